"""Subcommands of the infer area (placeholder: registers nothing yet)."""


def register(subparsers) -> None:
    pass
