"""Every dog in the photo: `Detector` finds the dogs, `detect_breeds` gives each one a breed.

    detector = Detector.from_path("runs/det")        # a detector run (or an exported .onnx file)
    detector.detect(rgb)                               # [Detection(box=(x0, y0, x1, y1), score), ...]
    detect_breeds(detector, Predictor.from_run("runs/breeds"), "photo.jpg")
    # {"image": "photo.jpg", "dogs": [{"box": [...], "score": 0.98, "top": [...], "verdict": ...}]}

Engines, as for breed runs (`--engine`): "auto" (= "onnxruntime") runs the detector's ONNX
export in a tuned onnxruntime session (the file written by detect/export.py, cached in
RUN/export/ under a hash of the checkpoint, so a second start never imports torch); "torch"
runs the PyTorch model (`detect.model.load_detector`). An `.onnx` file always runs on
onnxruntime, torch-free.

The model is a torchvision detection model: its own transform scales 0..1 pixels, normalises
them and resizes the photo to its min_size/max_size, and it answers boxes in the photo's own
pixel coordinates. So the input prepared here is only the photo as float32 CHW in [0, 1], the
same on both runtimes, and the exported graph holds the rest (resize, normalisation, box
decoding, NMS).

A breed per dog: each box is cropped with a margin (the run's `crop_margin` of its size on every
side, `DEFAULT_MARGIN` for a run without one; clipped to the photo: some context, as in the photos
the breed runs were trained on)
and the crops go through the breed `Predictor` as one batch: top-k breeds and, for a
calibrated run, the verdict, OOD score and breed set of each dog. A photo where nothing
scores at least the score threshold gives "dogs": [].

This module imports neither torch nor onnxruntime at import time.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..errors import DogbreedsError, ImageDecodeError, WeightsError

# The ONNX contract of a detector file (written by detect/export.py only).
FORMAT_NAME = "dogbreeds-detector"
FORMAT_VERSION = 1
INPUT_NAME = "image"                        # float32 (3, H, W) in [0, 1], any H and W
OUTPUT_NAMES = ("boxes", "scores", "labels")  # (N, 4) x0 y0 x1 y1 in input pixels, (N,), (N,) int64
# The order torchvision's detection models return them in (each output dict is boxes, labels, scores).
GRAPH_OUTPUTS = ("boxes", "labels", "scores")
META_FORMAT, META_VERSION, META_CONFIG, META_THRESHOLD = (
    "dogbreeds.format", "dogbreeds.version", "dogbreeds.detector", "dogbreeds.score_threshold")
# Part of the export cache key: bump it when what a detector export holds changes.
CACHE_VERSION = "detector-v1"

# A detection counts as a dog from this score on, unless the run's config or the caller says
# otherwise (`DetectorConfig.score_threshold` when C1's config has one).
DEFAULT_SCORE_THRESHOLD = 0.5
# The duplicate rule of `count_keep` (`DetectorConfig.count_nms_iou` / `count_containment`): 1.0 = off,
# what a run trained before the rule existed gets until `detect evaluate --split val --choose-count`.
COUNT_RULE_OFF = 1.0
DEFAULT_MARGIN = 0.1
MAX_MARGIN = 2.0  # a larger margin is the whole photo anyway
NOT_A_DOG = "not_a_dog"  # the trust layer's verdict (trust/): such boxes go to "not_dogs"
ENGINES = ("auto", "onnxruntime", "torch")


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the photo's pixels
    score: float

    def to_dict(self) -> dict:
        return {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 6)}


def to_model_input(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> float32 (3, H, W) in [0, 1]: what the detection model takes."""
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        what = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}".strip()
        raise TypeError(f"the detector takes an HxWx3 uint8 RGB numpy array (decode_image's output), got {what}")
    chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    chw /= np.float32(255)
    return chw


