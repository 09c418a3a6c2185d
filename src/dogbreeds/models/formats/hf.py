"""Hugging Face transformers ConvNext: a `save_pretrained` folder or its weight file alone."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from dogbreeds.errors import WeightsError
from dogbreeds.preprocessing import Preprocessing

from . import ConvertedWeights
from .arch import convnext_model, stage_layout
from ..safety import (confined_file, expect_dict, expect_int, expect_int_list, expect_number, expect_str,
                      validate_preprocessing)
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
    return (path / "config.json").exists() or (path / "config.json").is_symlink()


def convert_folder(path: Path) -> ConvertedWeights:
    config_file = confined_file(path, "config.json", "transformers config")
    config = read_json(config_file, "transformers config")
    model_type = config.get("model_type")
    if model_type != "convnext":
        raise WeightsError(
            f"{path}/config.json describes a transformers {model_type!r} model; only 'convnext' "
            "(ConvNextModel / ConvNextForImageClassification) folders can be loaded"
        )
    _check_config(config, config_file)
    sd = _read_folder_weights(path)
    preprocessing = _read_preprocessor(path)
    return convert(sd, config, preprocessing, source=str(path))


def _check_config(config: dict, source) -> None:
    """The config.json fields read here, of the types transformers writes (the stage layout is
    checked against the tensors by the factory, before any model is allocated)."""
    if config.get("depths") is not None:
        expect_int_list(config["depths"], source, "'depths'", 1, 64, 8)
    if config.get("hidden_sizes") is not None:
        expect_int_list(config["hidden_sizes"], source, "'hidden_sizes'", 1, 4096, 8)


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _read_folder_weights(path: Path) -> dict:
    for name in WEIGHT_FILES:
        if _present(path / name):
            file = confined_file(path, name, "weights file")
            return unwrap_state_dict(read_tensors(file)[0], file)[0]
    for name in SHARD_INDEXES:
        if _present(path / name):
            index_file = confined_file(path, name, "shard index")
            weight_map = expect_dict(read_json(index_file, "shard index").get("weight_map"), index_file, "'weight_map'")
            # Every entry names a file inside this folder, checked before any is opened: an index
            # must not make us read (or quote) a file elsewhere.
            shards = [confined_file(path, expect_str(shard, index_file, f"'weight_map'[{key!r:.40}]"),
                                    f"shard index entry {key!r:.40}")
                      for key, shard in sorted(weight_map.items(), key=lambda kv: str(kv[1]))]
            sd = {}
            for shard in sorted(set(shards)):
                sd.update(read_tensors(shard)[0])
            return sd
    raise WeightsError(f"{path} has config.json but no weights: expected one of {list(WEIGHT_FILES + SHARD_INDEXES)}")


def _read_preprocessor(folder: Path) -> Preprocessing:
    name = "preprocessor_config.json"
    if not _present(folder / name):
        return Preprocessing(source="transformers (no preprocessor_config.json: ImageNet defaults)")
    path = confined_file(folder, name, "transformers preprocessor config")
    cfg = read_json(path, "transformers preprocessor config")
    size = cfg.get("size", {})
    if isinstance(size, dict):
        edge = expect_int(size.get("shortest_edge", 224), path, "'size'['shortest_edge']", 8, 4096)
    else:
        edge = expect_int(size, path, "'size'", 8, 4096)
    # ConvNextImageProcessor crops only below 384 px; at 384 and above it resizes straight to size.
    crop = cfg.get("crop_pct")
    crop_pct = (expect_number(crop, path, "'crop_pct'", 0, 1, lo_open=True) if crop else 0.875) if edge < 384 else 1.0
    resample = cfg.get("resample", 3)
    interpolation = RESAMPLE.get(resample, "bicubic") if isinstance(resample, int) else "bicubic"
    fields = {"mean": cfg.get("image_mean", [0.485, 0.456, 0.406]), "std": cfg.get("image_std", [0.229, 0.224, 0.225])}
    validate_preprocessing({k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}, path)
    return Preprocessing(
        input_size=edge,
        mean=tuple(float(v) for v in fields["mean"]),
        std=tuple(float(v) for v in fields["std"]),
        crop_pct=crop_pct,
        interpolation=interpolation,
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
    name, kwargs = convnext_model(depths, dims, source)
    num_classes = int(out["head.fc.weight"].shape[0]) if "head.fc.weight" in out else 0
    if "head.norm.weight" not in out:
        raise WeightsError(f"{source}: transformers ConvNext weights without the final layernorm (convnext.layernorm)")
    log.debug("%s: transformers ConvNext -> %s %s", source, name, kwargs)
    return ConvertedWeights("transformers", name, out, num_classes, preprocessing or Preprocessing(source="transformers"), kwargs)
