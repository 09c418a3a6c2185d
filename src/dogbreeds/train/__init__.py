"""Training: `train(recipe) -> run dir` and the `Recipe` it follows (see docs/training.md).

Imported lazily: the CLI loads this package to register `dogbreeds train` without torch.
"""
from __future__ import annotations

import importlib

_LAZY = {"train": "dogbreeds.train.loop", "TrainingDiverged": "dogbreeds.train.loop",
         "Recipe": "dogbreeds.train.recipe"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dogbreeds.train' has no attribute {name!r}")
