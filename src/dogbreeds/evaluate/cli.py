"""Subcommands of the evaluate area (placeholder: registers nothing yet)."""


def register(subparsers) -> None:
    pass
