"""Export a run's model to ONNX, with its classes and preprocessing inside the file.

The exported graph outputs *probabilities* (the softmax is part of the graph), so an ONNX
consumer needs no knowledge of logits. Its input is float32 NCHW, already resized, cropped
and normalised as `dogbreeds.preprocessing` says; the batch dimension is dynamic.

metadata_props (all values are strings; JSON where structured):
    dogbreeds.format         "dogbreeds-onnx"
    dogbreeds.version        "1"
    dogbreeds.model          model name, e.g. "convnext_atto"
    dogbreeds.output         "probabilities"
    dogbreeds.classes        ClassInfo.to_json(): [{"index", "breed_id", "name"}, ...]
    dogbreeds.breed_ids      ["n02085620-Chihuahua", ...] in label order
    dogbreeds.preprocessing  Preprocessing.to_dict()

Right after writing, the file is checked against PyTorch on real photos, each side with its
own preprocessing (torch eval transform vs the numpy one the ONNX predictor uses): any
probability differing by more than `tolerance` is an error and no file is left behind.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DogbreedsError
from .predictor import collect_images

FORMAT_NAME = "dogbreeds-onnx"
FORMAT_VERSION = 1
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
DEFAULT_TOLERANCE = 1e-4
DEFAULT_CHECK_COUNT = 4


class ExportCheckError(DogbreedsError):
    """The exported graph does not reproduce the PyTorch model's probabilities."""


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


def export_onnx(run: str | Path, out: str | Path, opset: int = 17, check_images: list[str] | None = None,
                tolerance: float = DEFAULT_TOLERANCE, exporter: str = "legacy") -> ExportReport:
    """Export `run` (run dir or checkpoint) to `out`, check it, and return what was measured."""
    import torch

    from .predictor import Predictor, TorchBackend

    out = Path(out)
    torch_predictor = Predictor(TorchBackend.from_run(run))
    photos = _check_photos(Path(run), check_images)
    backend = torch_predictor.backend
    size = backend.preprocessing.input_size

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        _torch_export(_with_softmax(backend.model), torch.zeros(2, 3, size, size), partial, opset, exporter)
        _write_metadata(partial, backend)
        max_diff = _compare(torch_predictor, partial, photos)
        if not max_diff <= tolerance:  # also catches NaN
            raise ExportCheckError(
                f"the ONNX export of {run} differs from PyTorch by up to {max_diff:.3g} in probability "
                f"(limit {tolerance:g}) on {len(photos)} photos; try another --opset or exporter, and "
                "report the model name if it persists"
            )
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return ExportReport(out, opset, [str(p) for p in photos], max_diff, tolerance)


def _with_softmax(model):
    import torch

    class ProbabilityModel(torch.nn.Module):
        """The model followed by softmax, so the exported output is probabilities."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return torch.softmax(self.model(x).float(), dim=1)

    return ProbabilityModel(model).eval()


def _torch_export(module, example, path: Path, opset: int, exporter: str) -> None:
    import torch

    if exporter == "legacy":
        # The TorchScript exporter writes one self-contained file at exactly the requested
        # opset. With torch 2.9+ the dynamo exporter (the default) exports at opset 18 and
        # down-converts, which fails for MobileNetV2 at opset 17 in our tests, and it takes
        # several times longer; so legacy stays our default while it gives correct files.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module, (example,), str(path), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    elif exporter == "dynamo":
        torch.onnx.export(
            module, (example,), str(path), dynamo=True, opset_version=opset, external_data=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
        )
    else:
        raise ValueError(f"unknown exporter {exporter!r}; choose 'legacy' or 'dynamo'")


def _write_metadata(path: Path, backend) -> None:
    import onnx

    model = onnx.load(str(path))
    props = {
        "dogbreeds.format": FORMAT_NAME,
        "dogbreeds.version": str(FORMAT_VERSION),
        "dogbreeds.model": backend.name,
        "dogbreeds.output": OUTPUT_NAME,
        "dogbreeds.classes": json.dumps(backend.classes.to_json()),
        "dogbreeds.breed_ids": json.dumps(list(backend.classes.breed_ids)),
        "dogbreeds.preprocessing": json.dumps(backend.preprocessing.to_dict()),
    }
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _check_photos(run: Path, given: list[str] | None) -> list[Path]:
    """Real photos to compare on: the ones given, else the first test photos of the run."""
    if given:
        photos = collect_images(given)
        if not photos:
            raise ExportCheckError(f"no images found in --check-images {given}; pass photo files or folders")
        return photos[:16]
    # A checkpoint file sits in <run>/checkpoints/: its run's split.json is two levels up.
    run_dir = run if run.is_dir() else run.parent.parent
    split_file = run_dir / "split.json"
    if split_file.is_file():
        split = json.loads(split_file.read_text())
        root = Path(split.get("root", run_dir))
        for part in ("test", "val", "train"):
            found = [root / f for f in split.get("files", {}).get(part, [])]
            found = [p for p in found if p.is_file()][:DEFAULT_CHECK_COUNT]
            if found:
                return found
    raise ExportCheckError(
        f"no photos to check the export of {run} against PyTorch: {split_file} lists none that exist; "
        "pass a few real photos with --check-images PHOTO_OR_FOLDER"
    )


def _compare(torch_predictor, onnx_path: Path, photos: list[Path]) -> float:
    """Largest |p_onnx - p_torch| over the photos, run as one batch and the first one alone
    (so the dynamic batch dimension is exercised with a size the export never saw)."""
    from .onnx_predictor import OnnxBackend
    from .predictor import Predictor

    onnx_predictor = Predictor(OnnxBackend(onnx_path))
    arrays = [torch_predictor.decode(p, str(p)) for p in photos]
    reference = torch_predictor.forward(np.stack([torch_predictor.preprocess(a) for a in arrays]))
    onnx_inputs = np.stack([onnx_predictor.preprocess(a) for a in arrays])
    batched = onnx_predictor.forward(onnx_inputs)
    single = onnx_predictor.forward(onnx_inputs[:1])
    if batched.shape != reference.shape:
        raise ExportCheckError(f"{onnx_path}: ONNX output shape {batched.shape} != PyTorch {reference.shape}; "
                               "try another --opset or --exporter, and report the model name if it persists")
    return float(max(np.abs(batched - reference).max(), np.abs(single - reference[:1]).max()))
