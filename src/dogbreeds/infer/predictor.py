"""Predict breeds for photos: `Predictor.from_run(path).predict(images, top_k=5)`.

One `Predictor` drives any backend (infer/backend.py: one protocol, one implementation per
runtime) and does everything else: decoding, batching, the softmax over the backend's logits,
top-k, the low-confidence flag. It never knows which runtime ran.

- `Predictor.from_run(run, engine="auto")`: a run directory or checkpoint on the engine named
  (default: onnxruntime on an ONNX export cached in RUN/export/, the fastest path measured here,
  docs/performance.md; the first start exports, later starts open the cached file without
  importing torch); engine="torch" is PyTorch eager, the reference path;
- `Predictor.from_onnx(file)`: an exported `.onnx` file on onnxruntime alone.

This module imports neither torch nor onnxruntime at import time: the ONNX path must never
load torch, and the CLI imports this module at startup.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..data.records import ClassInfo
from ..errors import DogbreedsError, ImageDecodeError
from ..preprocessing import Preprocessing
from .backend import DEFAULT_ENGINE, Backend, open_path, open_run, softmax

# Softmax always spreads 100% over the known breeds, so a cat or a sofa still gets a "top"
# breed. When the best breed gets under 30%, the model is split between at least three
# breeds (or more than six near-equal ones among 20): too unsure to state a breed. 0.3 is
# 6x the chance level of a 20-breed model; it is a heuristic flag, not an out-of-distribution
# detector (see docs/serving.md), and every caller can change it.
DEFAULT_LOW_CONFIDENCE_THRESHOLD = 0.3
LOW_CONFIDENCE_MESSAGE = "not sure — maybe not a dog"
# Same limit as decode_image's default: refuse decompression bombs before decoding pixels.
DEFAULT_MAX_PIXELS = 50_000_000


@dataclass(frozen=True)
class BreedScore:
    index: int      # label index in the model's classes
    breed_id: str   # e.g. "n02085936-Maltese_dog"
    breed: str      # display name, e.g. "Maltese dog"
    prob: float     # softmax probability, 0..1

    def to_dict(self) -> dict:
        return {"breed_id": self.breed_id, "breed": self.breed, "prob": self.prob}


@dataclass
class Prediction:
    """The answer for one image: its top breeds, or the reason it could not be read.

    Issue 11 (docs/trust.md): `verdict` is "breed", "unknown_breed" or "not_a_dog";
    `ood_score` (0..1, higher = further from the run's training photos); `breed_set`, the
    conformal set of look-alike breeds; the probabilities in `top` and `breed_set` are the
    calibrated ones when the run is calibrated. `low_confidence` is kept for compatibility and
    is derived: top-1 probability below the predictor's threshold. `note` says what is missing
    (a run without calibration)."""

    image: str
    top: list[BreedScore] = field(default_factory=list)
    low_confidence: bool = False
    error: str | None = None
    verdict: str | None = None
    ood_score: float | None = None
    breed_set: list[BreedScore] = field(default_factory=list)
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        out = {"image": self.image, "top": [s.to_dict() for s in self.top], "low_confidence": self.low_confidence,
               "verdict": self.verdict, "ood_score": self.ood_score, "breed_set": [s.to_dict() for s in self.breed_set]}
        if self.note:
            out["note"] = self.note
        return out


class Predictor:
    """Batched breed prediction for paths, bytes, PIL images or HxWx3 uint8 arrays.

    A bad image never stops the others: its `Prediction` carries `error` instead of `top`.
    The model's own `Preprocessing` (from the checkpoint or ONNX metadata) prepares pixels.
    """

    def __init__(self, backend: Backend, threshold: float = DEFAULT_LOW_CONFIDENCE_THRESHOLD,
                 max_pixels: int = DEFAULT_MAX_PIXELS, calibration: Any = "auto",
                 ood_threshold: float | None = None, coverage: float | None = None):
        """calibration: "auto" (the run's calibration.json, or the ONNX file's metadata; none
        found = uncalibrated, with a note), a `trust.Calibration`, or None (uncalibrated).
        ood_threshold / coverage: override the run's (each strictly within (0, 1))."""
        from ..trust.scores import check_fraction

        if not 0 <= threshold <= 1:
            raise ValueError(f"low-confidence threshold must be within [0, 1], got {threshold!r}")
        self.backend = backend
        self.threshold = threshold
        self.max_pixels = max_pixels
        self.ood_threshold = None if ood_threshold is None else check_fraction("ood threshold", ood_threshold)
        self.coverage = None if coverage is None else check_fraction("coverage", coverage)
        self.calibration = find_calibration(backend) if isinstance(calibration, str) and calibration == "auto" \
            else calibration

    @classmethod
    def from_run(cls, path: str | Path, engine: str = DEFAULT_ENGINE, **kwargs) -> "Predictor":
        """A run directory (best, else last checkpoint) or a `.safetensors` checkpoint file.

        engine="auto" (default): the onnxruntime fast path, its export cached in RUN/export/;
        a model that cannot be exported is an error (nothing falls back on its own).
        engine="torch": PyTorch eager; any engine name of `backend.engine_names()` works."""
        return cls(open_run(path, engine=engine), **kwargs)

    @classmethod
    def from_onnx(cls, path: str | Path, **kwargs) -> "Predictor":
        """An exported `.onnx` file, on onnxruntime alone (never torch)."""
        from .runtime_onnxruntime import OrtBackend

        return cls(OrtBackend(path), **kwargs)

    @classmethod
    def from_path(cls, path: str | Path, engine: str = DEFAULT_ENGINE, spinning: bool = True,
                  **kwargs) -> "Predictor":
        """`.onnx` files run on onnxruntime (no torch); anything else is a run or checkpoint,
        run on `engine` (see `from_run`). spinning=False (the service): when "auto" chose
        onnxruntime-spin, run the same export in the default, sleeping session (auto.without_spinning)."""
        backend = open_path(path, engine=engine)
        if not spinning:
            from .auto import without_spinning

            backend = without_spinning(backend)
        return cls(backend, **kwargs)

    @property
    def classes(self) -> ClassInfo:
        return self.backend.classes

    @property
    def preprocessing(self) -> Preprocessing:
        return self.backend.preprocessing

    # --- the steps, public so the service can run them in its own threads and batches ---

    def decode(self, image: Any, name: str | None = None) -> np.ndarray:
        """Any supported input -> HxWx3 uint8 RGB, or an ImageDecodeError naming the image."""
        from ..data.decode import decode_image

        name = name or describe_image(image, 0)
        if isinstance(image, (str, Path)):
            return decode_image(image, max_pixels=self.max_pixels)
        if isinstance(image, (bytes, bytearray, memoryview)):
            try:
                return decode_image(image, max_pixels=self.max_pixels)
            except ImageDecodeError as exc:  # name the upload / position rather than "<bytes>"
                raise type(exc)(name, exc.reason) from None
        if isinstance(image, np.ndarray):
            if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
                return image
            raise ImageDecodeError(name, f"arrays must be HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
        if _is_pil_image(image):
            if image.width * image.height > self.max_pixels:
                raise ImageDecodeError(name, f"{image.width}x{image.height} exceeds the limit of {self.max_pixels:,} pixels")
            return np.asarray(image.convert("RGB"))
        raise ImageDecodeError(name, f"unsupported input type {type(image).__name__}; pass a path, bytes, a PIL image or an HxWx3 uint8 array")

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        return self.backend.preprocess(image)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """float32 NCHW -> N x classes probabilities: the softmax of the backend's logits."""
        return softmax(self.backend.forward(batch))

    def scores(self, probs: np.ndarray, top_k: int) -> list[BreedScore]:
        """Top-k breeds of one probability row, best first."""
        top_k = max(1, min(int(top_k), len(probs)))
        order = np.argsort(-probs, kind="stable")[:top_k]
        breed_ids, names = self.classes.breed_ids, self.classes.names
        return [BreedScore(int(i), breed_ids[i], names[i], float(probs[i])) for i in order]

    def make_prediction(self, name: str, probs: np.ndarray, top_k: int, assessment=None) -> Prediction:
        """A row of probabilities (and its trust `assessment`, from `assess`) -> a Prediction."""
        if assessment is None:  # a caller that only has probabilities
            from ..trust import assess_uncalibrated

            assessment = assess_uncalibrated(np.log(np.clip(probs, 1e-30, None))[None, :], self.threshold)[0]
        probs = assessment.probs
        top = self.scores(probs, top_k)
        breed_ids, names = self.classes.breed_ids, self.classes.names
        breed_set = [BreedScore(int(i), breed_ids[i], names[i], float(probs[i])) for i in assessment.breed_set]
        return Prediction(image=name, top=top, low_confidence=top[0].prob < self.threshold,
                          verdict=assessment.verdict, ood_score=assessment.ood_score, breed_set=breed_set,
                          note=assessment.note)

    def assess(self, batch: np.ndarray, mirror: bool = False) -> list:
        """float32 NCHW -> one `trust.Assessment` per row (calibrated probabilities, verdict,
        OOD score, breed set); uncalibrated runs get what their logits alone can say.

        mirror: each row is also run mirrored left to right and the two answers are averaged before
        the assessment: the pooled features (and so the logits, a linear head of them) of the photo
        and of its mirror image. Twice the computation; the calibration and OOD thresholds were fit
        on single views (docs/detection.md measures what it changes)."""
        from ..trust import assess_uncalibrated

        rows = len(batch)
        if mirror:
            batch = np.concatenate([batch, np.ascontiguousarray(batch[..., ::-1])])
        if self.calibration is None:
            logits = self.backend.forward(batch)
            if mirror:
                logits = (logits[:rows] + logits[rows:]) / 2
            return assess_uncalibrated(logits, self.threshold)
        logits, features = self.backend.embed(batch)
        if mirror:
            logits, features = (logits[:rows] + logits[rows:]) / 2, (features[:rows] + features[rows:]) / 2
        return self.calibration.assess(logits, features, self.ood_threshold, self.coverage)

    # --- the one-call API ---

    def predict(self, images: Iterable[Any] | Any, top_k: int = 5, batch_size: int = 16,
                mirror: bool = False) -> list[Prediction]:
        """One `Prediction` per image, in order. Images are decoded one batch at a time so a
        long list of paths never holds more than `batch_size` decoded photos in memory.
        mirror: average each photo's answer with its mirror image's (`assess`; twice the work)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if isinstance(images, (str, Path, bytes, np.ndarray)) or _is_pil_image(images):
            images = [images]
        images = list(images)
        results: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            results.extend(self._predict_chunk(images[start:start + batch_size], start, top_k, mirror))
        return results

    def detect(self, images: Iterable[Any] | Any, detector: Any, top_k: int = 5,
               score_threshold: float | None = None) -> list[dict]:
        """Every dog in each photo, a breed per dog (issue 14, detect/infer.py): one
        {"image": ..., "dogs": [{"box", "score", "top", "verdict", ...}, ...]} per image, in
        order ({"image", "error"} for one that cannot be read). detector: a `detect.infer.Detector`
        or a detector run / exported .onnx file (opened on the default engine)."""
        from ..detect.infer import Detector, detect_breeds

        if not isinstance(detector, Detector):
            detector = Detector.from_path(detector)
        if isinstance(images, (str, Path, bytes, np.ndarray)) or _is_pil_image(images):
            images = [images]
        return [detect_breeds(detector, self, image, top_k=top_k, score_threshold=score_threshold,
                              name=describe_image(image, i)) for i, image in enumerate(images)]

    def _predict_chunk(self, images: Sequence[Any], offset: int, top_k: int, mirror: bool = False) -> list[Prediction]:
        results: list[Prediction | None] = []
        inputs, slots = [], []
        for i, image in enumerate(images):
            name = describe_image(image, offset + i)
            try:
                inputs.append(self.preprocess(self.decode(image, name)))
                slots.append((len(results), name))
                results.append(None)
            except DogbreedsError as exc:
                results.append(Prediction(image=name, error=str(exc)))
        if inputs:
            answers = self.assess(np.stack(inputs), mirror)
            for (slot, name), answer in zip(slots, answers):
                results[slot] = self.make_prediction(name, answer.probs, top_k, answer)
        return results  # type: ignore[return-value]


def find_calibration(backend: Backend):
    """The calibration that travels with `backend`: an ONNX file's metadata ("trust" in
    dogbreeds.extra), else the run's calibration.json beside its checkpoint; None when neither."""
    from ..rundir import RunDir
    from ..trust import Calibration

    stored = (backend.metadata or {}).get("extra", {}).get("trust")
    if stored:
        return Calibration.from_metadata(stored, origin=f"{backend.path} metadata")
    if backend.checkpoint is not None and Path(backend.checkpoint).exists():
        return Calibration.load(RunDir.locate(backend.checkpoint))
    return None


def describe_image(image: Any, index: int) -> str:
    """How an input is named in results and errors: its path, or its kind and position."""
    if isinstance(image, (str, Path)):
        return str(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<bytes #{index}>"
    if isinstance(image, np.ndarray):
        return f"<array #{index}>"
    if _is_pil_image(image):
        return f"<PIL image #{index}>"
    return f"<{type(image).__name__} #{index}>"


def _is_pil_image(obj: Any) -> bool:
    # Checked by duck type and module so Pillow is only imported by those who pass images.
    return type(obj).__module__.startswith("PIL.") and hasattr(obj, "convert") and hasattr(obj, "size")


def collect_images(specs: Iterable[str | Path], left_out: list | None = None) -> list[Path]:
    """Files as given, folders searched recursively for image extensions, globs expanded.

    A file given by name is kept whatever its extension, and so is a name that does not exist
    or a pattern that matches nothing: each then gets its own error in the results instead of
    stopping the other images. What a folder or glob holds that is not used (not an image
    extension, a dangling symlink, a name with a newline...) goes to `left_out` as
    `data.listing.LeftOut`s when it is given (the one extension list: `data.listing`).
    """
    import glob

    from ..data.listing import LeftOut, classify, list_images

    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            listing = list_images(path, recursive=True)
            found.extend(listing.files)
            if left_out is not None:
                left_out.extend(listing.left_out)
        elif not path.exists() and glob.has_magic(str(spec)) and glob.glob(str(spec), recursive=True):
            for match in map(Path, sorted(glob.glob(str(spec), recursive=True))):
                verdict = classify(match)
                if verdict is None and match.is_dir():
                    found.extend(collect_images([match], left_out))
                elif verdict is None:
                    found.append(match)
                elif left_out is not None:
                    left_out.append(LeftOut(str(match), verdict[1], verdict[0]))
        else:
            found.append(path)
    return found


def collect_images_or_fail(specs: Iterable[str | Path], what: str) -> list[Path]:
    """collect_images for a command: the files left out are listed on stderr with why, and
    finding no image at all is an error naming `what` (e.g. "--not-dogs ['cats/']")."""
    import sys

    from ..data.listing import describe_extensions, left_out_report

    left_out: list = []
    images = collect_images(specs, left_out)
    if left_out:
        print(left_out_report(left_out), file=sys.stderr)
    if not images:
        raise DogbreedsError(f"no images found in {what} (extensions looked for in folders: "
                             f"{describe_extensions()}{'; see the files left out above' if left_out else ''})")
    return images
