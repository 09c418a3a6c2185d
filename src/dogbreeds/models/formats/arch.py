"""Which timm architecture a state dict belongs to, found from tensor shapes.

Models are built on the `meta` device here: no memory, no init cost, shapes only.
"""
from __future__ import annotations

import functools
import re

import timm
import torch

# (depths, dims) of the ConvNeXt family as timm names them.
CONVNEXT_VARIANTS = {
    ((2, 2, 6, 2), (40, 80, 160, 320)): "convnext_atto",
    ((2, 2, 6, 2), (48, 96, 192, 384)): "convnext_femto",
    ((2, 2, 6, 2), (64, 128, 256, 512)): "convnext_pico",
    ((2, 2, 8, 2), (80, 160, 320, 640)): "convnext_nano",
    ((3, 3, 9, 3), (96, 192, 384, 768)): "convnext_tiny",
    ((3, 3, 27, 3), (96, 192, 384, 768)): "convnext_small",
    ((3, 3, 27, 3), (128, 256, 512, 1024)): "convnext_base",
    ((3, 3, 27, 3), (192, 384, 768, 1536)): "convnext_large",
    ((3, 3, 27, 3), (256, 512, 1024, 2048)): "convnext_xlarge",
}

# Tried in order when a timm state dict arrives without a model name.
INFERABLE = (
    *CONVNEXT_VARIANTS.values(),
    "mobilenetv2_035", "mobilenetv2_050", "mobilenetv2_075", "mobilenetv2_100",
    "mobilenetv2_110d", "mobilenetv2_120d", "mobilenetv2_140",
    "resnet18", "resnet34", "resnet50", "resnet101",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "swin_tiny_patch4_window7_224", "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
)


def convnext_model(depths, dims, source="the weights") -> tuple[str, dict]:
    """timm name (+ kwargs for a non-standard size) for a ConvNeXt with these stages.

    The layout comes from a file (key names, shapes, config.json), so it is checked against the
    model_kwargs schema before any model, even a meta one, is built: a key 'stages.0.blocks.
    999999999' must not make timm construct a billion blocks."""
    from ..safety import validate_model_kwargs

    depths, dims = [int(d) for d in depths], [int(d) for d in dims]
    validate_model_kwargs({"depths": depths, "dims": dims}, source, "the ConvNeXt stage layout")
    if len(depths) != len(dims):
        from dogbreeds.errors import WeightsError

        raise WeightsError(f"{source}: {len(depths)} stage depths {depths} but {len(dims)} stage widths {dims}")
    depths, dims = tuple(depths), tuple(dims)
    name = CONVNEXT_VARIANTS.get((depths, dims))
    if name:
        return name, {}
    # timm's ConvNeXt class takes any depths/dims; start from tiny (Linear MLP, like the sources).
    return "convnext_tiny", {"depths": depths, "dims": dims}


def stage_layout(keys, pattern: str) -> dict[int, int]:
    """Blocks per stage from keys matching `pattern` with groups (stage, block)."""
    blocks: dict[int, set[int]] = {}
    rx = re.compile(pattern)
    for k in keys:
        m = rx.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return {s: max(b) + 1 for s, b in sorted(blocks.items())}


def meta_model(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


def classifier_prefix(model: torch.nn.Module) -> str | None:
    """State-dict prefix of the final classifier ('head.fc', 'classifier', 'fc', ...)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if head is None or isinstance(head, torch.nn.Identity):
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def head_classes(sd: dict, prefix: str | None) -> int:
    """Class count of the head in `sd` (0 when the file has no head)."""
    weight = sd.get(f"{prefix}.weight") if prefix else None
    return int(weight.shape[0]) if weight is not None else 0


def match_architecture(sd: dict, candidates=INFERABLE) -> tuple[str, int] | None:
    """First candidate whose non-head keys and shapes equal the file's -> (name, classes)."""
    for name in candidates:
        signature = _body_signature(name)
        if signature is None:
            continue
        prefix, target = signature
        body = {k: tuple(v.shape) for k, v in sd.items() if not _is_head(k, prefix)}
        if target == body:
            return name, head_classes(sd, prefix)
    return None


@functools.lru_cache(maxsize=None)
def _body_signature(name: str):
    """(classifier prefix, {key: shape} without the head) of a timm model; None if unknown.
    Cached: building dozens of meta models per lookup adds up, and shapes never change."""
    try:
        model = meta_model(name)
    except Exception:  # a candidate this timm version lacks
        return None
    prefix = classifier_prefix(model)
    return prefix, {k: tuple(v.shape) for k, v in model.state_dict().items() if not _is_head(k, prefix)}


def _is_head(key: str, prefix: str | None) -> bool:
    return bool(prefix) and key.startswith(prefix + ".")
