"""`dogbreeds data ...`: check a dataset for leaks, count its breeds (+ download/prepare when
those modules are installed). Thin: parse, call, print. Heavy imports live in the handlers
because the whole `dogbreeds` parser is built for every command."""
from __future__ import annotations

import argparse
import importlib
import json

# Other modules of the data area add their own subcommands through `register_cli(data_subparsers)`.
# They are optional: a missing module, or one that offers no register_cli (a pure library, e.g.
# while its commands are being written), is skipped; an import error *inside* one is raised.
PLUGGABLE_MODULES = ("dogbreeds.data.download", "dogbreeds.data.cache")

DATA_HELP = (
    "DATA is a dataset root: Stanford Dogs (Images/, Annotation/, lists/), a folder per breed, "
    "or a Kaggle-style labels.csv (see docs/data.md)."
)


def register(subparsers) -> None:
    data = subparsers.add_parser(
        "data",
        help="datasets: leakage check, per-breed counts and chart, download",
        description="Work with datasets. " + DATA_HELP,
    )
    data_subparsers = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data.set_defaults(func=lambda args: _print_help(data))
    _register_check(data_subparsers)
    _register_stats(data_subparsers)
    for module_name in PLUGGABLE_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        register_cli = getattr(module, "register_cli", None)
        if register_cli is not None:
            register_cli(data_subparsers)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 1


def _add_split_arguments(parser: argparse.ArgumentParser, breeds_default: str) -> None:
    parser.add_argument("data", metavar="DATA", help="dataset root (Stanford Dogs, breed folders or labels.csv)")
    parser.add_argument(
        "--breeds", default=breeds_default,
        help=f"which breeds: topN, all, a comma list of ids or names, or a file with one per line (default: {breeds_default})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation (and non-official test) split (default: 0)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of training images held out for validation (default: 0.1)")
    parser.add_argument(
        "--test-fraction", type=float, default=0.2,
        help="share of each breed held out for test when the data has no official split (default: 0.2)",
    )


def _hamming_distance(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 64:
        raise argparse.ArgumentTypeError(f"{value} is not a Hamming distance between 64-bit hashes (0..64)")
    return value


def _register_check(data_subparsers) -> None:
    parser = data_subparsers.add_parser(
        "check",
        help="find duplicate and near-duplicate photos across train/val/test, and unreadable files",
        description=(
            "Hash every image of the chosen breeds: sha256 of the bytes finds exact copies, a 64-bit "
            "perceptual hash (phash) finds re-encoded or resized copies. Prints the pairs whose two files are "
            "in different splits (test leakage), the files that cannot be decoded, and a summary. "
            "Exit status 1 when anything was found, 0 when clean. " + DATA_HELP
        ),
    )
    _add_split_arguments(parser, breeds_default="all")
    parser.add_argument(
        "--threshold", type=_hamming_distance, default=None,
        help="largest phash Hamming distance (0-64) counted as a near duplicate (default: 8)",
    )
    parser.add_argument("--workers", type=int, default=None, help="processes for hashing (default: all CPU cores)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    parser.set_defaults(func=_run_check)


def _run_check(args) -> int:
    from .check import NEAR_DUPLICATE_THRESHOLD, find_duplicates, format_report
    from .sources import load_dataset

    dataset = load_dataset(args.data, args.breeds, args.seed, args.val_fraction, args.test_fraction)
    threshold = NEAR_DUPLICATE_THRESHOLD if args.threshold is None else args.threshold
    records = dataset.train + dataset.val + dataset.test
    report = find_duplicates(records, threshold=threshold, workers=args.workers, progress=not args.json)
    if args.json:
        print(json.dumps({"root": dataset.root, "breeds": dataset.breeds, "seed": dataset.seed, **report.to_json()}, indent=2))
    else:
        print(format_report(report, root=dataset.root))
    return 0 if report.clean else 1


def _register_stats(data_subparsers) -> None:
    parser = data_subparsers.add_parser(
        "stats",
        help="images per breed (train/test/total) and a bar chart with the top N highlighted",
        description=(
            "Count the images of every breed, ranked by total (ties by breed id, as --breeds topN picks them), "
            "mark the top N, and optionally draw the bar chart. " + DATA_HELP
        ),
    )
    parser.add_argument("data", metavar="DATA", help="dataset root (Stanford Dogs, breed folders or labels.csv)")
    parser.add_argument("--top", type=int, default=20, help="how many breeds to highlight (default: 20)")
    parser.add_argument("--plot", metavar="FILE", help="write the bar chart to FILE (e.g. counts.png)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test split when the data has no official one")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="test share when the data has no official split")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON instead of a table")
    parser.set_defaults(func=_run_stats)


def _run_stats(args) -> int:
    from ..errors import DataError
    from .stats import breed_stats, format_table, plot_breed_counts

    stats = breed_stats(args.data, seed=args.seed, test_fraction=args.test_fraction)
    if not 1 <= args.top <= len(stats.breeds):
        raise DataError(f"--top {args.top}: the data has {len(stats.breeds)} breeds")
    print(json.dumps(stats.to_json(), indent=2) if args.json else format_table(stats, args.top))
    if args.plot:
        path = plot_breed_counts(stats, args.top, args.plot)
        if not args.json:
            print(f"chart written to {path}")
    return 0
