"""Keras `keras.applications.ConvNeXt{Tiny..XLarge}` -> timm `convnext_*` keys.

Keras prefixes every layer with the model name p (default "convnext_tiny" etc.):
p_prestem_normalization (x - 255*mean) / (255*std) for 0-255 inputs, p_stem_conv + p_stem_layernorm,
p_downsampling_layernorm_i + p_downsampling_conv_i, and per block p_stage_i_block_j_{depthwise_conv,
layernorm, pointwise_conv_1, pointwise_conv_2, layer_scale}. Its pointwise convolutions are
Dense layers over the channel axis, exactly like timm's `mlp.fc1/fc2` Linear layers (conv_mlp=False).
All LayerNorms use eps 1e-6, timm's default for ConvNeXt.
"""
from __future__ import annotations

import re

import numpy as np

from dogbreeds.errors import WeightsError

from .keras_h5 import KerasLayer

# (depths, dims) of the five keras.applications variants -> timm name.
VARIANTS = {
    ((3, 3, 9, 3), (96, 192, 384, 768)): "convnext_tiny",
    ((3, 3, 27, 3), (96, 192, 384, 768)): "convnext_small",
    ((3, 3, 27, 3), (128, 256, 512, 1024)): "convnext_base",
    ((3, 3, 27, 3), (192, 384, 768, 1536)): "convnext_large",
    ((3, 3, 27, 3), (256, 512, 1024, 2048)): "convnext_xlarge",
}
_BLOCK_PARTS = {
    "depthwise_conv": "conv_dw", "layernorm": "norm",
    "pointwise_conv_1": "mlp.fc1", "pointwise_conv_2": "mlp.fc2", "layer_scale": "gamma",
}


def find_prefix(names: set[str]) -> str | None:
    """The model-name prefix Keras put on every ConvNeXt layer, or None when it is no ConvNeXt."""
    for name in names:
        match = re.match(r"^(.*)_stage_0_block_0_depthwise_conv$", name)
        if match:
            return match.group(1)
    return None


def is_backbone_layer(name: str, prefix: str) -> bool:
    """Layers of the ConvNeXt body (not its head: p_head_* counts as head)."""
    return name.startswith(prefix + "_") and not name.startswith(prefix + "_head_")


def _get(layers: dict[str, KerasLayer], name: str, path) -> KerasLayer:
    if name not in layers:
        raise WeightsError(f"{path}: looks like a Keras ConvNeXt but layer {name!r} is missing; only "
                           f"the complete keras.applications ConvNeXt is supported")
    return layers[name]


def _conv(layer: KerasLayer, prefix: str, path) -> dict[str, np.ndarray]:
    kernel = layer.weights.get("kernel")
    if kernel is None or kernel.ndim != 4 or "bias" not in layer.weights:
        raise WeightsError(f"{path}: expected a Conv2D with kernel and bias, found {layer.describe()}")
    # Conv2D (kh, kw, in/groups, out) -> torch (out, in/groups, kh, kw); also right for the
    # depthwise convolutions, which Keras ConvNeXt writes as Conv2D(groups=C): (7, 7, 1, C).
    return {f"{prefix}.weight": kernel.transpose(3, 2, 0, 1), f"{prefix}.bias": layer.weights["bias"]}


def dense(layer: KerasLayer, prefix: str, path) -> dict[str, np.ndarray]:
    kernel = layer.weights.get("kernel")
    if kernel is None or kernel.ndim != 2:
        raise WeightsError(f"{path}: expected a Dense layer with a 2-D kernel, found {layer.describe()}")
    bias = layer.weights.get("bias", np.zeros(kernel.shape[1], dtype=np.float32))
    # Dense (in, out) -> torch Linear (out, in).
    return {f"{prefix}.weight": kernel.T, f"{prefix}.bias": bias}


def layer_norm(layer: KerasLayer, prefix: str, path) -> dict[str, np.ndarray]:
    if set(layer.weights) != {"gamma", "beta"}:
        raise WeightsError(f"{path}: expected a LayerNormalization with gamma and beta, found {layer.describe()}")
    eps = (layer.config or {}).get("epsilon", 1e-6)
    if abs(float(eps) - 1e-6) > 1e-12:
        raise WeightsError(f"{path}: LayerNormalization {layer.name} has epsilon {eps}; Keras and timm "
                           f"ConvNeXt use 1e-6 and no other value is supported")
    return {f"{prefix}.weight": layer.weights["gamma"], f"{prefix}.bias": layer.weights["beta"]}


