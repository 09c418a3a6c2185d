"""Subcommands of the bench area (placeholder: registers nothing yet)."""


def register(subparsers) -> None:
    pass
