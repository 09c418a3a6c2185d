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


def train_setup(name: str, num_classes: int = 1000, recipe=None, device=None) -> dict:
    """What `dogbreeds train` builds for `name` on `device` (random init), from train's own
    functions and the Recipe defaults: {"model", "optimizer", "criterion", "autocast" (a context
    factory), "precision" ("bf16"/"fp32"), "channels_last", "grad_clip", "model_kwargs"}."""
    import torch

    from ..models.factory import create_model
    from ..train.optim import build_optimizer
    from ..train.recipe import Recipe
    from ..train.session import autocast_dtype, fast_layout_kwargs

    recipe = recipe or Recipe(model=name)
    device = device or torch.device("cpu")
    kwargs = fast_layout_kwargs(name) if recipe.fast_layout else {}
    model = create_model(name, num_classes=num_classes, **kwargs).to(device).train()
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = autocast_dtype(recipe.precision, device)
    autocast = contextlib.nullcontext if dtype is None else (lambda: torch.autocast(device.type, dtype=dtype))
    return {"model": model, "optimizer": build_optimizer(model, recipe),
            "criterion": torch.nn.CrossEntropyLoss(label_smoothing=recipe.augment.label_smoothing),
            "autocast": autocast, "precision": "bf16" if dtype is not None else "fp32",
            "channels_last": recipe.channels_last, "grad_clip": recipe.grad_clip, "model_kwargs": kwargs}


def _native_bf16(profile: dict | None) -> bool:
    from ..machine import has_native_bf16, machine_profile

    profile = profile or machine_profile()
    return has_native_bf16(profile["cpu"]["flags"])


def measure(name: str = "convnext_tiny", batch: int = 16, size: int = 224, steps: int = 3, log=print,
            profile: dict | None = None, bound_s: float = BOUND_S) -> dict:
    """Images/s of the loops at `batch`, `steps` timed steps each (after one warm-up step)."""
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
    times = {k: [] for k in loops}
    for i in range(steps):
        for k in (loops if i % 2 == 0 else list(loops)[::-1]):
            if k in timed_once and times[k]:
                continue
            start = time.perf_counter()
            loops[k]()
            times[k].append(time.perf_counter() - start)
    ips = {k: batch / float(np.median(v)) for k, v in times.items()}
    out = {"model": name, "batch": batch, "size": size, "steps": steps, "first_loss": first_losses,
           "images_per_s": ips, "notes": notes, "train_setup": {"precision": setup["precision"],
                                                                "channels_last": setup["channels_last"],
                                                                "model_kwargs": setup["model_kwargs"],
                                                                "optimizer": type(setup["optimizer"]).__name__},
           "train_loop": train_name}
    out["ratio"] = ips[train_name] / ips[PLAIN]  # against the fp32 loop (the older reports' ratio)
    out["ratio_bf16"] = ips[train_name] / ips[PLAIN_BF16] if PLAIN_BF16 in ips else None
    log(f"  training {name} batch {batch}: " + ", ".join(f"{k} {v:.2f} img/s" for k, v in ips.items())
        + f" -> {out['ratio']:.2f}x the fp32 loop"
        + (f", {out['ratio_bf16']:.2f}x the bf16 loop" if out["ratio_bf16"] else ""))
    return out
