"""Keras HDF5 weights (legacy full-model `.h5` and Keras 3 `.weights.h5`) -> timm state dicts.

Supported: keras.applications ConvNeXtTiny ... ConvNeXtXLarge and MobileNetV2 (the widths timm
registers: alpha 0.35, 0.5, 0.75, 1.0, 1.4), alone or wrapped in a functional/Sequential model
whose head is GlobalAveragePooling2D -> Dropout -> one Dense (softmax or linear). The Dense
becomes timm's classifier and its softmax is dropped: our models output logits.

The file is read with h5py only; Keras itself is needed by the tests (as the reference), never here.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from dogbreeds.errors import WeightsError
from dogbreeds.preprocessing import IMAGENET_MEAN, IMAGENET_STD, MINUS_ONE_TO_ONE_MEAN, MINUS_ONE_TO_ONE_STD, Preprocessing

from . import ConvertedWeights
from . import keras_convnext as convnext
from . import keras_mobilenetv2 as mobilenetv2
from .keras_h5 import KerasFile, KerasLayer, read_keras_file

SUPPORTED = (
    "keras.applications ConvNeXtTiny/Small/Base/Large/XLarge and MobileNetV2 (alpha 0.35, 0.5, "
    "0.75, 1.0, 1.4; any input size), optionally wrapped as backbone -> GlobalAveragePooling2D -> "
    "Dropout -> Dense(classes, softmax or linear)"
)
# Weightless layers allowed between the backbone and the classifier.
_HEAD_PASS_THROUGH = {"dropout", "input_layer", "add"}
_CONTAINERS = {"functional", "sequential", "model"}


def load_keras_weights(path: str | Path, name: str | None = None) -> ConvertedWeights:
    """Read a Keras HDF5 file and return its weights under timm's names.

    name: optional timm model name ("convnext_tiny", "mobilenetv2_100", ...) or family
    ("convnext", "mobilenetv2") the file must hold; WeightsError when it holds something else.
    """
    path = Path(path)
    kfile = read_keras_file(path)
    layers = kfile.by_name()
    if len(layers) != len(kfile.layers):
        raise WeightsError(f"{path}: several layers share one name; cannot map the weights unambiguously")
    prefix = convnext.find_prefix(set(layers))
    family = "convnext" if prefix is not None else "mobilenetv2" if mobilenetv2.is_mobilenetv2(set(layers)) else None
    if family is None:
        raise WeightsError(
            f"{path}: not a supported Keras architecture. Found {kfile.describe_layers()}. "
            f"Supported: {SUPPORTED}."
        )
    if name is not None and not name.startswith(family):
        raise WeightsError(f"{path}: holds a Keras {family} model, not the requested {name!r}; drop the name "
                           f"or pass a {family} model name")
    if family == "convnext":
        converted = _convnext(kfile, layers, prefix)
    else:
        converted = _mobilenetv2(kfile, layers, name)
    if name is not None and name not in (converted.model_name, family):
        raise WeightsError(f"{path}: holds a Keras model that maps to timm {converted.model_name!r}, "
                           f"not the requested {name!r}; drop the name or pass {converted.model_name!r}")
    return converted


# ---------------------------------------------------------------- head


def _head_layers(kfile: KerasFile, in_backbone) -> tuple[list[KerasLayer], list[KerasLayer], list[KerasLayer]]:
    """Split the layers outside the backbone into (dense, layer_norms, global_avg_pools); reject the rest."""
    dense, norms, pools, unsupported = [], [], [], []
    for layer in kfile.layers:
        if in_backbone(layer.name) or layer.kind in _CONTAINERS or layer.kind in _HEAD_PASS_THROUGH:
            continue
        if layer.kind == "dense":
            activation = (layer.config or {}).get("activation", "linear")
            if activation not in ("linear", "softmax", None):
                unsupported.append(f"{layer.name} (Dense with activation {activation!r})")
            dense.append(layer)
        elif layer.kind == "layer_normalization":
            norms.append(layer)
        elif layer.kind == "global_average_pooling2d":
            pools.append(layer)
        elif layer.kind in ("activation", "softmax"):
            activation = (layer.config or {}).get("activation", "softmax" if layer.kind == "softmax" else None)
            if activation not in ("linear", "softmax") and kfile.structure_known:
                unsupported.append(f"{layer.name} ({layer.kind} {activation!r})")
        elif layer.weights or kfile.structure_known:
            unsupported.append(layer.describe())
    if len(dense) > 1:
        unsupported.append(f"{len(dense)} Dense layers ({', '.join(d.describe() for d in dense)}); only one "
                           f"Dense classifier is supported")
    # Weights-only legacy files do not show the pooling layer of a nested head: GAP is assumed there.
    if dense and len(pools) != 1 and (pools or kfile.structure_known):
        unsupported.append(f"{len(pools)} GlobalAveragePooling2D layers before the Dense classifier; exactly one "
                           f"is supported")
    if unsupported:
        raise WeightsError(f"{kfile.path}: unsupported layers around the backbone: {'; '.join(unsupported)}. "
                           f"Supported: {SUPPORTED}.")
    return dense, norms, pools


def _classifier(dense: list[KerasLayer], timm_prefix: str, path) -> tuple[dict, int]:
    if not dense:
        return {}, 0
    weights = convnext.dense(dense[0], timm_prefix, path)
    return weights, int(weights[f"{timm_prefix}.weight"].shape[0])


# ---------------------------------------------------------------- families


def _mobilenetv2(kfile: KerasFile, layers: dict[str, KerasLayer], name: str | None) -> ConvertedWeights:
    path = kfile.path
    state = mobilenetv2.convert_backbone(layers, path)
    dense, norms, _ = _head_layers(kfile, mobilenetv2.is_backbone_layer)
    if norms:
        raise WeightsError(f"{path}: unsupported LayerNormalization {norms[0].name} after a MobileNetV2 backbone. "
                           f"Supported: {SUPPORTED}.")
    head, num_classes = _classifier(dense, "classifier", path)
    state.update(head)
    eps_values = {float(layer.config.get("epsilon", 1e-3)) for layer in kfile.layers
                  if layer.kind == "batch_normalization" and layer.config is not None}
    if len(eps_values) > 1:
        raise WeightsError(f"{path}: BatchNormalization layers use different epsilons {sorted(eps_values)}; "
                           f"timm needs one value")
    # keras.applications MobileNetV2 uses BatchNorm eps 1e-3 (.weights.h5 files carry no config).
    # Its stride-2 layers pad TF-style ("same": the extra row/column at the bottom/right), which
    # timm reproduces with pad_type="same".
    model_kwargs = {"pad_type": "same", "bn_eps": eps_values.pop() if eps_values else 1e-3}

    candidates = [n for n in mobilenetv2.TIMM_WIDTHS.values() if name in (None, "mobilenetv2", n)]
    if not candidates:
        raise WeightsError(f"{path}: {name!r} is not a MobileNetV2 a Keras file can map to; use one of "
                           f"{sorted(mobilenetv2.TIMM_WIDTHS.values())} or no name")
    mismatches = {}
    for model_name in candidates:
        problem = _mismatch_with_timm(state, model_name, num_classes, model_kwargs)
        if problem is None:
            break
        mismatches[model_name] = problem
    else:
        example = next(iter(mismatches.items()))
        raise WeightsError(
            f"{path}: a Keras MobileNetV2 ({mobilenetv2.keras_alpha_hint(layers, _backbone_container(kfile, 'Conv1'))}) "
            f"whose channel widths match none of timm's MobileNetV2 widths {sorted(mobilenetv2.TIMM_WIDTHS)} "
            f"(e.g. {example[0]}: {example[1]}); timm cannot build this width by name, so it cannot be "
            f"imported - retrain with one of those widths. Supported: {SUPPORTED}."
        )
    container = _backbone_container(kfile, "Conv1")
    size = _input_size(kfile) or mobilenetv2.input_size_from_name(container) or 224
    # Keras users feed x/127.5 - 1 images resized as a whole (image_dataset_from_directory and
    # tf.image.resize stretch to the target size, bilinear). crop_pct 1.0 keeps the whole short
    # side - the closest our resize-then-centre-crop pipeline gets to what the model was trained on.
    preprocessing = Preprocessing(size, MINUS_ONE_TO_ONE_MEAN, MINUS_ONE_TO_ONE_STD, crop_pct=1.0,
                                  interpolation="bilinear", source=f"keras MobileNetV2 ({path.name})")
    return _converted(model_name, state, num_classes, preprocessing, model_kwargs)


def _convnext(kfile: KerasFile, layers: dict[str, KerasLayer], prefix: str) -> ConvertedWeights:
    path = kfile.path
    state, model_name, model_kwargs = convnext.convert_backbone(layers, prefix, path)
    dense, norms, pools = _head_layers(kfile, lambda n: convnext.is_backbone_layer(n, prefix))
    if len(norms) != 1:
        raise WeightsError(f"{path}: expected one LayerNormalization after the ConvNeXt stages, found "
                           f"{[n.name for n in norms]}. Supported: {SUPPORTED}.")
    norm = norms[0]
    if _norm_before_pooling(norm, pools[0] if pools else None, prefix, bool(dense), kfile.structure_known):
        # include_top=False, pooling=None: Keras normalises every pixel, then the wrapper pools.
        model_kwargs["head_norm_first"] = True
        state.update(convnext.layer_norm(norm, "norm_pre", path))
    else:
        state.update(convnext.layer_norm(norm, "head.norm", path))
    head, num_classes = _classifier(dense, "head.fc", path)
    state.update(head)
    problem = _mismatch_with_timm(state, model_name, num_classes, model_kwargs)
    if problem is not None:
        raise WeightsError(f"{path}: Keras ConvNeXt weights do not fit timm {model_name}: {problem}")

    mean_std = convnext.normalization_mean_std(layers.get(f"{prefix}_prestem_normalization"), path)
    source = f"keras ConvNeXt ({path.name})"
    if mean_std is None:
        warnings.warn(f"{path}: no in-model Normalization layer found in this Keras ConvNeXt (built with "
                      f"include_preprocessing=False, or a weights-only file that does not list it); assuming "
                      f"ImageNet mean/std inputs - check how this model was trained", stacklevel=3)
        mean_std = (IMAGENET_MEAN, IMAGENET_STD)
        source += ", ImageNet mean/std assumed"
    size = _input_size(kfile) or 224
    # Same reasoning as MobileNetV2: Keras pipelines resize the whole photo (bilinear) to the input size.
    preprocessing = Preprocessing(size, mean_std[0], mean_std[1], crop_pct=1.0, interpolation="bilinear",
                                  source=source)
    return _converted(model_name, state, num_classes, preprocessing, model_kwargs)


def _norm_before_pooling(norm: KerasLayer, pool: KerasLayer | None, prefix: str, has_dense: bool,
                         structure_known: bool) -> bool:
    if norm.name == f"{prefix}_head_layernorm":
        return False  # include_top=True: GlobalAveragePooling2D -> LayerNorm -> Dense
    if pool is None:
        # Features only (include_top=False, pooling=None): per-pixel LayerNorm. But weights-only
        # legacy files do not list a nested model's weightless layers: there a Dense with no
        # visible pooling means the pooling sits inside the backbone (pooling="avg").
        return not (has_dense and not structure_known)
    if pool.container != norm.container:
        return True  # pooling lives in the wrapper, so the backbone's LayerNorm ran first
    if norm.config is not None and pool.config is not None:
        return norm.index < pool.index
    # .weights.h5 keeps no layer order: a pool beside the LayerNorm means pooling="avg", which
    # Keras ConvNeXt applies before its final LayerNorm.
    return False


# ---------------------------------------------------------------- helpers


def _backbone_container(kfile: KerasFile, layer_name: str) -> str | None:
    for layer in kfile.layers:
        if layer.name == layer_name:
            return layer.container or kfile.model_name
    return None


def _input_size(kfile: KerasFile) -> int | None:
    if kfile.input_shape is None or kfile.input_shape[0] is None:
        return None
    height, width = kfile.input_shape[0], kfile.input_shape[1]
    if height != width:
        raise WeightsError(f"{kfile.path}: the Keras model takes {height}x{width} inputs; only square "
                           f"inputs are supported")
    return int(height)


def _mismatch_with_timm(state: dict[str, np.ndarray], model_name: str, num_classes: int, kwargs: dict) -> str | None:
    """Compare keys and shapes with timm's model built on the meta device (no memory, no init)."""
    import timm
    import torch

    with torch.device("meta"):
        reference = timm.create_model(model_name, num_classes=num_classes, **kwargs).state_dict()
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    wrong = [f"{k} {tuple(state[k].shape)} vs timm {tuple(reference[k].shape)}"
             for k in state if k in reference and tuple(state[k].shape) != tuple(reference[k].shape)]
    if not (missing or unexpected or wrong):
        return None
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches (e.g. {wrong[0]})")
    if missing:
        parts.append(f"missing {missing[:3]}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:3]}")
    return ", ".join(parts)


def _converted(model_name, state, num_classes, preprocessing, model_kwargs) -> ConvertedWeights:
    import torch

    tensors = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in state.items()}
    return ConvertedWeights("keras", model_name, tensors, num_classes, preprocessing, dict(model_kwargs))
