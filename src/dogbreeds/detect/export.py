"""The detector to ONNX: `dogbreeds detect export DETECTOR_RUN --out det.onnx`.

The whole torchvision detection model goes into the graph (its transform: normalisation and
the resize to the run's inference size, `DetectorConfig.inference_size()`: chosen on val by
`detect evaluate --choose-size`, else the training min_size/max_size; backbone, FPN, RPN, RoIAlign,
box head, box decoding, NMS and the rescale of boxes to the input photo's pixels), so the torch-free path (detect/infer.py:
`Detector.from_onnx`) only hands it the photo as float32 (3, H, W) in [0, 1] with any H and W.

Written with the TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`), the one
torchvision's detection models support (their ONNX tests use it, opset >= 11; the dynamo
exporter does not export their data-dependent control flow). Written to a partial file, checked
and only then renamed into place, like the breed exports (infer/export.py):

- always: onnxruntime against PyTorch on a synthetic photo of a size other than the traced one;
- `export_detector` (the command) also on real photos (the run's test photos, or
  --check-images): boxes within `box_tolerance` pixels (default 1) and scores within
  `score_tolerance` (default 1e-3), else no file is left behind.

Detections are compared as sets, matched by box: two boxes with nearly equal scores may come
out in either order. A detection of either side that scores at least `floor` (half the
detector's score threshold) must have a partner among all of the other side's detections.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import DogbreedsError

if TYPE_CHECKING:  # imported by the CLI at every start (register_detect): numpy and the rest load late
    import numpy as np

    from .infer import Detector

OPSET = 17
DEFAULT_BOX_TOLERANCE = 1.0     # pixels of the photo
DEFAULT_SCORE_TOLERANCE = 1e-3
DEFAULT_CHECK_COUNT = 4
TRACE_SIZE = (3, 320, 416)      # the example the graph is traced with (any size works afterwards)
CHECK_SIZE = (3, 397, 500)      # the built-in check: another size and aspect, one whose resize is exact
#                                 only in exact arithmetic (stable_resize)


class DetectorExportError(DogbreedsError):
    """The exported detector does not reproduce the PyTorch model's detections."""


@dataclass(frozen=True)
class Agreement:
    """How far two runtimes' detections are apart on one photo (matched by box)."""

    max_box_diff: float     # pixels, largest coordinate difference of a matched pair
    max_score_diff: float
    compared: int           # detections scoring >= floor, both sides together
    unmatched: int          # of those, how many found no partner at all

    def within(self, box_tolerance: float, score_tolerance: float) -> bool:
        return self.unmatched == 0 and self.max_box_diff <= box_tolerance and self.max_score_diff <= score_tolerance


def compare_detections(reference: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray],
                       floor: float) -> Agreement:
    """Match every detection scoring >= floor on either side to its nearest box on the other
    side (largest coordinate difference), and report the worst pair."""
    import numpy as np

    box_diff = score_diff = 0.0
    compared = unmatched = 0
    for (a_boxes, a_scores), (b_boxes, b_scores) in ((reference, other), (other, reference)):
        a_boxes, b_boxes = np.asarray(a_boxes, np.float64).reshape(-1, 4), np.asarray(b_boxes, np.float64).reshape(-1, 4)
        a_scores, b_scores = np.asarray(a_scores, np.float64).reshape(-1), np.asarray(b_scores, np.float64).reshape(-1)
        for box, score in zip(a_boxes, a_scores):
            if score < floor:
                continue
            compared += 1
            if not len(b_boxes):
                unmatched += 1
                continue
            distance = np.abs(b_boxes - box).max(axis=1)
            # nearest box; among (near-)equal boxes, the nearest score
            best = int(np.argmin(distance + 1e-6 * np.abs(b_scores - score)))
            box_diff = max(box_diff, float(distance[best]))
            score_diff = max(score_diff, float(abs(b_scores[best] - score)))
    return Agreement(box_diff, score_diff, compared, unmatched)


