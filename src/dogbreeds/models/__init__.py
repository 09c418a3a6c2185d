"""Models: one factory for every network and weight format, checkpoints, cost counting.

    create_model(name, num_classes=None, weights=None, pretrained=False, **kwargs)
    set_preprocessing(model, preprocessing)  # model.preprocessing and timm's pretrained_cfg together
    load_run(path) -> LoadedModel(model, classes, preprocessing, name, path)
    save_model_checkpoint(model, path, classes, extra=None), read_checkpoint_meta(path)
    count_gmacs(model, input_size=224), count_params_m(model)

Imported lazily: `dogbreeds.models.cli` lives in this package and must not pull in torch.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "create_model": "dogbreeds.models.factory",
    "set_preprocessing": "dogbreeds.models.factory",
    "load_run": "dogbreeds.models.factory",
    "LoadedModel": "dogbreeds.models.factory",
    "save_model_checkpoint": "dogbreeds.models.checkpoint_format",
    "read_checkpoint_meta": "dogbreeds.models.checkpoint_format",
    "count_gmacs": "dogbreeds.models.flops",
    "count_params_m": "dogbreeds.models.flops",
    "ConvertedWeights": "dogbreeds.models.formats",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dogbreeds.models' has no attribute {name!r}")
