"""Subcommands of the train area (placeholder: registers nothing yet)."""


def register(subparsers) -> None:
    pass
