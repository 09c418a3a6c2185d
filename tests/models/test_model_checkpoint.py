"""Own checkpoints (safetensors + JSON sidecar) and load_run."""
from __future__ import annotations

import json

import pytest
import torch

from dogbreeds.data.records import ClassInfo
from dogbreeds.errors import DogbreedsError
from dogbreeds.models.checkpoint_format import read_checkpoint_meta, save_model_checkpoint
from dogbreeds.models.factory import create_model, load_run

CLASSES = ClassInfo(("n02085620-Chihuahua", "n02085936-Maltese_dog", "n02099601-golden_retriever"))


@pytest.fixture
def keras_like(randomize):
    # Extra constructor kwargs must survive the round trip: 'same' padding changes every output.
    return randomize(create_model("mobilenetv2_050", num_classes=3, pad_type="same", bn_eps=1e-3), seed=7)


def test_round_trip_keeps_weights_kwargs_classes_and_preprocessing(keras_like, photo, tmp_path):
    run = tmp_path / "runs" / "mnv2"
    path = save_model_checkpoint(keras_like, run / "checkpoints" / "best.safetensors", CLASSES, extra={"epoch": 4})
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.json", "best.safetensors"]  # no temp files left
    meta = json.loads((path.parent / "best.json").read_text())
    assert meta["format"] == "dogbreeds-checkpoint" and meta["version"] == 1
    assert meta["model"] == "mobilenetv2_050" and meta["num_classes"] == 3
    assert meta["model_kwargs"] == {"pad_type": "same", "bn_eps": 1e-3}
    assert meta["classes"][2] == {"index": 2, "breed_id": "n02099601-golden_retriever", "name": "golden retriever"}
    assert meta["preprocessing"] == keras_like.preprocessing.to_dict() and meta["extra"] == {"epoch": 4}
    assert read_checkpoint_meta(path) == meta

    loaded = load_run(run)
    assert loaded.path == path and loaded.name == "mobilenetv2_050" and loaded.classes == CLASSES
    assert loaded.preprocessing == keras_like.preprocessing and not loaded.model.training
    assert loaded.model.dogbreeds_kwargs == {"pad_type": "same", "bn_eps": 1e-3}
    with torch.no_grad():
        assert torch.equal(loaded.model(photo), keras_like.eval()(photo))
        plain = create_model("mobilenetv2_050", num_classes=3)
        plain.load_state_dict(keras_like.state_dict())
        assert not torch.allclose(plain.eval()(photo), keras_like(photo)), "kwargs made no difference: weak test"

    # the same file through create_model, by file and by run folder
    for source in (path, run):
        model = create_model(None, weights=source)
        assert model.dogbreeds_name == "mobilenetv2_050" and model.preprocessing == keras_like.preprocessing


def test_load_run_prefers_best_then_last(tmp_path, randomize):
    run = tmp_path / "run"
    last = randomize(create_model("convnext_atto", num_classes=3), seed=1)
    best = randomize(create_model("convnext_atto", num_classes=3), seed=2)
    save_model_checkpoint(last, run / "checkpoints" / "last.safetensors", CLASSES)
    assert load_run(run).path.name == "last.safetensors"
    save_model_checkpoint(best, run / "checkpoints" / "best.safetensors", CLASSES)
    loaded = load_run(run)
    assert loaded.path.name == "best.safetensors"
    assert torch.equal(loaded.model.stem[0].weight, best.stem[0].weight)
    # a checkpoint file (or its sidecar) works too
    assert load_run(run / "checkpoints" / "last.json").path.name == "last.safetensors"


def test_overwriting_a_checkpoint_replaces_it(tmp_path, randomize):
    path = tmp_path / "last.safetensors"
    for seed in (1, 2):
        model = randomize(create_model("convnext_atto", num_classes=3), seed=seed)
        save_model_checkpoint(model, path, CLASSES, extra={"epoch": seed})
    assert read_checkpoint_meta(path)["extra"] == {"epoch": 2}
    assert torch.equal(load_run(path).model.stem[0].weight, model.stem[0].weight)


def test_load_run_without_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(DogbreedsError, match=r"best\.safetensors.*last\.safetensors"):
        load_run(tmp_path / "run")
    with pytest.raises(DogbreedsError, match="not found"):
        load_run(tmp_path / "nowhere")


def test_save_refuses_mismatched_classes_and_foreign_models(tmp_path):
    import timm

    with pytest.raises(DogbreedsError, match="3 classes"):
        save_model_checkpoint(create_model("convnext_atto", num_classes=5), tmp_path / "x.safetensors", CLASSES)
    with pytest.raises(DogbreedsError, match="create_model"):
        save_model_checkpoint(timm.create_model("convnext_atto", num_classes=3), tmp_path / "x.safetensors", CLASSES)
    assert not list(tmp_path.iterdir())
