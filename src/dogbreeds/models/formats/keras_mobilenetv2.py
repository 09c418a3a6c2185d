"""Keras `keras.applications.MobileNetV2` (any width alpha) -> timm `mobilenetv2_*` keys.

Keras names its layers without a model prefix: Conv1/bn_Conv1 (stem), expanded_conv_* (the
first block: depthwise + project, no expansion), block_1..block_16_{expand,depthwise,project}
with a _BN after each, Conv_1/Conv_1_bn (head conv). timm groups the 17 blocks into 7 stages
of 1, 2, 3, 4, 3, 3, 1 blocks.
"""
from __future__ import annotations

import re

import numpy as np

from .keras_h5 import KerasLayer

# Blocks per timm stage after stage 0 (which holds Keras' expanded_conv): block_1 .. block_16.
_STAGE_SIZES = (2, 3, 4, 3, 3, 1)
STEM_LAYERS = ("Conv1", "bn_Conv1", "expanded_conv_depthwise", "Conv_1", "Conv_1_bn")
# Weightless backbone layers (padding, activations, residual adds), by Keras' names.
_WEIGHTLESS = re.compile(
    r"^(Conv1_pad|Conv1_relu|bn_Conv1_relu|expanded_conv_depthwise_relu|out_relu|"
    r"block_\d+_(pad|add|expand_relu|depthwise_relu))$"
)
# timm registers these widths for the plain (Keras-compatible) MobileNetV2.
TIMM_WIDTHS = {0.35: "mobilenetv2_035", 0.5: "mobilenetv2_050", 0.75: "mobilenetv2_075",
               1.0: "mobilenetv2_100", 1.4: "mobilenetv2_140"}


def is_mobilenetv2(names: set[str]) -> bool:
    return all(name in names for name in STEM_LAYERS)


def _block_keras_to_timm() -> dict[str, str]:
    """Keras layer name -> timm module prefix, for every layer holding weights."""
    table = {
        "Conv1": "conv_stem", "bn_Conv1": "bn1",
        "expanded_conv_depthwise": "blocks.0.0.conv_dw", "expanded_conv_depthwise_BN": "blocks.0.0.bn1",
        "expanded_conv_project": "blocks.0.0.conv_pw", "expanded_conv_project_BN": "blocks.0.0.bn2",
        "Conv_1": "conv_head", "Conv_1_bn": "bn2",
    }
    block = 1
    for stage, size in enumerate(_STAGE_SIZES, start=1):
        for index in range(size):
            prefix = f"blocks.{stage}.{index}"
            for keras_part, timm_part in (("expand", "conv_pw"), ("expand_BN", "bn1"),
                                          ("depthwise", "conv_dw"), ("depthwise_BN", "bn2"),
                                          ("project", "conv_pwl"), ("project_BN", "bn3")):
                table[f"block_{block}_{keras_part}"] = f"{prefix}.{timm_part}"
            block += 1
    return table


KERAS_TO_TIMM = _block_keras_to_timm()


def is_backbone_layer(name: str) -> bool:
    return name in KERAS_TO_TIMM or bool(_WEIGHTLESS.match(name))


def convert_layer(layer: KerasLayer, timm_prefix: str, path) -> dict[str, np.ndarray]:
    """One Keras layer's weights in timm layout (numpy, float32)."""
    from dogbreeds.errors import WeightsError

    w = layer.weights
    out: dict[str, np.ndarray] = {}
    if layer.kind == "batch_normalization":
        missing = {"gamma", "beta", "moving_mean", "moving_variance"} - set(w)
        if missing:
            raise WeightsError(f"{path}: BatchNormalization {layer.name} lacks {sorted(missing)} "
                               f"(found {sorted(w)}); only center=True, scale=True layers are supported")
        out[f"{timm_prefix}.weight"] = w["gamma"]
        out[f"{timm_prefix}.bias"] = w["beta"]
        out[f"{timm_prefix}.running_mean"] = w["moving_mean"]
        out[f"{timm_prefix}.running_var"] = w["moving_variance"]
        out[f"{timm_prefix}.num_batches_tracked"] = np.zeros((), dtype=np.int64)
        return out
    if "kernel" not in w:
        raise WeightsError(f"{path}: layer {layer.describe()} has no kernel; expected a convolution")
    kernel = w["kernel"]
    if kernel.ndim != 4:
        raise WeightsError(f"{path}: layer {layer.describe()}: expected a 4-D convolution kernel")
    if layer.name.endswith("depthwise"):
        # Keras depthwise (kh, kw, C, multiplier=1) -> torch grouped conv (C, 1, kh, kw).
        out[f"{timm_prefix}.weight"] = kernel.transpose(2, 3, 0, 1)
    else:
        # Keras Conv2D (kh, kw, in, out) -> torch (out, in, kh, kw).
        out[f"{timm_prefix}.weight"] = kernel.transpose(3, 2, 0, 1)
    if "bias" in w:
        raise WeightsError(f"{path}: convolution {layer.name} has a bias; Keras MobileNetV2 convolutions "
                           f"have none (use_bias=False), so this is not a keras.applications MobileNetV2")
    return out


def convert_backbone(layers: dict[str, KerasLayer], path) -> dict[str, np.ndarray]:
    from dogbreeds.errors import WeightsError

    missing = [name for name in KERAS_TO_TIMM if name not in layers]
    if missing:
        raise WeightsError(
            f"{path}: looks like a Keras MobileNetV2 but lacks {len(missing)} of its layers "
            f"(e.g. {missing[:5]}); only the complete keras.applications MobileNetV2 is supported"
        )
    state: dict[str, np.ndarray] = {}
    for keras_name, timm_prefix in KERAS_TO_TIMM.items():
        state.update(convert_layer(layers[keras_name], timm_prefix, path))
    return state


def keras_alpha_hint(layers: dict[str, KerasLayer], model_name: str | None) -> str:
    """Human-readable width for error messages: from the model name or the stem channels."""
    if model_name:
        match = re.match(r"mobilenetv2_([\d.]+)_(\d+)", model_name)
        if match:
            return f"alpha {match.group(1)}"
    stem = layers["Conv1"].weights.get("kernel")
    head = layers["Conv_1"].weights.get("kernel")
    stem_ch = stem.shape[3] if stem is not None else "?"
    head_ch = head.shape[3] if head is not None else "?"
    return f"stem {stem_ch} channels, head {head_ch} channels"


def input_size_from_name(model_name: str | None) -> int | None:
    """keras.applications names the model mobilenetv2_<alpha>_<rows>, e.g. mobilenetv2_1.00_160."""
    match = re.match(r"mobilenetv2_[\d.]+_(\d+)$", model_name or "")
    return int(match.group(1)) if match else None
