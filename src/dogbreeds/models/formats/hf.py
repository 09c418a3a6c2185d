"""Hugging Face transformers ConvNext: a `save_pretrained` folder or its weight file alone."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from dogbreeds.errors import WeightsError
from dogbreeds.preprocessing import Preprocessing

from . import ConvertedWeights
from .arch import convnext_model, stage_layout
from .reading import read_json, read_tensors, unwrap_state_dict

log = logging.getLogger("dogbreeds")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# transformers' `resample` codes are PIL's.
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}

# transformers name -> timm name, applied in order to the part after the 'convnext.' prefix.
_RENAMES = (
    (r"^embeddings\.patch_embeddings\.", "stem.0."),
    (r"^embeddings\.layernorm\.", "stem.1."),
    (r"^encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"\.dwconv\.", ".conv_dw."),
    (r"\.layernorm\.", ".norm."),
    (r"\.pwconv(\d)\.", r".mlp.fc\1."),
    (r"\.layer_scale_parameter$", ".gamma"),
    (r"^layernorm\.", "head.norm."),
)


def matches(sd: dict) -> bool:
    return any(k.startswith(("convnext.embeddings.", "embeddings.patch_embeddings.")) for k in sd)


def is_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def convert_folder(path: Path) -> ConvertedWeights:
    config = read_json(path / "config.json")
    model_type = config.get("model_type")
    if model_type != "convnext":
        raise WeightsError(
            f"{path}/config.json describes a transformers {model_type!r} model; only 'convnext' "
            "(ConvNextModel / ConvNextForImageClassification) folders can be loaded"
        )
    sd = _read_folder_weights(path)
    preprocessing = _read_preprocessor(path / "preprocessor_config.json")
    return convert(sd, config, preprocessing, source=str(path))


def _read_folder_weights(path: Path) -> dict:
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return unwrap_state_dict(read_tensors(path / name)[0], path / name)[0]
    for name in SHARD_INDEXES:
        if (path / name).is_file():
            shards = sorted(set(read_json(path / name).get("weight_map", {}).values()))
            sd = {}
            for shard in shards:
                sd.update(read_tensors(path / shard)[0])
            return sd
    raise WeightsError(f"{path} has config.json but no weights: expected one of {list(WEIGHT_FILES + SHARD_INDEXES)}")


def _read_preprocessor(path: Path) -> Preprocessing:
    if not path.is_file():
        return Preprocessing(source="transformers (no preprocessor_config.json: ImageNet defaults)")
    cfg = read_json(path)
    size = cfg.get("size", {})
    edge = int(size.get("shortest_edge", 224)) if isinstance(size, dict) else int(size)
    # ConvNextImageProcessor crops only below 384 px; at 384 and above it resizes straight to size.
    crop_pct = float(cfg.get("crop_pct") or 0.875) if edge < 384 else 1.0
    return Preprocessing(
        input_size=edge,
        mean=tuple(cfg.get("image_mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("image_std", (0.229, 0.224, 0.225))),
        crop_pct=crop_pct,
        interpolation=RESAMPLE.get(cfg.get("resample", 3), "bicubic"),
        source="transformers preprocessor_config.json",
    )


def convert(sd: dict, config: dict | None, preprocessing: Preprocessing | None, source: str) -> ConvertedWeights:
    # transformers' final layernorm uses config.layer_norm_eps (1e-12) where timm uses 1e-6 for
    # every norm; on real activations (variance ~1) that moves logits by ~1e-6, well inside fp32
    # agreement, so no per-layer eps override is needed.
    out = {}
    for key, value in sd.items():
        if key.startswith("classifier."):
            out["head.fc." + key[len("classifier."):]] = value
            continue
        key = key.removeprefix("convnext.")
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    if config and config.get("depths") and config.get("hidden_sizes"):
        depths, dims = config["depths"], config["hidden_sizes"]
    else:  # the weight file alone: read the stage layout from the keys
        layout = stage_layout(out, r"stages\.(\d+)\.blocks\.(\d+)\.")
        depths = list(layout.values())
        dims = [out[f"stages.{s}.blocks.0.conv_dw.weight"].shape[0] for s in layout]
    name, kwargs = convnext_model(depths, dims)
    num_classes = int(out["head.fc.weight"].shape[0]) if "head.fc.weight" in out else 0
    if "head.norm.weight" not in out:
        raise WeightsError(f"{source}: transformers ConvNext weights without the final layernorm (convnext.layernorm)")
    log.debug("%s: transformers ConvNext -> %s %s", source, name, kwargs)
    return ConvertedWeights("transformers", name, out, num_classes, preprocessing or Preprocessing(source="transformers"), kwargs)
