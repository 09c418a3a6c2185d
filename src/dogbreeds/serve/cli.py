"""Subcommands of the serve area (placeholder: registers nothing yet)."""


def register(subparsers) -> None:
    pass
