"""onnxruntime with and without spinning worker threads, side by side: the two engines "auto" probes
("onnxruntime": workers sleep between operators; "onnxruntime-spin": they spin, onnxruntime's own
default). Everything else is the same: the same fp32 export file, the same tuned session options
(`runtime_onnxruntime.session`), the same thread count.

Random-init timm models (speed does not depend on the weights) at --size px, exported once into
--cache-dir. Rounds interleave the variants (the order reversed every other round, so a change in
the machine's load falls on both alike); each round times --calls calls per variant and batch
(with --decode-beside: as many more as fill --window seconds), after one untimed warm-up call per session. Printed per model and batch: each variant's median
milliseconds per call over all rounds, and the median over rounds of the per-round ratio
(sleeping time / spinning time: > 1 means spinning is faster). The load average is printed
before and after.

--decode-beside: a thread decodes and preprocesses real photos (../shared/data/stanford-dogs-mini)
without pause while the model runs, as the service's decode threads do beside its micro-batcher;
printed also: photos decoded per second during each variant's calls.

    nice -n 5 python benchmarks/bench_ort_spin.py --models mobilenetv2_100,convnext_tiny --batches 1,16
    nice -n 5 python benchmarks/bench_ort_spin.py --models mobilenetv2_100 --batches 1,16 --decode-beside
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from dogbreeds.machine import load_average

VARIANTS = ("onnxruntime", "onnxruntime-spin")
PHOTOS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "stanford-dogs-mini" / "Images"


class Decoder(threading.Thread):
    """Decodes photos in a loop while `running` is set; `count` photos so far."""

    def __init__(self, photos: list[Path], preprocessing):
        super().__init__(daemon=True)
        from dogbreeds.infer.preprocess_np import NumpyEvalTransform

        self.photos, self.transform = photos, NumpyEvalTransform(preprocessing)
        self.running, self.stop, self.count = threading.Event(), threading.Event(), 0

    def run(self):
        from dogbreeds.data.decode import decode_image

        i = 0
        while not self.stop.is_set():
            if not self.running.wait(0.05):
                continue
            self.transform(decode_image(self.photos[i % len(self.photos)]))
            self.count += 1
            i += 1


def measure(model_name: str, size: int, batches: list[int], rounds: int, calls: dict[int, int], threads: int,
            cache_dir: Path, decode_beside: bool, window: float = 0.0) -> list[dict]:
    import timm
    import torch

    from dogbreeds.infer.backend import build_backend
    from dogbreeds.models.factory import set_preprocessing

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=120).eval()
    from dogbreeds.infer.backend import info_for_model

    set_preprocessing(model, info_for_model(model).preprocessing.with_input_size(size))
    start = time.perf_counter()
    backends = {v: build_backend(model, v, cache_dir=cache_dir, threads=threads) for v in VARIANTS}
    print(f"{model_name}: built in {time.perf_counter() - start:.1f}s: "
          + "; ".join(str(b) for b in backends.values()), flush=True)
    del model
    decoder = None
    if decode_beside:
        photos = sorted(PHOTOS.glob("*/*.jpg"))[:64]
        if not photos:
            raise SystemExit(f"--decode-beside needs photos under {PHOTOS}")
        decoder = Decoder(photos, backends[VARIANTS[0]].preprocessing)
        decoder.start()
    rng = np.random.default_rng(0)
    results = []
    try:
        for batch in batches:
            x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
            for backend in backends.values():
                backend.forward(x)  # warm-up
            times = {v: [] for v in VARIANTS}
            decoded = {v: [] for v in VARIANTS}
            ratios = []
            for r in range(rounds):
                order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
                this_round = {}
                for v in order:
                    if decoder is not None:
                        before = decoder.count
                        decoder.running.set()
                    begun = time.perf_counter()
                    per_call = []
                    while len(per_call) < calls[batch] or time.perf_counter() - begun < window:
                        t0 = time.perf_counter()
                        backends[v].forward(x)
                        per_call.append(time.perf_counter() - t0)
                    elapsed = time.perf_counter() - begun
                    if decoder is not None:
                        decoder.running.clear()
                        decoded[v].append((decoder.count - before) / elapsed)
                    times[v] += per_call
                    this_round[v] = statistics.median(per_call)
                ratios.append(this_round["onnxruntime"] / this_round["onnxruntime-spin"])
            row = {"model": model_name, "batch": batch, "size": size, "threads": threads, "rounds": rounds,
                   "calls": len(times[VARIANTS[0]]) // rounds, "ratio_sleep_over_spin": statistics.median(ratios),
                   "spin_faster_rounds": sum(r > 1 for r in ratios)}
            for v in VARIANTS:
                row[f"{v}_ms"] = 1000 * statistics.median(times[v])
                if decoder is not None:
                    row[f"{v}_decodes_per_s"] = statistics.median(decoded[v])
            results.append(row)
            extra = (f"; photos decoded beside: {row['onnxruntime_decodes_per_s']:.1f}/s sleeping, "
                     f"{row['onnxruntime-spin_decodes_per_s']:.1f}/s spinning" if decoder is not None else "")
            print(f"  batch {batch}: sleeping {row['onnxruntime_ms']:.1f} ms, spinning {row['onnxruntime-spin_ms']:.1f} ms "
                  f"per call; sleeping/spinning time {row['ratio_sleep_over_spin']:.2f} (median of {rounds} rounds; "
                  f"spinning faster in {row['spin_faster_rounds']}){extra}", flush=True)
    finally:
        if decoder is not None:
            decoder.stop.set()
            decoder.running.set()
            decoder.join()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mobilenetv2_100,convnext_tiny")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", default="1:10,16:2", help="calls per variant per round, by batch (default 1:10,16:2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the exports are kept (default: a temporary folder)")
    parser.add_argument("--decode-beside", action="store_true")
    parser.add_argument("--window", type=float, default=1.0,
                        help="with --decode-beside: each variant's calls last at least this many seconds per round "
                             "(so that the decode rate is measured over a useful span; default 1.0)")
    args = parser.parse_args()
    calls = {int(b): int(n) for b, n in (part.split(":") for part in args.calls.split(","))}
    batches = [int(b) for b in args.batches.split(",")]
    calls = {b: calls.get(b, 2) for b in batches}
    print(f"load average before: {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-ort-spin-") as scratch:
        cache = args.cache_dir or Path(scratch)
        for name in args.models.split(","):
            measure(name, args.size, batches, args.rounds, calls, args.threads, cache, args.decode_beside,
                    args.window if args.decode_beside else 0.0)
    print(f"load average after: {load_average()}", flush=True)


if __name__ == "__main__":
    main()
