"""Reading weight files safely: sniff the content, never execute pickled code.

Every file is identified by its first bytes, not its name, because checkpoints travel
with misleading suffixes (`.bin` that is a zip, `.pth` that is safetensors, ...).
"""
from __future__ import annotations

import json
import logging
import pickle
import pickletools
import struct
import warnings
from pathlib import Path

import torch

from dogbreeds.errors import WeightsError

log = logging.getLogger("dogbreeds")

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6 writes a zip archive
PICKLE_PROTO = 0x80  # legacy torch.save and plain pickle start with the PROTO opcode

# Wrappers training scripts put around a state dict. EMA weights first: when a file
# carries both, the averaged ones are what the authors evaluate and publish.
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")
# Prefixes added by DistributedDataParallel and torch.compile.
STRIP_PREFIXES = ("module.", "_orig_mod.")


def sniff(path: Path) -> str:
    """'hdf5' | 'torch-zip' | 'pickle' | 'safetensors'; raises WeightsError otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        size = path.stat().st_size
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc.strerror or exc}") from exc
    if not head:
        raise WeightsError(f"weights file {path} is empty (0 bytes); download or copy it again")
    if head.startswith(HDF5_MAGIC):
        return "hdf5"
    if head.startswith(ZIP_MAGIC):
        return "torch-zip"
    if head[0] == PICKLE_PROTO:
        return "pickle"
    # safetensors: 8-byte little-endian header length, then a JSON object.
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    raise WeightsError(
        f"{path} is not a recognised weights file (first bytes {head[:8]!r}); expected a PyTorch "
        ".pth/.bin, a .safetensors or a Keras .h5 file"
    )


def read_tensors(path: Path, kind: str | None = None) -> tuple[dict, dict]:
    """Load a torch or safetensors file -> (object, safetensors metadata or {})."""
    kind = kind or sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind in ("torch-zip", "pickle"):
        return _torch_load(path, kind), {}
    raise WeightsError(f"{path} is a {kind} file, which cannot be read as a PyTorch state dict")


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"safetensors file {path} is corrupt or truncated: {exc}") from exc
    return tensors, metadata


def _torch_load(path: Path, kind: str):
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it may not parse; a failure is reported below anyway.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if _needs_code(path, kind, str(exc)):
            raise WeightsError(
                f"refusing to execute pickled code in {path}: the file contains Python objects, not "
                "only tensors; re-save it as a plain state dict or safetensors "
                "(torch.save(model.state_dict(), ...) or safetensors.torch.save_file)"
            ) from None  # the unpickler's long advice tells users to disable the safety check
        raise WeightsError(f"{path} is corrupt or not a PyTorch weights file: {_first_line(exc)}") from None
    except (RuntimeError, EOFError, ValueError, OSError, struct.error) as exc:
        raise WeightsError(f"{path} is corrupt or truncated: {_first_line(exc)}") from exc


def _needs_code(path: Path, kind: str, message: str) -> bool:
    """Did the safe unpickler refuse because the pickle imports Python objects?

    torch names the refused global for zip files. Plain pickles (pickle.dump) use opcodes
    the safe unpickler does not know, so scan the opcodes instead: pickletools only
    parses, it never imports or calls anything.
    """
    if "allowed global" in message or "Unsupported global" in message:
        return True
    if kind != "pickle":
        return False
    try:
        data = path.read_bytes()
        return any(op.name in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ") for op, _, _ in pickletools.genops(data))
    except Exception:  # not a parseable pickle: corrupt, reported by the caller
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def unwrap_state_dict(obj, path: Path) -> tuple[dict, str | None]:
    """Find the tensor dict inside a checkpoint -> (state dict, wrapper key or None)."""
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    wrapper = None
    for _ in range(3):  # wrappers nest at most a couple of levels ({'model': {'state_dict': ...}})
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict) and obj[k]), None)
        if key is None or _all_tensors(obj):
            break
        wrapper = key if wrapper is None else f"{wrapper}.{key}"
        obj = obj[key]
    if not _all_tensors(obj):
        others = sorted(k for k, v in obj.items() if not torch.is_tensor(v))[:8]
        raise WeightsError(
            f"{path} is not a state dict: entries {others} are not tensors and none of the usual wrapper "
            f"keys {list(WRAPPER_KEYS)} holds the weights"
        )
    if wrapper:
        log.info("%s: using the weights under %r", path, wrapper)
    return strip_prefixes(obj), wrapper


def _all_tensors(d: dict) -> bool:
    return bool(d) and all(torch.is_tensor(v) for v in d.values())


def strip_prefixes(sd: dict) -> dict:
    for prefix in STRIP_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read JSON file {path}: {exc}") from exc
