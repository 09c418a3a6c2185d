"""The onnxruntime runtime: engines "onnxruntime" (fp32) and "int8", and `.onnx` files.

Measured in `dogbreeds bench` (docs/performance.md): on a 2-core AVX-512 AMD EPYC, PyTorch's
matrix products go through MKL, which runs far below its best on AMD CPUs, while onnxruntime's
own kernels (MLAS) do not care who made the CPU. So "auto" is onnxruntime on an ONNX export of
the model (export.write_onnx: ConvNeXt MLPs as 1x1 convolutions, see runtime_torch.inference_layout),
in a session with tuned options (`session`, the one place sessions are made).

"int8" is onnxruntime dynamic int8 quantisation of the matrix products of the Linear-MLP export,
classifier kept fp32 (`quantize_int8`): a separate, labelled path; it changes the numbers. On a
model with no other matrix product (MobileNetV2: convolutions and the classifier) it quantises
nothing: the export records how many operators compute in int8 (`integer_op_count`, metadata
QUANTISED_OPS_KEY), and such a backend says so (`OrtBackend.not_quantised`): "auto" skips it,
`--engine int8` warns, `dogbreeds bench` labels it fp32.
"int8-static" is static QDQ quantisation (`quantize_static_int8`) of the fp32 export, convolutions
and matrix products, activation ranges calibrated on real photos (the run's validation split,
or the photos given: ModelInfo.photos); its file name carries a hash of the calibration photos.
"auto" (infer/auto.py) chooses either only where it agrees with fp32 on real photos.
"onnxruntime-spin" is the same fp32 export and the same tuned session with spinning worker
threads (`session.intra_op.allow_spinning` = 1, onnxruntime's own default): a thread that finished
its share of one operator busy-waits for the next instead of sleeping, which saves a wake-up per
operator (most at batch 1 on a model of many small operators) and costs the cores it spins on.
"auto" probes both; the service never runs the spinning one unless named (`without_spinning`).

Exports of a run are cached in RUN/export/ under the run's key (backend.checkpoint_key), so the
second start opens the file without torch, and a changed checkpoint gets a new export. The
cached file is a complete dogbreeds ONNX file (onnx_format.py): `dogbreeds predict` takes it as is.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import DogbreedsError, WeightsError
from .backend import USE_TORCH, Backend, ModelInfo, Runtime, model_key, physical_cores, register
from .onnx_format import read_metadata

FP32, INT8, INT8_STATIC = "onnxruntime", "int8", "int8-static"
SPIN = "onnxruntime-spin"  # FP32's export and session, with spinning intra-op threads
SPINNING_KEY = "session.intra_op.allow_spinning"
INT8_SCHEME = "fp32head"  # in the int8 file name: change it when quantize_int8 changes, so old int8 exports miss
STATIC_SCHEME = "qdq1"     # the same for quantize_static_int8
CALIBRATION_PHOTOS = 32    # photos the static int8 ranges are calibrated on
QUANTISED_OPS_KEY = "dogbreeds.quantised_ops"  # metadata of a quantised export: how many operators compute in int8
# operators that compute on integers: what quantize_dynamic writes (MatMulInteger, ConvInteger) and
# the fused / QOperator forms onnxruntime and its quantiser use
INTEGER_OPS = frozenset({"MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                         "QLinearMatMul", "QLinearConv", "QGemm", "QAttention", "DynamicQuantizeLSTM"})
QDQ_COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def session(path: str | Path, threads: int | None = None, tuned: bool = True, spinning: bool = False):
    """An onnxruntime CPU session for `path`, the one way this package makes them.

    Tuned (the default): every graph optimisation (fusions and the NCHWc layout), one intra-op
    thread per physical core, sequential execution, and worker threads that sleep instead of
    spinning (spinning threads steal the cores that decoding and other processes need).
    spinning=True (engine "onnxruntime-spin"): the same, with worker threads that spin between
    operators (SPINNING_KEY = 1). tuned=False: onnxruntime's defaults, for `dogbreeds bench` to
    compare against."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such ONNX file; create one with `dogbreeds export RUN --out {path.name}`")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: QDQ graphs make it list every constant it folds away
    if tuned:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads or physical_cores()
        options.add_session_config_entry(SPINNING_KEY, "1" if spinning else "0")
    elif threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types (e.g. a truncated file)
        raise WeightsError(f"onnxruntime cannot load {path} ({type(exc).__name__}: {exc}); a cached export "
                           "(RUN/export/): delete the file so that it is exported again; an exported file: re-export "
                           f"it with `dogbreeds export`; or {USE_TORCH}") from exc


