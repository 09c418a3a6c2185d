"""Inference side by side: every path on the same batch, interleaved (A B C A B C ...), medians.

Paths per model (each labelled with the precision it computes in, and compared with the matmul
ceiling of that precision measured in the same rounds: see ceiling.py):
  timm eager NCHW        what a user gets by default (the baseline of every ratio)
  timm channels_last     the simplest lever
  timm channels_last + bf16 autocast
                         what a practised PyTorch user does (two lines); on a CPU whose machine
                         profile lists no native bf16 it is bounded (timed once; skipped at batches
                         its batch-1 time says would take over BOUND_S per call)
  dogbreeds torch        build_backend(engine="torch"): conv-MLP layout + channels_last
  dogbreeds engine       build_backend(engine="auto"): the default of predict/evaluate/serve
  onnxruntime plain      the timm model exported as is, default SessionOptions
  OpenVINO fp32 / bf16   the same plain export compiled by OpenVINO with its defaults and the
                         f32 or bf16 INFERENCE_PRECISION_HINT (threads as every path); the bf16
                         row computes in what OpenVINO reports it chose (f32 on CPUs without bf16)
  HF transformers        ConvNextForImageClassification / MobileNetV2ForImageClassification, random init
  Keras (torch backend)  keras.applications ConvNeXtTiny / MobileNetV2, weights=None, NHWC input
                         (optional, as OpenVINO: skipped, with a line saying so, when not installed)
  int8 (separate)        build_backend(engine="int8"): dynamic int8 matmuls; changes the numbers.
                         Where it quantised no operator (MobileNetV2: no matrix product but the
                         fp32 classifier) it is the fp32 graph, and is labelled so (fp32, a note)
  torch.compile          build_backend(engine="torch-compile"), only with --compile (minutes to compile)
Weights are random: speed does not depend on them. The int8 agreement check uses real photos.
"""
from __future__ import annotations

import functools
import importlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

BASELINE = "timm eager NCHW"
ENGINE = "dogbreeds engine (auto)"
INT8 = "int8 dynamic (separate path)"
TIMM_BF16 = "timm channels_last + bf16 autocast"
OPENVINO_FP32 = "OpenVINO fp32 (defaults)"
OPENVINO_BF16 = "OpenVINO bf16 hint (defaults)"
BOUND_S = 20.0  # a bounded path (emulated precision) is not run where one call would take longer
HF_CLASSES = {"convnext_tiny": ("ConvNextForImageClassification", "ConvNextConfig", {}),
              "mobilenetv2_100": ("MobileNetV2ForImageClassification", "MobileNetV2Config", {})}
KERAS_APPS = {"convnext_tiny": "ConvNeXtTiny", "mobilenetv2_100": "MobileNetV2"}
PEERS = ("transformers", "keras")  # optional: timed when installed, skipped with a note when not


@dataclass
class Path_:
    name: str
    run: Callable[[np.ndarray], object] | None  # None: unavailable (reason in note)
    note: str = ""
    times: dict[int, list[float]] = field(default_factory=dict)  # batch -> seconds per call
    precision: str = "fp32"  # what it computes in: its ceiling ("fp32", "bf16", "int8")
    bounded: bool = False  # emulated on this machine: timed once per batch, skipped where too slow
    notes: dict[int, str] = field(default_factory=dict)  # batch -> note for that batch only


@dataclass
class Result:
    model: str
    batch: int
    path: str
    ms: float | None
    images_per_s: float | None
    ratio: float | None
    fraction_of_ceiling: float | None  # of the ceiling sampled during this (model, batch)'s own rounds
    note: str = ""
    gflop_per_image: float = 0.0
    ceiling_gflops: float = 0.0  # the ceiling of `precision`, sampled in this (model, batch)'s rounds
    precision: str = "fp32"


