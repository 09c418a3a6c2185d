"""Checkpoints already in timm's key names (timm training scripts, our own model.state_dict())."""
from __future__ import annotations

from dogbreeds.errors import WeightsError

from . import ConvertedWeights
from .arch import INFERABLE, classifier_prefix, head_classes, match_architecture, meta_model


def convert(sd: dict, name: str | None, path) -> ConvertedWeights:
    if name is None:
        found = match_architecture(sd, _candidates())
        if found is None:
            raise WeightsError(
                f"{path}: could not tell which architecture these {len(sd)} tensors belong to "
                f"(tried {len(_candidates())} timm models such as convnext_tiny, mobilenetv2_100, "
                f"resnet50); pass the model name, e.g. create_model('convnext_tiny', weights=...) "
                f"or --model convnext_tiny"
            )
        name, num_classes = found
    else:
        num_classes = head_classes(sd, classifier_prefix(meta_model(name)))
    # No preprocessing in a bare state dict: the factory uses timm's config for the architecture.
    return ConvertedWeights("timm", name, sd, num_classes, None, {})


def _candidates() -> tuple[str, ...]:
    import timm

    return (*INFERABLE, *timm.list_models("roadmap_step*"))
