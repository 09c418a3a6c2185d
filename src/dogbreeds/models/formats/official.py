"""facebookresearch/ConvNeXt checkpoints ({'model': state_dict} with the paper code's names)."""
from __future__ import annotations

from timm.models.convnext import checkpoint_filter_fn

from dogbreeds.preprocessing import Preprocessing

from . import ConvertedWeights
from .arch import convnext_model, meta_model, stage_layout


def matches(sd: dict) -> bool:
    return "downsample_layers.0.0.weight" in sd and any(k.startswith("stages.0.0.") for k in sd)


def convert(sd: dict) -> ConvertedWeights:
    depths = stage_layout(sd, r"stages\.(\d+)\.(\d+)\.")
    dims = [sd[f"stages.{s}.0.dwconv.weight"].shape[0] for s in sorted(depths)]
    name, kwargs = convnext_model(depths.values(), dims)
    num_classes = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
    # timm's own filter renames the keys and reshapes MLP weights for conv-MLP variants;
    # it reads target shapes from the model, so a meta-device model is enough.
    target = meta_model(name, num_classes=num_classes, **kwargs)
    state_dict = checkpoint_filter_fn(sd, target)
    # The paper's evaluation: ImageNet statistics, 224 crop from a 256 resize, bicubic.
    preprocessing = Preprocessing(crop_pct=0.875, interpolation="bicubic", source="official ConvNeXt")
    return ConvertedWeights("official-convnext", name, state_dict, num_classes, preprocessing, kwargs)