def config_to_dict(config: Any) -> dict:
    """A DetectorConfig (dataclass, or anything with to_dict) or a dict -> a JSON-able dict."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    import dataclasses

    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    raise TypeError(f"detector config must be a dict or a DetectorConfig, got {type(config).__name__}")


def _config_threshold(config: dict) -> float:
    value = config.get("score_threshold")
    return float(value) if isinstance(value, (int, float)) and 0 <= value <= 1 else DEFAULT_SCORE_THRESHOLD


def config_count_rule(config: dict) -> tuple[float, float]:
    """(count_nms_iou, count_containment) of a detector config; 1.0 (off) where it has none."""
    rule = []
    for key in ("count_nms_iou", "count_containment"):
        value = config.get(key)
        rule.append(float(value) if isinstance(value, (int, float)) and 0 < value <= 1 else COUNT_RULE_OFF)
    return rule[0], rule[1]


def config_crop_margin(config: dict) -> float:
    """The margin each box is grown by before the breed run (`crop_margin`, chosen with `crop_square`
    on the validation photos by `detect evaluate --choose-margin`); DEFAULT_MARGIN for a run that has none."""
    value = config.get("crop_margin")
    return float(value) if isinstance(value, (int, float)) and 0 <= value <= MAX_MARGIN else DEFAULT_MARGIN


def config_inference_size(config: dict) -> tuple[Any, Any]:
    """(min_size, max_size) of a detector config's resize at inference: `infer_min_size` /
    `infer_max_size` (chosen on the validation photos by `detect evaluate --choose-size`) where it
    has them, else the training `min_size` / `max_size` (None where it has neither)."""
    sizes = []
    for key in ("min_size", "max_size"):
        chosen = config.get(f"infer_{key}")
        sizes.append(chosen if isinstance(chosen, (int, float)) and chosen > 0 else config.get(key))
    return sizes[0], sizes[1]


def count_keep(boxes: np.ndarray, scores: np.ndarray, threshold: float, nms_iou: float = 1.0,
               containment: float = 1.0) -> np.ndarray:
    """Indices (best first) of the detections that count as dogs: score >= threshold, then, going
    down the scores, a box is dropped when it overlaps a box already kept with IoU > nms_iou
    (class-agnostic NMS, stricter than the model's own) or when their intersection covers more than
    `containment` of the smaller of the two (a duplicate box inside a dog's box, or a box around a
    dog and its neighbour). 1.0 turns either test off. Numpy after the model, so the PyTorch and
    ONNX paths, `detect evaluate` and predict all count the same dogs."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    idx = np.flatnonzero(scores >= threshold)
    idx = idx[np.argsort(-scores[idx], kind="stable")]
    if len(idx) < 2 or (nms_iou >= 1.0 and containment >= 1.0):
        return idx
    b = boxes[idx]
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    wx = np.clip(np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0]), 0, None)
    wy = np.clip(np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1]), 0, None)
    inter = wx * wy
    union = area[:, None] + area[None, :] - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    smaller = np.minimum(area[:, None], area[None, :])
    cover = np.where(smaller > 0, inter / np.where(smaller > 0, smaller, 1), 0.0)
    drop = (iou > nms_iou) | (cover > containment)
    kept: list[int] = []
    for i in range(len(idx)):
        if not any(drop[i, j] for j in kept):
            kept.append(i)
    return idx[kept]


def check_score_threshold(value: float) -> float:
    value = float(value)
    if not 0 <= value <= 1:  # also refuses nan
        raise DogbreedsError(f"detector score threshold must be within [0, 1], got {value!r}")
    return value