def write_detector_onnx(model, path: str | Path, config=None, opset: int = OPSET,
                        check: Callable[[Path], None] | None = None) -> Path:
    """Export the torchvision detection `model` to `path` (atomically) with its config in the
    metadata; checked against PyTorch on a synthetic photo, then by `check(partial)` if given."""
    import torch

    from .infer import GRAPH_OUTPUTS, INPUT_NAME, config_to_dict, detector_metadata, stable_resize

    if opset < 11:
        raise DogbreedsError(f"detector export needs ONNX opset 11 or newer (torchvision's detection ops), got {opset}")
    config = config_to_dict(config if config is not None else getattr(model, "detector_config", None))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    model = stable_resize(model.eval())  # the same input size as PyTorch eager, whatever the photo's size
    example = torch.rand(*TRACE_SIZE, generator=torch.Generator().manual_seed(0))
    try:
        try:
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(), _gather_merge():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, ([example],), str(partial), dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=list(GRAPH_OUTPUTS),
                                  dynamic_axes={INPUT_NAME: {1: "height", 2: "width"},
                                                **{name: {0: "detections"} for name in GRAPH_OUTPUTS}})
        except Exception as exc:  # unsupported operators, tracing failures, a full disk ...
            raise DogbreedsError(f"cannot export the detector ({config.get('backbone', type(model).__name__)}) to "
                                 f"ONNX ({type(exc).__name__}: {exc}); use --engine torch") from exc
        from ..infer.export import write_metadata

        write_metadata(partial, detector_metadata(config))
        _check_synthetic(model, config, partial)
        if check is not None:
            check(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


class _gather_merge:
    """While tracing, merge MultiScaleRoIAlign's per-level results with one Gather instead of
    torchvision's one full-size ScatterElements per level (`_onnx_merge_levels`): the same
    numbers (rows are only put back in their order), measured about 30 ms less per photo on
    this 2-core CPU (onnxruntime's ScatterElements is element by element)."""

    def __enter__(self):
        from torchvision.ops import poolers

        self._poolers, self._original = poolers, poolers._onnx_merge_levels
        poolers._onnx_merge_levels = _merge_levels_by_gather
        return self

    def __exit__(self, *exc):
        self._poolers._onnx_merge_levels = self._original
        return False


def _merge_levels_by_gather(levels, unmerged_results):
    import torch

    order = torch.cat([torch.where(levels == level)[0] for level in range(len(unmerged_results))])
    inverse = torch.zeros_like(order).scatter(0, order, torch.arange(order.size(0), dtype=order.dtype))
    return torch.cat(unmerged_results, 0).index_select(0, inverse)


def _check_synthetic(model, config: dict, partial: Path) -> None:
    """The graph must also answer for a size it was not traced with, like PyTorch does."""
    import numpy as np

    from .infer import Detector

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(CHECK_SIZE[1], CHECK_SIZE[2], 3), dtype=np.uint8)
    reference = Detector.from_model(model, config)
    onnx_detector = Detector.from_onnx(partial)
    agreement = agreement_on(reference, onnx_detector, image)
    if not agreement.within(DEFAULT_BOX_TOLERANCE, DEFAULT_SCORE_TOLERANCE):
        raise DetectorExportError(
            f"the ONNX export of the detector differs from PyTorch on a {CHECK_SIZE[2]}x{CHECK_SIZE[1]} image "
            f"(boxes by {agreement.max_box_diff:.3g} px, scores by {agreement.max_score_diff:.3g}, "
            f"{agreement.unmatched} unmatched); try another --opset, or use --engine torch")


def agreement_on(reference: Detector, other: Detector, image: np.ndarray, floor: float | None = None) -> Agreement:
    floor = reference.score_threshold / 2 if floor is None else floor
    ref_boxes, ref_scores, _ = reference.raw(image)
    got_boxes, got_scores, _ = other.raw(image)
    return compare_detections((ref_boxes, ref_scores), (got_boxes, got_scores), floor)


# --- `dogbreeds detect export` -------------------------------------------------------------------

