"""torchvision `convnext_*` and `mobilenet_v2` state dicts, renamed to timm's keys."""
from __future__ import annotations

import re

from dogbreeds.errors import WeightsError
from dogbreeds.preprocessing import Preprocessing

from . import ConvertedWeights
from .arch import convnext_model, match_architecture, stage_layout

# torchvision's reference evaluation resizes with bilinear interpolation.
PREPROCESSING = Preprocessing(crop_pct=0.875, interpolation="bilinear", source="torchvision")

# torchvision MobileNetV2 stacks (expand, channels, repeats, stride) rows into one `features`
# list; timm keeps one `blocks.<row>` per row. Repeats per row of the MobileNetV2 paper:
MOBILENET_V2_REPEATS = (1, 2, 3, 4, 3, 3, 1)
MOBILENET_V2_NAMES = ("mobilenetv2_100", "mobilenetv2_050", "mobilenetv2_140", "mobilenetv2_075", "mobilenetv2_035")


def kind(sd: dict) -> str | None:
    if "features.0.0.weight" not in sd:
        return None
    if "features.1.0.block.0.weight" in sd:
        return "convnext"
    if "features.1.conv.0.0.weight" in sd:
        return "mobilenet_v2"
    return None


def convert(sd: dict, path) -> ConvertedWeights:
    which = kind(sd)
    if which == "convnext":
        return _convnext(sd)
    if which == "mobilenet_v2":
        return _mobilenet_v2(sd, path)
    raise WeightsError(f"{path}: torchvision weights of an unsupported model (only convnext_* and mobilenet_v2)")


def _convnext(sd: dict) -> ConvertedWeights:
    # features: 0 = stem, odd = stages 0..3, even >= 2 = downsample before stage (i // 2).
    out = {}
    for key, value in sd.items():
        new = key
        if m := re.match(r"features\.0\.([01])\.(.*)", key):
            new = f"stem.{m[1]}.{m[2]}"
        elif m := re.match(r"features\.(\d+)\.(\d+)\.(.*)", key):
            index, sub, rest = int(m[1]), m[2], m[3]
            if index % 2:  # a block of stage index // 2
                stage = index // 2
                rest = {"layer_scale": "gamma"}.get(rest, rest)
                rest = re.sub(r"^block\.(\d)\.", lambda b: {"0": "conv_dw.", "2": "norm.", "3": "mlp.fc1.", "5": "mlp.fc2."}[b[1]], rest)
                new = f"stages.{stage}.blocks.{sub}.{rest}"
                if rest == "gamma":  # torchvision keeps it (C, 1, 1) for broadcasting in NCHW
                    value = value.reshape(-1)
            else:
                new = f"stages.{index // 2}.downsample.{sub}.{rest}"
        elif m := re.match(r"classifier\.([02])\.(.*)", key):
            new = f"head.{'norm' if m[1] == '0' else 'fc'}.{m[2]}"
        out[new] = value
    layout = stage_layout(out, r"stages\.(\d+)\.blocks\.(\d+)\.")
    dims = [out[f"stages.{s}.blocks.0.conv_dw.weight"].shape[0] for s in layout]
    name, kwargs = convnext_model(layout.values(), dims)
    num_classes = int(out["head.fc.weight"].shape[0]) if "head.fc.weight" in out else 0
    return ConvertedWeights("torchvision", name, out, num_classes, PREPROCESSING, kwargs)


def _mobilenet_v2(sd: dict, path) -> ConvertedWeights:
    block_of = {}  # features index -> "blocks.<row>.<repeat>"
    index = 1
    for row, repeats in enumerate(MOBILENET_V2_REPEATS):
        for rep in range(repeats):
            block_of[index] = f"blocks.{row}.{rep}"
            index += 1
    last = index  # the 1x1 conv to 1280 (or wider) channels
    # Inside a torchvision InvertedResidual, `conv` is (expand?, depthwise, project, bn).
    first_block = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
    other_blocks = {"conv.0.0": "conv_pw", "conv.0.1": "bn1", "conv.1.0": "conv_dw", "conv.1.1": "bn2",
                    "conv.2": "conv_pwl", "conv.3": "bn3"}
    out = {}
    for key, value in sd.items():
        if m := re.match(r"features\.0\.([01])\.(.*)", key):
            new = f"{'conv_stem' if m[1] == '0' else 'bn1'}.{m[2]}"
        elif m := re.match(rf"features\.{last}\.([01])\.(.*)", key):
            new = f"{'conv_head' if m[1] == '0' else 'bn2'}.{m[2]}"
        elif m := re.match(r"features\.(\d+)\.(conv\.\d(?:\.\d)?)\.([a-z_]+)$", key):
            table = first_block if int(m[1]) == 1 else other_blocks
            if int(m[1]) not in block_of or m[2] not in table:
                raise WeightsError(f"{path}: unexpected torchvision MobileNetV2 key {key!r}")
            new = f"{block_of[int(m[1])]}.{table[m[2]]}.{m[3]}"
        elif m := re.match(r"classifier\.1\.(.*)", key):
            new = f"classifier.{m[1]}"
        else:
            new = key
        out[new] = value
    found = match_architecture(out, MOBILENET_V2_NAMES)
    if found is None:
        raise WeightsError(
            f"{path}: torchvision mobilenet_v2 weights with a width timm has no model for "
            f"(stem has {sd['features.0.0.weight'].shape[0]} channels; known: {', '.join(MOBILENET_V2_NAMES)})"
        )
    name, num_classes = found
    # Both use BatchNorm eps 1e-5, ReLU6 and symmetric padding: no extra kwargs needed.
    return ConvertedWeights("torchvision", name, out, num_classes, PREPROCESSING, {})
