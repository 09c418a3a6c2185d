"""The one shape of inference: a `Backend` runs a model on one runtime; `--engine` names which.

Every backend, whatever runs it, offers the same attributes and three calls:

    name           the model's name (e.g. "convnext_atto")
    classes        ClassInfo: label index -> breed id and display name
    preprocessing  Preprocessing: how a photo becomes the model's input
    metadata       everything stored with the weights (the checkpoint's sidecar, or the ONNX
                   file's metadata): "model", "classes", "preprocessing", and "extra", the dict
                   where later features keep what they need at prediction time
    kind           the engine name it was built for ("onnxruntime", "int8", "torch", ...)
    description    one line for logs: runtime, version, threads, file
    path           the file it runs (the .onnx file, or the checkpoint for PyTorch); None for a
                   model that only lives in memory
    checkpoint     the run's checkpoint it came from, or None (an exported .onnx file)

    preprocess(image)  HxWx3 uint8 RGB -> float32 CHW: the numpy eval transform (preprocess_np.py),
                       the same on every runtime
    forward(batch)     float32 NCHW -> float32 N x classes logits
    embed(batch)       -> (logits, features): features are the pooled pre-logit features
                       (timm's `forward_head(forward_features(x), pre_logits=True)`), N x D

The softmax is not a backend's business: `Predictor` applies it above any backend.

Runtimes: each `runtime_*.py` module in this package is one runtime and registers itself with
`register(Runtime(...))`: the engine names it serves and how it builds a backend from a torch
model, from its own export cache, or from a file (e.g. `.onnx`). A new runtime (OpenVINO,
CUDA) is one new `runtime_<name>.py` file; nothing else names it.

"auto" chooses per machine (infer/auto.py): by capability (machine.py: ISA flags, GPUs) and a
short probe on real photos (the run's validation split, or the photos given), cached per machine
profile and model next to the export: the fastest engine that agrees with fp32 (top-1 >= 99.5%,
max |probability difference| <= 1e-2). With no photos to probe on it is onnxruntime (fp32).

This module imports neither torch nor any runtime at import time: the CLI imports it at
startup, and the torch-free path (an .onnx file, a run whose export is cached) must stay so.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..data.records import ClassInfo
from ..errors import DogbreedsError
from ..preprocessing import Preprocessing

AUTO = "auto"
AUTO_ENGINE = "onnxruntime"  # what "auto" falls back to when it has no photos to probe on (infer/auto.py)
AUTO_DESCRIPTION = ("chosen per machine: the fastest engine that agrees with fp32 on the run's validation photos, "
                    "measured once per machine and model (cached in RUN/export/); onnxruntime when there are no photos")
DEFAULT_ENGINE = AUTO
# What every "the fast path cannot be built" error ends with: the way out, never a silent fallback.
USE_TORCH = "use the PyTorch path instead (--engine torch on the command line; engine='torch' in Python)"
# Part of every export cache key: bump it when what an export holds changes (graph layout, outputs,
# metadata), so that old cache entries miss instead of being read as the new contract.
CACHE_VERSION = "logits+features-v2"
# a pause (untimed) between two timed calls of different runtimes: after a call their worker threads keep
# spinning for a while (onnxruntime by default, torch's OpenMP pool), and a runtime timed right after shares
# the cores with them. Measured on a 2-core AVX-512 AMD EPYC: OpenVINO bf16 on MobileNetV2 batch 16 took
# 29.3 ms alone, 49.6 ms right after an onnxruntime call, 34.7 ms after a torch call, 29.2 ms after an
# onnxruntime call and this pause (docs/performance.md). Used by the auto probe and by `dogbreeds bench`.
RUNTIME_SETTLE_S = 0.05


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def physical_cores() -> int:
    """Cores this process may use, counting SMT siblings once (they share one core's FMA units)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        cores.add(siblings.read_text().strip() if siblings.is_file() else str(cpu))
    return max(1, len(cores))


# --- what a backend knows besides the weights -------------------------------------------------

@dataclass
class ModelInfo:
    """The model's description, the same on every runtime: written into every export, read back
    from it, and what `Backend` exposes as classes / preprocessing / name / metadata."""

    classes: ClassInfo
    preprocessing: Preprocessing
    name: str
    metadata: dict = field(default_factory=dict)  # see `stored_record`
    checkpoint: Path | None = None  # the run's checkpoint it came from
    key: str | None = None          # names cached exports: a hash of the weights and of this record
    photos: list[Path] | None = None  # real photos for int8 calibration and the auto probe (None: the run's val split)

    def __post_init__(self):
        self.metadata = stored_record(self.name, self.classes, self.preprocessing, self.metadata)

    @property
    def extra(self) -> dict:
        return self.metadata["extra"]


def stored_record(name: str, classes: ClassInfo, preprocessing: Preprocessing, stored: dict | None = None) -> dict:
    """`metadata` as every backend exposes it: what was stored with the weights (a checkpoint's
    sidecar, an ONNX file's metadata) with "model", "classes" (ClassInfo JSON), "preprocessing"
    (Preprocessing.to_dict()) and "extra" (a dict; {} when nothing was stored) always present."""
    record = dict(stored or {})
    record.update(model=name, classes=classes.to_json(), preprocessing=preprocessing.to_dict())
    record["extra"] = dict(record.get("extra") or {})
    return record


def info_for_model(model, classes: ClassInfo | None = None, name: str | None = None) -> ModelInfo:
    """ModelInfo for a torch model that did not come from a run (benchmarks, tests): its own
    preprocessing (timm's pretrained_cfg when it has none of ours) and numbered classes."""
    preprocessing = getattr(model, "preprocessing", None)
    if preprocessing is None:
        preprocessing = Preprocessing.from_timm_cfg(dict(getattr(model, "pretrained_cfg", None) or {}))
    if classes is None:
        classes = ClassInfo(tuple(f"class_{i}" for i in range(int(getattr(model, "num_classes", 0) or 0))))
    name = name or getattr(model, "dogbreeds_name", None) or (getattr(model, "pretrained_cfg", None) or {}).get(
        "architecture") or type(model).__name__
    return ModelInfo(classes, preprocessing, name)


def info_for_loaded(loaded) -> ModelInfo:
    """ModelInfo for a `models.factory.LoadedModel` (a run's checkpoint, read by `load_run`)."""
    return ModelInfo(loaded.classes, loaded.preprocessing, loaded.name, metadata=getattr(loaded, "metadata", {}),
                     checkpoint=Path(loaded.path))


# --- cache keys ---------------------------------------------------------------------------------

def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _key(parts: list[bytes]) -> str:
    digest = hashlib.sha256(CACHE_VERSION.encode())
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:16]


