"""Is inductor under bf16 autocast faster than OpenVINO bf16 on this CPU? One process, the
dogbreeds engines side by side: openvino-bf16, torch-bf16 (eager) and torch-bf16-compile
(inductor, freezing, channels_last, ConvNeXt MLPs as 1x1 convolutions), each timed after an
untimed RUNTIME_SETTLE_S pause, in interleaved rounds (the order reversed every other round).

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


def photo_batch(size: int, count: int) -> np.ndarray:
    from PIL import Image

    from dogbreeds.preprocessing import IMAGENET_MEAN, IMAGENET_STD

    files = sorted(PHOTOS.rglob("*.jpg"))[::37][:count]
    arrays = []
    for f in files:
        img = Image.open(f).convert("RGB").resize((size, size))
        arrays.append(((np.asarray(img, np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))
    return np.stack(arrays).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="convnext_tiny")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--engines", nargs="+", default=["openvino-bf16", "torch-bf16", "torch-bf16-compile"])
    args = p.parse_args()

    import torch

    from dogbreeds.infer.backend import RUNTIME_SETTLE_S, build_backend, softmax
    from dogbreeds import create_model

    print("load average at start:", load_average(), flush=True)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=20).eval()
    backends = {}
    for engine in args.engines:
        start = time.perf_counter()
        backends[engine] = build_backend(model, engine=engine)
        print(f"{engine}: built in {time.perf_counter() - start:.1f} s", flush=True)
    reference = build_backend(model, engine="torch")
    photos = photo_batch(args.size, 32)
    ref = softmax(reference.forward(photos))
    for batch in args.batches:
        x = np.random.default_rng(0).standard_normal((batch, 3, args.size, args.size)).astype(np.float32)
        for engine, b in backends.items():
            start = time.perf_counter()
            b.forward(x)
            print(f"b{batch} {engine}: first call {time.perf_counter() - start:.1f} s", flush=True)
        times: dict[str, list[float]] = {e: [] for e in backends}
        for r in range(args.rounds):
            for engine in (list(backends) if r % 2 == 0 else list(backends)[::-1]):
                time.sleep(RUNTIME_SETTLE_S)
                start = time.perf_counter()
                backends[engine].forward(x)
                times[engine].append(time.perf_counter() - start)
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
