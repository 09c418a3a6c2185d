"""Weight file formats: each converter turns a foreign file into timm key names.

The contract every converter returns is `ConvertedWeights`; `factory.create_model` builds
`timm.create_model(model_name, num_classes=num_classes, **model_kwargs)` and loads
`state_dict` into it. Keep this module free of torch imports at runtime so that it stays
cheap to import (the type hints are strings only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import Tensor

    from dogbreeds.preprocessing import Preprocessing


@dataclass
class ConvertedWeights:
    """A state dict already renamed to timm's keys, plus what is needed to rebuild the model.

    format:         short name of the detected source format, e.g. "official-convnext",
                    "timm", "transformers", "torchvision", "keras", "dogbreeds-checkpoint".
    model_name:     timm model name the keys belong to, e.g. "convnext_tiny".
    state_dict:     tensors keyed by timm names for `model_name` built with `model_kwargs`.
    num_classes:    classes of the head found in the file (0 when the file has no head).
    preprocessing:  the source's own preprocessing when it declares one, else None
                    (the factory then uses timm's default config for the architecture).
    model_kwargs:   extra timm constructor arguments the weights need, e.g.
                    {"pad_type": "same", "bn_eps": 1e-3} for Keras MobileNetV2.
    """

    format: str
    model_name: str
    state_dict: "dict[str, Tensor]"
    num_classes: int
    preprocessing: "Preprocessing | None" = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
