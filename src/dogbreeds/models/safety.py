"""What every weights reader checks before it trusts a file (docs/security.md).

One place for each check, called by every format:

- `check_regular` / `open_regular`: a weights path is a regular file (never a FIFO, socket or
  device: opening those can block forever or read without end), opened without blocking;
- `sniff`: what kind of weights file it is, from its first bytes;
- `check_declared`: sizes a file declares (tensor shapes, zip entries, HDF5 datasets) fit the
  bytes it holds, checked before anything is allocated;
- `confined_file`: a file named inside a folder (a shard index entry) stays inside it;
- `read_json` and the `expect_*` helpers: JSON of the right shape, or an error naming the file
  and the field;
- `validate_model_kwargs` / `validate_sidecar`: the schema of checkpoint metadata. Metadata is
  data, never a path: `checkpoint_path`, `pretrained_cfg_overlay` and other kwargs that make
  timm open files or download are refused, and so is any key outside the schema.

Plain Python (no torch, no timm): the torch-free ONNX path reads checkpoint sidecars through it.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from pathlib import Path
from typing import Any

from dogbreeds.errors import WeightsError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6 writes a zip archive
PICKLE_PROTO = 0x80  # legacy torch.save and plain pickle start with the PROTO opcode

KIND_NAMES = {
    "hdf5": "a Keras HDF5 file (.h5)",
    "torch-zip": "a PyTorch file (torch.save, zip format: .pth/.pt/.bin)",
    "pickle": "a pickle / legacy PyTorch file (.pth/.pkl)",
    "safetensors": "a safetensors file",
}

# Compressed data (deflate in a zip or an HDF5 filter) may declare more bytes than it stores.
# Float weights barely compress (about 1.1x); 16x plus 1 MiB leaves room for zero biases and
# still bounds what a small file can make us allocate.
MAX_COMPRESSION_RATIO = 16
COMPRESSION_SLACK = 1 << 20
# JSON metadata larger than this is not metadata (a 100,000-class sidecar is about 10 MB).
MAX_JSON_BYTES = 32 << 20
MAX_CLASSES = 100_000


# --- files -------------------------------------------------------------------------------------

def describe_mode(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path, what: str = "weights file") -> os.stat_result:
    """stat(path) of a regular file (symlinks followed); WeightsError for anything else, at once."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise WeightsError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise WeightsError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise WeightsError(f"{path} is {describe_mode(st.st_mode)}, not a regular file; a {what} must be a "
                           "plain file (copy the weights into one)")
    return st


