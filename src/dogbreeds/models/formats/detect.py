"""Detect a weights file's format from its content and convert it to timm key names."""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

from dogbreeds.errors import WeightsError

from . import ConvertedWeights, hf, official, timm_format, torchvision_format
from .reading import read_tensors, sniff, unwrap_state_dict

log = logging.getLogger("dogbreeds")

KERAS_MODULE = "dogbreeds.models.formats.keras"


def convert_weights(path, name: str | None = None) -> ConvertedWeights:
    """Any supported file or folder -> ConvertedWeights. `name` (a timm model name) helps only
    where the file cannot say its architecture (plain timm state dicts)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"weights not found: {path}")
    try:
        return _convert(path, name)
    except (KeyError, IndexError) as exc:
        # A converter looked for a tensor the file's other keys promised (e.g. the first block of
        # a stage); a hand-made or damaged file lacks it.
        raise WeightsError(f"{path}: the weights lack {exc} (or hold it in another shape), which the rest of the "
                           "file implies; the file is incomplete or was not written by the program it imitates") from None


def _convert(path: Path, name: str | None) -> ConvertedWeights:
    from dogbreeds.models import checkpoint_format  # imports this package: import late

    if path.is_dir():
        if hf.is_folder(path):
            return _log(hf.convert_folder(path), path)
        checkpoint = checkpoint_format.find_run_checkpoint(path)
        if checkpoint is None:
            raise WeightsError(
                f"{path} is a folder but neither a transformers save_pretrained folder (config.json) "
                "nor a dogbreeds run (checkpoints/best.safetensors or last.safetensors)"
            )
        return _log(checkpoint_format.convert_checkpoint(checkpoint), checkpoint)
    kind = sniff(path)
    if kind == "hdf5":
        return _log(_keras(path, name), path)
    if checkpoint_format.is_dogbreeds_checkpoint(path, kind):
        return _log(checkpoint_format.convert_checkpoint(path), path)
    obj, _ = read_tensors(path, kind)
    sd, _ = unwrap_state_dict(obj, path)
    if hf.matches(sd):
        converted = hf.convert(sd, None, None, source=str(path))
    elif official.matches(sd):
        converted = official.convert(sd)
    elif torchvision_format.kind(sd):
        converted = torchvision_format.convert(sd, path)
    else:
        converted = timm_format.convert(sd, name, path)
    return _log(converted, path)


def _keras(path: Path, name: str | None) -> ConvertedWeights:
    try:
        keras_format = importlib.import_module(KERAS_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != KERAS_MODULE:
            raise
        raise WeightsError(f"{path} is a Keras HDF5 file, but Keras weight support ({KERAS_MODULE}) is not installed") from None
    return keras_format.load_keras_weights(path, name=name)


def _log(converted: ConvertedWeights, path) -> ConvertedWeights:
    log.info("%s: %s weights for %s (%d classes)", path, converted.format, converted.model_name, converted.num_classes)
    return converted