class Detector:
    """A dog detector on one runtime: `detect(rgb)` -> detections scoring >= the threshold.

    runner: float32 (3, H, W) in [0, 1] -> (boxes (N, 4), scores (N,), labels (N,)) numpy arrays,
    all of the model's detections (best first), before this class's threshold."""

    def __init__(self, runner: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]], config: dict,
                 score_threshold: float | None = None, kind: str = "", description: str = "",
                 path: Path | None = None, checkpoint: Path | None = None):
        self.runner = runner
        self.config = config_to_dict(config)
        self.score_threshold = check_score_threshold(
            _config_threshold(self.config) if score_threshold is None else score_threshold)
        self.count_nms_iou, self.count_containment = config_count_rule(self.config)
        self.crop_margin = config_crop_margin(self.config)
        self.crop_square = self.config.get("crop_square") is True
        self.crop_mirror = self.config.get("crop_mirror") is True
        self.kind, self.description = kind, description
        self.path = Path(path) if path is not None else None
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.exported = False  # True when building this detector wrote a new export

    @property
    def name(self) -> str:
        return str(self.config.get("backbone") or self.config.get("name") or (self.path.stem if self.path else "detector"))

    # --- building ---

    @classmethod
    def from_path(cls, path: str | Path, engine: str = "auto", score_threshold: float | None = None,
                  threads: int | None = None, cache_dir: str | Path | None = None) -> "Detector":
        """A detector run directory (or its checkpoint) on `engine`, or an exported `.onnx` file
        (onnxruntime only, torch never imported)."""
        engine = check_detect_engine(engine)
        path = Path(path)
        if path.suffix.lower() == ".onnx":
            if engine == "torch":
                raise DogbreedsError(f"{path} is an exported .onnx file, which runs on onnxruntime only; drop "
                                     "--engine torch, or pass the detector run directory it was exported from")
            return cls.from_onnx(path, score_threshold=score_threshold, threads=threads)
        check_detector_run(path)
        if engine == "torch":
            return cls.from_run_torch(path, score_threshold=score_threshold)
        return cls.from_run_onnx(path, score_threshold=score_threshold, threads=threads, cache_dir=cache_dir)

    @classmethod
    def from_onnx(cls, path: str | Path, score_threshold: float | None = None, threads: int | None = None,
                  checkpoint: Path | None = None, kind: str = "onnxruntime") -> "Detector":
        import onnxruntime as ort

        path = Path(path)
        session = detector_session(path, threads)
        config = read_detector_metadata(session.get_modelmeta().custom_metadata_map, path)
        stored = config.pop("__score_threshold__", None)
        input_name = session.get_inputs()[0].name
        outputs = [o.name for o in session.get_outputs()]
        missing = [name for name in OUTPUT_NAMES if name not in outputs]
        if missing:
            raise WeightsError(f"{path}: the detector graph lacks outputs {missing}; re-export it with "
                               "`dogbreeds detect export DETECTOR_RUN --out FILE.onnx`")

        def run(chw: np.ndarray):
            boxes, scores, labels = session.run(list(OUTPUT_NAMES), {input_name: chw})
            return boxes, scores, labels

        threshold = score_threshold if score_threshold is not None else stored
        used = session.get_session_options().intra_op_num_threads
        detector = cls(run, config, threshold, kind=kind, path=path, checkpoint=checkpoint,
                       description=f"onnxruntime {ort.__version__} ({used or 'default'} threads): {path.name}")
        detector.session = session
        return detector

    @classmethod
    def from_model(cls, model, config: Any, score_threshold: float | None = None, path: Path | None = None,
                   checkpoint: Path | None = None) -> "Detector":
        """A torchvision detection model in memory, on PyTorch eager (its resize made exact:
        `stable_resize`, as in every export)."""
        import torch

        model = stable_resize(model.eval())

        def run(chw: np.ndarray):
            with torch.inference_mode():
                out = model([torch.from_numpy(chw)])[0]
            return out["boxes"].float().numpy(), out["scores"].float().numpy(), out["labels"].numpy()

        detector = cls(run, config, score_threshold, kind="torch", path=path, checkpoint=checkpoint,
                       description=f"torch {torch.__version__} eager")
        detector.model = model
        return detector

    @classmethod
    def from_run_torch(cls, run: str | Path, score_threshold: float | None = None) -> "Detector":
        from ..rundir import RunDir
        from .model import load_detector

        located = RunDir.locate(run)
        model, config = load_detector(run)
        checkpoint = located.find_checkpoint()
        return cls.from_model(model, config, score_threshold, path=checkpoint, checkpoint=checkpoint)

    @classmethod
    def from_run_onnx(cls, run: str | Path, score_threshold: float | None = None, threads: int | None = None,
                      cache_dir: str | Path | None = None) -> "Detector":
        """The run's export cached in RUN/export/ (opened without torch), exported there first if missing."""
        from ..rundir import RunDir

        located = RunDir.locate(run)
        checkpoint = located.checkpoint()
        folder = Path(cache_dir) if cache_dir is not None else located.export_dir
        cached = folder / f"detector-{detector_key(checkpoint)}.onnx"
        exported = False
        if not cached.is_file():
            try:
                import onnxruntime  # noqa: F401
            except ImportError as exc:
                raise DogbreedsError("the detector's default engine needs onnxruntime (pip install onnxruntime); "
                                     "or use --engine torch") from exc
            from .export import write_detector_onnx
            from .model import load_detector

            model, config = load_detector(run)
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DogbreedsError(f"cannot create the export folder {folder} ({exc}); make it writable, "
                                     "or use --engine torch") from exc
            write_detector_onnx(model, cached, config)
            exported = True
        detector = cls.from_onnx(cached, score_threshold=score_threshold, threads=threads, checkpoint=checkpoint)
        detector.exported = exported
        return detector

    # --- running ---

    def raw(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All of the model's detections for an HxWx3 uint8 photo: (boxes, scores, labels)."""
        boxes, scores, labels = self.runner(to_model_input(image))
        return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(scores, dtype=np.float32).reshape(-1),
                np.asarray(labels).reshape(-1))

    def check_size(self, image: np.ndarray, name: str = "the photo") -> None:
        """A photo so thin that the model's resize would make its short side under one pixel
        (e.g. 3x900 at max_size 160) cannot be looked at: an ImageDecodeError that says so."""
        height, width = image.shape[:2]
        min_size, max_size = config_inference_size(self.config)
        if isinstance(min_size, (int, float)) and isinstance(max_size, (int, float)) and min(height, width) > 0:
            scale = min(min_size / min(height, width), max_size / max(height, width))
            if min(height, width) * scale < 1:
                raise ImageDecodeError(name, f"{width}x{height} is too thin for the detector: its resize to at most "
                                             f"{max_size:g} pixels would leave the short side under one pixel; crop "
                                             "it to a less extreme aspect ratio")

    def detect(self, image: np.ndarray, score_threshold: float | None = None) -> list[Detection]:
        """The dogs in an HxWx3 uint8 RGB photo, best first: boxes in its pixel coordinates
        (`count_keep`: score >= the threshold, duplicates dropped by the run's count rule)."""
        threshold = self.score_threshold if score_threshold is None else check_score_threshold(score_threshold)
        self.check_size(image)
        boxes, scores, _ = self.raw(image)
        height, width = image.shape[:2]
        found = []
        for i in count_keep(boxes, scores, threshold, self.count_nms_iou, self.count_containment):
            x0, y0, x1, y1 = (float(v) for v in boxes[i])
            box = (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width),
                   min(max(y1, 0.0), height))
            found.append(Detection(box, float(scores[i])))
        return found

    def crop(self, image: np.ndarray, box: Iterable[float], margin: float | None = None) -> np.ndarray:
        """The crop of one detected dog for the breed run, as this detector's run chose it on the
        validation photos (`crop_margin`, `crop_square`; margin overrides the first)."""
        return crop_dog(image, box, self.crop_margin if margin is None else float(margin), self.crop_square)

    def __repr__(self) -> str:
        return f"Detector({self.kind}: {self.description})"


