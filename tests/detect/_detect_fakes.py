"""Fakes shared by the detection tests (imported by name: tests/detect/conftest.py puts this folder on sys.path)."""
from __future__ import annotations

import numpy as np


class FixedBoxes:
    """A detector runner that answers the same boxes for every photo."""

    def __init__(self, boxes, scores):
        self.boxes, self.scores = np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32)

    def __call__(self, chw):
        return self.boxes, self.scores, np.ones(len(self.scores), np.int64)
