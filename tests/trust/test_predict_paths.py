"""A calibrated run predicts the same verdicts on PyTorch, on the cached onnxruntime export and
from an exported .onnx file (torch-free: the calibration travels in its metadata); a run
without calibration still predicts, with a note."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dogbreeds.errors import DogbreedsError

SIZE = 64


@pytest.fixture(scope="module")
def photos(mini_root) -> list[Path]:
    images = sorted(p for d in sorted((mini_root / "Images").iterdir())[:6] for p in sorted(d.glob("*.jpg"))[:4])
    return images


@pytest.fixture(scope="module")
def cats(mini_root) -> list[Path]:
    folder = mini_root.parent / "cats-and-dogs" / "cats"
    return sorted(folder.glob("*.jpg"))[:8]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mini_root) -> Path:
    import torch

    from dogbreeds.data.records import ClassInfo
    from dogbreeds.models.checkpoint_format import save_model_checkpoint
    from dogbreeds.models.factory import create_model

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("trust_run")
    breeds = sorted(p.name for p in (mini_root / "Images").iterdir())[:5]
    model = create_model("mobilenetv2_050", num_classes=5)
    model.preprocessing = model.preprocessing.with_input_size(SIZE)
    save_model_checkpoint(model, root / "checkpoints" / "best.safetensors", ClassInfo(tuple(breeds)))
    return root


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory, tiny_run, photos, cats) -> Path:
    import shutil

    from dogbreeds.infer.predictor import Predictor
    from dogbreeds.rundir import RunDir
    from dogbreeds.trust import fit_calibration

    run = tmp_path_factory.mktemp("calibrated") / "run"
    shutil.copytree(tiny_run, run)
    predictor = Predictor.from_run(run, engine="torch", calibration=None)

    def embed(paths):
        return predictor.backend.embed(np.stack([predictor.preprocess(predictor.decode(p)) for p in paths]))

    train_logits, train_x = embed(photos[:16])
    val_logits, val_x = embed(photos[16:])
    _, other_x = embed(photos[:4])
    _, cat_x = embed(cats[:4])
    labels = np.arange(len(val_x)) % 5
    # the outlier-exposure head with the max-softmax part, the top-label isotonic step and LAC sets given (too
    # few photos here to choose them): every part of ood_score, of the calibrated probabilities and of the sets travels
    calibration = fit_calibration(train_x, val_x, val_logits, labels, other_x, cat_x, ood_head=(0.5, 1e-4, 0.3),
                                  top_label="isotonic", set_method="lac")
    assert calibration.ood_head_w is not None and calibration.top_label_x is not None
    assert calibration.ood_msp_weight == 0.3
    assert calibration.set_method == "lac"
    from dogbreeds.trust.scores import softmax

    assert np.abs(calibration.calibrated_probs(val_logits) - softmax(val_logits, calibration.temperature)).max() > 1e-3
    calibration.save(RunDir(run))
    return run


def _answers(predictor, images):
    return predictor.predict(images, top_k=5, batch_size=4)


def test_torch_onnxruntime_and_exported_file_agree(calibrated_run, photos, cats, tmp_path):
    from dogbreeds.infer.export import export_onnx
    from dogbreeds.infer.predictor import Predictor

    images = photos[16:] + cats[4:]
    reference = _answers(Predictor.from_run(calibrated_run, engine="torch"), images)
    cached = _answers(Predictor.from_run(calibrated_run), images)  # onnxruntime, export cached in RUN/export
    onnx_file = tmp_path / "model.onnx"
    export_onnx(calibrated_run, onnx_file, check_images=[str(p) for p in photos[:2]])
    # the file alone, in a folder with no run: the calibration comes from its metadata
    alone = tmp_path / "elsewhere" / "model.onnx"
    alone.parent.mkdir()
    onnx_file.rename(alone)
    exported = Predictor.from_onnx(alone)
    assert exported.calibration is not None and exported.calibration.ood_head_w is not None
    assert exported.calibration.ood_msp_weight == 0.3
    np.testing.assert_array_equal(exported.calibration.top_label_y, Predictor.from_run(calibrated_run).calibration.top_label_y)
    assert exported.calibration.set_method == "lac"
    from_file = _answers(exported, images)
    assert {p.verdict for p in reference} <= {"breed", "unknown_breed", "not_a_dog"}
    for a, b, c in zip(reference, cached, from_file):
        assert a.verdict == b.verdict == c.verdict
        assert abs(a.ood_score - b.ood_score) < 1e-4 and abs(a.ood_score - c.ood_score) < 1e-4
        assert [s.index for s in a.breed_set] == [s.index for s in b.breed_set] == [s.index for s in c.breed_set]
        for x, y, z in zip(a.top, b.top, c.top):
            assert x.index == y.index == z.index and abs(x.prob - y.prob) < 1e-4 and abs(x.prob - z.prob) < 1e-4
        assert a.note is None


def test_overrides_change_the_answer_and_bad_values_name_themselves(calibrated_run, photos):
    from dogbreeds.infer.predictor import Predictor

    strict = _answers(Predictor.from_run(calibrated_run, engine="torch", ood_threshold=1e-6), photos[16:])
    assert all(p.verdict != "breed" for p in strict)
    wide = _answers(Predictor.from_run(calibrated_run, engine="torch", coverage=0.999), photos[16:])
    narrow = _answers(Predictor.from_run(calibrated_run, engine="torch", coverage=0.05), photos[16:])
    assert sum(len(p.breed_set) for p in wide) >= sum(len(p.breed_set) for p in narrow)
    for kwargs, text in (({"ood_threshold": 1.5}, "1.5"), ({"coverage": 0}, "0")):
        with pytest.raises(DogbreedsError, match=text):
            Predictor.from_run(calibrated_run, engine="torch", **kwargs)


def test_uncalibrated_run_predicts_with_a_note(tiny_run, photos):
    from dogbreeds.infer.predictor import Predictor

    answers = _answers(Predictor.from_run(tiny_run, engine="torch"), photos[:3])
    for p in answers:
        assert p.ok and p.verdict in ("breed", "unknown_breed") and "dogbreeds calibrate" in p.note
        assert p.to_dict()["note"] == p.note and p.breed_set[0].index == p.top[0].index


def test_predict_cli_json_carries_the_verdict_and_honours_the_flags(calibrated_run, photos, capsys):
    import json

    from dogbreeds.cli import main

    assert main(["predict", str(calibrated_run), str(photos[16]), str(photos[17]), "--json", "--engine", "torch",
                 "--ood-threshold", "0.000001", "--coverage", "0.5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert line["verdict"] in ("unknown_breed", "not_a_dog") and 0 <= line["ood_score"] <= 1
        assert line["breed_set"] and "note" not in line


def test_serve_flags_reach_the_predictor(calibrated_run, monkeypatch):
    import uvicorn

    from dogbreeds.cli import main

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level, **_: apps.append(app))
    assert main(["serve", str(calibrated_run), "--engine", "torch", "--ood-threshold", "0.125",
                 "--coverage", "0.75"]) == 0
    assert main(["serve", str(calibrated_run), "--engine", "torch"]) == 0
    flagged, default = (app.state.predictor for app in apps)
    assert (flagged.ood_threshold, flagged.coverage) == (0.125, 0.75)
    assert (default.ood_threshold, default.coverage) == (None, None)  # the run's own


def test_service_answers_carry_the_verdict_in_words(calibrated_run, photos, cats):
    from fastapi.testclient import TestClient

    from dogbreeds.infer.predictor import Predictor
    from dogbreeds.serve.app import create_app

    predictor = Predictor.from_run(calibrated_run, engine="torch")
    expected = predictor.predict([photos[16], cats[5]])
    with TestClient(create_app(predictor)) as client:
        for photo, want in zip([photos[16], cats[5]], expected):
            body = client.post("/v1/predict", content=photo.read_bytes()).json()
            # batch of 1 vs 2: float noise, scaled up by the z-scores of the mixed score (the paths' contract: 1e-4)
            assert body["verdict"] == want.verdict and abs(body["ood_score"] - want.ood_score) < 1e-5
            assert [s["breed_id"] for s in body["breed_set"]] == [s.breed_id for s in want.breed_set]
            words = {"not_a_dog": "This does not look like a dog",
                     "unknown_breed": "A dog, but not one of the 5 breeds this model knows — closest: "}
            assert body["verdict_text"].startswith(words.get(body["verdict"], body["top"][0]["breed"]))
        page = client.get("/static/app.js").text
        assert "verdict_text" in page and "breed-set" in client.get("/").text


@pytest.mark.parametrize("calibrated", [True, False])
def test_mirror_averages_each_photo_with_its_mirror_image(calibrated_run, tiny_run, photos, calibrated):
    from dogbreeds.infer.predictor import Predictor

    predictor = Predictor.from_run(calibrated_run if calibrated else tiny_run, engine="torch")
    assert (predictor.calibration is not None) is calibrated
    x = np.stack([predictor.preprocess(predictor.decode(p)) for p in photos[:3]])
    both = np.concatenate([x, np.ascontiguousarray(x[..., ::-1])])
    logits, features = predictor.backend.embed(both)
    mean_logits, mean_features = (logits[:3] + logits[3:]) / 2, (features[:3] + features[3:]) / 2
    if calibrated:
        expected = predictor.calibration.assess(mean_logits, mean_features, predictor.ood_threshold, predictor.coverage)
    else:
        from dogbreeds.trust import assess_uncalibrated

        expected = assess_uncalibrated(mean_logits, predictor.threshold)
    mirrored = predictor.predict(photos[:3], top_k=5, mirror=True)
    plain = predictor.predict(photos[:3], top_k=5)
    for want, got, one in zip(expected, mirrored, plain):
        assert got.verdict == want.verdict and got.ood_score == pytest.approx(want.ood_score, abs=1e-5)
        assert [s.index for s in got.top] == list(np.argsort(-want.probs, kind="stable")[:5])
        assert [s.prob for s in got.top] == pytest.approx([float(want.probs[s.index]) for s in got.top], abs=1e-5)
    # the mirror image changes the answer: the averaging is not a no-op
    assert max(abs(a.top[0].prob - b.top[0].prob) for a, b in zip(mirrored, plain)) > 1e-4


def test_predict_cli_tta_flip_gives_the_mirrored_answer_and_is_refused_with_detect(calibrated_run, photos, capsys):
    import json

    from dogbreeds.cli import main
    from dogbreeds.infer.predictor import Predictor

    assert main(["predict", str(calibrated_run), str(photos[16]), "--json", "--engine", "torch", "--tta", "flip"]) == 0
    line = json.loads(capsys.readouterr().out)
    want = Predictor.from_run(calibrated_run, engine="torch").predict([photos[16]], mirror=True)[0].to_dict()
    assert [t["breed_id"] for t in line["top"]] == [t["breed_id"] for t in want["top"]]
    assert [t["prob"] for t in line["top"]] == pytest.approx([t["prob"] for t in want["top"]], abs=1e-6)
    assert main(["predict", str(calibrated_run), str(photos[16]), "--detect", str(calibrated_run), "--tta", "flip"]) == 2
    assert "--tta flip: with --detect the detector run decides" in capsys.readouterr().err