# How far the resize's scale is nudged up (relative): see `stable_resize`.
RESIZE_NUDGE = 1e-6


def stable_resize(model):
    """Make the eval-time resize of a torchvision detection model give the same image size in
    PyTorch eager and in its ONNX export, and return the model.

    torchvision resizes by scale = min(min_size / short side, max_size / long side) and an output
    side of floor(side * scale). For the side that sets the scale that product is mathematically
    an integer (min_size), so floating point decides: eager computes it in double from a double
    scale, the ONNX graph in float32, and one of them often floors to min_size - 1 (e.g. a
    397-pixel side at min_size 128; every 224x224 photo of the mini data at most sizes). A
    one-pixel different input moves every feature map a little: boxes then differ by more than
    a pixel. Here the scale is computed in float32 on both sides, as torchvision's traced path
    does, and nudged up by RESIZE_NUDGE (1e-6), far more than float32's rounding and far less
    than a pixel: the products that should be integers come out just above them, so both
    runtimes floor to the intended size. Training (and a fixed_size transform) is unchanged."""
    transform = getattr(model, "transform", None)
    if transform is None or getattr(transform, "_dogbreeds_stable_resize", False):
        return model
    import types

    original = type(transform).resize

    def resize(self, image, target=None):
        if self.training or target is not None or self.fixed_size is not None:
            return original(self, image, target)
        import torch
        import torchvision
        from torchvision.models.detection.transform import _fake_cast_onnx, _get_shape_onnx

        tracing = torchvision._is_tracing()
        shape = (_get_shape_onnx(image) if tracing else torch.tensor(image.shape[-2:])).to(torch.float32)
        scale = torch.min(float(self.min_size[-1]) / torch.min(shape), float(self.max_size) / torch.max(shape))
        scale = scale * (1.0 + RESIZE_NUDGE)
        scale_factor = _fake_cast_onnx(scale) if tracing else scale.item()
        image = torch.nn.functional.interpolate(image[None], scale_factor=scale_factor, mode="bilinear",
                                                recompute_scale_factor=True, align_corners=False)[0]
        return image, target

    transform.resize = types.MethodType(resize, transform)
    transform._dogbreeds_stable_resize = True
    return model