def integer_op_count(model) -> int:
    """How many operators of an ONNX graph (an onnx ModelProto, or the path of a file) compute in
    int8: integer kernels (INTEGER_OPS: what dynamic quantisation writes) plus, in a QDQ graph
    (static quantisation), each Conv/MatMul/Gemm whose input and weight both come out of a
    DequantizeLinear (onnxruntime fuses those into integer kernels). 0: nothing was quantised,
    the graph computes in fp32 whatever its file is called."""
    if not hasattr(model, "graph"):
        import onnx

        model = onnx.load(str(model), load_external_data=False)
    nodes = list(model.graph.node)
    dequantised = {out for node in nodes if node.op_type == "DequantizeLinear" for out in node.output}
    count = 0
    for node in nodes:
        if node.op_type in INTEGER_OPS:
            count += 1
        elif node.op_type in QDQ_COMPUTE_OPS and len(node.input) >= 2 and all(i in dequantised for i in node.input[:2]):
            count += 1
    return count


def not_quantised_reason(kind: str, name: str) -> str:
    """What an int8 engine whose graph has no integer operator is (see `integer_op_count`)."""
    if kind == INT8:
        return (f"int8 dynamic quantised no operator of this model ({name} has no matrix product but its classifier, "
                "kept fp32, and convolutions are not quantised): it is the fp32 graph")
    return f"{kind} quantised no operator of this model ({name}): it is the fp32 graph"


