"""The one ONNX exporter: `write_onnx` writes the contract of onnx_format.py (logits + features +
metadata) for every caller: `dogbreeds export` (`export_onnx`) and the onnxruntime runtime's
cache in RUN/export/ (so a cached export is a file `dogbreeds predict` takes as is).

Every file is written to a partial file of its own (one per process: two processes exporting the
same run must not write into one file), checked, and only then renamed into place, so a
reader never sees a half-written or unchecked file:

- always: onnxruntime against PyTorch on a random batch (logits and features);
- `dogbreeds export` also: probabilities on real photos, each side with its own backend
  (PyTorch on the model as loaded, onnxruntime on the file): any probability differing by
  more than `tolerance` is an error and no file is left behind.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DogbreedsError
from .backend import USE_TORCH, ModelInfo, info_for_model
from .onnx_format import FEATURES_NAME, INPUT_NAME, LOGITS_NAME, metadata_props
from .predictor import collect_images_or_fail

OPSET = 17
DEFAULT_TOLERANCE = 1e-4
DEFAULT_CHECK_COUNT = 4
MAX_CHECK_PHOTOS = 16  # --check-images: at most this many are compared (one batch each way)
EXPORTERS = ("legacy", "dynamo")


class ExportCheckError(DogbreedsError):
    """The exported graph does not reproduce the PyTorch model's numbers."""


@dataclass(frozen=True)
class ExportReport:
    path: Path
    opset: int
    check_images: list[str]
    max_abs_diff: float
    tolerance: float

    def summary(self) -> str:
        return (f"wrote {self.path} (opset {self.opset}); checked on {len(self.check_images)} photos: "
                f"max |probability difference| vs PyTorch = {self.max_abs_diff:.2e} (limit {self.tolerance:.0e})")


def write_onnx(model, path: str | Path, info: ModelInfo | None = None, opset: int = OPSET, exporter: str = "legacy",
               check: Callable[[Path], None] | None = None, input_size: int | None = None) -> Path:
    """Export torch `model` to `path` in the dogbreeds ONNX contract, atomically.

    info:       what goes into the metadata (default: `info_for_model(model)`)
    check:      called with the partial file after the built-in check; raise to refuse the file
    input_size: the random check batch's size (default: the preprocessing's input size)."""
    import torch

    from .runtime_torch import check_timm_interface, logits_and_features

    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    info = info or info_for_model(model)
    check_timm_interface(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    size = input_size or info.preprocessing.input_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    model = model.eval()

    class LogitsAndFeatures(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return logits_and_features(self.model, x)

    try:
        try:
            _torch_export(LogitsAndFeatures().eval(), example, partial, opset, exporter)
        except Exception as exc:  # unsupported operators, tracing failures, a full disk ...
            raise DogbreedsError(f"cannot export {info.name} to ONNX ({type(exc).__name__}: {exc}); "
                                 f"{USE_TORCH}") from exc
        write_metadata(partial, metadata_props(info.name, info.classes, info.preprocessing, info.extra))
        with torch.inference_mode():
            expected = [t.float().numpy() for t in logits_and_features(model, example)]
        _check_against_torch(partial, example.numpy(), expected, info.name)
        if check is not None:
            check(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _torch_export(module, example, path: Path, opset: int, exporter: str) -> None:
    import torch

    names = dict(input_names=[INPUT_NAME], output_names=[LOGITS_NAME, FEATURES_NAME])
    if exporter == "legacy":
        # The TorchScript exporter writes one self-contained file at exactly the requested
        # opset. With torch 2.9+ the dynamo exporter (the default) exports at opset 18 and
        # down-converts, which fails for MobileNetV2 at opset 17 in our tests, and it takes
        # several times longer; so legacy stays our default while it gives correct files.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset, **names,
                              dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                                            LOGITS_NAME: {0: "batch"}, FEATURES_NAME: {0: "batch"}})
    else:
        torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=opset, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False, **names)


