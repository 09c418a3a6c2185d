"""Reading weight files safely: sniff the content, never execute pickled code.

Every file is identified by its first bytes, not its name, because checkpoints travel
with misleading suffixes (`.bin` that is a zip, `.pth` that is safetensors, ...).
"""
from __future__ import annotations

import logging
import pickle
import pickletools
import struct
import warnings
from pathlib import Path

import torch

from dogbreeds.errors import WeightsError

from ..safety import check_declared, check_regular, compressed_allowance, open_regular, sniff  # noqa: F401 (sniff: re-exported)

log = logging.getLogger("dogbreeds")

# Wrappers training scripts put around a state dict. EMA weights first: when a file
# carries both, the averaged ones are what the authors evaluate and publish.
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")
# Prefixes added by DistributedDataParallel and torch.compile.
STRIP_PREFIXES = ("module.", "_orig_mod.")


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

    # The safetensors library checks every declared shape and offset against the file's size
    # before it maps a byte (tests/hostile/test_weights.py holds it to that).
    check_regular(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"safetensors file {path} is corrupt or truncated: {exc}") from exc
    except MemoryError:
        raise WeightsError(f"safetensors file {path} declares more tensor data than fits in memory; "
                           "it will not be loaded") from None
    return tensors, metadata


def _torch_load(path: Path, kind: str):
    size = check_regular(path).st_size
    if kind == "torch-zip":
        _check_zip(path, size)  # torch sizes each storage by its zip entry
    else:  # a legacy torch file sizes each storage by the numel its pickle declares
        check_declared(path, "its tensor storages", scan_pickles(path, kind)[1], size)
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it may not parse; a failure is reported below anyway.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise WeightsError(f"{path} declares more tensor data than fits in memory; it is crafted or corrupt "
                           "and will not be loaded") from None
    except Exception as exc:  # noqa: BLE001 - why it failed is decided by what the file holds, below
        # Recognised by what the pickle imports, not by torch's wording (which changes between
        # versions): a global outside the tensor-rebuilding allow-list is code. The unpickler's
        # own advice (weights_only=False) is never passed on: that would run the code.
        found = code_globals(path, kind)
        if found:
            raise WeightsError(
                f"refusing to execute pickled code in {path}: the file carries code (it imports "
                f"{', '.join(found[:3])}{', ...' if len(found) > 3 else ''}), not only tensors, and will not be "
                "loaded. Re-save it as a plain state dict or safetensors where it was made "
                "(torch.save(model.state_dict(), ...) or safetensors.torch.save_file)"
            ) from None
        if isinstance(exc, (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, struct.error,
                            KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError)):
            raise WeightsError(f"{path} is corrupt or truncated, or not a PyTorch weights file: "
                               f"{_reason(exc)}; download or save it again") from None
        raise
    _check_views(obj, path)
    return obj


def _check_views(obj, path: Path, depth: int = 0) -> None:
    """No tensor may declare more elements than its storage holds: a stride-0 view of one float
    can claim 2^40 elements in a 1 KB file, and copying it into a model would allocate them all."""
    if depth > 4:
        return
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for value in values:
        if torch.is_tensor(value):
            declared = value.numel() * value.element_size()
            held = value.untyped_storage().nbytes()
            if declared > held:
                check_declared(path, f"a tensor of shape {tuple(value.shape)} (a view of a smaller storage)",
                               declared, held)
        elif isinstance(value, (dict, list, tuple)):
            _check_views(value, path, depth + 1)