def detector_session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session for a detector file, tuned as the breed models' sessions are
    (infer/runtime_onnxruntime.py: every graph optimisation, one thread per physical core,
    sequential, no spinning), with onnxruntime's own log at errors only: its optimiser folds
    the exported ReLU6 clips and says so in one warning per folded constant (dozens per start)."""
    import onnxruntime as ort

    from ..infer.backend import physical_cores

    if not path.is_file():
        raise WeightsError(f"{path}: no such ONNX file; create one with `dogbreeds detect export DETECTOR_RUN "
                           f"--out {path.name}`")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or physical_cores()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types (e.g. a truncated file)
        raise WeightsError(f"onnxruntime cannot load {path} ({type(exc).__name__}: {exc}); a cached export "
                           "(RUN/export/detector-*.onnx): delete it so that it is exported again; an exported file: "
                           "re-export it with `dogbreeds detect export`; or use --engine torch") from exc


def check_detector_run(path: Path) -> None:
    """A breed run given where a detector run belongs is an error that says which is which (read
    from the checkpoint's JSON sidecar: no torch)."""
    from ..rundir import RunDir

    checkpoint = RunDir.locate(path).checkpoint()
    sidecar = checkpoint.with_suffix(".json")
    try:
        kind = json.loads(sidecar.read_text()).get("format") if sidecar.is_file() else None
    except (OSError, ValueError, AttributeError, RecursionError):
        return  # the checkpoint reader reports it
    if kind is not None and kind != FORMAT_NAME:
        raise DogbreedsError(f"{path} is not a detector run ({sidecar.name} says format {kind!r}): --detect takes a "
                             "run written by `dogbreeds detect train` or its exported .onnx file; a breed run is the "
                             "first argument (RUN_OR_MODEL)")


def check_detect_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise DogbreedsError(f"unknown detector engine {engine!r}; choose one of {', '.join(ENGINES)} "
                             "('auto' = onnxruntime on the run's ONNX export, cached in RUN/export/)")
    return "onnxruntime" if engine == "auto" else engine


def detector_key(checkpoint: Path) -> str:
    """Names a run's cached export: the checkpoint's bytes and its sidecar (no torch)."""
    import hashlib

    from ..infer.backend import file_sha256

    digest = hashlib.sha256(CACHE_VERSION.encode())
    digest.update(file_sha256(checkpoint).encode())
    sidecar = Path(checkpoint).with_suffix(".json")
    if sidecar.is_file():
        digest.update(sidecar.read_bytes())
    return digest.hexdigest()[:16]


def detector_metadata(config: Any, score_threshold: float | None = None) -> dict[str, str]:
    """The metadata_props of a detector export."""
    config = config_to_dict(config)
    threshold = _config_threshold(config) if score_threshold is None else check_score_threshold(score_threshold)
    return {META_FORMAT: FORMAT_NAME, META_VERSION: str(FORMAT_VERSION),
            META_CONFIG: json.dumps(config, sort_keys=True, default=str), META_THRESHOLD: repr(float(threshold))}


def read_detector_metadata(props: dict[str, str], path: Path) -> dict:
    """The config stored in a detector export (plus "__score_threshold__"); errors say what to do."""
    fmt = props.get(META_FORMAT)
    if fmt != FORMAT_NAME:
        what = "a breed model (dogbreeds export): pass it as the breed RUN_OR_MODEL" if fmt == "dogbreeds" else \
            f"not a dogbreeds detector (format {fmt!r})"
        raise WeightsError(f"{path}: {what}; export a detector run with `dogbreeds detect export DETECTOR_RUN "
                           "--out FILE.onnx`")
    try:
        version = int(props.get(META_VERSION, "1"))
        config = json.loads(props.get(META_CONFIG, "{}"))
        threshold = float(props[META_THRESHOLD]) if META_THRESHOLD in props else None
    except (ValueError, TypeError, RecursionError) as exc:  # RecursionError: a nesting bomb
        raise WeightsError(f"{path}: unreadable detector metadata ({exc}); re-export it with "
                           "`dogbreeds detect export DETECTOR_RUN --out FILE.onnx`") from None
    if version > FORMAT_VERSION:
        raise WeightsError(f"{path}: written by a newer dogbreeds (detector format {version}; this one reads up to "
                           f"{FORMAT_VERSION}); upgrade dogbreeds, or re-export the run with this version")
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: {META_CONFIG} is not a JSON object; re-export it")
    config["__score_threshold__"] = threshold
    return config


# --- a breed per dog ----------------------------------------------------------------------------

def crop_box(image: np.ndarray, box: Iterable[float], margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """The part of `image` under `box` (x0, y0, x1, y1), grown by `margin` of its width and height
    on each side and clipped to the photo; at least one pixel."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    dx, dy = margin * max(x1 - x0, 0.0), margin * max(y1 - y0, 0.0)
    left = int(np.clip(np.floor(x0 - dx), 0, width - 1))
    top = int(np.clip(np.floor(y0 - dy), 0, height - 1))
    right = int(np.clip(np.ceil(x1 + dx), left + 1, width))
    bottom = int(np.clip(np.ceil(y1 + dy), top + 1, height))
    return np.ascontiguousarray(image[top:bottom, left:right])


def crop_dog(image: np.ndarray, box: Iterable[float], margin: float = DEFAULT_MARGIN, square: bool = False) -> np.ndarray:
    """The crop of one dog for the breed run: `crop_box`, or with square=True a square of side
    max(width, height) * (1 + 2 * margin) around the box's centre, moved inside the photo where it
    fits (else clipped to it). The breed runs resize the short side and cut the centre square
    (Preprocessing.crop_pct), so a long rectangular crop would lose the ends of the dog."""
    if not square:
        return crop_box(image, box, margin)
    height, width = image.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0, 0.0) * (1 + 2 * margin)
    edges = []
    for centre, limit in (((x0 + x1) / 2, width), ((y0 + y1) / 2, height)):
        low = centre - side / 2
        if side <= limit:
            low = min(max(low, 0.0), limit - side)
        edges.append((low, low + side))
    (left, right), (top, bottom) = edges
    return crop_box(image, (left, top, right, bottom), 0.0)


def dog_entry(detection: Detection, prediction: dict) -> dict:
    """One dog of the answer: its box and score, then the breed prediction's fields (top, verdict, ...)."""
    entry = detection.to_dict()
    entry.update({k: v for k, v in prediction.items() if k != "image"})
    return entry


def split_dogs(entries: list[dict], drop_not_a_dog: bool = True) -> dict:
    """{"dogs": [...]} , plus {"not_dogs": [...]} for the boxes whose breed verdict is "not_a_dog"
    when drop_not_a_dog (only a calibrated breed run says so; its dog / not-dog head)."""
    if not drop_not_a_dog:
        return {"dogs": entries}
    dogs = [e for e in entries if e.get("verdict") != NOT_A_DOG]
    not_dogs = [e for e in entries if e.get("verdict") == NOT_A_DOG]
    return {"dogs": dogs, "not_dogs": not_dogs} if not_dogs else {"dogs": dogs}


def detect_breeds(detector: Detector, predictor, image: Any, top_k: int = 5, margin: float | None = None,
                  score_threshold: float | None = None, name: str | None = None, drop_not_a_dog: bool = True) -> dict:
    """{"image": name, "dogs": [{"box", "score", "top", "low_confidence", "verdict", "ood_score",
    "breed_set"[, "note"]}, ...]} for one photo (a path, bytes, PIL image or HxWx3 uint8 array),
    dogs best first; {"image": name, "error": ...} when the photo cannot be read. margin None: the
    detector's own (`crop_margin` of its config, chosen on the validation photos).

    drop_not_a_dog (default): a box whose crop the calibrated breed run calls "not_a_dog" is
    moved from "dogs" to "not_dogs" (kept, never hidden): the detector learnt from dog photos
    only and fires on cats (docs/detection.md: measured)."""
    from ..infer.predictor import describe_image

    name = name or describe_image(image, 0)
    try:
        rgb = predictor.decode(image, name)
        detector.check_size(rgb, name)
    except DogbreedsError as exc:
        return {"image": name, "error": str(exc)}
    detections = detector.detect(rgb, score_threshold)
    crops = [detector.crop(rgb, d.box, margin) for d in detections]
    predictions = predictor.predict(crops, top_k=top_k, mirror=detector.crop_mirror) if crops else []
    entries = [dog_entry(d, p.to_dict()) for d, p in zip(detections, predictions)]
    return {"image": name, **split_dogs(entries, drop_not_a_dog)}
