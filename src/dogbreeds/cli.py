"""`dogbreeds` command line: parse, call, print. Each area registers its own subcommands.

Heavy imports (torch, timm) happen inside the handlers, never here, so that
`dogbreeds predict model.onnx photo.jpg` runs on onnxruntime alone.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import DogbreedsError

# Modules with a `register(subparsers)` function, in the order `--help` lists them.
COMMAND_MODULES = (
    "dogbreeds.models.cli",
    "dogbreeds.data.cli",
    "dogbreeds.train.cli",
    "dogbreeds.evaluate.cli",
    "dogbreeds.trust.cli",
    "dogbreeds.infer.cli",
    "dogbreeds.serve.cli",
    "dogbreeds.roadmap.cli",
    "dogbreeds.bench.cli",
    "dogbreeds.detect.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dogbreeds",
        description="Tell a dog's breed from a photo: data, fine-tuning, comparison, and shipping the model.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dogbreeds")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        result = args.func(args)
    except DogbreedsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