def build_paths(name: str, cache_dir: Path, with_compile: bool, log=print,
                profile: dict | None = None, photos: list[Path] | None = None,
                choices: dict | None = None) -> tuple[list[Path_], float]:
    """Every path for timm model `name`; returns them and the model's GFLOP per 224 image.
    `profile` (machine.machine_profile()) says whether bf16 is native here (else bf16 is bounded);
    `photos`: the real photos "auto" probes its engines on (none: its fp32 fallback); what it
    chose goes into `choices[name]` and gives the engine row its precision."""
    import timm
    import torch

    from ..machine import has_native_bf16, machine_profile

    from ..infer.backend import build_backend
    from ..infer.export import write_onnx
    from ..infer.runtime_onnxruntime import OrtBackend
    from ..models.flops import count_gmacs

    torch.manual_seed(0)  # the same weights every run, so the cached exports are reused
    model = timm.create_model(name, pretrained=False).eval()
    model.dogbreeds_name = name
    gflop = 2 * count_gmacs(model, 224)
    paths = [Path_(BASELINE, _torch_call(model, channels_last=False))]
    paths.append(Path_("timm eager NCHW, 1 thread", _torch_call(model, channels_last=False, threads=1),
                       "sensitivity check: torch's thread barriers on a busy machine"))
    cl_model = timm.create_model(name, pretrained=False).eval()
    cl_model.load_state_dict(model.state_dict())
    paths.append(Path_("timm channels_last", _torch_call(cl_model.to(memory_format=torch.channels_last), True)))
    native_bf16 = has_native_bf16((profile or machine_profile())["cpu"]["flags"])
    paths.append(Path_(TIMM_BF16, _torch_call(cl_model, True, autocast=torch.bfloat16), precision="bf16",
                       bounded=not native_bf16,
                       note="" if native_bf16 else "bounded: the machine profile lists no native bf16 (emulated)"))
    paths.append(_try("dogbreeds torch (conv-MLP, channels_last)", lambda: build_backend(model, engine="torch").forward, log))
    engine = [None]

    def make_engine():
        from ..infer.backend import info_for_model

        start = time.perf_counter()
        info = info_for_model(model)
        info.photos = list(photos) if photos else None
        engine[0] = build_backend(model, engine="auto", info=info, cache_dir=cache_dir)
        log(f"  {name}: engine built in {time.perf_counter() - start:.1f}s ({engine[0]})")
        return engine[0].forward
    paths.append(_try(ENGINE, make_engine, log))
    record = getattr(engine[0], "auto_choice", None) if engine[0] is not None else None
    if record:
        paths[-1].precision = record.get("precision") or "fp32"
        paths[-1].note = f"auto chose {record.get('engine')} ({paths[-1].precision})"
        if choices is not None:
            choices[name] = record

    def plain_export() -> Path:
        plain = cache_dir / f"{name}-plain.onnx"
        if not plain.is_file():
            write_onnx(model, plain, input_size=224)
        return plain
    paths.append(_try("onnxruntime plain (default options)", lambda: OrtBackend(plain_export(), tuned=False).forward, log))
    paths += openvino_paths(plain_export, log)
    paths += peer_paths(name, log)
    int8 = []

    def make_int8():
        int8.append(build_backend(model, engine="int8", cache_dir=cache_dir, quiet=True))
        return int8[0].forward
    paths.append(_try(INT8, make_int8, log))
    paths[-1].precision = "int8"
    if int8 and int8[0].not_quantised:  # the fp32 graph under the int8 label: timed, but labelled what it is
        paths[-1].precision = "fp32"
        paths[-1].note = f"nothing quantised: {int8[0].not_quantised}"
        log(f"  {name}: {INT8}: {paths[-1].note}")
    if with_compile:
        compiled = []

        def make_compiled():
            compiled.append(build_backend(model, engine="torch-compile"))
            return compiled[0].forward
        path = _try("torch.compile (inductor, freezing)", make_compiled, log)
        if compiled:
            path.note = "compile time: see log"
            path.compiled = compiled[0]
        paths.append(path)
    return paths, gflop


def peer_paths(name: str, log=print) -> list[Path_]:
    """The other libraries' implementations of `name` (HF transformers, Keras 3). Both are
    optional: a library that is not installed gives a skipped row and one line of log, never
    an error, so the bench runs on an install without them."""
    makers = {"transformers": ("HF transformers", _hf_call), "keras": ("Keras 3 (torch backend)", _keras_call)}
    paths = []
    for module, (label, make) in makers.items():
        if not peer_installed(module):
            note = f"skipped: {module} is not installed (pip install {module} to time it)"
            log(f"  {label}: {note}")
            paths.append(Path_(label, None, note))
        else:
            paths.append(_try(label, lambda make=make: make(name), log))
    return paths


def openvino_paths(export: Callable[[], Path], log=print) -> list[Path_]:
    """OpenVINO as a user would run it: `Core().compile_model(onnx, "CPU", {hint})` on the plain
    export, fp32 and bf16 hints; the bf16 row computes in what OpenVINO says it chose. Skipped
    with a message when openvino is not installed."""
    labels = {OPENVINO_FP32: "f32", OPENVINO_BF16: "bf16"}
    if not peer_installed("openvino"):
        note = 'skipped: openvino is not installed (pip install -e ".[openvino]" to time it)'
        log(f"  OpenVINO: {note}")
        return [Path_(label, None, note) for label in labels]
    paths = []
    for label, hint in labels.items():
        chosen = []

        def make(hint=hint, chosen=chosen):
            run, precision = _openvino_call(export(), hint)
            chosen.append(precision)
            return run
        path = _try(label, make, log)
        if chosen:
            path.precision = chosen[0]
            if hint == "bf16" and chosen[0] != "bf16":
                path.note = f"OpenVINO computes in {chosen[0]} on this CPU when asked for bf16"
        paths.append(path)
    return paths


