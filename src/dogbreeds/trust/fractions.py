"""Values that must lie strictly inside (0, 1) (thresholds, coverage): one check, for the API and the
CLI alike. No numpy here: the CLI imports it at startup."""
from __future__ import annotations

from ..errors import DogbreedsError


def check_fraction(name: str, value) -> float:
    """A threshold / coverage must lie strictly inside (0, 1); the error names the value."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DogbreedsError(f"{name} must be a number strictly between 0 and 1, got {value!r}") from None
    if not 0.0 < number < 1.0:  # also refuses NaN
        raise DogbreedsError(f"{name} must be strictly between 0 and 1, got {value!r}")
    return number


def fraction_type(name: str):
    """An argparse `type=` for a value strictly inside (0, 1): the CLI's message is check_fraction's."""
    def parse(text: str) -> float:
        import argparse

        try:
            return check_fraction(name, text)
        except DogbreedsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse
