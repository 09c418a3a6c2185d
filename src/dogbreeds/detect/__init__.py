"""Every dog in the photo: a dog detector (torchvision Faster R-CNN with a feature pyramid) on
this project's timm backbones. See docs/detection.md.

Lazy on purpose: `import dogbreeds.detect` costs nothing; torch and torchvision load only when
one of the names below is used.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DetectorConfig": "dogbreeds.detect.model",
    "build_detector": "dogbreeds.detect.model",
    "load_detector": "dogbreeds.detect.model",
    "save_detector": "dogbreeds.detect.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dogbreeds.detect' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
