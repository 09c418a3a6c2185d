"""Predictor: batched, per-image errors, any input type, the model's own preprocessing."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import dogbreeds
from dogbreeds.data.decode import decode_image
from dogbreeds.infer.predictor import LOW_CONFIDENCE_MESSAGE, Predictor, collect_images


@pytest.fixture(scope="module")
def predictor(convnext_run):
    return Predictor.from_run(convnext_run)


def test_public_api_exposes_predictor():
    assert dogbreeds.Predictor is Predictor


def test_predict_returns_sorted_top_k_with_names_from_the_classes(predictor, photos):
    results = predictor.predict(photos, top_k=5)
    assert len(results) == len(photos)
    for photo, result in zip(photos, results):
        assert result.ok and result.image == str(photo)
        probs = [s.prob for s in result.top]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True)
        assert 0 < sum(probs) <= 1 + 1e-6
        assert {s.breed_id for s in result.top} <= set(predictor.classes.breed_ids)
        assert all(predictor.classes.names[s.index] == s.breed for s in result.top)
        as_dict = result.to_dict()
        # issue 11 added the verdict fields; an uncalibrated run also carries a note saying so
        assert set(as_dict) - {"note"} == {"image", "top", "low_confidence", "verdict", "ood_score", "breed_set"}
        assert set(as_dict["top"][0]) == {"breed_id", "breed", "prob"}
        json.dumps(as_dict)  # JSON-able as is


def test_every_input_type_gives_the_same_answer(predictor, photos):
    path = photos[0]
    array = decode_image(path)
    inputs = [path, str(path), path.read_bytes(), Image.open(path), array]
    results = predictor.predict(inputs, top_k=3)
    reference = [(s.breed_id, s.prob) for s in results[0].top]
    for result in results[1:]:
        assert [s.breed_id for s in result.top] == [b for b, _ in reference]
        np.testing.assert_allclose([s.prob for s in result.top], [p for _, p in reference], atol=1e-6)
    assert [r.image for r in results[2:]] == ["<bytes #2>", "<PIL image #3>", "<array #4>"]


def test_a_bad_image_never_stops_the_others(predictor, photos, tmp_path):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(photos[0].read_bytes()[:2000])
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    inputs = [photos[0], truncated, b"", text, tmp_path / "missing.jpg", np.zeros((4, 4), np.uint8), photos[1]]
    results = predictor.predict(inputs, batch_size=3)
    assert [r.ok for r in results] == [True, False, False, False, False, False, True]
    assert "truncated.jpg" in results[1].error
    assert "empty" in results[2].error
    assert "notes.jpg" in results[3].error and "not an image" in results[3].error
    assert "does not exist" in results[4].error
    assert "HxWx3 uint8" in results[5].error
    assert results[1].to_dict() == {"image": str(truncated), "error": results[1].error}


def test_batch_size_does_not_change_the_answers(predictor, photos):
    one_by_one = predictor.predict(photos, batch_size=1)
    batched = predictor.predict(photos, batch_size=4)
    for a, b in zip(one_by_one, batched):
        assert [s.breed_id for s in a.top] == [s.breed_id for s in b.top]
        np.testing.assert_allclose([s.prob for s in a.top], [s.prob for s in b.top], atol=1e-5)


def test_forward_is_called_once_per_batch(predictor, photos, monkeypatch):
    calls = []
    original = predictor.backend.forward
    monkeypatch.setattr(predictor.backend, "forward", lambda batch: calls.append(len(batch)) or original(batch))
    predictor.predict(photos, batch_size=4)
    assert calls == [4, 2]


def test_low_confidence_flag_follows_the_threshold(convnext_run, photos):
    # A random-init model spreads ~5-15% over 20 breeds: unsure at 0.3, "sure" at 0.0.
    unsure = Predictor.from_run(convnext_run, threshold=0.3).predict(photos[:2])
    assert all(r.low_confidence for r in unsure)
    sure = Predictor.from_run(convnext_run, threshold=0.0).predict(photos[:2])
    assert not any(r.low_confidence for r in sure)
    assert "not sure" in LOW_CONFIDENCE_MESSAGE
    with pytest.raises(ValueError, match="threshold"):
        Predictor.from_run(convnext_run, threshold=1.5)


def test_preprocessing_comes_from_the_checkpoint(predictor, convnext_run):
    sidecar = json.loads((convnext_run / "checkpoints" / "best.json").read_text())
    assert predictor.preprocessing.to_dict() == {**sidecar["preprocessing"]}
    assert predictor.preprocess(np.zeros((300, 400, 3), np.uint8)).shape == (3, 128, 128)


def test_collect_images_walks_folders_and_globs(tmp_path, photos):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for i, name in enumerate(["a/one.jpg", "a/b/two.JPEG", "a/b/three.png", "a/readme.txt"]):
        (tmp_path / name).write_bytes(photos[i % 2].read_bytes())
    found = collect_images([tmp_path / "a"])
    assert sorted(p.name for p in found) == ["one.jpg", "three.png", "two.JPEG"]
    assert [p.name for p in collect_images([str(tmp_path / "a" / "b" / "*.png")])] == ["three.png"]
    # named files are kept (each gets its own error if bad), missing ones too
    assert [p.name for p in collect_images([tmp_path / "a" / "readme.txt", tmp_path / "nope.jpg"])] == ["readme.txt", "nope.jpg"]
