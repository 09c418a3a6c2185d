"""Images/s of the prepared cache vs decoding JPEGs, side by side in one run.

    python benchmarks/bench_data_cache.py [--data DIR] [--images 1000] [--repeats 3] [--workers 0]

Builds a cache of the first --images photos of DATA in a temporary folder (timed: the
one-off cost), then times the same samples through `RecordDataset` both ways, alternating
the two paths on every repeat so machine noise hits both alike, and prints the best of the
repeats and the ratio, for:
  pixels  decode + resize to int(224 / 0.875) = 256 vs reading the cached row (no transform)
  eval    the eval transform at 224 (resize 256, centre crop 224, normalise)
  train   the ConvNeXt training transform at 224 (RandomResizedCrop, flip, RandAugment, erasing)
--workers N > 0 also times whole `make_loader` epochs (batch 64) with N persistent worker
processes, after one warm-up epoch.
torch runs with one thread, as in a DataLoader worker.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dogbreeds.data.cache import ImageCache, prepare_cache
from dogbreeds.data.loaders import RecordDataset, make_loader
from dogbreeds.data.records import ImageRecord
from dogbreeds.data.transforms import AugmentConfig, build_eval_transform, build_train_transform
from dogbreeds.preprocessing import Preprocessing

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "stanford-dogs-mini"


def _pixels_only(image, boxes=()):
    return image


def _images_per_second(run, count: int) -> float:
    start = time.perf_counter()
    run()
    return count / (time.perf_counter() - start)


def _dataset_pass(dataset: RecordDataset):
    def run():
        for index in range(len(dataset)):
            dataset[index]
    return run


def _loader_pass(loader):
    def run():
        for _ in loader:
            pass
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    # Time what one loader worker does: DataLoader workers run torch with one thread, and on a
    # small shared machine torch's default intra-op threads only add contention.
    torch.set_num_threads(1)

    paths = sorted(str(p) for p in (args.data / "Images").glob("*/*.jpg"))[: args.images]
    records = [ImageRecord(p, 0, "any", "train") for p in paths]
    preprocessing = Preprocessing(input_size=224, crop_pct=0.875, interpolation="bicubic")
    short_side = int(preprocessing.input_size / preprocessing.crop_pct)
    print(f"{len(records)} photos from {args.data}, input 224, cache short side {short_side}")

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        prepare_cache(paths, folder, short_side, preprocessing.interpolation, workers=2, progress=False)
        prepare_s = time.perf_counter() - start
        print(f"prepare (2 processes, one-off): {prepare_s:.1f} s = {len(paths) / prepare_s:.0f} images/s")
        cache = ImageCache.open(folder)

        cases = {
            "pixels": _pixels_only,
            "eval": build_eval_transform(preprocessing),
            "train": build_train_transform(preprocessing, AugmentConfig()),
        }
        print(f"{'case':<16}{'decode img/s':>14}{'cache img/s':>14}{'ratio':>8}")
        for name, transform in cases.items():
            plain = RecordDataset(records, transform, seed=0)
            cached = RecordDataset(records, transform, seed=0, cache=cache)
            best = {"decode": 0.0, "cache": 0.0}
            for _ in range(args.repeats):
                best["decode"] = max(best["decode"], _images_per_second(_dataset_pass(plain), len(records)))
                best["cache"] = max(best["cache"], _images_per_second(_dataset_pass(cached), len(records)))
            print(f"{name:<16}{best['decode']:>14.0f}{best['cache']:>14.0f}{best['cache'] / best['decode']:>7.1f}x")

        if args.workers:
            for name in ("eval", "train"):
                loaders = {kind: make_loader(records, cases[name], 64, shuffle=True, seed=0, workers=args.workers, **kw)
                           for kind, kw in (("decode", {}), ("cache", {"cache": cache}))}
                for loader in loaders.values():
                    _loader_pass(loader)()  # start the (persistent) workers outside the timing
                best = {"decode": 0.0, "cache": 0.0}
                for repeat in range(args.repeats):
                    for kind, loader in loaders.items():
                        loader.set_epoch(repeat + 1)
                        best[kind] = max(best[kind], _images_per_second(_loader_pass(loader), len(records)))
                label = f"{name} loader w{args.workers}"
                print(f"{label:<16}{best['decode']:>14.0f}{best['cache']:>14.0f}{best['cache'] / best['decode']:>7.1f}x")
                del loaders

if __name__ == "__main__":
    main()
