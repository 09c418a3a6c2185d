"""Subcommands of the roadmap area (placeholder: registers nothing yet)."""


def register(subparsers) -> None:
    pass
