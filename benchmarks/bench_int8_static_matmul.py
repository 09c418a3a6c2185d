"""Static int8 of ConvNeXt's MLP matrix products alone vs the shipped dynamic int8, side by side.

The "int8" engine (runtime_onnxruntime.quantize_int8) quantises the 36 MLP MatMuls of the Linear-MLP
export dynamically: at batch 16 onnxruntime's DynamicQuantizeMatMul is 61% of ConvNeXt-T's time, partly
passes over the activations to find their range and quantise them at run time (docs/performance.md,
"Where ConvNeXt-T's time goes in onnxruntime"). Here the same MatMuls get STATIC activation scales
(onnxruntime.quantization.quantize_static, op_types_to_quantize=["MatMul"], the classifier excluded:
classifier_nodes; convolutions, GELU, LayerNorm stay fp32), calibrated (min/max) on real photos of the
train split of --split-run's split.json, in up to three variants:

    static-qdq-pc   QDQ, weights per channel, fp32 product outputs (onnxruntime fuses DQ + MatMul + bias Add
                    into MatMulIntegerToFloat: one quantising pass over the input, none over the output)
    static-qdq-pt   the same, weights per tensor
    static-qop-pt   QOperator, weights per tensor: QLinearMatMul, whose u8 output is dequantised again
                    (what QDQ gives too when the outputs are quantised, the quantiser's default)

Activations u8, weights s8.
Weights use 7 bits (reduce_range) on CPUs without VNNI/AMX-INT8, as the project's int8-static engine does.
Every file runs in the session the project makes for its int8 engine (runtime_onnxruntime.session via
OrtBackend: every graph optimisation, sequential, sleeping worker threads, --threads threads).

1. ConvNeXt-T (timm, random init: what `dogbreeds bench` uses; --classes logits) at --size px: after one
   warm-up call each, --rounds rounds time one batch of --batch per variant (the order reversed every other
   round); median per variant, ratio vs dynamic int8. Outputs vs the fp32 engine's export on
   --eval-photos test-split photos (none of them calibration photos): max |logit diff|, max |prob diff|,
   top-1 agreement. Also the operators onnxruntime runs after its fusions (integer kernels, Q/DQ left).
2. With --run RUN (a trained run): the same files from its checkpoint, at its own input size,
   calibrated on the train-split photos of its own split.json, compared on every photo of its test split
   (top-1 agreement, accuracy against the labels, max diffs) and timed at --batch.

The load average is printed at the start and end (the machine is shared).

    nice -n 5 python benchmarks/bench_int8_static_matmul.py --threads 2 --batch 16 --rounds 6 --run runs/trust_atto
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from dogbreeds.machine import load_average

VARIANTS = ("static-qdq-pc", "static-qdq-pt", "static-qop-pt")
FP32, DYNAMIC = "fp32 (onnxruntime engine)", "dynamic int8 (int8 engine)"
SHOWN_OPS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QuantizeLinear",
             "DequantizeLinear", "DynamicQuantizeLinear", "MatMul", "FusedMatMul", "Gemm")


def spread(photos: list[Path], count: int, skip: set[Path] = frozenset()) -> list[Path]:
    """`count` photos taken evenly over the list (the lists are sorted by breed), none of `skip`."""
    photos = [p for p in photos if p not in skip]
    if count >= len(photos):
        return photos
    step = len(photos) / count
    return [photos[int(i * step)] for i in range(count)]


def static_matmul_int8(linear: Path, out: Path, variant: str, calibration: np.ndarray, cache: Path,
                       batch: int = 8) -> None:
    """quantize_static of the MatMuls of `linear` (a Linear-MLP export) but the classifier, into `out`
    (with the fp32 file's metadata, as the project's quantisers write them); activation ranges from
    `calibration` (N x 3 x S x S), cached in `cache` so that every variant uses the same ranges."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from dogbreeds.infer.onnx_format import INPUT_NAME
    from dogbreeds.infer.runtime_onnxruntime import _quantize_into, classifier_nodes
    from dogbreeds.machine import has_fast_int8, machine_profile

    class Photos(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([calibration[i:i + batch] for i in range(0, len(calibration), batch)])

        def get_next(self):
            part = next(self._batches, None)
            return None if part is None else {INPUT_NAME: part}

    fmt = QuantFormat.QOperator if "-qop-" in variant else QuantFormat.QDQ
    extra = {} if fmt == QuantFormat.QOperator else {"OpTypesToExcludeOutputQuantization": ["MatMul"]}
    _quantize_into(linear, out, lambda partial: quantize_static(
        str(linear), str(partial), Photos(), quant_format=fmt, op_types_to_quantize=["MatMul"],
        per_channel=variant.endswith("-pc"), reduce_range=not has_fast_int8(machine_profile()["cpu"]["flags"]),
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=classifier_nodes(linear),
        calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=str(cache), extra_options=extra))


def build_files(model, info, folder: Path, calibration: np.ndarray, variants) -> dict[str, Path]:
    """The fp32 engine's export, the int8 engine's dynamic file and each static variant, in `folder`."""
    from dogbreeds.infer.runtime_onnxruntime import FP32 as ORT_FP32, INT8, ensure_export

    files = {FP32: ensure_export(model, ORT_FP32, info, folder)[0], DYNAMIC: ensure_export(model, INT8, info, folder)[0]}
    linear = folder / f"model-{info.key}-linear.onnx"  # what quantize_int8 quantised (ensure_export wrote it)
    cache = folder / f"calibration-{info.key}.json"
    for variant in variants:
        started = time.perf_counter()
        files[variant] = folder / f"model-{info.key}-{variant}.onnx"
        static_matmul_int8(linear, files[variant], variant, calibration, cache)
        print(f"  {variant}: quantised in {time.perf_counter() - started:.0f} s", flush=True)
    return files


def fused_ops(path: Path, threads: int) -> dict[str, int]:
    """Operator counts of the graph onnxruntime runs (after every optimisation), for SHOWN_OPS."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.optimized_model_filepath = os.path.join(scratch, "optimised.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        counts = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return {op: counts[op] for op in SHOWN_OPS if counts[op]}


def outputs(backends: dict, inputs: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    return {name: np.concatenate([b.forward(inputs[i:i + batch]) for i in range(0, len(inputs), batch)])
            for name, b in backends.items()}


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def agreement(logits: dict[str, np.ndarray], labels: np.ndarray | None = None) -> dict[str, dict]:
    reference = logits[FP32]
    rows = {}
    for name, values in logits.items():
        rows[name] = {"max_abs_logit_diff": float(np.abs(values - reference).max()),
                      "max_abs_prob_diff": float(np.abs(softmax(values) - softmax(reference)).max()),
                      "top1_agreement": float((values.argmax(1) == reference.argmax(1)).mean())}
        if labels is not None:
            rows[name]["top1_accuracy"] = float((values.argmax(1) == labels).mean())
    return rows


def interleaved(backends: dict, x: np.ndarray, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each backend on `x`, one per round: one warm-up call each, then `rounds`
    rounds that call every backend once, the order reversed every other round, each timed call after
    an untimed RUNTIME_SETTLE_S pause (the previous runtime's spinning worker threads settle)."""
    from dogbreeds.infer.backend import RUNTIME_SETTLE_S

    names = list(backends)
    for name in names:
        backends[name].forward(x)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            time.sleep(RUNTIME_SETTLE_S)
            start = time.perf_counter()
            backends[name].forward(x)
            times[name].append(time.perf_counter() - start)
    return times


def measure(title: str, model, info, calibration: np.ndarray, inputs: np.ndarray, labels, args, folder: Path) -> dict:
    from dogbreeds.infer.runtime_onnxruntime import FP32 as ORT_FP32, INT8, INT8_STATIC, OrtBackend

    print(f"\n== {title}: {len(calibration)} calibration photos, {len(inputs)} comparison photos, "
          f"{inputs.shape[-1]} px; load average {load_average()}", flush=True)
    files = build_files(model, info, folder, calibration, [v for v in VARIANTS if v in args.variants])
    kinds = {FP32: ORT_FP32, DYNAMIC: INT8}
    backends = {name: OrtBackend(path, threads=args.threads, kind=kinds.get(name, INT8_STATIC))
                for name, path in files.items()}
    quality = agreement(outputs(backends, inputs, args.batch), labels)
    x = np.random.default_rng(0).standard_normal((args.batch, *inputs.shape[1:])).astype(np.float32)
    print(f"  timing {args.rounds} interleaved rounds at batch {args.batch}; load average {load_average()}", flush=True)
    times = interleaved(backends, x, args.rounds)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    rows = []
    for name, backend in backends.items():
        per_round = [d / v for d, v in zip(times[DYNAMIC], times[name])]  # > 1: faster than dynamic that round
        rows.append({"variant": name, "images_per_s": args.batch / seconds[name], "seconds": times[name],
                     "vs_dynamic": seconds[DYNAMIC] / seconds[name], "vs_dynamic_per_round": statistics.median(per_round),
                     "rounds_faster": sum(r > 1 for r in per_round), "int8_ops": backend.quantised_ops,
                     "ops_after_fusion": fused_ops(files[name], args.threads), **quality[name]})
    accuracy = labels is not None
    print(f"\n{title}, batch {args.batch}, {args.threads} threads, {args.rounds} rounds; load average at end "
          f"{load_average()}")
    print("| variant | images/s | vs dynamic int8 (medians; median per-round ratio; rounds faster) | max abs logit diff | max abs prob diff | top-1 agreement |"
          + (" top-1 accuracy |" if accuracy else "") + " int8 ops | onnxruntime runs |")
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if accuracy else "") + "---:|---|")
    for row in rows:
        ops = ", ".join(f"{op} {n}" for op, n in row["ops_after_fusion"].items())
        print(f"| {row['variant']} | {row['images_per_s']:.2f} | {row['vs_dynamic']:.2f}x; {row['vs_dynamic_per_round']:.2f}x; "
              f"{row['rounds_faster']} of {args.rounds} | "
              f"{row['max_abs_logit_diff']:.3g} | {row['max_abs_prob_diff']:.3g} | {row['top1_agreement']:.1%} |"
              + (f" {row['top1_accuracy']:.2%} |" if accuracy else "") + f" {'-' if row['int8_ops'] is None else row['int8_ops']} | {ops} |", flush=True)
    return {"title": title, "photos": len(inputs), "calibration_photos": len(calibration), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Run under `nice -n 5` on a shared machine.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds (default 6)")
    p.add_argument("--size", type=int, default=224, help="ConvNeXt-T's input size (default 224)")
    p.add_argument("--classes", type=int, default=1000, help="ConvNeXt-T's logits (default 1000, as the bench)")
    p.add_argument("--split-run", type=Path, default=Path("runs/trust_atto"),
                   help="the run whose split.json lists the photos: train for calibration, test for comparison "
                        "(default runs/trust_atto: the mini data's top-20 breeds)")
    p.add_argument("--calibration-photos", type=int, default=32)
    p.add_argument("--eval-photos", type=int, default=48, help="test photos ConvNeXt-T is compared on (default 48)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--run", type=Path, help="also a trained run (e.g. runs/trust_atto): its own test split")
    p.add_argument("--skip-convnext-tiny", action="store_true", help="only the --run part")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--keep", type=Path, help="write the ONNX files into this folder and keep them (e.g. for "
                                             "benchmarks/profile_onnx.py); default: a temporary folder")
    args = p.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    import timm
    import torch

    import dogbreeds
    from dogbreeds.infer.auto import load_batch, split_photos
    from dogbreeds.infer.backend import info_for_loaded, info_for_model, model_key

    torch.set_num_threads(args.threads)
    print("load average at start:", load_average(), flush=True)
    train, test = split_photos(args.split_run, "train"), split_photos(args.split_run, "test")
    if not train or not test:
        p.error(f"--split-run {args.split_run}: no split.json with existing train and test photos; pass a run "
                "trained on ../shared/data/stanford-dogs-mini")
    calibration_photos = spread(train, args.calibration_photos)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-int8-static-") as scratch:
        if args.keep:
            scratch = str(args.keep)
        if not args.skip_convnext_tiny:
            torch.manual_seed(0)
            model = timm.create_model("convnext_tiny", num_classes=args.classes).eval()
            info = info_for_model(model)
            info.preprocessing = info.preprocessing.with_input_size(args.size)
            info.key = model_key(model, info)
            calibration, _ = load_batch(calibration_photos, info)
            inputs, _ = load_batch(spread(test, args.eval_photos, set(calibration_photos)), info)
            results.append(measure(f"convnext_tiny, random init, {args.classes} logits", model, info, calibration,
                                   inputs, None, args, Path(scratch) / "convnext_tiny"))
        if args.run:
            loaded = dogbreeds.load_run(args.run)
            info = info_for_loaded(loaded)
            info.key = model_key(loaded.model, info)
            run_train, run_test = split_photos(args.run, "train"), split_photos(args.run, "test")
            calibration, _ = load_batch(spread(run_train, args.calibration_photos), info)
            inputs, used = load_batch(run_test, info)
            index = {breed: i for i, breed in enumerate(loaded.classes.breed_ids)}
            labels = np.array([index[photo.parent.name] for photo in used])
            results.append(measure(f"{args.run.name} ({loaded.name}, trained), its test split", loaded.model, info,
                                   calibration, inputs, labels, args, Path(scratch) / "run"))
    print("\nload average at end:", load_average())
    if args.json:
        args.json.write_text(json.dumps({"load_average_end": load_average(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