def checkpoint_key(checkpoint: str | Path, record: dict) -> str:
    """The export cache key of a run's checkpoint: its bytes and the record stored with it (no torch)."""
    return _key([file_sha256(checkpoint).encode(), json.dumps(record, sort_keys=True, default=str).encode()])


def model_key(model, info: ModelInfo) -> str:
    """The export cache key of a model in memory: architecture, weights and its record."""
    parts = [json.dumps([info.metadata, getattr(model, "dogbreeds_kwargs", {}), type(model).__name__],
                        sort_keys=True, default=str).encode()]
    for name, tensor in model.state_dict().items():
        parts += [name.encode(), tensor.detach().cpu().contiguous().numpy().tobytes()]
    return _key(parts)


# --- the protocol -------------------------------------------------------------------------------

class Backend:
    """One model on one runtime (see the module doc for the protocol). Runtimes subclass it and
    implement `embed` (and `forward` when logits alone are cheaper)."""

    kind = ""
    description = ""
    exported = False  # True when building this backend wrote a new export (not a cache hit)
    auto_choice: dict | None = None  # when "auto" chose this engine: what was measured (infer/auto.py)
    quantised_ops: int | None = None  # a quantised engine's operators that compute in int8 (None: not quantised)
    not_quantised: str | None = None  # set when an int8 engine quantised nothing of this model: why

    def __init__(self, info: ModelInfo, path: str | Path | None):
        from .preprocess_np import NumpyEvalTransform

        self.info = info
        self.classes: ClassInfo = info.classes
        self.preprocessing: Preprocessing = info.preprocessing
        self.name: str = info.name
        self.metadata: dict = info.metadata
        self.checkpoint: Path | None = info.checkpoint
        self.path: Path | None = Path(path) if path is not None else None
        self._transform = NumpyEvalTransform(info.preprocessing)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        return self._transform(image)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return self.embed(batch)[0]

    def embed(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"


# --- the registry -------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one entry per runtime
class Runtime:
    """A runtime's entry in the registry (see `register`).

    engines:    engine name -> one line saying what it is (shown by --help and in errors)
    from_model: (model, kind, info, cache_dir, threads) -> Backend, for a torch model
    from_cache: (kind, cache_dir, key, checkpoint, threads) -> Backend | None: a backend from an
                export cached earlier, without torch; None when this runtime keeps no cache
    suffixes / from_file: model files it opens by themselves, e.g. (".onnx",) and (path, threads) -> Backend
    """

    engines: dict[str, str]
    from_model: Callable[..., Backend]
    from_cache: Callable[..., Backend | None] | None = None
    suffixes: tuple[str, ...] = ()
    from_file: Callable[..., Backend] | None = None


_RUNTIMES: dict[str, Runtime] = {}
_DISCOVERED = False


def register(runtime: Runtime) -> None:
    """Called by each runtime_*.py module when it is imported."""
    for engine in runtime.engines:
        if engine == AUTO or (engine in _RUNTIMES and _RUNTIMES[engine] is not runtime):
            raise RuntimeError(f"engine name {engine!r} is taken; give the runtime another name")
        _RUNTIMES[engine] = runtime


def _runtimes() -> dict[str, Runtime]:
    global _DISCOVERED
    if not _DISCOVERED:
        package = __name__.rpartition(".")[0]
        for module in sorted(pkgutil.iter_modules(importlib.import_module(package).__path__), key=lambda m: m.name):
            if module.name.startswith("runtime_"):
                importlib.import_module(f"{package}.{module.name}")
        _DISCOVERED = True
    return _RUNTIMES


def engine_descriptions() -> dict[str, str]:
    """Every engine name, "auto" first, with what it is."""
    described = {AUTO: AUTO_DESCRIPTION}
    for runtime in _runtime_list():
        described.update(runtime.engines)
    return described


def _runtime_list() -> list[Runtime]:
    """Each runtime once: the one "auto" stands for first, then by module name (a fixed order,
    whichever module was imported first)."""
    unique = dict.fromkeys(_runtimes().values())
    return sorted(unique, key=lambda r: (AUTO_ENGINE not in r.engines, r.from_model.__module__))


def engine_names() -> tuple[str, ...]:
    return tuple(engine_descriptions())


def check_engine(engine: str) -> str:
    """The engine name `engine` stands for ("auto" -> onnxruntime, its fallback; the builders below
    resolve "auto" per machine); an unknown name is an error listing the choices."""
    described = engine_descriptions()
    if engine not in described:
        choices = "; ".join(f"{name!r} ({what})" for name, what in described.items())
        raise DogbreedsError(f"unknown engine {engine!r}; choose one of: {choices}")
    return AUTO_ENGINE if engine == AUTO else engine


def runtime_of(engine: str) -> Runtime:
    return _runtimes()[check_engine(engine)]


# --- building backends ---------------------------------------------------------------------------

def say_not_quantised(backend: Backend, quiet: bool = False) -> Backend:
    """On stderr, when an engine named by the user (--engine int8) quantised nothing of this model
    and so runs the fp32 graph under an int8 label; `backend` returned as it is. "auto" never
    chooses such a backend (it skips it with this reason); quiet: the caller reports it itself."""
    if backend.not_quantised and not quiet:
        import sys

        print(f"warning: --engine {backend.kind} on {backend.name}: {backend.not_quantised}; it runs, but no faster "
              "than --engine onnxruntime; for int8 convolutions try --engine int8-static (calibrated on real photos)",
              file=sys.stderr, flush=True)
    return backend


def build_backend(model, engine: str = DEFAULT_ENGINE, info: ModelInfo | None = None,
                  cache_dir: str | Path | None = None, threads: int | None = None, quiet: bool = False) -> Backend:
    """The backend of `engine` for a torch `model` (put in eval mode; its weights are not changed).

    info:      what the model is (default: `info_for_model(model)`); a run's checkpoint gives its own
    cache_dir: where exports are kept, named by `info.key` (None: a temporary folder, exported each time)
    threads:   intra-op threads (default: the physical cores)
    "auto" probes the engines when `info.photos` are given (choice cached in `cache_dir`), else onnxruntime.
    quiet:     no warning on stderr when a named int8 engine quantised nothing (`say_not_quantised`)
    """
    if engine == AUTO:
        from .auto import auto_for_model

        return auto_for_model(model, info or info_for_model(model), Path(cache_dir) if cache_dir is not None else None,
                              threads)
    kind = check_engine(engine)
    return say_not_quantised(_runtimes()[kind].from_model(model.eval(), kind, info or info_for_model(model),
                                                          Path(cache_dir) if cache_dir is not None else None, threads),
                             quiet)


def backend_for_loaded(loaded, engine: str = DEFAULT_ENGINE, cache_dir: str | Path | None = None,
                       threads: int | None = None, key: str | None = None,
                       photos: list[Path] | None = None, quiet: bool = False) -> Backend:
    """The backend of `engine` for a run's model read by `load_run`; exports are cached in `cache_dir`
    (default: the run's export folder) under the checkpoint's key (hashed here unless given).
    photos: real photos for "auto"'s probe and int8 calibration (default: the run's validation split)."""
    from ..rundir import RunDir

    if engine == AUTO:
        from .auto import auto_for_loaded

        return auto_for_loaded(loaded, cache_dir, threads, key, photos)
    kind = check_engine(engine)
    runtime = _runtimes()[kind]
    info = info_for_loaded(loaded)
    info.photos = photos
    if runtime.from_cache is not None:
        info.key = key or checkpoint_key(loaded.path, _key_record(loaded.metadata, loaded.classes))
    cache_dir = Path(cache_dir) if cache_dir is not None else RunDir.locate(loaded.path).export_dir
    return say_not_quantised(runtime.from_model(loaded.model, kind, info, cache_dir, threads), quiet)


def open_run(path: str | Path, engine: str = DEFAULT_ENGINE, cache_dir: str | Path | None = None,
             threads: int | None = None, photos: list[Path] | None = None) -> Backend:
    """A run directory (best, else last checkpoint) or a checkpoint file on `engine`.

    For a runtime that caches exports, the checkpoint is hashed once; a cached export is opened
    as it is (no torch), else the run's model is loaded and exported into RUN/export/.
    "auto" reads the choice cached for this machine and model (no torch when it names a cached
    export), else probes (infer/auto.py); photos: what it probes on (default: the run's val split)."""
    from ..rundir import RunDir

    run = RunDir.locate(path)
    checkpoint = run.checkpoint()
    cache_dir = Path(cache_dir) if cache_dir is not None else run.export_dir
    if engine == AUTO:
        from .auto import auto_for_run

        return auto_for_run(run, checkpoint, cache_dir, threads, photos)
    return open_engine(run, checkpoint, engine, cache_dir, threads, photos=photos)


def run_key(run, checkpoint: Path) -> str:
    """The export cache key of a run's checkpoint (no torch)."""
    from ..models.checkpoint_format import read_checkpoint_meta

    return checkpoint_key(checkpoint, _key_record(read_checkpoint_meta(checkpoint), run.read_classes()))


def open_engine(run, checkpoint: Path, engine: str, cache_dir: Path, threads: int | None = None,
                key: str | None = None, photos: list[Path] | None = None, quiet: bool = False) -> Backend:
    """`open_run` for one named engine (not "auto"): a cached export as it is, else load and build.
    quiet: see `say_not_quantised`."""
    kind = check_engine(engine)
    runtime = _runtimes()[kind]
    if runtime.from_cache is not None:
        key = key or run_key(run, checkpoint)
    if runtime.from_cache is not None and photos is None:  # given photos may name another int8 calibration
        cached = runtime.from_cache(kind, cache_dir, key, checkpoint, threads)
        if cached is not None:
            return say_not_quantised(cached, quiet)
    from ..models.factory import load_run

    return backend_for_loaded(load_run(checkpoint), kind, cache_dir, threads, key=key, photos=photos, quiet=quiet)


def _key_record(sidecar: dict, classes: ClassInfo) -> dict:
    return {"sidecar": sidecar, "classes": list(classes.breed_ids)}


def file_runtime(path: str | Path) -> Runtime | None:
    """The runtime that opens `path` by itself (an exported model file), or None (a run or checkpoint)."""
    suffix = Path(path).suffix.lower()
    return next((r for r in _runtime_list() if suffix in r.suffixes), None)


def open_path(path: str | Path, engine: str = DEFAULT_ENGINE, threads: int | None = None) -> Backend:
    """An exported model file on the runtime that opens it, or a run / checkpoint on `engine`."""
    kind = check_engine(engine)
    runtime = file_runtime(path)
    if runtime is None:
        return open_run(path, engine, threads=threads)
    native = next(iter(runtime.engines))
    if engine != AUTO and kind != native:
        raise DogbreedsError(f"{path} is an {Path(path).suffix} file, which runs on {native} only, as it is; "
                             f"drop --engine {engine} (engine={engine!r}), or pass the run directory or checkpoint "
                             "it was exported from")
    return runtime.from_file(path, threads)
