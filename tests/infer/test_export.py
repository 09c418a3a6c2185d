"""ONNX export: logits and features out, dynamic batch and size, metadata inside, checked against PyTorch."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from dogbreeds.errors import DogbreedsError, WeightsError
from dogbreeds.infer.export import ExportCheckError, export_onnx
from dogbreeds.infer.predictor import Predictor


def test_export_carries_metadata_and_a_dynamic_batch(convnext_onnx, convnext_run):
    model = onnx.load(str(convnext_onnx))
    props = {p.key: p.value for p in model.metadata_props}
    torch_predictor = Predictor.from_run(convnext_run, engine="torch")
    assert props["dogbreeds.format"] == "dogbreeds-onnx" and props["dogbreeds.version"] == "2"
    assert props["dogbreeds.output"] == "logits" and props["dogbreeds.features"] == "features"
    assert [o.name for o in model.graph.output] == ["logits", "features"]
    # the run's stored extra travels in the file: later features keep what they need there
    sidecar = json.loads((convnext_run / "checkpoints" / "best.json").read_text())
    assert json.loads(props["dogbreeds.extra"]) == sidecar["extra"]
    assert props["dogbreeds.model"] == "convnext_atto"
    assert json.loads(props["dogbreeds.breed_ids"]) == list(torch_predictor.classes.breed_ids)
    assert [c["name"] for c in json.loads(props["dogbreeds.classes"])] == torch_predictor.classes.names
    assert json.loads(props["dogbreeds.preprocessing"]) == torch_predictor.preprocessing.to_dict()
    assert model.opset_import[0].version == 17
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [bool(dims[i].dim_param) and not dims[i].dim_value for i in (0, 2, 3)] == [True] * 3  # batch, H, W symbolic
    for output in model.graph.output:
        assert output.type.tensor_type.shape.dim[0].dim_param  # batch


@pytest.mark.parametrize("architecture", ["convnext", "mobilenet"])
def test_onnx_predictions_match_pytorch_on_real_photos(architecture, request, photos, tmp_path):
    run = request.getfixturevalue(f"{architecture}_run")
    if architecture == "convnext":
        out = request.getfixturevalue("convnext_onnx")  # exported (and checked) by the fixture
    else:
        out = tmp_path / "model.onnx"
        report = export_onnx(run, out, check_images=[str(p) for p in photos[:2]])
        assert report.max_abs_diff <= 1e-4 and out.is_file()
    # Independently of the built-in check: all six photos, batch of 5 + 1, both predictors.
    torch_results = Predictor.from_run(run, engine="torch").predict(photos, top_k=20)
    onnx_results = Predictor.from_onnx(out).predict(photos, top_k=20, batch_size=5)
    for t, o in zip(torch_results, onnx_results):
        t_probs = {s.breed_id: s.prob for s in t.top}
        o_probs = {s.breed_id: s.prob for s in o.top}
        assert t_probs.keys() == o_probs.keys()
        assert max(abs(t_probs[k] - o_probs[k]) for k in t_probs) <= 1e-4
        assert sum(o_probs.values()) == pytest.approx(1.0, abs=1e-5)  # all 20 breeds: a distribution


def test_a_failed_check_is_an_error_and_leaves_no_file(convnext_run, photos, tmp_path):
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportCheckError, match="differs from PyTorch"):
        export_onnx(convnext_run, out, check_images=[str(photos[0])], tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_no_photos_to_check_is_an_error_naming_the_option(convnext_run, tmp_path):
    with pytest.raises(ExportCheckError, match="--check-images"):
        export_onnx(convnext_run, tmp_path / "x.onnx")


def test_export_checks_on_the_runs_own_test_photos(photos, tmp_path):
    from dogbreeds.infer.export import _check_photos
    from dogbreeds.rundir import RunDir

    root = photos[0].parents[2]
    (tmp_path / "split.json").write_text(json.dumps({"root": str(root), "files": {
        "test": [str(p.relative_to(root)) for p in photos[:3]] + ["gone/missing.jpg"], "val": [], "train": []}}))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.safetensors").write_bytes(b"")
    assert _check_photos(RunDir.locate(tmp_path), None) == photos[:3]
    assert _check_photos(RunDir.locate(tmp_path / "checkpoints" / "best.safetensors"), None) == photos[:3]  # a run's checkpoint
    assert _check_photos(RunDir.locate(tmp_path), [str(photos[4].parent)])[0].parent == photos[4].parent


def test_an_onnx_file_without_our_metadata_is_refused(convnext_onnx, tmp_path):
    model = onnx.load(str(convnext_onnx))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(WeightsError, match="dogbreeds export"):
        Predictor.from_onnx(bare)
    with pytest.raises(WeightsError, match="no such ONNX file"):
        Predictor.from_onnx(tmp_path / "missing.onnx")


def test_onnx_backend_takes_any_batch_size(convnext_onnx):
    predictor = Predictor.from_onnx(convnext_onnx)
    for n in (1, 7):
        probs = predictor.forward(np.zeros((n, 3, 128, 128), np.float32))
        assert probs.shape == (n, 20)


def test_check_images_says_what_it_leaves_out(photos, tmp_path, capsys):
    from dogbreeds.infer.export import MAX_CHECK_PHOTOS, _check_photos
    from dogbreeds.rundir import RunDir

    folder = tmp_path / "check"
    folder.mkdir()
    for i in range(MAX_CHECK_PHOTOS + 2):
        (folder / f"p{i:02d}.jpg").write_bytes(photos[i % len(photos)].read_bytes())
    (folder / "notes.txt").write_text("not a photo")
    chosen = _check_photos(RunDir(tmp_path), [str(folder)])
    err = capsys.readouterr().err
    assert len(chosen) == MAX_CHECK_PHOTOS and chosen[0].name == "p00.jpg"
    assert "notes.txt" in err and f"first {MAX_CHECK_PHOTOS} of the {MAX_CHECK_PHOTOS + 2} photos" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a photo")
    with pytest.raises(DogbreedsError, match=r"no images found in --check-images .*empty"):
        _check_photos(RunDir(tmp_path), [str(empty)])
