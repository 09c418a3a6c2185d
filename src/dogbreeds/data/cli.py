"""Subcommands of the data area (placeholder: registers nothing yet)."""


def register(subparsers) -> None:
    pass
