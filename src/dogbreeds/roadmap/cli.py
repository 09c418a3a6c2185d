"""`dogbreeds roadmap`: the ConvNeXt paper's design journey, ResNet-50 -> ConvNeXt-T.

  dogbreeds roadmap --table [--json]           params and GMACs of each step beside the paper's
  dogbreeds roadmap --train --data DATA ...    train every step on dogs, plot it beside the paper

torch and timm are imported inside the handler only: the CLI must start fast.
"""
from __future__ import annotations

import json

from ..errors import DogbreedsError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "roadmap",
        help="ResNet-50 -> ConvNeXt-T step by step: cost table, or train every step on dogs",
        description="The twelve steps of 'A ConvNet for the 2020s' (Figure 2) as models roadmap_step0..11. "
        "--table measures each step's parameters and GMACs (meta device, no weights) beside the paper's "
        "GFLOPs and ImageNet top-1; --train trains the steps on dogs under one recipe and plots them "
        "beside the paper's curve.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--table", action="store_true", help="print the cost table (the default)")
    mode.add_argument("--train", action="store_true", help="train the steps on --data and write OUT/roadmap.png/.md")
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    p.add_argument("--input-size", type=int, default=None,
                   help="square input side in pixels (default: 224 for --table, the paper's; 64 for --train)")
    p.add_argument("--data", help="dataset root for --train (Stanford Dogs layout, CSV or breed folders)")
    p.add_argument("--breeds", default="top20", help="breeds to train on (default top20; chance is 1/number of breeds)")
    p.add_argument("--steps", help="steps to train, e.g. 0,3,11 or 0-4 (default: all twelve)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per step (default 10)")
    p.add_argument("--batch-size", type=int, default=32, help="images per optimizer step (default 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3, from scratch)")
    p.add_argument("--seed", type=int, default=0, help="split, init and batch-order seed shared by every step")
    p.add_argument("--workers", type=int, default=2, help="decoding processes (default 2)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' (default auto)")
    p.add_argument("--out", default="runs/roadmap", help="one run dir per step goes here, plus the summary")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.train:
        return _run_train(args)
    from .table import format_table, roadmap_rows

    size = args.input_size or 224
    if size < 32:
        raise DogbreedsError(f"--input-size {size} is too small: the network downsamples 32x; use 32 or more")
    rows = roadmap_rows(input_size=size)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        print(format_table(rows))
        if size != 224:
            print(f"\nnote: the paper's GFLOPs are at 224x224; at {size}x{size} expect about "
                  f"{(size / 224) ** 2:.2f}x of them.")
    return 0


def _run_train(args) -> int:
    from .train import RoadmapTraining, format_results, parse_steps, train_roadmap

    if not args.data:
        raise DogbreedsError("--train needs --data DATA: a dataset root, e.g. ../shared/data/stanford-dogs-mini")
    plan = RoadmapTraining(
        data=args.data, out=args.out, steps=parse_steps(args.steps), input_size=args.input_size or 64,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, breeds=args.breeds, seed=args.seed,
        workers=args.workers, device=args.device,
    )
    rows = train_roadmap(plan)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_results(rows, plan))
        print(f"\nwrote {plan.out}/roadmap.md, roadmap.json and roadmap.png")
    return 0