def _check_zip(path: Path, size: int) -> None:
    """The zip's entries may not declare more bytes than the archive holds (torch.save stores
    entries uncompressed; a compressed entry gets MAX_COMPRESSION_RATIO)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise WeightsError(f"{path} is corrupt or truncated (a damaged zip archive: {_first_line(exc)})") from None
    declared = sum(info.file_size for info in infos)
    packed = sum(info.compress_size for info in infos if info.compress_type != zipfile.ZIP_STORED)
    check_declared(path, f"its zip archive of {len(infos)} entries", declared,
                   size + (compressed_allowance(packed) if packed else 0))


# Globals a weights-only pickle may import: what torch's own weights_only unpickler allows
# (read from torch when this version exposes it) plus the tensor-rebuilding names every
# version writes. Anything else is code.
_STATIC_ALLOWED = {
    "collections.OrderedDict", "torch.Size", "torch.device", "torch.Tensor", "torch.nn.parameter.Parameter",
    "torch.serialization._get_layout", "_codecs.encode", "builtins.set", "builtins.frozenset", "builtins.bytearray",
    "builtins.complex", "builtins.slice", "builtins.range", "torch._tensor._rebuild_from_type_v2",
}
_ALLOWED_PREFIXES = ("torch._utils._rebuild_",)
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_PICKLES_PER_FILE = 6  # a legacy torch file is 5 pickles in a row (magic, protocol, info, object, keys)


def _allowed_globals() -> set[str]:
    allowed = set(_STATIC_ALLOWED)
    try:
        from torch import _weights_only_unpickler as wou

        allowed |= {str(k) for k in wou._get_allowed_globals()}
    except Exception:  # noqa: BLE001 - a private API; the static list stands without it
        pass
    try:
        for obj in torch.serialization.get_safe_globals():
            obj = obj[0] if isinstance(obj, tuple) else obj
            allowed.add(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
    except Exception:  # noqa: BLE001
        pass
    return allowed


def _is_allowed(name: str, allowed: set[str]) -> bool:
    if name in allowed or name.startswith(_ALLOWED_PREFIXES):
        return True
    module, _, attr = name.rpartition(".")
    # storage classes (torch.FloatStorage, ...) and dtypes (torch.float32, ...)
    return module == "torch" and (attr.endswith("Storage") or isinstance(getattr(torch, attr, None), torch.dtype))


def code_globals(path: Path, kind: str) -> list[str]:
    """The globals outside the allow-list that the pickle(s) in `path` import, found by reading
    the opcodes with pickletools (which parses, never imports or calls). [] for a file that
    imports nothing else, including a corrupt one."""
    return scan_pickles(path, kind)[0]


def scan_pickles(path: Path, kind: str) -> tuple[list[str], int]:
    """(globals outside the allow-list, bytes of tensor storage the pickles declare), from the
    opcodes alone. A zip's pickles are its *.pkl entries; a plain or legacy torch file is up to
    _PICKLES_PER_FILE pickles in a row (the raw storage bytes that follow are never parsed)."""
    allowed = _allowed_globals()
    found: list[str] = []
    declared = [0]
    try:
        if kind == "torch-zip":
            import zipfile

            with zipfile.ZipFile(path) as archive:
                for name in archive.namelist():
                    if name.endswith(".pkl"):
                        with archive.open(name) as stream:
                            _scan_pickles(stream, allowed, found, declared, 1)
        else:
            with open_regular(path) as stream:
                _scan_pickles(stream, allowed, found, declared, _PICKLES_PER_FILE)
    except WeightsError:
        raise
    except Exception:  # noqa: BLE001 - unreadable: the caller reports the file as corrupt
        pass
    return found, declared[0]


# Bytes per element of the typed storages torch's pickles name (legacy files declare numel).
_STORAGE_ITEMSIZE = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
                     "Byte": 1, "Bool": 1, "ComplexDouble": 16, "ComplexFloat": 8, "Untyped": 1}
_INT_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG"}


class _Storage:
    """Marks, in the scan's recent values, a storage class pushed by a GLOBAL."""

    def __init__(self, itemsize: int):
        self.itemsize = itemsize


def _pushed_global(name: str):
    module, _, attr = name.rpartition(".")
    if module == "torch" and attr.endswith("Storage"):
        return _Storage(_STORAGE_ITEMSIZE.get(attr[:-len("Storage")], 1))
    return None


def _scan_pickles(stream, allowed: set[str], found: list[str], declared: list[int], count: int) -> None:
    for _ in range(count):
        memo: dict[int, object] = {}
        recent: list[object] = []  # what the last opcodes pushed (strings, ints, storage marks, else None)
        stopped = False
        try:
            for op, arg, _pos in pickletools.genops(stream):
                name = op.name
                pushed = None
                if name in ("GLOBAL", "INST"):
                    module, _, attr = str(arg).partition(" ")
                    _note(f"{module}.{attr}", allowed, found)
                    pushed = _pushed_global(f"{module}.{attr}")
                elif name == "STACK_GLOBAL":
                    module, attr = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
                    full = f"{module}.{attr}" if isinstance(module, str) and isinstance(attr, str) else None
                    _note(full or "<a global built at run time>", allowed, found)
                    pushed = _pushed_global(full) if full else None
                elif name in ("EXT1", "EXT2", "EXT4"):
                    _note(f"<extension code {arg}>", allowed, found)
                elif name in ("BINPERSID", "PERSID"):
                    # ('storage', <storage class>, key, location, numel): the numel is the first
                    # integer after the storage class.
                    marks = [i for i, v in enumerate(recent) if isinstance(v, _Storage)]
                    if marks:
                        numel = next((v for v in recent[marks[-1]:] if isinstance(v, int)), 0)
                        declared[0] += max(int(numel), 0) * recent[marks[-1]].itemsize
                if name in _STRING_OPS:
                    recent.append(arg if isinstance(arg, str) else bytes(arg).decode("latin-1"))
                elif name in _INT_OPS and isinstance(arg, int):
                    recent.append(arg)
                elif name in ("BINGET", "LONG_BINGET", "GET"):
                    recent.append(memo.get(int(arg)))
                elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[int(arg)] = recent[-1] if recent else None
                elif name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                else:
                    recent.append(pushed)
                del recent[:-12]
                if name == "STOP":
                    stopped = True
        except Exception:  # noqa: BLE001 - the end of the pickles, or a damaged one
            return
        if not stopped:
            return


def _note(name: str, allowed: set[str], found: list[str]) -> None:
    if not _is_allowed(name, allowed) and name not in found:
        found.append(name)


def _reason(exc: BaseException) -> str:
    """torch's first line, unless it advises weights_only=False (which would run any code)."""
    line = _first_line(exc)
    return type(exc).__name__ if "weights_only" in line.lower() else line[:300]


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


def read_json(path: Path, what: str = "JSON file") -> dict:
    """A JSON object from a regular file, or a WeightsError naming the file."""
    from ..safety import expect_dict
    from ..safety import read_json as read_any

    return expect_dict(read_any(path, what), path, "the whole file")