@dataclass(frozen=True)
class DetectorExportReport:
    path: Path
    opset: int
    check_images: list[str]
    max_box_diff: float
    max_score_diff: float
    compared: int
    box_tolerance: float
    score_tolerance: float

    def summary(self) -> str:
        return (f"wrote {self.path} (opset {self.opset}, dynamic image size); checked on {len(self.check_images)} "
                f"photos ({self.compared} detections compared): max box difference vs PyTorch "
                f"{self.max_box_diff:.3g} px (limit {self.box_tolerance:g}), max score difference "
                f"{self.max_score_diff:.2e} (limit {self.score_tolerance:g})")


def export_detector(run: str | Path, out: str | Path, opset: int = OPSET, check_images: list[str] | None = None,
                    box_tolerance: float = DEFAULT_BOX_TOLERANCE,
                    score_tolerance: float = DEFAULT_SCORE_TOLERANCE) -> DetectorExportReport:
    """Export a detector run to `out`, checked against PyTorch on real photos."""
    from ..data.decode import decode_image
    from ..infer.export import _check_photos
    from ..rundir import RunDir
    from .infer import Detector

    reference = Detector.from_run_torch(run)
    photos = _check_photos(RunDir.locate(run), check_images)
    images = [decode_image(p) for p in photos]
    measured: list[Agreement] = []

    def on_real_photos(partial: Path) -> None:
        onnx_detector = Detector.from_onnx(partial)
        results = [agreement_on(reference, onnx_detector, image) for image in images]
        worst = Agreement(max(r.max_box_diff for r in results), max(r.max_score_diff for r in results),
                          sum(r.compared for r in results), sum(r.unmatched for r in results))
        measured.append(worst)
        if not worst.within(box_tolerance, score_tolerance):
            raise DetectorExportError(
                f"the ONNX export of {run} differs from PyTorch on {len(photos)} photos: boxes by up to "
                f"{worst.max_box_diff:.3g} px (limit {box_tolerance:g}), scores by up to {worst.max_score_diff:.3g} "
                f"(limit {score_tolerance:g}), {worst.unmatched} detections without a partner; try another --opset")

    write_detector_onnx(reference.model, out, reference.config, opset=opset, check=on_real_photos)
    worst = measured[-1]
    return DetectorExportReport(Path(out), opset, [str(p) for p in photos], worst.max_box_diff, worst.max_score_diff,
                                worst.compared, box_tolerance, score_tolerance)


def register_detect(subparsers) -> None:
    """`dogbreeds detect export DETECTOR_RUN --out FILE.onnx` (detect/cli.py calls it at every CLI start:
    nothing heavy is imported here)."""
    p = subparsers.add_parser(
        "export", help="export a detector run to ONNX (dynamic image size), checked against PyTorch",
        description="Write the detector as one ONNX file that runs on onnxruntime alone (torch-free): input "
                    "'image' float32 (3, H, W) in [0, 1], any H and W; outputs boxes (in the photo's pixels), "
                    "scores, labels. Checked against PyTorch on real photos; no file is left when it differs.")
    p.add_argument("run", metavar="DETECTOR_RUN", help="detector run directory (dogbreeds detect train) or checkpoint")
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset, 11 or newer (default {OPSET})")
    p.add_argument("--check-images", nargs="+", metavar="PHOTO",
                   help="real photos (files or folders) to compare with PyTorch on; default: the run's test photos")
    p.add_argument("--box-tolerance", type=float, default=DEFAULT_BOX_TOLERANCE,
                   help=f"max allowed box coordinate difference in pixels (default {DEFAULT_BOX_TOLERANCE:g})")
    p.add_argument("--score-tolerance", type=float, default=DEFAULT_SCORE_TOLERANCE,
                   help=f"max allowed score difference (default {DEFAULT_SCORE_TOLERANCE:g})")
    p.set_defaults(func=_export_command)


def _export_command(args) -> int:
    report = export_detector(args.run, args.out, opset=args.opset, check_images=args.check_images,
                             box_tolerance=args.box_tolerance, score_tolerance=args.score_tolerance)
    print(report.summary())
    return 0