def write_metadata(path: Path, props: dict[str, str]) -> None:
    """Replace an ONNX file's metadata_props (also used by the detector export)."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _check_against_torch(path: Path, example: np.ndarray, expected: list[np.ndarray], name: str) -> None:
    from .runtime_onnxruntime import OrtBackend

    got = OrtBackend(path, tuned=False).embed(example)
    for what, a, b in zip((LOGITS_NAME, FEATURES_NAME), got, expected):
        diff = float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")
        if not diff <= 1e-3 * (1 + float(np.abs(b).max())):
            raise ExportCheckError(f"the ONNX export of {name} differs from torch by {diff:.3g} in {what} "
                                   f"(shapes {a.shape} vs {b.shape}); {USE_TORCH}, and report the model name")


# --- `dogbreeds export` ------------------------------------------------------------------------------

def export_onnx(run: str | Path, out: str | Path, opset: int = OPSET, check_images: list[str] | None = None,
                tolerance: float = DEFAULT_TOLERANCE, exporter: str = "legacy") -> ExportReport:
    """Export `run` (run dir or checkpoint) to `out`, check it on real photos, and return what was measured."""
    from ..models.factory import load_run
    from ..rundir import RunDir
    from .backend import info_for_loaded
    from .predictor import Predictor
    from .runtime_torch import TorchBackend, inference_layout

    loaded = load_run(run)
    photos = _check_photos(RunDir.locate(run), check_images)
    fast = inference_layout(loaded.model)  # a rebuilt copy, or the model itself (then exported as loaded)
    reference = Predictor(TorchBackend.from_loaded(loaded, fast=False))  # the model as loaded: the reference
    measured: list[float] = []

    def on_real_photos(partial: Path) -> None:
        measured.append(_compare(reference, partial, photos))
        if not measured[-1] <= tolerance:  # also catches NaN
            raise ExportCheckError(
                f"the ONNX export of {run} differs from PyTorch by up to {measured[-1]:.3g} in probability "
                f"(limit {tolerance:g}) on {len(photos)} photos; try another --opset or exporter, and "
                "report the model name if it persists")

    info = info_for_loaded(loaded)
    from ..trust.calibration import Calibration  # issue 11: the run's calibration travels in the file

    calibration = Calibration.load(RunDir.locate(run))
    if calibration is not None:
        info.extra["trust"] = calibration.to_metadata()
    write_onnx(fast, out, info, opset=opset, exporter=exporter, check=on_real_photos)
    return ExportReport(Path(out), opset, [str(p) for p in photos], measured[-1], tolerance)


def _check_photos(run, given: list[str] | None) -> list[Path]:
    """Real photos to compare on: the ones given, else the first test photos of the run (a RunDir)."""
    if given:  # the files of given folders that are not photos are listed with why; none at all is an error
        photos = collect_images_or_fail(given, f"--check-images {given}")
        if len(photos) > MAX_CHECK_PHOTOS:
            print(f"export: checking on the first {MAX_CHECK_PHOTOS} of the {len(photos)} photos given to "
                  "--check-images", file=sys.stderr)
        return photos[:MAX_CHECK_PHOTOS]
    if run.split_file.is_file():
        split = run.read_split()
        root = Path(split.get("root", run.path))
        for part in ("test", "val", "train"):
            found = [root / f for f in split.get("files", {}).get(part, [])]
            found = [p for p in found if p.is_file()][:DEFAULT_CHECK_COUNT]
            if found:
                return found
    raise ExportCheckError(
        f"no photos to check the export of {run.path} against PyTorch: {run.split_file} lists none that exist; "
        "pass a few real photos with --check-images PHOTO_OR_FOLDER"
    )


def _compare(reference, onnx_path: Path, photos: list[Path]) -> float:
    """Largest |p_onnx - p_torch| over the photos, run as one batch and the first one alone
    (so the dynamic batch dimension is exercised with a size the export never saw)."""
    from .predictor import Predictor
    from .runtime_onnxruntime import OrtBackend

    onnx_predictor = Predictor(OrtBackend(onnx_path))
    arrays = [reference.decode(p, str(p)) for p in photos]
    inputs = np.stack([reference.preprocess(a) for a in arrays])
    expected = reference.forward(inputs)
    batched, single = onnx_predictor.forward(inputs), onnx_predictor.forward(inputs[:1])
    if batched.shape != expected.shape:
        raise ExportCheckError(f"{onnx_path}: ONNX output shape {batched.shape} != PyTorch {expected.shape}; "
                               "try another --opset or --exporter, and report the model name if it persists")
    return float(max(np.abs(batched - expected).max(), np.abs(single - expected[:1]).max()))