def _openvino_call(onnx_path: Path, hint: str):
    import torch

    from ..infer.runtime_openvino import openvino_core
    from .ceiling import openvino_precision

    compiled = openvino_core().compile_model(str(onnx_path), "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                                     "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    precision = {"f32": "fp32"}.get(openvino_precision(compiled), openvino_precision(compiled))
    request = compiled.create_infer_request()

    def run(batch: np.ndarray):
        return request.infer({0: batch})
    return run, precision


def peer_installed(module: str) -> bool:
    """Whether an optional peer library imports (not just whether a folder of that name exists)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _try(name: str, make, log) -> Path_:
    """A path whose set-up failed stays in the table as 'unavailable', with the reason."""
    try:
        return Path_(name, make())
    except Exception as exc:  # any library's failure: reported, never hidden
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        log(f"  {name}: unavailable ({reason})")
        return Path_(name, None, f"unavailable: {reason}")


def _torch_call(model, channels_last: bool, threads: int | None = None, autocast=None):
    import contextlib

    import torch

    def run(batch: np.ndarray):
        x = torch.from_numpy(batch)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            cast = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
            with torch.inference_mode(), cast:
                return model(x)
        finally:
            torch.set_num_threads(before)
    return run


def _hf_call(name: str):
    import torch
    import transformers

    model_cls, config_cls, extra = HF_CLASSES[name]
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(num_labels=1000, **extra)).eval()

    def run(batch: np.ndarray):
        with torch.inference_mode():
            return model(pixel_values=torch.from_numpy(batch)).logits
    return run


def _keras_call(name: str):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    import torch

    if keras.backend.backend() != "torch":
        raise RuntimeError(f"keras was already imported with the {keras.backend.backend()!r} backend; "
                           "run the benchmark with KERAS_BACKEND=torch")
    model = getattr(keras.applications, KERAS_APPS[name])(weights=None, input_shape=(224, 224, 3), classes=1000)
    nhwc = {}

    def run(batch: np.ndarray):
        # Keras applications take NHWC; the transpose is done once per batch, outside the timing.
        key = batch.__array_interface__["data"][0]
        if key not in nhwc:
            nhwc[key] = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 2, 3, 1)))
        with torch.no_grad():
            return model(nhwc[key], training=False)
    return run


def measure(models: list[str], batches: list[int], rounds: int, cache_dir: Path, with_compile: bool,
            ceiling, log=print, profile: dict | None = None, bound_s: float = BOUND_S,
            photos: list[Path] | None = None, choices: dict | None = None) -> list[Result]:
    """Time every path of every model at every batch size, interleaved, and sample the ceilings
    once per round; return one Result per (model, batch, path), each against the ceiling of the
    precision it computes in. A bounded path (an emulated precision) is timed once after its
    warm-up, outside the rounds, and skipped at a batch its smaller batches say would take over
    `bound_s` per call. Every timed call comes after an untimed RUNTIME_SETTLE_S pause."""
    from ..infer.backend import RUNTIME_SETTLE_S

    results = []
    rng = np.random.default_rng(0)
    for name in models:
        paths, gflop = build_paths(name, cache_dir, with_compile, log, profile, photos, choices)
        live = [p for p in paths if p.run is not None]
        per_image: dict[str, float] = {}  # bounded paths: seconds per image at the last batch timed
        for batch in batches:
            x = rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)
            group = []
            for p in live:
                if p.bounded and p.name in per_image and per_image[p.name] * batch > bound_s:
                    p.notes[batch] = (f"skipped at batch {batch}: {p.note.removeprefix('bounded: ')}; one call at a "
                                      f"smaller batch took {per_image[p.name]:.2f} s per image, so this batch would "
                                      f"take about {per_image[p.name] * batch:.0f} s (bound {bound_s:g} s)")
                    log(f"  {name} {p.name}: {p.notes[batch]}")
                    continue
                start = time.perf_counter()  # warm-up (and, for torch.compile, the compilation)
                p.run(x)
                first = time.perf_counter() - start
                if getattr(p, "compiled", None) is not None:
                    p.note = f"first call (compile) {first:.0f}s"
                if not p.bounded:
                    group.append(p)
                elif first > bound_s:  # too slow for a second call: the first one (warm-up included) is the time
                    p.times[batch] = [first]
                    p.notes[batch] = f"one call, its warm-up included, over the {bound_s:g} s bound ({p.note})"
                else:  # one timed call after the warm-up, outside the rounds
                    start = time.perf_counter()
                    p.run(x)
                    p.times[batch] = [time.perf_counter() - start]
                    p.notes[batch] = f"timed once after a warm-up ({p.note})"
                if p.bounded:
                    per_image[p.name] = p.times[batch][0] / batch
            first_sample = ceiling.rounds
            for r in range(rounds * 3 if batch == 1 else rounds):  # batch 1 is cheap: more rounds
                order = group if r % 2 == 0 else group[::-1]  # alternate the order: no path always runs first
                for p in order:
                    time.sleep(RUNTIME_SETTLE_S)  # untimed: the previous path's spinning threads settle
                    start = time.perf_counter()
                    p.run(x)
                    p.times.setdefault(batch, []).append(time.perf_counter() - start)
                ceiling.sample()
            # the ceilings of this group's own rounds: the same load from other processes
            base_path = next(p for p in paths if p.name == BASELINE)
            base = np.median(base_path.times[batch]) if base_path.times.get(batch) else None
            for p in paths:
                top = ceiling.since(p.precision, first_sample) or 0.0
                note = p.notes.get(batch, p.note)
                if p.run is None or not p.times.get(batch):
                    results.append(Result(name, batch, p.name, None, None, None, None, note, gflop, top, p.precision))
                    continue
                seconds = float(np.median(p.times[batch]))
                ips = batch / seconds
                results.append(Result(name, batch, p.name, seconds * 1000, ips, base / seconds if base else None,
                                      ips * gflop / top if top else None, note, gflop, top, p.precision))
            log(f"  {name} batch {batch}: " + ", ".join(f"{r.path} {r.ratio:.2f}x" for r in results[-len(paths):] if r.ratio))
    return results


def op_profile(onnx_path: Path, batch: int, size: int = 224) -> dict[str, float]:
    """Share of onnxruntime kernel time per operator type (tuned session, one profiled call after a
    warm-up). 1x1 and depthwise convolutions are told apart by their node names (timm's)."""
    import json

    import onnxruntime as ort

    from ..infer.backend import physical_cores

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = physical_cores()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    options.profile_file_prefix = str(onnx_path.parent / "ort_profile")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    session.run(None, {session.get_inputs()[0].name: x})
    profile = Path(session.end_profiling())
    totals: dict[str, float] = {}
    for event in json.loads(profile.read_text()):
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op = event["args"]["op_name"]
        if op == "Conv":
            op = "Conv depthwise 7x7" if "conv_dw" in event["name"] else ("Conv 1x1 (MLP)" if "mlp" in event["name"]
                                                                          or "/Mul_output" in event["name"] else "Conv other")
        totals[op] = totals.get(op, 0.0) + event["dur"]
    profile.unlink(missing_ok=True)
    whole = sum(totals.values()) or 1.0
    return {op: t / whole for op, t in sorted(totals.items(), key=lambda kv: -kv[1])}


def sample_photos(root: Path, count: int) -> list[Path]:
    """`count` real photos spread over the breeds of a Stanford Dogs layout (deterministic)."""
    files = sorted((root / "Images").glob("*/*.jpg"))
    if not files:
        raise FileNotFoundError(f"no photos under {root}/Images/*/*.jpg; pass --photos pointing at Stanford Dogs")
    step = max(1, len(files) // count)
    return files[::step][:count]


def int8_agreement(photos: list[Path], cache_dir: Path, keras_weights: Path | None, log=print) -> list[dict]:
    """Top-1 agreement of the int8 path with fp32 on real photos, for a trained MobileNetV2
    (the real Keras weights, if present) and a random-init ConvNeXt-T (argmax over 1000 logits:
    a weaker test, since random logits are close together)."""
    import timm

    from ..data.decode import decode_image
    from ..infer.backend import build_backend
    from ..infer.preprocess_np import NumpyEvalTransform
    from ..models.factory import create_model, set_preprocessing

    subjects = []
    if keras_weights is not None and keras_weights.is_file():
        subjects.append((KERAS_LABEL, keras_mobilenet(keras_weights)))
    else:
        log(f"  int8 agreement: no real MobileNetV2 weights at {keras_weights}; skipped")
    import torch

    torch.manual_seed(0)
    convnext = set_preprocessing(timm.create_model("convnext_tiny", pretrained=False).eval(),
                                 create_model("convnext_tiny").preprocessing)
    subjects.append(("ConvNeXt-T, random init (1000 logits)", convnext))
    rows = []
    for label, model in subjects:
        model.eval()
        transform = NumpyEvalTransform(model.preprocessing)
        batch = np.stack([transform(decode_image(p)) for p in photos])
        fp32 = build_backend(model, engine="auto", cache_dir=cache_dir)
        int8 = build_backend(model, engine="int8", cache_dir=cache_dir, quiet=True)
        a = np.concatenate([fp32.forward(batch[i:i + 16]) for i in range(0, len(batch), 16)])
        b = np.concatenate([int8.forward(batch[i:i + 16]) for i in range(0, len(batch), 16)])
        agree = float((a.argmax(1) == b.argmax(1)).mean())
        rows.append({"model": label, "photos": len(photos), "top1_agreement": agree,
                     "max_abs_logit_diff": float(np.abs(a - b).max()), "quantised_ops": int8.quantised_ops,
                     "not_quantised": int8.not_quantised})
        log(f"  int8 agreement {label}: {agree:.1%} on {len(photos)} photos"
            + (f" ({int8.not_quantised})" if int8.not_quantised else f", {int8.quantised_ops} int8 operators"))
    return rows


KERAS_LABEL = "MobileNetV2, real Keras weights (19 breeds, 160 px)"


@functools.lru_cache(maxsize=1)
def keras_mobilenet(keras_weights: Path):
    """The trained MobileNetV2 of the Keras file, read once per bench run (int8_agreement and
    real_weights_choice both use it; neither changes it)."""
    from ..models.factory import create_model

    return create_model(None, num_classes=19, weights=keras_weights).eval()


def real_weights_choice(photos: list[Path], cache_dir: Path, keras_weights: Path | None, log=print) -> dict:
    """What "auto" chooses for a trained model: the real Keras MobileNetV2 probed on the bench's real
    photos, as predict, evaluate and serve probe a run on its validation photos. The speed rows use
    random weights, whose nearly uniform probabilities pass the agreement rule in any precision;
    trained weights are where bf16 or int8 can move an answer. {label: auto's record}, {} without
    the weights."""
    from ..infer.backend import build_backend, info_for_model

    if keras_weights is None or not keras_weights.is_file() or not photos:
        return {}
    model = keras_mobilenet(keras_weights)
    info = info_for_model(model)
    info.photos = list(photos)
    backend = build_backend(model, engine="auto", info=info, cache_dir=cache_dir)
    record = getattr(backend, "auto_choice", None)
    log(f"  {KERAS_LABEL}: auto chose {record.get('engine') if record else backend.kind}")
    return {KERAS_LABEL: record} if record else {}


def plot(results: list[Result], path: Path) -> None:
    import matplotlib.ticker

    from ..plotting import pyplot, save_figure

    plt = pyplot()

    groups = sorted({(r.model, r.batch) for r in results}, key=lambda g: (g[0], g[1]))
    names = list(dict.fromkeys(r.path for r in results))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4.6), squeeze=False)
    for ax, (model, batch) in zip(axes[0], groups):
        rows = {r.path: r for r in results if r.model == model and r.batch == batch}
        values = [rows[n].ratio or 0 if n in rows else 0 for n in names]
        colors = ["tab:orange" if n == ENGINE else "tab:gray" if n == INT8 else
                  "tab:green" if n in rows and rows[n].precision == "bf16" else "tab:blue" for n in names]
        # bars grow from 1x (as fast as timm eager) to the left or right
        ax.barh(range(len(names)), [v - 1 if v else 0 for v in values], left=1, color=colors)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names if ax is axes[0][0] else [""] * len(names), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{model}, batch {batch}", fontsize=9)
        ax.set_xscale("log")
        shown = [v for v in values if v] + [1.0]
        every = (1 / 256, 1 / 64, 1 / 16, 0.25, 1, 4, 16, 64, 256)
        low = max([t for t in every if t <= min(shown)] or [every[0]])
        ticks = [t for t in every if low <= t <= max(shown) * 4]
        ax.set_xlim(min(ticks), max(ticks) * 1.6)
        ax.set_xticks(ticks, [f"{t:g}" if t >= 0.25 else f"1/{1 / t:.0f}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("speed vs timm eager NCHW (x, log scale)")
        for i, v in enumerate(values):
            ax.text(v if v else 1.0, i, f" {v:.2f}" if v else " n/a", va="center", fontsize=7)
    fig.suptitle("Inference throughput relative to timm eager (same run, medians; green: bf16, gray: int8)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
