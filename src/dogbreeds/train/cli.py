"""`dogbreeds train`: a recipe from --config YAML and/or flags, then train(recipe).

Flags are made from the Recipe's fields, so the two can never disagree. Precedence:
Recipe defaults < --config file < flags given on the command line.
Heavy imports (torch, timm) happen inside the handler.
"""
from __future__ import annotations

import argparse
from dataclasses import fields

HELP = {
    "data": "dataset root (Stanford Dogs layout, a CSV, or a folder per breed)",
    "model": "model name for create_model (e.g. convnext_tiny, mobilenetv2_100; a timm tag such as "
             "convnext_tiny.fb_in22k_ft_in1k downloads pretrained weights)",
    "weights": "local weights file or folder to start from (any format create_model reads)",
    "breeds": "'top20', 'all', a comma-separated list, or a file with one breed per line",
    "out": "run directory (default runs/<model>); rerunning into it resumes",
    "batch_size": "images per optimizer step, over all processes and accumulation steps",
    "accum_steps": "micro-batches per optimizer step (less memory, same effective batch)",
    "freeze": "auto (from pretrained weights last_n_stages:3, from random weights none) | none | "
              "backbone (head only, on cached features: fast on CPU) | last_n_stages:N",
    "precision": "auto (bf16 on bf16 GPUs and AMX CPUs, else fp32) | fp32 | bf16",
    "layer_decay": "lr multiplier per twelfth of the depth, head to stem ('none' turns it off)",
    "ema_decay": "EMA decay of the weights ('none' turns EMA off)",
    "grad_clip": "max gradient norm ('none' turns clipping off)",
    "input_size": "training/eval image size in pixels (default: the weights' own)",
    "head_init_scale": "a head made new on pretrained weights starts at this fraction of timm's init (1 keeps it)",
    "calibrate": "fit the 'not a dog' / 'unknown breed' thresholds, temperature and breed sets at the end "
                 "(--no-calibrate skips it; `dogbreeds calibrate RUN --data DATA` does it later)",
    "deterministic": "deterministic algorithms: bit-identical reruns and resumes (slower)",
    "fast_layout": "ConvNeXt-T and larger: train in the MLP layout (1x1 convolutions or Linear, same weights) a short "
                   "probe timed faster on this machine (once per machine, cached; recorded in config.yaml)",
    "outlier_exposure": "outlier exposure (Hendrycks et al. 2019): each step also sees outlier photos (the data root's "
                        "other breeds, --outliers) pushed towards uniform probabilities; recorded in split.json, used by "
                        "the calibration at the end (docs/trust.md)",
    "oe_weight": "weight of the outlier-exposure loss (cross-entropy to uniform)",
    "oe_breeds": "which of the data root's other breeds are outliers: all | none | a seeded share in (0, 1] such as 0.5 "
                 "(leaves the rest unseen, to measure on) | a comma-separated list of breed ids",
    "outliers": "more outlier photos for --outlier-exposure: a quoted glob, a folder or a file "
                "(e.g. '../shared/data/cats-and-dogs/dogs/dog.*[02468].jpg')",
    "oe_batch_size": "outlier photos per optimizer step (over all processes and accumulation steps)",
}


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "off") else kind(text)

    parse.__name__ = f"{kind.__name__} or none"
    return parse


def _box_crop(text: str):
    """--crop-to-box: largest, union, or none."""
    value = text.lower()
    if value not in ("largest", "union", "none", "off"):
        raise argparse.ArgumentTypeError(f"{text!r}: choose largest, union or none")
    return None if value in ("none", "off") else value


AUGMENT_FLAGS = {
    "mixup": (float, "mixup Beta alpha (0 turns mixup off)"),
    "cutmix": (float, "cutmix Beta alpha (0 turns cutmix off)"),
    "label_smoothing": (float, "label smoothing"),
    "crop_to_box": (_box_crop, "cut each training photo to its dogs' boxes before the random crop: largest "
                               "(the biggest dog) or union (all of them), plus box_margin of context; none = the "
                               "whole photo (Stanford Dogs' Annotation/ gives the boxes; a photo without one is "
                               "used whole). Measured for naming detector crops: no gain (docs/detection.md)"),
}


def register(subparsers) -> None:
    from .recipe import Recipe

    parser = subparsers.add_parser(
        "train", help="fine-tune a model on dog photos (writes a run directory)",
        description="Fine-tune a model. Defaults suit pretrained weights on a small dataset; see docs/training.md. "
                    "Example: dogbreeds train --data data/stanford-dogs --model convnext_tiny --breeds top20 "
                    "--out runs/convnext_tiny",
    )
    parser.add_argument("--config", help="recipe YAML (a run's config.yaml works too); flags override it")
    parser.add_argument("--augment", choices=("convnext", "quick", "none"),
                        help="augmentation preset: convnext (RandAugment, erasing, mixup/cutmix), quick, none")
    defaults = Recipe.__dataclass_fields__
    for f in fields(Recipe):
        if f.name == "augment":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults[f.name].default
        help_text = HELP.get(f.name, "") + f" (recipe default: {default})"
        # SUPPRESS: a flag not given leaves no attribute, so "not given" and "none" stay distinct.
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        elif "None" in f.type:
            base = float if "float" in f.type else int if "int" in f.type else str
            parser.add_argument(flag, type=_optional(base), default=argparse.SUPPRESS, help=help_text)
        else:
            base = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, type=base, default=argparse.SUPPRESS, help=help_text)
    parser.add_argument("--accum", dest="accum_steps", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for name, (kind, help_text) in AUGMENT_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=argparse.SUPPRESS, help=help_text)
    parser.set_defaults(func=run)


def recipe_from_args(args: argparse.Namespace):
    """Recipe defaults < --config < flags. A flag left out means 'keep what the config says'."""
    from ..data.augment import AugmentConfig
    from ..errors import DogbreedsError
    from .recipe import Recipe

    recipe = Recipe.from_yaml(args.config) if args.config else Recipe()
    names = [f.name for f in fields(Recipe) if f.name != "augment"] + list(AUGMENT_FLAGS)
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    if args.augment:
        recipe = recipe.with_overrides(augment=AugmentConfig.preset(args.augment))
    if "out" not in given and not args.config:
        given["out"] = f"runs/{given.get('model', recipe.model).split('.')[0]}"
    recipe = recipe.with_overrides(**given)
    if not recipe.data:
        raise DogbreedsError("dogbreeds train needs --data DATASET_ROOT (or a --config that sets data)")
    return recipe


def run(args: argparse.Namespace) -> int:
    import sys

    from .loop import TrainingStopped, train

    recipe = recipe_from_args(args)
    try:
        run_dir = train(recipe)
    except TrainingStopped as stopped:  # state saved; the shell's convention: 128 + the signal
        print("interrupted", file=sys.stderr)
        return 128 + stopped.signum
    print(run_dir)
    return 0
