"""Honest answers (issue 11): calibrated probabilities, "not a dog" / "unknown breed" verdicts
from k-nearest-neighbour distances in the model's feature space, and split-conformal breed sets.

numpy only at prediction time (`calibration.Calibration.assess`); fitting from a run's photos is
`dogbreeds calibrate` (cli.py, uses torch). Measured in docs/trust.md.
"""
_PUBLIC = ("DEFAULT_COVERAGE", "UNCALIBRATED_NOTE", "VERDICTS", "Assessment", "Calibration", "assess_uncalibrated",
           "fit_calibration")
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    # Lazy, so that the CLI's argument checks (trust.fractions) do not import numpy at startup.
    if name in _PUBLIC:
        from . import calibration

        return getattr(calibration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
