"""Subcommands of the models area (placeholder: registers nothing yet)."""


def register(subparsers) -> None:
    pass
