"""This project's checkpoint: safetensors weights + a JSON sidecar saying how to rebuild them.

    best.safetensors   timm state dict (metadata repeats the sidecar, so the file alone is enough)
    best.json          {"format": "dogbreeds-checkpoint", "version": 1, "model": ..., "model_kwargs": ...,
                        "num_classes": ..., "classes": [...], "preprocessing": {...}, "extra": {...}}

Both files are written to a temporary name in the same folder and moved into place with
os.replace, so a crash mid-write never leaves a half-written checkpoint under the real name.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dogbreeds.data.records import ClassInfo
from dogbreeds.errors import DogbreedsError, WeightsError
from dogbreeds.preprocessing import Preprocessing

from .formats import ConvertedWeights
from .safety import KIND_NAMES, check_regular, parse_json, read_json, sniff, validate_model_kwargs, validate_sidecar

log = logging.getLogger("dogbreeds")

FORMAT = "dogbreeds-checkpoint"
VERSION = 1
METADATA_KEY = "dogbreeds"  # safetensors metadata entry holding the sidecar JSON
RUN_CHECKPOINTS = ("best.safetensors", "last.safetensors")


def sidecar_path(path) -> Path:
    return Path(path).with_suffix(".json")


def save_model_checkpoint(model, path, classes: ClassInfo, extra: dict | None = None) -> Path:
    """Write `model`'s weights to `path` (.safetensors) and the sidecar next to it."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise DogbreedsError(f"checkpoint path must end in .safetensors, got {path}")
    name = getattr(model, "dogbreeds_name", None)
    if not name:
        raise DogbreedsError("cannot save a checkpoint of a model not made by dogbreeds.create_model (no model.dogbreeds_name)")
    num_classes = int(getattr(model, "num_classes", len(classes)))
    if num_classes != len(classes):
        raise DogbreedsError(f"model has {num_classes} outputs but {len(classes)} classes were given for {path}")
    preprocessing = getattr(model, "preprocessing", None) or Preprocessing()
    # Refused here, not only when read back: a checkpoint that could not be loaded is worse than none.
    validate_model_kwargs(dict(getattr(model, "dogbreeds_kwargs", {}) or {}), f"model to save as {path}")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": name,
        "model_kwargs": dict(getattr(model, "dogbreeds_kwargs", {}) or {}),
        "num_classes": num_classes,
        "classes": classes.to_json(),
        "preprocessing": preprocessing.to_dict(),
        "extra": extra or {},
    }
    text = json.dumps(meta, indent=2, default=_json_default) + "\n"
    # safetensors refuses tensors that share memory; clone() gives each its own storage.
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, METADATA_KEY: text})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _write_atomic(sidecar_path(path), text)
    return path


def _json_default(value):
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars in `extra`
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in the checkpoint sidecar: {value!r}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def safetensors_metadata(path: Path, what: str = "safetensors file") -> dict[str, str]:
    """The string metadata of a safetensors file (a regular file: a FIFO or device is refused
    before it is opened); a damaged file is a WeightsError naming it."""
    from safetensors import SafetensorError, safe_open

    check_regular(path, "checkpoint")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"{what} {path} is corrupt or truncated: {exc}; retrain or restore it") from exc


def _embedded_meta(path: Path) -> dict | None:
    metadata = safetensors_metadata(path)
    if metadata.get("format") != FORMAT or METADATA_KEY not in metadata:
        return None
    return parse_json(metadata[METADATA_KEY], f"{path} (metadata entry {METADATA_KEY!r})", "checkpoint metadata")


def is_dogbreeds_checkpoint(path, kind: str) -> bool:
    if kind != "safetensors":
        return False
    path = Path(path)
    return _sidecar_format(path) == FORMAT or _embedded_meta(path) is not None


def _sidecar_format(path: Path) -> str | None:
    side = sidecar_path(path)
    if path.suffix == ".json" or not side.is_file():
        return None
    try:
        meta = read_json(side, "checkpoint sidecar")
    except WeightsError:
        return None
    return meta.get("format") if isinstance(meta, dict) else None


# What `predict` and `serve` take as a model (said when given something else); `export`,
# `explain` and `evaluate` take the first two.
ACCEPTED = ("a run directory written by `dogbreeds train`, one of its checkpoints/*.safetensors files "
            "(this project's checkpoints: safetensors weights with a .json sidecar), or, for predict and serve, "
            "an exported .onnx file")


def not_a_checkpoint(path: Path, kind: str | None) -> WeightsError:
    """The error for a file that is not one of this project's checkpoints, saying what it is."""
    what = KIND_NAMES.get(kind, kind) if kind else "not a weights file"
    if kind == "safetensors":
        what = "a safetensors file without dogbreeds metadata (timm or Hugging Face weights?)"
    return WeightsError(
        f"{path} is {what}, not a checkpoint of this project; a model here is {ACCEPTED}. To use other "
        f"weights, train from them (`dogbreeds train --weights {path} ...`) or load them in Python "
        f"with create_model(weights=...)"
    )


def read_checkpoint_meta(path) -> dict:
    """The sidecar of a checkpoint (`x.safetensors` or `x.json`), validated against the schema
    (safety.validate_sidecar): metadata is data, never a path or code."""
    path = Path(path)
    weights = path.with_suffix(".safetensors") if path.suffix == ".json" else path
    side = sidecar_path(weights)
    if weights.exists() or weights.is_symlink():
        kind = sniff(weights)  # a regular file (never blocks on a FIFO) of a known kind, or an error
        if kind != "safetensors":
            raise not_a_checkpoint(weights, kind)
    if side.exists() and side != weights:
        meta, source = read_json(side, "checkpoint sidecar"), side
    elif weights.is_file() and (meta := _embedded_meta(weights)) is not None:
        source = f"{weights} (metadata entry {METADATA_KEY!r})"
        log.info("%s: sidecar %s missing; using the copy stored in the safetensors metadata", weights, side.name)
    elif weights.is_file():
        raise not_a_checkpoint(weights, "safetensors")
    else:
        raise WeightsError(f"{weights} has no dogbreeds sidecar ({side.name}) and no embedded metadata")
    return validate_sidecar(meta, source, FORMAT, VERSION)


def convert_checkpoint(path) -> ConvertedWeights:
    from .formats.reading import read_tensors

    path = Path(path)
    meta = read_checkpoint_meta(path)
    tensors, _ = read_tensors(path, "safetensors")
    pre = meta.get("preprocessing")
    return ConvertedWeights(
        format=FORMAT,
        model_name=meta["model"],
        state_dict=tensors,
        num_classes=meta["num_classes"],
        preprocessing=Preprocessing.from_dict(pre) if pre else None,
        model_kwargs=dict(meta.get("model_kwargs") or {}),
    )


def find_run_checkpoint(path) -> Path | None:
    """best, else last, in a run dir (`checkpoints/`) or in a checkpoints folder itself (RunDir's search)."""
    from dogbreeds.rundir import RunDir

    return RunDir(path).find_checkpoint()