class OrtBackend(Backend):
    """A dogbreeds ONNX file (onnx_format.py) in an onnxruntime session; numpy in, numpy out."""

    def __init__(self, path: str | Path, threads: int | None = None, kind: str = FP32,
                 checkpoint: Path | None = None, tuned: bool = True, spinning: bool | None = None):
        """spinning: None = as `kind` says (SPIN spins, every other kind sleeps)."""
        import onnxruntime as ort

        self.spinning = (kind == SPIN) if spinning is None else bool(spinning)
        self.session = session(path, threads, tuned, spinning=self.spinning)
        self.contents = read_metadata(self.session.get_modelmeta().custom_metadata_map, path)
        info = ModelInfo(self.contents.classes, self.contents.preprocessing, self.contents.name,
                         metadata=self.contents.record, checkpoint=checkpoint)
        super().__init__(info, path)
        self.kind = kind
        self.threads = self.session.get_session_options().intra_op_num_threads or None
        self._input = self.session.get_inputs()[0].name
        options = (f"tuned, {self.threads} threads{', spinning' if self.spinning else ''}" if tuned
                   else "default options")
        legacy = "" if self.contents.has_features else ", format 1: no features"
        self.quantised_ops = self._quantised_ops(path) if kind in (INT8, INT8_STATIC) else None
        honest = " (nothing quantised: the fp32 graph)" if self.quantised_ops == 0 else ""
        self.description = f"onnxruntime {ort.__version__} {kind}{honest} ({options}{legacy}): {self.path.name}"

    def _quantised_ops(self, path) -> int:
        """The count written at quantisation (QUANTISED_OPS_KEY), else counted in the graph (older exports)."""
        stored = self.session.get_modelmeta().custom_metadata_map.get(QUANTISED_OPS_KEY)
        if stored is not None and stored.isdigit():
            return int(stored)
        return integer_op_count(path)

    @property
    def not_quantised(self) -> str | None:
        """Why this int8 backend is not one (no operator computes in int8), or None."""
        return not_quantised_reason(self.kind, self.name) if self.quantised_ops == 0 else None

    def _run(self, outputs: list[str], batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(outputs, {self._input: np.ascontiguousarray(batch, dtype=np.float32)})

    def forward(self, batch: np.ndarray) -> np.ndarray:
        if self.contents.logits_output is None:  # format 1: probabilities; log p has the same softmax
            probs = self._run([self.contents.probabilities_output], batch)[0]
            return np.log(np.maximum(probs, np.finfo(np.float32).tiny)).astype(np.float32)
        return self._run([self.contents.logits_output], batch)[0]

    def embed(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.contents.has_features:
            raise DogbreedsError(f"{self.path} was written by an older dogbreeds (format version {self.contents.version}: "
                                 "probabilities only, no features); re-export it with `dogbreeds export RUN --out "
                                 f"{self.path.name}` (a cached export in RUN/export/: delete it)")
        logits, features = self._run([self.contents.logits_output, self.contents.features_output], batch)
        return logits, features


# --- exports of a torch model, cached --------------------------------------------------------------

def cache_path(cache_dir: str | Path, key: str, kind: str, photos: list[Path] | None = None) -> Path:
    """Where the export for `kind` ("onnxruntime", "int8", "int8-static") of the weights named `key`
    is kept; int8-static's name also names its calibration photos."""
    if kind in (FP32, SPIN):  # one fp32 export; SPIN differs in its session only
        return Path(cache_dir) / f"model-{key}.onnx"
    if kind == INT8_STATIC:
        return Path(cache_dir) / f"model-{key}-{STATIC_SCHEME}-{photo_set_key(photos or [])}-int8.onnx"
    return Path(cache_dir) / f"model-{key}-{INT8_SCHEME}-int8.onnx"


def photo_set_key(photos: list[Path]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(sorted(Path(p).name for p in photos)).encode()).hexdigest()[:8]


def calibration_photos(info_photos: list[Path] | None, checkpoint: Path | None) -> list[Path]:
    """The photos int8-static calibrates on: the ones given, else the run's validation photos
    (the last CALIBRATION_PHOTOS of them: "auto" probes on the first ones). No torch."""
    if info_photos:
        return [Path(p) for p in info_photos][:CALIBRATION_PHOTOS]
    if checkpoint is None:
        return []
    from .auto import split_photos

    return split_photos(checkpoint, "val")[-CALIBRATION_PHOTOS:]


def _from_cache(kind: str, cache_dir: Path, key: str, checkpoint: Path | None, threads: int | None) -> OrtBackend | None:
    photos = calibration_photos(None, checkpoint) if kind == INT8_STATIC else None
    if kind == INT8_STATIC and not photos:
        return None
    path = cache_path(cache_dir, key, kind, photos)
    return OrtBackend(path, threads=threads, kind=kind, checkpoint=checkpoint) if path.is_file() else None


def _from_model(model, kind: str, info: ModelInfo, cache_dir: Path | None, threads: int | None) -> OrtBackend:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise DogbreedsError(f"engine {kind!r} needs onnxruntime (pip install onnxruntime); or {USE_TORCH}") from exc
    with tempfile.TemporaryDirectory(prefix="dogbreeds-export-") as scratch:
        folder = cache_dir if cache_dir is not None else Path(scratch)
        path, exported = ensure_export(model, FP32 if kind == SPIN else kind, info, folder)
        backend = OrtBackend(path, threads=threads, kind=kind, checkpoint=info.checkpoint)  # the session holds the graph
    backend.exported = exported
    return backend


def ensure_export(model, kind: str, info: ModelInfo, folder: Path) -> tuple[Path, bool]:
    """The export file of `kind` for a torch model in `folder` (written unless cached there), and
    whether it was written now. Also what OpenVINO reads (the fp32 file)."""
    from .export import write_onnx
    from .runtime_torch import inference_layout, linear_layout

    info.key = info.key or model_key(model, info)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DogbreedsError(f"cannot create the export folder {folder} ({exc}); make it writable, "
                             f"or {USE_TORCH}") from exc
    photos = None
    if kind == INT8_STATIC:
        photos = calibration_photos(info.photos, info.checkpoint)
        if not photos:
            raise DogbreedsError(f"engine {kind!r} calibrates on real photos, and there are none: "
                                 f"{info.checkpoint or 'this model'} has no validation split listing photos that "
                                 "exist; pass photos (ModelInfo.photos / photos=...), or use --engine int8 (dynamic)")
    path = cache_path(folder, info.key, kind, photos)
    exported = not path.is_file()
    if exported and kind == FP32:
        write_onnx(inference_layout(model), path, info)
    elif exported and kind == INT8_STATIC:  # quantise the fp32 export (kept too: fp32 engines share it)
        fp32 = cache_path(folder, info.key, FP32)
        if not fp32.is_file():
            write_onnx(inference_layout(model), fp32, info)
        quantize_static_int8(fp32, path, photos, info)
    elif exported:  # int8: quantise the Linear-MLP export, whose matrix products are what int8 speeds up
        fp32 = folder / f"model-{info.key}-linear.onnx"
        if not fp32.is_file():
            write_onnx(linear_layout(model), fp32, info)
        quantize_int8(fp32, path)
    return path, exported


def classifier_nodes(onnx_path: Path) -> list[str]:
    """Names of the MatMul/Gemm nodes that compute the logits output (the classifier), directly or
    through a bias Add, plus the name onnxruntime's quantiser gives a Gemm it splits into MatMul + Add."""
    import onnx

    from .onnx_format import LOGITS_NAME

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get(LOGITS_NAME)
    if node is not None and node.op_type == "Add":  # MatMul + Add: the bias
        node = next((producer[i] for i in node.input if i in producer and producer[i].op_type in ("MatMul", "Gemm")), None)
    if node is None or node.op_type not in ("MatMul", "Gemm"):
        return []
    return [node.name, f"{node.name}_MatMul"] if node.op_type == "Gemm" else [node.name]


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """Dynamic int8 quantisation of the matrix products (weights int8 per tensor, activations
    quantised per batch at run time), except the classifier, which stays fp32; the file keeps
    the fp32 file's metadata.

    Measured on trained ConvNeXt runs (benchmarks/bench_int8_agreement.py, docs/performance.md):
    the classifier's int8 error goes straight into the logits and was most of the int8 logit
    error (quantising it alone moved the logits about as much as quantising every layer);
    keeping it fp32 cut the mean logit error about 3x and lifted top-1 agreement with fp32
    above 99%, for a layer that costs nothing next to the blocks. Per-channel weights and
    reduce_range did not help. Convolutions stay fp32: onnxruntime's ConvInteger is slower
    than fp32 here."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quantize_into(fp32_path, int8_path, lambda partial: quantize_dynamic(
        str(fp32_path), str(partial), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_exclude=classifier_nodes(fp32_path)))


def _quantize_into(fp32_path: Path, int8_path: Path, quantize) -> None:
    """Run `quantize(partial_path)` without its advice on the terminal (the quantiser logs to the
    root logger and prints per-channel rescales: not for users), give the result the fp32 file's
    metadata and move it into place atomically."""
    import contextlib
    import io
    import logging

    import onnx

    partial = int8_path.with_name(f"{int8_path.name}.{os.getpid()}.partial")
    try:
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quantize(partial)
        finally:
            root.setLevel(level)
        quantized, source = onnx.load(str(partial)), onnx.load(str(fp32_path), load_external_data=False)
        del quantized.metadata_props[:]
        quantized.metadata_props.extend(p for p in source.metadata_props if p.key != QUANTISED_OPS_KEY)
        count = quantized.metadata_props.add()
        count.key, count.value = QUANTISED_OPS_KEY, str(integer_op_count(quantized))
        onnx.save(quantized, str(partial))
        os.replace(partial, int8_path)
    finally:
        partial.unlink(missing_ok=True)


def quantize_static_int8(fp32_path: Path, int8_path: Path, photos: list[Path], info: ModelInfo,
                         batch_size: int = 8) -> None:
    """Static int8 (QDQ): weights int8 per channel, activations uint8 with ranges calibrated
    (min/max) on `photos`, preprocessed as the model's eval transform; convolutions and matrix
    products quantised, the classifier kept fp32 (see quantize_int8). Without int8 dot-product
    instructions (VNNI, AMX) weights use 7 bits (reduce_range), which avoids the saturation of
    the u8 x s8 AVX2 instruction. The file keeps the fp32 file's metadata."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    from ..data.decode import decode_image
    from ..machine import has_fast_int8, machine_profile
    from .onnx_format import INPUT_NAME
    from .preprocess_np import NumpyEvalTransform

    transform = NumpyEvalTransform(info.preprocessing)
    arrays = []
    for photo in photos:
        try:
            arrays.append(transform(decode_image(photo)))
        except DogbreedsError:  # an unreadable photo calibrates nothing; the others still do
            continue
    if not arrays:
        raise DogbreedsError(f"none of the {len(photos)} calibration photos could be read (first: {photos[0]}); "
                             "pass readable photos, or use --engine int8 (dynamic)")
    batches = [np.stack(arrays[i:i + batch_size]) for i in range(0, len(arrays), batch_size)]

    class Photos(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(batches)

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    _quantize_into(fp32_path, int8_path, lambda partial: quantize_static(
        str(fp32_path), str(partial), Photos(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, per_channel=True, reduce_range=not has_fast_int8(machine_profile()["cpu"]["flags"]),
        nodes_to_exclude=classifier_nodes(fp32_path), calibrate_method=CalibrationMethod.MinMax))


register(Runtime(
    engines={FP32: "onnxruntime (tuned session) on the ONNX export of the model, cached in RUN/export/ for a run",
             SPIN: "onnxruntime fp32 as 'onnxruntime', with spinning worker threads: fewer wake-ups per operator, "
                   "but they busy-wait on the cores decoding needs (docs/performance.md); never chosen for serve",
             INT8: "onnxruntime with dynamic int8 matrix products, classifier fp32: faster, but it changes the numbers "
                   "(docs/performance.md)",
             INT8_STATIC: "onnxruntime static int8 (QDQ) calibrated on the run's validation photos, classifier fp32: "
                          "changes the numbers"},
    from_model=_from_model,
    from_cache=_from_cache,
    suffixes=(".onnx",),
    from_file=lambda path, threads=None: OrtBackend(path, threads=threads),
))
