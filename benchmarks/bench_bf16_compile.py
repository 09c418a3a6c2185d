"""Is inductor under bf16 autocast faster than OpenVINO bf16 on this CPU? One process, the
dogbreeds engines side by side: openvino-bf16, torch-bf16 (eager) and torch-bf16-compile
(inductor, freezing, channels_last, ConvNeXt MLPs as 1x1 convolutions), timed in interleaved
rounds (bench_int8_static_matmul.interleaved: the order reversed every other round, a settle pause
before each timed call). Real photos through the model's own eval transform (auto.load_batch).

Printed: the load, each engine's first call (for the compiled one, the compile) in seconds, the
median ms per batch of each, the compiled engine against OpenVINO bf16, and the compiled
engine's top-1 agreement and max |probability difference| against fp32 torch on real photos.

    python benchmarks/bench_bf16_compile.py --model convnext_tiny --batches 16 1
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from dogbreeds.machine import load_average

PHOTOS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "stanford-dogs-mini" / "Images"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="convnext_tiny")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--engines", nargs="+", default=["openvino-bf16", "torch-bf16", "torch-bf16-compile"])
    args = p.parse_args()

    import torch

    from bench_int8_static_matmul import interleaved  # benchmarks/ is sys.path[0]
    from dogbreeds import create_model
    from dogbreeds.infer.auto import load_batch
    from dogbreeds.infer.backend import build_backend, info_for_model, softmax

    print("load average at start:", load_average(), flush=True)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=20).eval()
    backends = {}
    for engine in args.engines:
        start = time.perf_counter()
        backends[engine] = build_backend(model, engine=engine)
        print(f"{engine}: built in {time.perf_counter() - start:.1f} s", flush=True)
    reference = build_backend(model, engine="torch")
    photos, _ = load_batch(sorted(PHOTOS.rglob("*.jpg"))[::37][:32], info_for_model(model))  # the eval transform
    ref = softmax(reference.forward(photos))
    for batch in args.batches:
        x = np.random.default_rng(0).standard_normal((batch, 3, args.size, args.size)).astype(np.float32)
        for engine, b in backends.items():
            start = time.perf_counter()
            b.forward(x)
            print(f"b{batch} {engine}: first call {time.perf_counter() - start:.1f} s", flush=True)
        times = interleaved(backends, x, args.rounds)
        med = {e: statistics.median(t) * 1000 for e, t in times.items()}
        for engine, ms in med.items():
            print(f"b{batch} {engine}: {ms:.1f} ms / batch, {batch * 1000 / ms:.2f} images/s", flush=True)
        if "openvino-bf16" in med:
            for engine, ms in med.items():
                print(f"b{batch} {engine} vs openvino-bf16: {med['openvino-bf16'] / ms:.2f}x")
    for engine, b in backends.items():
        probs = np.concatenate([softmax(b.forward(photos[i:i + 16])) for i in range(0, len(photos), 16)])
        agree = float((probs.argmax(1) == ref.argmax(1)).mean())
        print(f"{engine}: top-1 agreement {agree:.1%} on {len(photos)} photos, "
              f"max |prob diff| {np.abs(probs - ref).max():.1e}")
    print("load average at end:", load_average(), flush=True)


if __name__ == "__main__":
    main()