def convert_backbone(layers: dict[str, KerasLayer], p: str, path) -> tuple[dict[str, np.ndarray], str, dict]:
    """-> (timm state dict without head, timm model name, extra timm kwargs)."""
    state: dict[str, np.ndarray] = {}
    state.update(_conv(_get(layers, f"{p}_stem_conv", path), "stem.0", path))
    state.update(layer_norm(_get(layers, f"{p}_stem_layernorm", path), "stem.1", path))
    depths, dims = [], []
    has_layer_scale = f"{p}_stage_0_block_0_layer_scale" in layers
    for stage in range(4):
        if stage > 0:
            ln = _get(layers, f"{p}_downsampling_layernorm_{stage - 1}", path)
            state.update(layer_norm(ln, f"stages.{stage}.downsample.0", path))
            state.update(_conv(_get(layers, f"{p}_downsampling_conv_{stage - 1}", path),
                               f"stages.{stage}.downsample.1", path))
        block = 0
        while f"{p}_stage_{stage}_block_{block}_depthwise_conv" in layers:
            keras_block = f"{p}_stage_{stage}_block_{block}"
            timm_block = f"stages.{stage}.blocks.{block}"
            for keras_part, timm_part in _BLOCK_PARTS.items():
                if keras_part == "layer_scale" and not has_layer_scale:
                    continue
                layer = _get(layers, f"{keras_block}_{keras_part}", path)
                if keras_part == "depthwise_conv":
                    state.update(_conv(layer, f"{timm_block}.{timm_part}", path))
                elif keras_part == "layernorm":
                    state.update(layer_norm(layer, f"{timm_block}.{timm_part}", path))
                elif keras_part == "layer_scale":
                    if "gamma" not in layer.weights:
                        raise WeightsError(f"{path}: expected a LayerScale with one variable, found {layer.describe()}"
                                           f" with {sorted(layer.weights)}")
                    state[f"{timm_block}.gamma"] = layer.weights["gamma"]
                else:
                    state.update(dense(layer, f"{timm_block}.{timm_part}", path))
            block += 1
        depths.append(block)
        dims.append(int(state[f"stages.{stage}.blocks.0.conv_dw.weight"].shape[0]) if block else 0)
    model_name = VARIANTS.get((tuple(depths), tuple(dims)))
    if model_name is None:
        known = ", ".join(f"{name} depths {d} dims {c}" for (d, c), name in VARIANTS.items())
        raise WeightsError(f"{path}: Keras ConvNeXt with depths {tuple(depths)} and dims {tuple(dims)} is "
                           f"not one of the supported variants ({known})")
    kwargs = {} if has_layer_scale else {"ls_init_value": None}
    return state, model_name, kwargs


def normalization_mean_std(layer: KerasLayer | None, path) -> tuple[tuple, tuple] | None:
    """ImageNet-style mean/std (0-1 scale) from Keras' in-model Normalization for 0-255 inputs."""
    if layer is None:
        return None
    mean = layer.weights.get("mean")
    variance = layer.weights.get("variance")
    if mean is None and layer.config is not None:
        mean, variance = layer.config.get("mean"), layer.config.get("variance")
    if mean is None:
        # keras.applications' PreStem passes ImageNet mean/variance as constants; .weights.h5
        # files store no values for it, so its documented constants are the only source.
        mean = [0.485 * 255, 0.456 * 255, 0.406 * 255]
        variance = [(0.229 * 255) ** 2, (0.224 * 255) ** 2, (0.225 * 255) ** 2]
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    variance = np.asarray(variance, dtype=np.float64).reshape(-1)
    if mean.size != 3 or variance.size != 3:
        raise WeightsError(f"{path}: Normalization layer {layer.name} has mean {mean} and variance "
                           f"{variance}; expected 3 values (RGB) each")
    std = np.sqrt(variance)
    # Our pipeline computes (x/255 - m) / s; Keras computes (x - M) / S on 0-255 pixels: m = M/255, s = S/255.
    return tuple(float(v) for v in mean / 255.0), tuple(float(v) for v in std / 255.0)
