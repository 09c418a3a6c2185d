"""Training-step speed: what `dogbreeds train` runs against plain timm loops, interleaved step by step.

plain timm loop, fp32:          timm model in NCHW, torch.optim.AdamW defaults, CE loss.
plain timm loop, bf16 autocast: the same under torch.autocast(bfloat16) (what a practised user adds).
dogbreeds train setup:          built by `train_setup` from the functions `train` itself calls, with
                                the Recipe defaults: the model layout (`fast_layout_kwargs`), the
                                memory format (`Recipe.channels_last`), the precision (`autocast_dtype`,
                                the same decision train makes on this machine: bf16 autocast where it
                                pays, else fp32), the optimizer (`build_optimizer`: timm AdamW with layer
                                decay), label-smoothed CE and gradient clipping, as in train's loop.

On a CPU whose profile lists no native bf16, torch emulates bf16 (many times slower than fp32):
the bf16 loop is then bounded: one bf16 forward at batch 1 against one in fp32 gives the slowdown,
and a bf16 step is timed only if the step it predicts stays under `bound_s`; otherwise it is
reported as skipped with those measured numbers.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np

PLAIN = "plain timm loop, fp32"
PLAIN_BF16 = "plain timm loop, bf16 autocast"
TRAIN = "dogbreeds train setup"
BOUND_S = 60.0


def prepare_for_training(model):
    """The same network, laid out to train faster on CPU: ConvNeXt blocks with 1x1-conv MLPs
    (identical weights, reshaped; checked against the original) in channels_last memory.
    Other models only get channels_last. Returns the model in train mode.

    For the training loop, the equivalent is `create_model(name, ..., conv_mlp=True)` for
    ConvNeXt names (the kwarg travels in the checkpoint sidecar) plus `model.to(memory_format=
    torch.channels_last)` and channels_last inputs."""
    import torch

    from ..infer.runtime_torch import inference_layout

    was_training = model.training
    model = inference_layout(model)
    return model.train(was_training).to(memory_format=torch.channels_last)


def training_optimizer(params, lr: float = 1e-3, weight_decay: float = 0.05):
    import torch

    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


# Untimed steps before the timed ones. Two, not one: on a 2-core CPU with AMX-BF16 the second step of train's setup (a fresh
# model and optimizer) still took 1.7x its later steps (2.33 s against 1.31-1.36 s; the plain bf16 loop 1.78 s
# against 1.72-1.82 s: settled after one), so one warm-up step let a start-up cost into the median of three.
WARMUP_STEPS = 2


def train_setup(name: str, num_classes: int = 1000, recipe=None, device=None, conv_mlp: bool | None = None,
                fp32_depthwise: bool | None = None) -> dict:
    """What `dogbreeds train` builds for `name` on `device` (random init), from train's own
    functions and the Recipe defaults: {"model", "optimizer", "criterion", "autocast" (a context
    factory), "precision" ("bf16"/"fp32"), "channels_last", "grad_clip", "model_kwargs", "layout",
    "depthwise"}. The MLP layout is train's own per-machine choice (train/layout_probe.py, cached) unless
    `conv_mlp` forces one (where the model has the switch); so is, in bf16, the precision of the depthwise
    convolutions (train/depthwise_probe.py) unless `fp32_depthwise` forces it."""
    import torch

    from ..models.depthwise import keep_depthwise_fp32
    from ..models.factory import create_model
    from ..train.depthwise_probe import CHOICE, depthwise_for_run
    from ..train.layout_probe import layout_for_run
    from ..train.optim import build_optimizer
    from ..train.recipe import Recipe
    from ..train.precision_probe import precision_for_run
    from ..train.session import fast_layout_kwargs

    recipe = recipe or Recipe(model=name)
    device = device or torch.device("cpu")
    dtype, precision_record = precision_for_run(recipe, device)
    layout = None
    if conv_mlp is not None:
        kwargs = fast_layout_kwargs(name) if conv_mlp else {}
    elif recipe.fast_layout:
        layout = layout_for_run(recipe, device, dtype, None)
        kwargs = layout["model_kwargs"] if layout else {}
    else:
        kwargs = {}
    model = create_model(name, num_classes=num_classes, **kwargs).to(device).train()
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    depthwise = depthwise_for_run(recipe, model, device, dtype, kwargs)  # train's per-machine choice (cached)
    if depthwise is not None and fp32_depthwise is not None:
        depthwise = {CHOICE: fp32_depthwise, "why": "forced"}
    if depthwise and depthwise[CHOICE]:
        keep_depthwise_fp32(model)
    autocast = contextlib.nullcontext if dtype is None else (lambda: torch.autocast(device.type, dtype=dtype))
    return {"model": model, "optimizer": build_optimizer(model, recipe),
            "criterion": torch.nn.CrossEntropyLoss(label_smoothing=recipe.augment.label_smoothing),
            "autocast": autocast, "precision": "bf16" if dtype is not None else "fp32",
            "channels_last": recipe.channels_last, "grad_clip": recipe.grad_clip, "model_kwargs": kwargs,
            "layout": layout, "precision_why": (precision_record or {}).get("why"), "depthwise": depthwise}


def _native_bf16(profile: dict | None) -> bool:
    from ..machine import has_native_bf16, machine_profile

    profile = profile or machine_profile()
    return has_native_bf16(profile["cpu"]["flags"])


def measure(name: str = "convnext_tiny", batch: int = 16, size: int = 224, steps: int = 3, log=print,
            profile: dict | None = None, bound_s: float = BOUND_S) -> dict:
    """Images/s of the loops at `batch`, `steps` timed steps each (after WARMUP_STEPS untimed ones)."""
    import timm
    import torch

    torch.manual_seed(0)
    plain = timm.create_model(name, pretrained=False, num_classes=1000).train()
    plain_bf16 = timm.create_model(name, pretrained=False, num_classes=1000).train()
    plain_bf16.load_state_dict(plain.state_dict())
    torch.manual_seed(0)
    setup = train_setup(name, num_classes=1000)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    ce = torch.nn.CrossEntropyLoss()
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731

    def plain_step(model, opt, autocast):
        def step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = ce(model(x), y)
            loss.backward()
            opt.step()
            return float(loss.detach())
        return step

    train_x = x.contiguous(memory_format=torch.channels_last) if setup["channels_last"] else x
    trainable = [p for p in setup["model"].parameters() if p.requires_grad]

    def train_step():
        opt = setup["optimizer"]
        opt.zero_grad(set_to_none=True)
        with setup["autocast"]():
            loss = setup["criterion"](setup["model"](train_x), y)
        loss.backward()
        if setup["grad_clip"] is not None:
            torch.nn.utils.clip_grad_norm_(trainable, setup["grad_clip"])
        opt.step()
        return float(loss.detach())

    loops = {PLAIN: plain_step(plain, torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.05),
                               contextlib.nullcontext),
             PLAIN_BF16: plain_step(plain_bf16, torch.optim.AdamW(plain_bf16.parameters(), lr=1e-3, weight_decay=0.05), bf16),
             f"{TRAIN} ({setup['precision']})": train_step}
    train_name = list(loops)[-1]
    notes = {}
    warm = {}
    first_losses = {}
    for k in (PLAIN, train_name):
        start = time.perf_counter()
        first_losses[k] = loops[k]()
        warm[k] = time.perf_counter() - start
    timed_once = set()
    if not _native_bf16(profile):
        # bounded: predict a bf16 step from one bf16 forward at batch 1 against one in fp32
        probe = timm.create_model(name, pretrained=False, num_classes=1000).eval()
        one = x[:1]
        with torch.inference_mode():
            probe(one)
            start = time.perf_counter()
            probe(one)
            fp32_s = time.perf_counter() - start
            with bf16():
                start = time.perf_counter()
                probe(one)
                bf16_s = time.perf_counter() - start
        slowdown = bf16_s / fp32_s
        predicted = slowdown * warm[PLAIN]
        reason = (f"the machine profile lists no native bf16: one bf16-autocast forward at batch 1 took {bf16_s:.2f} s "
                  f"against {fp32_s:.3f} s in fp32 ({slowdown:.0f}x)")
        if predicted > bound_s:
            notes[PLAIN_BF16] = f"skipped: {reason}, so one step at batch {batch} would take about {predicted:.0f} s"
            log(f"  {PLAIN_BF16}: {notes[PLAIN_BF16]}")
            del loops[PLAIN_BF16]
        else:
            notes[PLAIN_BF16] = f"timed once after a warm-up step (bounded: {reason})"
            timed_once.add(PLAIN_BF16)
    if PLAIN_BF16 in loops:
        start = time.perf_counter()
        first_losses[PLAIN_BF16] = loops[PLAIN_BF16]()
        warm[PLAIN_BF16] = time.perf_counter() - start
    for _ in range(WARMUP_STEPS - 1):  # the rest of the warm-up, untimed, for every loop timed more than once
        for k in loops:
            if k not in timed_once:
                loops[k]()
    times = {k: [] for k in loops}
    for i in range(steps):
        for k in (loops if i % 2 == 0 else list(loops)[::-1]):
            if k in timed_once and times[k]:
                continue
            start = time.perf_counter()
            loops[k]()
            times[k].append(time.perf_counter() - start)
    ips = {k: batch / float(np.median(v)) for k, v in times.items()}
    gflop = _step_gflop_per_image(plain, x)
    out = {"model": name, "batch": batch, "size": size, "steps": steps, "warmup_steps": WARMUP_STEPS,
           "first_loss": first_losses,
           "images_per_s": ips, "notes": notes, "train_setup": {"precision": setup["precision"],
                                                                "channels_last": setup["channels_last"],
                                                                "model_kwargs": setup["model_kwargs"],
                                                                "layout_why": (setup["layout"] or {}).get("why"),
                                                                "precision_why": setup.get("precision_why"),
                                                                "depthwise": setup["depthwise"],
                                                                "optimizer": type(setup["optimizer"]).__name__},
           "train_loop": train_name, "gflop_per_image": gflop,
           "precisions": {PLAIN: "fp32", PLAIN_BF16: "bf16", train_name: setup["precision"]}}
    out["ratio"] = ips[train_name] / ips[PLAIN]  # against the fp32 loop (the older reports' ratio)
    out["ratio_bf16"] = ips[train_name] / ips[PLAIN_BF16] if PLAIN_BF16 in ips else None
    log(f"  training {name} batch {batch}: " + ", ".join(f"{k} {v:.2f} img/s" for k, v in ips.items())
        + f" -> {out['ratio']:.2f}x the fp32 loop"
        + (f", {out['ratio_bf16']:.2f}x the bf16 loop" if out["ratio_bf16"] else ""))
    return out


def _step_gflop_per_image(model, x) -> float:
    """FLOPs / 1e9 per image of one training step (`models.flops.count_training_gflop`: 3x the
    forward), counted at batch 2 (FLOPs grow linearly with the batch)."""
    from ..models.flops import count_training_gflop

    return count_training_gflop(model, x[:2]) / 2


# --- train's settings one at a time (benchmarks/bench_train_step.py --settings) ----------------------

OPTIMIZER_IMPLS = ("default", "foreach", "fused")  # torch AdamW's implementations; "default" is what train builds
DEFAULT_SETTING = {"channels_last": True, "fast_layout": True, "optimizer": "default", "fp32_depthwise": None}


def setting_variants(name: str) -> dict[str, dict]:
    """{label: setting} for `name`: train's defaults, then each setting changed alone
    (channels_last off; ConvNeXt's conv_mlp off where train turns it on; foreach / fused AdamW; in bf16, the
    depthwise convolutions in the precision train's probe did not choose)."""
    from ..train.session import fast_layout_kwargs

    variants = {"train default": dict(DEFAULT_SETTING),
                "channels_last off": dict(DEFAULT_SETTING, channels_last=False)}
    if fast_layout_kwargs(name):
        variants["conv_mlp off (timm's Linear MLPs)"] = dict(DEFAULT_SETTING, fast_layout=False)
    variants["foreach AdamW"] = dict(DEFAULT_SETTING, optimizer="foreach")
    variants["fused AdamW"] = dict(DEFAULT_SETTING, optimizer="fused")
    variants["depthwise in bf16"] = dict(DEFAULT_SETTING, fp32_depthwise=False)
    variants["depthwise in fp32"] = dict(DEFAULT_SETTING, fp32_depthwise=True)
    return variants


def with_implementation(optimizer, impl: str):
    """The same AdamW (train's parameter groups: layer decay, no decay on norms) with torch's
    `impl` implementation: "default" (what torch picks: the per-tensor loop on CPU), "foreach"
    or "fused"."""
    import torch

    if impl == "default":
        return optimizer
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"unknown AdamW implementation {impl!r}; choose one of {', '.join(OPTIMIZER_IMPLS)}")
    groups = [{k: v for k, v in g.items() if k not in ("foreach", "fused")} for g in optimizer.param_groups]
    defaults = {k: v for k, v in optimizer.defaults.items() if k in ("lr", "betas", "eps", "weight_decay", "amsgrad")}
    return torch.optim.AdamW(groups, **defaults, **{impl: True})


