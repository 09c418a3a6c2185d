"""Outlier exposure during fine-tuning (train/outliers.py): the loss, which photos are outliers and
how they are recorded, the benchmark's split following the record, resume, bad input."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dogbreeds.errors import DogbreedsError
from dogbreeds.train.loop import TrainHooks, TrainingStopped, train
from dogbreeds.train.outliers import choose_outlier_breeds, oe_loss
from dogbreeds.train.recipe import Recipe

from .conftest import BREEDS

PROJECT = Path(__file__).resolve().parents[2]
LEARNT = ",".join(BREEDS[:2])  # the run learns two breeds; the tiny data's third is the outlier breed


@pytest.fixture(scope="module")
def wild_dogs(tmp_path_factory) -> Path:
    """Four real wild dog photos (cats-and-dogs), shrunk: outliers given by glob."""
    folder = tmp_path_factory.mktemp("wild")
    for number in (2, 4, 6, 8):
        source = PROJECT.parent / "shared" / "data" / "cats-and-dogs" / "dogs" / f"dog.{number}.jpg"
        Image.open(source).convert("RGB").resize((40, 40)).save(folder / f"dog.{number}.jpg")
    return folder


def _recipe(tiny_recipe, tiny_data, out, **overrides):
    settings = dict(breeds=LEARNT, outlier_exposure=True, oe_batch_size=2, batch_size=4, epochs=2)
    settings.update(overrides)
    return tiny_recipe(tiny_data, out, **settings)


def test_oe_loss_is_the_cross_entropy_to_the_uniform_distribution():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [10.0, -3.0, 1.0]])
    k = logits.shape[1]
    by_hand = -(torch.log_softmax(logits, -1).sum(-1) / k).mean()
    soft_targets = torch.nn.functional.cross_entropy(logits, torch.full_like(logits, 1 / k))
    assert torch.allclose(oe_loss(logits), by_hand) and torch.allclose(oe_loss(logits), soft_targets)
    assert float(oe_loss(torch.zeros(4, 20))) == pytest.approx(np.log(20)) != 0  # flat logits: ln K, its minimum
    assert float(oe_loss(logits[1:2])) == pytest.approx(np.log(3))
    assert float(oe_loss(logits[2:3])) > float(oe_loss(logits[0:1])) > np.log(3)  # confident costs more


def test_seeded_half_is_the_benchmarks_half_and_never_a_learnt_breed():
    ids = [f"breed{i:03d}" for i in range(100)]
    half = choose_outlier_breeds(ids, "0.5", seed=0)
    benchmark = {ids[i] for i in np.random.default_rng(0).permutation(100)[:50]}
    assert set(half) == benchmark and len(half) == 50
    assert choose_outlier_breeds(ids, "0.5", seed=1) != half
    assert choose_outlier_breeds(ids, "all", 0) == ids and choose_outlier_breeds(ids, "none", 0) == []
    with pytest.raises(DogbreedsError, match="not among"):
        choose_outlier_breeds(ids[1:], "breed000", 0)  # a breed the run learns (not among the others)


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2", "nan"])
def test_a_share_outside_0_1_is_a_named_error(tiny_data, tmp_path, tiny_recipe, value):
    with pytest.raises(DogbreedsError, match=f"oe_breeds='{value}'.*\\(0, 1\\]"):
        _recipe(tiny_recipe, tiny_data, tmp_path / "run", oe_breeds=value)


def test_bad_settings_are_named_errors(tiny_data, tmp_path, tiny_recipe):
    with pytest.raises(DogbreedsError, match="oe_weight"):
        _recipe(tiny_recipe, tiny_data, tmp_path / "a", oe_weight=0.0)
    with pytest.raises(DogbreedsError, match="only used with outlier_exposure"):
        _recipe(tiny_recipe, tiny_data, tmp_path / "b", outlier_exposure=False, outliers="x/*.jpg")
    missing = str(tmp_path / "nothing" / "dog.*.jpg")
    with pytest.raises(DogbreedsError, match="--outliers"):
        train(_recipe(tiny_recipe, tiny_data, tmp_path / "c", oe_breeds="none", outliers=missing))
    assert not (tmp_path / "c" / "checkpoints").exists()  # refused before any training


def test_outliers_are_recorded_never_a_learnt_breed_and_seen_every_step(tiny_data, tmp_path, tiny_recipe, wild_dogs,
                                                                       capsys):
    out = tmp_path / "run"
    train(_recipe(tiny_recipe, tiny_data, out, outliers=str(wild_dogs / "dog.*.jpg")))
    split = json.loads((out / "split.json").read_text())
    record = split["outliers"]
    assert record["breeds"] == [BREEDS[2]] and record["breed_photos"] == 10
    learnt = {c["breed_id"] for c in split["classes"]}
    assert learnt == set(BREEDS[:2]) and not set(record["breeds"]) & learnt
    assert record["other_breeds_not_used"] == []
    assert sorted(Path(p).name for p in record["photos"]) == [f"dog.{n}.jpg" for n in (2, 4, 6, 8)]
    assert record["weight"] == 0.5
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = lines[0]["step"]
    assert [line["outlier_images"] for line in lines] == [2 * steps] * 2  # 2 outliers in every step
    assert all(np.isfinite(line["train_oe_loss"]) and line["train_oe_loss"] >= np.log(2) - 1e-6 for line in lines)
    assert "oe " in capsys.readouterr().out  # the epoch line says it
    # the benchmark takes the recorded breed as its fitting unknown breed
    from dogbreeds.trust.cli import run_outlier_record

    assert run_outlier_record(out) == record


def _arrays(n_breeds=6, per=2):
    ids = np.array([f"n{i:03d}-b" for i in range(n_breeds)])
    y = np.repeat(np.arange(n_breeds), per)
    numbers = np.arange(8)
    return {"other_breed_ids": ids, "unknown_y": y, "unknown_paths": np.array([f"u/{i}.jpg" for i in range(len(y))]),
            "wild_cats_y": numbers, "wild_dogs_y": numbers, "test_paths": np.array(["t/0.jpg"]),
            "wild_cats_paths": np.array([f"w/cats/cat.{n}.jpg" for n in numbers]),
            "wild_dogs_paths": np.array([f"w/dogs/dog.{n}.jpg" for n in numbers])}


def test_benchmark_split_follows_the_record_and_refuses_a_leak(benchmark_module):
    bench = benchmark_module("measure_trust")
    arrays = _arrays()
    record = {"breeds": ["n001-b", "n004-b"], "photos": ["w/dogs/dog.0.jpg", "w/dogs/dog.2.jpg"], "oe_breeds": "x"}
    masks = bench.splits(arrays, outliers=record)
    fit = set(arrays["other_breed_ids"][np.unique(arrays["unknown_y"][masks["unknown_fit"]])])
    report = set(arrays["other_breed_ids"][np.unique(arrays["unknown_y"][masks["unknown_report"]])])
    assert fit == {"n001-b", "n004-b"} and report == set(arrays["other_breed_ids"]) - fit
    assert fit != set(arrays["other_breed_ids"][np.unique(arrays["unknown_y"][bench.splits(arrays)["unknown_fit"]])])
    with pytest.raises(bench.LeakingSplit, match="dog.3.jpg"):  # an odd-numbered wild dog reports
        bench.splits(arrays, outliers={**record, "photos": ["w/dogs/dog.3.jpg"]})
    with pytest.raises(bench.LeakingSplit, match="none is left"):
        bench.splits(arrays, outliers={**record, "breeds": list(arrays["other_breed_ids"])})


def test_benchmark_flip_average_means_features_and_logits_of_the_same_photos(benchmark_module):
    bench = benchmark_module("measure_trust")
    arrays = _arrays()
    rng = np.random.default_rng(0)
    arrays.update(unknown_x=rng.normal(size=(12, 4)).astype(np.float32),
                  unknown_logits=rng.normal(size=(12, 3)).astype(np.float32))
    mirrored = dict(arrays, unknown_x=rng.normal(size=(12, 4)).astype(np.float32),
                    unknown_logits=rng.normal(size=(12, 3)).astype(np.float32))
    both = bench.flip_average(arrays, mirrored)
    np.testing.assert_allclose(both["unknown_x"], (arrays["unknown_x"] + mirrored["unknown_x"]) / 2, rtol=1e-6)
    np.testing.assert_allclose(both["unknown_logits"], (arrays["unknown_logits"] + mirrored["unknown_logits"]) / 2,
                               rtol=1e-6)
    assert both["unknown_x"].dtype == np.float32 and (both["unknown_y"] == arrays["unknown_y"]).all()
    other = dict(mirrored, unknown_paths=np.array([f"u/{i + 1}.jpg" for i in range(12)]))
    with pytest.raises(bench.CacheMismatch, match="unknown_paths"):
        bench.flip_average(arrays, other)


def test_resume_with_outlier_exposure_is_bit_identical(tiny_data, tmp_path, tiny_recipe, wild_dogs):
    pattern = str(wild_dogs / "dog.*.jpg")
    reference = train(_recipe(tiny_recipe, tiny_data, tmp_path / "ref", outliers=pattern))
    out = tmp_path / "stopped"
    recipe = _recipe(tiny_recipe, tiny_data, out, outliers=pattern)

    def stop_in_epoch_one(epoch, index, inputs):
        if epoch == 1 and index == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the loop saves at the next step and stops
        return inputs

    with pytest.raises(TrainingStopped):
        train(recipe, TrainHooks(on_micro_batch=stop_in_epoch_one))
    assert (out / "checkpoints" / "resume.pt").is_file()
    train(recipe)
    for name in ("last.safetensors", "best.safetensors"):
        mine, theirs = load_file(out / "checkpoints" / name), load_file(reference / "checkpoints" / name)
        assert [k for k in theirs if not torch.equal(mine[k], theirs[k])] == []

    def metrics(run):
        timing = ("epoch_time", "images_per_s", "outliers_per_s")
        return [{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert metrics(out) == metrics(reference) and len(metrics(out)) == 2
