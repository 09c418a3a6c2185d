"""The fastest way to run a model on this kind of CPU: `build_engine(model, kind="auto")`.

Measured in `dogbreeds bench` (docs/performance.md): on a 2-core AVX-512 AMD EPYC, PyTorch's
matrix products go through MKL, which runs far below its best on AMD CPUs, while
onnxruntime's own kernels (MLAS) do not care who made the CPU. So "auto" is onnxruntime on an
ONNX export of the model, with two changes that keep the numbers (within 1e-5) but not the cost:

- **ConvNeXt's MLPs as 1x1 convolutions.** timm's default ConvNeXt block permutes to NHWC,
  runs LayerNorm + two Linear layers, and permutes back; the same block with `conv_mlp=True`
  holds the same weights (shaped (out, in, 1, 1)) and runs as convolutions that onnxruntime
  blocks for its NCHWc kernels, with no transposes in between.
- **Tuned SessionOptions**: every graph optimisation (fusions and the NCHWc layout), one
  intra-op thread per physical core, sequential execution, and worker threads that sleep
  instead of spinning (on a shared machine spinning threads steal the cores the work needs).

Every engine returns **logits** from `run(batch)` (float32 N x classes); `probabilities(batch)`
applies the softmax. Input is float32 NCHW, already resized, cropped and normalised as the
model's `Preprocessing` says.

Kinds: "auto" (= "onnxruntime"), "onnxruntime", "torch" (eager, channels_last, inference
layout), "torch-compile" (inductor with freezing; compiles on the first batch of each shape,
minutes for ConvNeXt-T on 2 cores), "int8" (onnxruntime dynamic int8 quantisation of the
matrix products, classifier kept fp32: a separate, labelled path — it changes the numbers, see
docs/performance.md).

The ONNX export is cached in `cache_dir` (a run's `export/` folder when built from a run),
named by a hash of the weights, so the second start skips the export, and a run whose
checkpoint changed gets a new export.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from ..errors import DogbreedsError

KINDS = ("auto", "onnxruntime", "torch", "torch-compile", "int8")
AUTO_KIND = "onnxruntime"
# What every "the fast path cannot be built" error ends with: the way out, never a silent fallback.
USE_TORCH = "use the PyTorch path instead (--engine torch on the command line; engine='torch' or kind='torch' in Python)"
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
LAYOUT_VERSION = "convmlp-v1"  # bump when the inference rewrite changes: old cache entries then miss
INT8_SCHEME = "fp32head"  # in the int8 file name: change it when quantize_int8 changes, so old int8 exports miss


def physical_cores() -> int:
    """Cores this process may use, counting SMT siblings once (they share one core's FMA units)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        cores.add(siblings.read_text().strip() if siblings.is_file() else str(cpu))
    return max(1, len(cores))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class InferenceEngine:
    """float32 NCHW batch -> float32 logits. Subclasses set `kind` and `description`."""

    kind = "base"
    description = ""
    exported = False  # True when building this engine wrote a new ONNX export (not a cache hit)

    def run(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return softmax(self.run(batch))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"


class OrtEngine(InferenceEngine):
    kind = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None, tuned: bool = True, kind: str | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise DogbreedsError(f"ONNX file {self.path} does not exist; build it with build_engine(model, ...)")
        self.threads = threads or physical_cores()
        options = ort.SessionOptions()
        if tuned:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.intra_op_num_threads = self.threads
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types (e.g. a truncated file)
            raise DogbreedsError(f"onnxruntime cannot load {self.path} ({type(exc).__name__}: {exc}); delete the file "
                                 f"so that it is exported again, or {USE_TORCH}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.kind = kind or self.kind
        self.description = f"onnxruntime {ort.__version__} {'tuned, ' + str(self.threads) + ' threads' if tuned else 'default options'}: {self.path.name}"

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


class TorchEngine(InferenceEngine):
    kind = "torch"

    def __init__(self, model, threads: int | None = None, compile: bool = False):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.compile_seconds: dict[tuple, float] = {}
        if compile:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # fold weights into the graph: inference only
            self.forward = torch.compile(self.model, backend="inductor", dynamic=False)
            self.kind = "torch-compile"
        else:
            self.forward = self.model
        self.description = f"torch {torch.__version__} {self.kind}, channels_last, {torch.get_num_threads()} threads"

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).contiguous(memory_format=torch.channels_last)
        first = self.kind == "torch-compile" and tuple(x.shape) not in self.compile_seconds
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.forward(x).float().numpy()
        if first:  # the first call of a shape compiles: remember how long that took
            self.compile_seconds[tuple(x.shape)] = time.perf_counter() - start
        return out


def inference_layout(model):
    """The same network in the layout that runs fastest on CPU (see the module doc).

    timm ConvNeXt blocks with Linear MLPs are rebuilt with 1x1-convolution MLPs holding the same
    weights; a model that has them already (built with conv_mlp=True, as training does for
    ConvNeXt-T) and any other model come back unchanged. The rebuilt model is checked against
    the original on a random batch and an error is raised if they differ.
    """
    return _convnext_mlp_layout(model, conv_mlp=True)


def linear_layout(model):
    """The reverse of `inference_layout`: ConvNeXt MLPs as Linear layers (timm's default for
    ConvNeXt-T), for the int8 export, whose dynamic quantisation speeds up matrix products
    (MatMul/Gemm) but not 1x1 convolutions. Other models come back unchanged."""
    return _convnext_mlp_layout(model, conv_mlp=False)


def _convnext_mlp_layout(model, conv_mlp: bool):
    import timm
    import torch
    from timm.models.convnext import ConvNeXt

    if not isinstance(model, ConvNeXt) or all(getattr(b, "use_conv_mlp", conv_mlp) == conv_mlp for b in model.modules()
                                               if type(b).__name__ == "ConvNeXtBlock"):
        return model
    arch = model.pretrained_cfg.get("architecture") or getattr(model, "dogbreeds_name", None)
    kwargs = {k: v for k, v in getattr(model, "dogbreeds_kwargs", {}).items() if k != "conv_mlp"}
    rebuilt = timm.create_model(arch, pretrained=False, num_classes=model.num_classes, conv_mlp=conv_mlp, **kwargs).eval()
    target = rebuilt.state_dict()
    source = model.state_dict()
    layout = "1x1-convolution" if conv_mlp else "Linear"
    if set(source) != set(target):
        raise DogbreedsError(f"cannot give {arch} {layout} MLPs: parameter names differ "
                             f"({sorted(set(source) ^ set(target))[:4]}); use kind='torch' for this model")
    rebuilt.load_state_dict({k: v.reshape(target[k].shape) for k, v in source.items()})
    for attr in ("preprocessing", "dogbreeds_name", "dogbreeds_kwargs"):
        if hasattr(model, attr):
            setattr(rebuilt, attr, getattr(model, attr))
    size = getattr(getattr(model, "preprocessing", None), "input_size", 224)
    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        diff = (model(probe) - rebuilt(probe)).abs().max().item()
    model.train(was_training)
    if not diff <= 1e-4:
        raise DogbreedsError(f"the {layout} layout of {arch} differs from the original by {diff:.3g}; "
                             "use kind='torch' and report the model name")
    return rebuilt


def weights_key(model, checkpoint: str | Path | None = None) -> str:
    """A hash of what the export depends on: the checkpoint file's bytes when given (so it can be
    computed without torch), else the architecture and the weights in memory."""
    digest = hashlib.sha256(f"{LAYOUT_VERSION} opset{OPSET}".encode())
    if checkpoint is not None:
        digest.update(file_sha256(checkpoint).encode())
        return digest.hexdigest()[:16]
    arch = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    digest.update(json.dumps([arch, getattr(model, "dogbreeds_kwargs", {})], sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_path(cache_dir: str | Path, key: str, kind: str) -> Path:
    """Where build_engine keeps the export for `kind` ("onnxruntime" or "int8")."""
    return Path(cache_dir) / (f"model-{key}.onnx" if kind == "onnxruntime" else f"model-{key}-{INT8_SCHEME}-int8.onnx")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_onnx_logits(model, path: Path, input_size: int) -> None:
    """ONNX (opset 17, TorchScript exporter) with dynamic batch and image size, output logits;
    written to a partial file and checked against torch before it takes its final name."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    # one partial file per process: two processes exporting the same run (serve + evaluate) must not
    # write into one file; each checks its own, and the last os.replace wins (both hold the same export)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    example = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    model = model.eval()
    name = getattr(model, "dogbreeds_name", None) or type(model).__name__
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), str(partial), dynamo=False, opset_version=OPSET,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch"}})
        except Exception as exc:  # unsupported operators, tracing failures, a full disk ...
            raise DogbreedsError(f"cannot export {name} to ONNX for the onnxruntime engine "
                                 f"({type(exc).__name__}: {exc}); {USE_TORCH}") from exc
        with torch.inference_mode():
            expected = model(example).numpy()
        got = OrtEngine(partial, tuned=False).run(example.numpy())
        diff = float(np.abs(got - expected).max())
        if not diff <= 1e-3 * (1 + float(np.abs(expected).max())):
            raise DogbreedsError(f"the ONNX export of {name} differs from torch by {diff:.3g} "
                                 f"in logits; {USE_TORCH}, and report the model name")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def classifier_nodes(onnx_path: Path) -> list[str]:
    """Names of the MatMul/Gemm nodes that compute the graph's output (the classifier), directly or
    through a bias Add, plus the name onnxruntime's quantiser gives a Gemm it splits into MatMul + Add."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    outputs = {o.name for o in graph.output}
    producer = {out: node for node in graph.node for out in node.output}
    names = []
    for name in outputs:
        node = producer.get(name)
        if node is not None and node.op_type == "Add":  # MatMul + Add: the bias
            node = next((producer[i] for i in node.input if i in producer and producer[i].op_type in ("MatMul", "Gemm")), None)
        if node is not None and node.op_type in ("MatMul", "Gemm"):
            names += [node.name, f"{node.name}_MatMul"] if node.op_type == "Gemm" else [node.name]
    return names


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """Dynamic int8 quantisation of the matrix products (weights int8 per tensor, activations
    quantised per batch at run time), except the classifier, which stays fp32.

    Measured on trained ConvNeXt runs (benchmarks/bench_int8_agreement.py, docs/performance.md):
    the classifier's int8 error goes straight into the logits and was most of the int8 logit
    error (quantising it alone moved the logits about as much as quantising every layer);
    keeping it fp32 cut the mean logit error about 3x and lifted top-1 agreement with fp32
    above 99%, for a layer that costs nothing next to the blocks. Per-channel weights and
    reduce_range did not help. Convolutions stay fp32: onnxruntime's ConvInteger is slower
    than fp32 here."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    partial = int8_path.with_name(int8_path.name + ".partial")
    try:
        quantize_dynamic(str(fp32_path), str(partial), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         nodes_to_exclude=classifier_nodes(fp32_path))
        os.replace(partial, int8_path)
    finally:
        partial.unlink(missing_ok=True)


def build_engine(model, preprocessing=None, kind: str = "auto", cache_dir: str | Path | None = None,
                 threads: int | None = None, checkpoint: str | Path | None = None) -> InferenceEngine:
    """The engine of `kind` for a torch `model` (which is put in eval mode; its weights are not changed).

    preprocessing: the model's `Preprocessing` (default `model.preprocessing`); its input size
                   is used for the export's check (the export accepts any size).
    cache_dir:     where ONNX exports are kept (None: a temporary folder, exported every time).
    threads:       intra-op threads (default: physical cores).
    checkpoint:    the weights file the model came from: hashing it is the cache key
                   (default: a hash of the weights in memory).
    """
    if kind not in KINDS:
        raise DogbreedsError(f"unknown engine kind {kind!r}; choose one of {', '.join(KINDS)}")
    kind = AUTO_KIND if kind == "auto" else kind
    preprocessing = preprocessing or getattr(model, "preprocessing", None)
    size = preprocessing.input_size if preprocessing is not None else 224
    if kind in ("torch", "torch-compile"):
        import copy

        fast = inference_layout(model)
        # a copy, so that converting to channels_last does not change the caller's model
        return TorchEngine(copy.deepcopy(fast) if fast is model else fast, threads=threads, compile=kind == "torch-compile")
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise DogbreedsError(f"engine kind {kind!r} needs onnxruntime (pip install onnxruntime); "
                             f"or {USE_TORCH}") from exc
    key = weights_key(model, checkpoint)
    with tempfile.TemporaryDirectory(prefix="dogbreeds-engine-") as scratch:
        folder = Path(cache_dir) if cache_dir is not None else Path(scratch)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DogbreedsError(f"cannot create the engine's export folder {folder} ({exc}); make it writable, "
                                 f"or {USE_TORCH}") from exc
        if kind == "onnxruntime":
            path, exported = _cached(cache_path(folder, key, kind), lambda p: export_onnx_logits(inference_layout(model), p, size))
        else:  # int8: quantise the Linear-MLP export, whose matrix products are what int8 speeds up
            fp32 = folder / f"model-{key}-linear.onnx"
            path, exported = _cached(cache_path(folder, key, kind),
                                     lambda p: (_cached(fp32, lambda q: export_onnx_logits(linear_layout(model), q, size)),
                                                quantize_int8(fp32, p)))
        engine = OrtEngine(path, threads=threads, kind=kind)  # the session holds the graph; the file may go
    engine.exported = exported
    return engine


def _cached(path: Path, make) -> tuple[Path, bool]:
    if path.is_file():
        return path, False
    make(path)
    return path, True


class EngineBackend:
    """A `Predictor` backend (see infer/predictor.py) running a run's checkpoint on an engine.

    `Predictor(EngineBackend.from_run(run))`: with an onnxruntime kind and a cached export in
    RUN/export/ this never imports torch; otherwise it loads the run and exports once.
    Preprocessing is the numpy eval transform (the same as the ONNX predictor's).
    """

    def __init__(self, engine: InferenceEngine, classes, preprocessing, name: str, path: Path):
        from .preprocess_np import NumpyEvalTransform

        self.engine, self.classes, self.preprocessing, self.name, self.path = engine, classes, preprocessing, name, Path(path)
        self._transform = NumpyEvalTransform(preprocessing)

    @classmethod
    def from_run(cls, run: str | Path, kind: str = "auto", cache_dir: str | Path | None = None,
                 threads: int | None = None) -> "EngineBackend":
        from ..data.records import ClassInfo
        from ..models.checkpoint_format import find_run_checkpoint, read_checkpoint_meta
        from ..preprocessing import Preprocessing

        run = Path(run).expanduser()
        checkpoint = find_run_checkpoint(run) if run.is_dir() else (run.with_suffix(".safetensors") if run.suffix == ".json" else run)
        if checkpoint is None or not checkpoint.is_file():
            raise DogbreedsError(f"{run}: no checkpoint found (expected a run dir with checkpoints/best.safetensors "
                                 "or last.safetensors, or a .safetensors file)")
        run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
        cache_dir = Path(cache_dir) if cache_dir is not None else run_dir / "export"
        meta = read_checkpoint_meta(checkpoint)
        kind = AUTO_KIND if kind == "auto" else kind
        if kind in ("onnxruntime", "int8"):
            cached = cache_path(cache_dir, weights_key(None, checkpoint), kind)
            if cached.is_file():
                if meta.get("classes"):
                    classes = ClassInfo.from_json(meta["classes"])
                elif (run_dir / "classes.json").is_file():
                    classes = ClassInfo.load(run_dir / "classes.json")
                else:
                    raise DogbreedsError(f"{checkpoint}: no classes in its sidecar {checkpoint.with_suffix('.json')} and no "
                                         f"classes.json in {run_dir}; copy the run's classes.json there, or {USE_TORCH}")
                engine = OrtEngine(cached, threads=threads, kind=kind)
                return cls(engine, classes, Preprocessing.from_dict(meta["preprocessing"]), meta["model"], checkpoint)
        from ..models.factory import load_run

        loaded = load_run(checkpoint)
        engine = build_engine(loaded.model, loaded.preprocessing, kind=kind, cache_dir=cache_dir, threads=threads,
                              checkpoint=checkpoint)
        return cls(engine, loaded.classes, loaded.preprocessing, loaded.name, checkpoint)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        return self._transform(image)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return self.engine.probabilities(batch)
