"""The OpenVINO runtime: engines "openvino" (fp32) and "openvino-bf16", on the same ONNX export.

Both read the file onnxruntime runs (the fp32 export in RUN/export/, written by export.write_onnx,
ConvNeXt MLPs as 1x1 convolutions): one export, two runtimes. "openvino-bf16" asks OpenVINO's CPU
plugin for bf16 inference (INFERENCE_PRECISION_HINT); on a CPU without native bf16 the plugin runs
fp32 instead, and the description says which precision it actually runs (`precision`).

OpenVINO is optional: `pip install -e ".[openvino]"`. Without it the engine names still exist
(so `--engine openvino` is understood) and building one says which extra to install.

One `openvino.Core` per process (`openvino_core`), kept until exit: every Core loads its own CPU
plugin, and on Linux each CPU plugin replaces the signal alternate stack of the thread that loads it
with one it mmaps, and on destruction unmaps it, restoring the previous stack only if its own is
still the current one. Two plugins destroyed in the order they were created (Python frees Cores
and compiled models in no fixed order) thus leave the thread's alternate stack pointing at unmapped
memory, and the next signal delivered on it (CPython's handlers use SA_ONSTACK, e.g. the SIGCHLD
handler torch's DataLoader installs) killed the process with SIGSEGV, far from any OpenVINO call.

Shapes: the export's batch, height and width are dynamic, and OpenVINO compiles kernels for a
dynamic shape that ran ConvNeXt-T 1.09-1.19x slower than kernels for a fixed one (bf16, batch 1
and 16, 2-core AVX512-BF16 CPU, identical outputs; MobileNetV2 no faster; docs/performance.md). So each of the first MAX_STATIC_SHAPES input shapes a backend
sees is compiled once for that exact shape (0.2-1.3 s on 2 cores; `compile_seconds`) and run
that way afterwards; any further shape runs on the dynamic compile, which always exists. The
bound keeps memory in check when the batch size varies (the service's micro-batches): each
fixed-shape compile holds its own buffers (60-200 MB for ConvNeXt-T at 224 px).
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import DogbreedsError, WeightsError
from .backend import USE_TORCH, Backend, ModelInfo, Runtime, physical_cores, register
from .onnx_format import read_metadata

log = logging.getLogger(__name__)

FP32, BF16 = "openvino", "openvino-bf16"
MAX_STATIC_SHAPES = 4  # input shapes compiled for their exact size; the rest run on the dynamic compile
INSTALL = 'pip install -e ".[openvino]" (in the project folder; or pip install openvino)'


def import_openvino(kind: str = FP32):
    """The openvino module, or an error naming the extra to install."""
    try:
        import openvino
    except ImportError as exc:
        raise DogbreedsError(f"engine {kind!r} needs OpenVINO, which is not installed: {INSTALL}; "
                             "or use --engine auto / --engine onnxruntime") from exc
    return openvino


_CORE = None
_CORE_LOCK = threading.Lock()


def openvino_core(kind: str = FP32):
    """The process's one `openvino.Core`, created on first use and never released (see the module
    docstring: a Core per model crashed the process later). Raises as `import_openvino` does."""
    global _CORE
    ov = import_openvino(kind)
    with _CORE_LOCK:
        if _CORE is None:
            _CORE = ov.Core()
        return _CORE


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


class OpenVinoBackend(Backend):
    """A dogbreeds ONNX file compiled by OpenVINO for the CPU; numpy in, numpy out."""

    def __init__(self, path: str | Path, kind: str = FP32, threads: int | None = None,
                 checkpoint: Path | None = None):
        ov = import_openvino(kind)
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"{path}: no such ONNX file; create one with `dogbreeds export RUN --out {path.name}`")
        self.contents = read_metadata(_onnx_metadata(path), path)
        info = ModelInfo(self.contents.classes, self.contents.preprocessing, self.contents.name,
                         metadata=self.contents.record, checkpoint=checkpoint)
        super().__init__(info, path)
        self.kind = kind
        self.threads = threads or physical_cores()
        config = {"INFERENCE_PRECISION_HINT": "bf16" if kind == BF16 else "f32",
                  "INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"}
        try:
            core = openvino_core(kind)
            self._read = core.read_model(str(path))
            self._compiled = core.compile_model(self._read, "CPU", config)
            self.precision = str(self._compiled.get_property("INFERENCE_PRECISION_HINT"))
        except Exception as exc:  # OpenVINO raises its own types (unsupported operators, a bad file)
            raise WeightsError(f"OpenVINO {ov.__version__} cannot compile {path} ({type(exc).__name__}: {exc}); "
                               f"use --engine onnxruntime, or {USE_TORCH}") from exc
        self._config = config
        self._request = self._compiled.create_infer_request()
        self._static: dict[tuple, object] = {}  # input shape -> infer request of a compile for exactly that shape
        self._dynamic_only: set[tuple] = set()  # shapes OpenVINO would not compile fixed (logged once)
        self.compile_seconds: dict[tuple, float] = {}
        self._lock = threading.Lock()  # one call at a time (infer requests are not thread-safe)
        names = {name for output in self._compiled.outputs for name in output.get_names()}
        self._logits = self.contents.logits_output or self.contents.probabilities_output
        self._features = self.contents.features_output if self.contents.features_output in names else None
        asked = "bf16" if kind == BF16 else "f32"
        ran = self.precision.lower().replace("<type: '", "").replace("'>", "")
        note = "" if asked in ran else f", asked for {asked}"
        self.description = (f"openvino {ov.__version__} {kind} (CPU, {ran}{note}, {self.threads} threads): "
                            f"{self.path.name}")

    def _request_for(self, shape: tuple):
        """The infer request for an input of `shape`: a compile for exactly that shape (made on
        first sight while fewer than MAX_STATIC_SHAPES exist), else the dynamic one. Under the lock."""
        request = self._static.get(shape)
        if request is not None:
            return request
        if len(self._static) >= MAX_STATIC_SHAPES or shape in self._dynamic_only or len(shape) != 4:
            return self._request
        start = time.perf_counter()
        try:
            fixed = self._read.clone()
            fixed.reshape({fixed.inputs[0]: list(shape)})
            request = openvino_core(self.kind).compile_model(fixed, "CPU", self._config).create_infer_request()
        except Exception as exc:  # a shape the graph cannot take fixed: the dynamic compile runs it (or says why not)
            log.info("OpenVINO did not compile %s for the fixed input shape %s (%s: %s); it runs dynamic",
                     self.path.name, shape, type(exc).__name__, exc)
            if len(self._dynamic_only) < 64:  # bounded, whatever shapes arrive
                self._dynamic_only.add(shape)
            return self._request
        self.compile_seconds[shape] = time.perf_counter() - start
        self._static[shape] = request
        return request

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        with self._lock:
            result = self._request_for(tuple(batch.shape)).infer({0: batch})
            return {name: np.array(value, dtype=np.float32) for port, value in result.items()
                    for name in port.get_names()}

    def forward(self, batch: np.ndarray) -> np.ndarray:
        out = self._run(batch)[self._logits]
        if self.contents.logits_output is None:  # format 1: probabilities; log p has the same softmax
            return np.log(np.maximum(out, np.finfo(np.float32).tiny)).astype(np.float32)
        return out

    def embed(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._features is None:
            raise DogbreedsError(f"{self.path} has no features output (an older dogbreeds file); re-export it with "
                                 f"`dogbreeds export RUN --out {self.path.name}`")
        out = self._run(batch)
        return out[self._logits], out[self._features]


def _from_cache(kind: str, cache_dir: Path, key: str, checkpoint: Path | None, threads: int | None):
    from .runtime_onnxruntime import FP32 as ORT_FP32, cache_path

    path = cache_path(cache_dir, key, ORT_FP32)
    if not path.is_file():
        return None
    return OpenVinoBackend(path, kind=kind, threads=threads, checkpoint=checkpoint)


def _from_model(model, kind: str, info: ModelInfo, cache_dir: Path | None, threads: int | None):
    import tempfile

    import_openvino(kind)  # before exporting anything
    from .runtime_onnxruntime import FP32 as ORT_FP32, ensure_export

    with tempfile.TemporaryDirectory(prefix="dogbreeds-export-") as scratch:
        folder = cache_dir if cache_dir is not None else Path(scratch)  # compiled before a scratch folder goes
        path, exported = ensure_export(model, ORT_FP32, info, folder)  # the one fp32 export (cached)
        backend = OpenVinoBackend(path, kind=kind, threads=threads, checkpoint=info.checkpoint)
    backend.exported = exported
    return backend


register(Runtime(
    engines={FP32: "OpenVINO (CPU, fp32) on the same ONNX export as onnxruntime; needs the [openvino] extra",
             BF16: "OpenVINO (CPU) with its bf16 precision hint: bf16 on CPUs with native bf16 (AMX, AVX512-BF16), "
                   "fp32 elsewhere; needs the [openvino] extra"},
    from_model=_from_model,
    from_cache=_from_cache,
))