def open_regular(path, what: str = "weights file"):
    """A binary file object for a regular file. Opened with O_NONBLOCK and checked again on the
    open descriptor, so a FIFO put in its place after the check cannot make the open block."""
    check_regular(path, what)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise WeightsError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise WeightsError(f"{path} is {describe_mode(st.st_mode)}, not a regular file; a {what} must be a plain file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def sniff(path) -> str:
    """'hdf5' | 'torch-zip' | 'pickle' | 'safetensors'; raises WeightsError otherwise."""
    path = Path(path)
    with open_regular(path) as f:
        head = f.read(16)
        size = os.fstat(f.fileno()).st_size
    if not head:
        raise WeightsError(f"weights file {path} is empty (0 bytes); download or copy it again")
    if head.startswith(HDF5_MAGIC):
        return "hdf5"
    if head.startswith(ZIP_MAGIC):
        return "torch-zip"
    # safetensors: 8-byte little-endian header length, then a JSON object. Checked before the
    # pickle opcode: a header length whose low byte is 0x80 also starts with PICKLE_PROTO.
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[0] == PICKLE_PROTO:
        return "pickle"
    # The bytes themselves are not repeated: the file may not be the caller's to show.
    looks = "text" if all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "binary data of no known format"
    raise WeightsError(
        f"{path} is not a recognised weights file (it starts with {looks}); expected a PyTorch "
        ".pth/.bin, a .safetensors or a Keras .h5 file"
    )


def check_declared(path, what: str, declared: int, available: int) -> None:
    """Refuse, before allocating, a `what` that declares more bytes than the file can hold."""
    if declared > available:
        raise WeightsError(
            f"{path}: {what}: {_size(declared)} declared, but the file holds only {_size(available)}; the file "
            "is truncated or crafted and will not be loaded"
        )


def compressed_allowance(stored: int) -> int:
    """Most bytes that `stored` compressed bytes may declare (see MAX_COMPRESSION_RATIO)."""
    return stored * MAX_COMPRESSION_RATIO + COMPRESSION_SLACK


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def confined_file(folder, name, what: str) -> Path:
    """folder/name, refused unless `name` is a plain relative path that stays inside `folder`
    (no '..', not absolute, no symlink out of it). In a Hugging Face cache snapshot
    (.../snapshots/<revision>/) files are symlinks to ../../blobs/: those are allowed."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise WeightsError(f"{folder}: {what} names {_short(name)}, not a file name inside the folder")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or name.startswith(("/", "\\")):
        raise WeightsError(f"{folder}: {what} names {_short(name)}, a path outside the folder; only files "
                           "inside the folder are read")
    root = folder.resolve()
    target = (folder / rel).resolve()
    allowed = [root]
    if root.parent.name == "snapshots":  # huggingface_hub's cache layout
        allowed.append(root.parent.parent / "blobs")
    if not any(target == r or target.is_relative_to(r) for r in allowed):
        raise WeightsError(f"{folder}: {what} {_short(name)} is a symlink that leads outside the folder; "
                           "only files inside the folder are read")
    check_regular(folder / rel, what)
    return folder / rel


# --- JSON ----------------------------------------------------------------------------------------

def read_json(path, what: str = "JSON file") -> Any:
    """Parse a JSON file (a regular file, at most MAX_JSON_BYTES) or raise WeightsError naming it."""
    path = Path(path)
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_JSON_BYTES:
            raise WeightsError(f"{what} {path} is {_size(size)}; metadata files are at most {_size(MAX_JSON_BYTES)}")
        data = f.read(MAX_JSON_BYTES + 1)
    return parse_json(data, path, what)


def parse_json(data: bytes | str, source, what: str = "JSON") -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting bombs
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"{what} {source} is not valid JSON ({detail[:200]}); restore or re-save it") from None


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad(source, field: str, wanted: str, value) -> WeightsError:
    return WeightsError(f"{source}: {field} must be {wanted}, got {_short(value)}; the file is damaged or was not "
                        "written by the program it claims - restore it or get a fresh copy")


def expect_dict(value, source, field: str) -> dict:
    if not isinstance(value, dict):
        raise _bad(source, field, "a JSON object", value)
    return value


def expect_list(value, source, field: str) -> list:
    if not isinstance(value, list):
        raise _bad(source, field, "a JSON list", value)
    return value


def expect_str(value, source, field: str) -> str:
    if not isinstance(value, str):
        raise _bad(source, field, "a string", value)
    return value


def expect_int(value, source, field: str, lo: int, hi: int) -> int:
    if not _is_int(value) or not lo <= value <= hi:
        raise _bad(source, field, f"an integer from {lo} to {hi}", value)
    return value


def expect_number(value, source, field: str, lo: float, hi: float, lo_open: bool = False) -> float:
    if not _is_number(value) or not (lo < value if lo_open else lo <= value) or not value <= hi:
        raise _bad(source, field, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]", value)
    return float(value)


def expect_int_list(value, source, field: str, lo: int, hi: int, max_len: int) -> list[int]:
    if not (isinstance(value, (list, tuple)) and 1 <= len(value) <= max_len
            and all(_is_int(v) and lo <= v <= hi for v in value)):
        raise _bad(source, field, f"a list of 1 to {max_len} integers from {lo} to {hi}", value)
    return [int(v) for v in value]


# --- checkpoint metadata schema ------------------------------------------------------------------

def _bool_rule(v):
    return isinstance(v, bool)


def _rate_rule(v):
    return _is_number(v) and 0 <= v < 1


# model_kwargs a file may carry: what the converters and training write (keras: pad_type,
# bn_eps, head_norm_first, ls_init_value; ConvNeXt of other sizes: depths, dims; training:
# conv_mlp, drop_path_rate). Each value is checked; nothing else passes.
MODEL_KWARGS = {
    "conv_mlp": ("true or false", _bool_rule),
    "head_norm_first": ("true or false", _bool_rule),
    "pad_type": ("'' or 'same'", lambda v: isinstance(v, str) and v in ("", "same")),
    "bn_eps": ("a number in (0, 0.1]", lambda v: _is_number(v) and 0 < v <= 0.1),
    "ls_init_value": ("null or a number in [0, 10]", lambda v: v is None or (_is_number(v) and 0 <= v <= 10)),
    "drop_path_rate": ("a number in [0, 1)", _rate_rule),
    "drop_rate": ("a number in [0, 1)", _rate_rule),
    "depths": ("a list of 1 to 8 integers from 1 to 64",
               lambda v: isinstance(v, (list, tuple)) and 1 <= len(v) <= 8 and all(_is_int(d) and 1 <= d <= 64 for d in v)),
    "dims": ("a list of 1 to 8 integers from 1 to 4096",
             lambda v: isinstance(v, (list, tuple)) and 1 <= len(v) <= 8 and all(_is_int(d) and 1 <= d <= 4096 for d in v)),
}
# Kwargs that make timm open a file or reach the network: never taken from a file.
PATH_BEARING = ("checkpoint_path", "pretrained_cfg_overlay", "pretrained_cfg", "pretrained", "cache_dir",
                "pretrained_strict", "hf_hub_id", "url", "file")


def validate_model_kwargs(kwargs, source, field: str = "model_kwargs") -> dict:
    """The `model_kwargs` of a checkpoint or converter, checked against MODEL_KWARGS."""
    expect_dict(kwargs, source, field)
    for key, value in kwargs.items():
        if key in PATH_BEARING:
            raise WeightsError(f"{source}: {field} carries {key!r}, which would make timm open a file or download; "
                               "metadata in a weights file never chooses what else is read, so it will not be loaded")
        rule = MODEL_KWARGS.get(key)
        if rule is None:
            raise WeightsError(f"{source}: {field} has {_short(key)}, which is not one a checkpoint may carry "
                               f"(allowed: {', '.join(sorted(MODEL_KWARGS))}); re-save the checkpoint without it")
        wanted, check = rule
        if not check(value):
            raise _bad(source, f"{field}[{key!r}]", wanted, value)
    return dict(kwargs)


MODEL_NAME = re.compile(r"^[A-Za-z0-9_]{1,100}(\.[A-Za-z0-9_]{1,100})?$")  # timm name[.tag]; no hf-hub:, no path
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
SIDECAR_KEYS = ("format", "version", "model", "model_kwargs", "num_classes", "classes", "preprocessing", "extra")


def validate_sidecar(meta, source, format_name: str, version: int) -> dict:
    """A dogbreeds checkpoint sidecar (or its copy in the safetensors metadata), checked field by field."""
    expect_dict(meta, source, "the sidecar")
    if meta.get("format") != format_name:
        raise WeightsError(f"{source} is not a dogbreeds checkpoint sidecar (format={_short(meta.get('format'))})")
    if meta.get("version") != version or isinstance(meta.get("version"), bool):
        raise WeightsError(f"{source}: checkpoint version {_short(meta.get('version'))} is not supported "
                           f"(this dogbreeds reads version {version})")
    missing = [k for k in ("model", "num_classes") if k not in meta]
    if missing:
        raise WeightsError(f"{source} lacks {missing}")
    unknown = [k for k in meta if k not in SIDECAR_KEYS]
    if unknown:
        raise WeightsError(f"{source}: unknown fields {[_short(k) for k in unknown[:5]]} (a checkpoint sidecar has "
                           f"{', '.join(SIDECAR_KEYS)}); restore the file or re-save the checkpoint")
    model = meta["model"]
    if not isinstance(model, str) or not MODEL_NAME.match(model):
        raise _bad(source, "'model'", "a timm model name such as 'convnext_tiny' (no path, no hub address)", model)
    num_classes = expect_int(meta["num_classes"], source, "'num_classes'", 1, MAX_CLASSES)
    if meta.get("model_kwargs") is not None:
        validate_model_kwargs(meta["model_kwargs"], source, "'model_kwargs'")
    if meta.get("classes") is not None:
        _validate_classes(meta["classes"], source, num_classes)
    if meta.get("preprocessing") is not None:
        validate_preprocessing(meta["preprocessing"], source, "'preprocessing'")
    if meta.get("extra") is not None:
        expect_dict(meta["extra"], source, "'extra'")
    return meta


def _validate_classes(classes, source, num_classes: int) -> None:
    expect_list(classes, source, "'classes'")
    if len(classes) != num_classes:
        raise WeightsError(f"{source}: 'classes' lists {len(classes)} breeds but 'num_classes' is {num_classes}; "
                           "restore the sidecar or re-save the checkpoint")
    for i, item in enumerate(classes):
        if isinstance(item, str):
            continue
        field = f"'classes'[{i}]"
        expect_dict(item, source, field)
        expect_str(item.get("breed_id"), source, f"{field}['breed_id']")
        expect_int(item.get("index"), source, f"{field}['index']", 0, num_classes - 1)
        if "name" in item:
            expect_str(item["name"], source, f"{field}['name']")


def validate_preprocessing(pre, source, field: str = "preprocessing") -> dict:
    """The fields of Preprocessing.to_dict(), each of the right type and range."""
    expect_dict(pre, source, field)
    allowed = ("input_size", "mean", "std", "crop_pct", "interpolation", "source")
    unknown = [k for k in pre if k not in allowed]
    if unknown:
        raise WeightsError(f"{source}: {field} has unknown fields {[_short(k) for k in unknown[:5]]} "
                           f"(allowed: {', '.join(allowed)})")
    if "input_size" in pre:
        size = pre["input_size"]
        if isinstance(size, list):
            expect_int_list(size, source, f"{field}['input_size']", 1, 4096, 3)
        else:
            expect_int(size, source, f"{field}['input_size']", 8, 4096)
    for key, lo in (("mean", -10.0), ("std", 1e-6)):
        if key in pre:
            value = pre[key]
            if not (isinstance(value, list) and len(value) == 3 and all(_is_number(v) and lo <= v <= 10 for v in value)):
                raise _bad(source, f"{field}[{key!r}]", f"a list of 3 numbers from {lo:g} to 10 (R, G, B)", value)
    if "crop_pct" in pre:
        expect_number(pre["crop_pct"], source, f"{field}['crop_pct']", 0, 1, lo_open=True)
    if "interpolation" in pre and pre["interpolation"] not in INTERPOLATIONS:
        raise _bad(source, f"{field}['interpolation']", f"one of {', '.join(INTERPOLATIONS)}", pre["interpolation"])
    if "source" in pre:
        expect_str(pre["source"], source, f"{field}['source']")
    return pre
