"""Honest answers (issue 11): calibrated probabilities, "not a dog" / "unknown breed" verdicts
from k-nearest-neighbour distances in the model's feature space, and split-conformal breed sets.

numpy only at prediction time (`calibration.Calibration.assess`); fitting from a run's photos is
`dogbreeds calibrate` (cli.py, uses torch). Measured in docs/trust.md.
"""
from .calibration import (DEFAULT_COVERAGE, UNCALIBRATED_NOTE, VERDICTS, Assessment, Calibration,  # noqa: F401
                          assess_uncalibrated, fit_calibration)