def _step_fn(model, optimizer, criterion, x, y, autocast=None, grad_clip=None):
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    autocast = autocast or contextlib.nullcontext

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = criterion(model(x), y)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        optimizer.step()
        return float(loss.detach())
    return step


def interleaved(loops: dict, rounds: int, reference: str, clock=time.perf_counter) -> dict:
    """Time `loops` (label -> step callable) in `rounds` rounds, each running every loop once (the
    order reversed every other round, so a load change falls on all alike). Returns {label:
    {"seconds": [...], "median_s", "ratio": median over rounds of reference's time / this loop's
    time (> 1: faster than the reference)}}. Pure except for the calls: unit-tested with a fake clock."""
    names = list(loops)
    seconds = {k: [] for k in names}
    for i in range(rounds):
        for k in (names if i % 2 == 0 else names[::-1]):
            start = clock()
            loops[k]()
            seconds[k].append(clock() - start)
    out = {}
    for k in names:
        ratios = [r / s for r, s in zip(seconds[reference], seconds[k]) if s > 0]
        out[k] = {"seconds": [round(s, 4) for s in seconds[k]], "median_s": float(np.median(seconds[k])),
                  "ratio": float(np.median(ratios)) if ratios else None}
    return out


def measure_settings(name: str, batch: int = 8, size: int = 224, rounds: int = 3, threads: int | None = None,
                     num_classes: int = 20, variants: dict | None = None, log=print) -> dict:
    """Training-step images/s of train's setup with each setting of `setting_variants` against the
    plain timm fp32 loop (timm model in NCHW, torch AdamW defaults, CE), interleaved, after one
    warm-up step each, at `threads` intra-op threads (default: torch's, which is what train runs at)."""
    import timm
    import torch

    from ..train.recipe import Recipe

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, num_classes, (batch,))
    plain = timm.create_model(name, pretrained=False, num_classes=num_classes).train()
    loops = {PLAIN: _step_fn(plain, torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.05),
                             torch.nn.CrossEntropyLoss(), x, y)}
    built = {}
    for label, setting in (variants or setting_variants(name)).items():
        recipe = Recipe(model=name, channels_last=setting["channels_last"], fast_layout=setting["fast_layout"])
        torch.manual_seed(0)
        setup = train_setup(name, num_classes=num_classes, recipe=recipe, conv_mlp=setting["fast_layout"],
                            fp32_depthwise=setting.get("fp32_depthwise"))
        if setting.get("fp32_depthwise") is not None and setup["depthwise"] is None:
            continue  # fp32 training or no depthwise convolution: the same loop as train's default
        optimizer = with_implementation(setup["optimizer"], setting["optimizer"])
        inputs = x.contiguous(memory_format=torch.channels_last) if setup["channels_last"] else x
        loops[label] = _step_fn(setup["model"], optimizer, setup["criterion"], inputs, y, setup["autocast"],
                                setup["grad_clip"])
        built[label] = {**setting, "precision": setup["precision"], "model_kwargs": setup["model_kwargs"],
                        "depthwise": setup["depthwise"],
                        "optimizer_class": type(optimizer).__name__}
    first_loss, warm_s = {}, {}
    for label, step in loops.items():
        start = time.perf_counter()
        first_loss[label] = round(step(), 4)
        warm_s[label] = round(time.perf_counter() - start, 2)
    timed = interleaved(loops, rounds, PLAIN)
    result = {"model": name, "batch": batch, "size": size, "rounds": rounds, "threads": torch.get_num_threads(),
              "settings": built, "first_loss": first_loss, "warmup_s": warm_s,
              "loops": {k: {**v, "images_per_s": batch / v["median_s"]} for k, v in timed.items()}}
    for k, v in result["loops"].items():
        log(f"  {name} b{batch} {size}px {result['threads']}t: {k}: {v['images_per_s']:.2f} img/s, "
            f"{v['ratio']:.2f}x the plain loop (per-round ratios' median)")
    return result
