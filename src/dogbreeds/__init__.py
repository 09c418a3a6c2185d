"""dogbreeds: tell a dog's breed from a photo.

Public API (imported lazily so that light paths, such as ONNX prediction, never load torch):

    create_model(name=None, num_classes=None, weights=None, **kwargs)
    load_run(path) -> LoadedModel (model, classes, preprocessing)
    Predictor.from_run(path).predict(images)
    train(Recipe(...)) -> run directory
    load_dataset(root, breeds='top20') -> Dataset
    Preprocessing, ClassInfo, ImageRecord, decode_image
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "create_model": "dogbreeds.models.factory",
    "load_run": "dogbreeds.models.factory",
    "LoadedModel": "dogbreeds.models.factory",
    "Predictor": "dogbreeds.infer.predictor",
    "Preprocessing": "dogbreeds.preprocessing",
    "ClassInfo": "dogbreeds.data.records",
    "ImageRecord": "dogbreeds.data.records",
    "decode_image": "dogbreeds.data.decode",
    "train": "dogbreeds.train",
    "Recipe": "dogbreeds.train",
    "load_dataset": "dogbreeds.data.sources",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dogbreeds' has no attribute {name!r}")
