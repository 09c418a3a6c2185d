"""`detect evaluate --split val --with-other-breeds`: the choices that need no breed (count rule, model
NMS, size) are made on the run's val photos plus every photo of the data root's breeds the detector was
not trained on; breed accuracy, the crop and the figure stay on the run's own val photos."""
from __future__ import annotations

import shutil

import pytest

from dogbreeds.detect import evaluate as evaluate_module
from dogbreeds.detect.evaluate import evaluate_detector
from dogbreeds.detect.model import read_detector_meta
from dogbreeds.errors import DogbreedsError
from dogbreeds.rundir import RunDir

from conftest import BREEDS, make_box_root, tiny_config


@pytest.fixture(scope="module")
def one_breed_run(mini_root, tmp_path_factory):
    """A tiny detector trained on the first breed of a two-breed root (12 photos of it, 6 of the other)."""
    from dogbreeds.detect.train import train_detector

    root = tmp_path_factory.mktemp("two_breeds")
    make_box_root(mini_root, root, per_breed=12, breeds=BREEDS[:1])
    make_box_root(mini_root, root, per_breed=6, breeds=BREEDS[1:])
    out = tmp_path_factory.mktemp("one_breed") / "run"
    train_detector(tiny_config(root, out, breeds=BREEDS[0]), progress=False)
    return root, out


def test_choices_use_the_other_breeds_photos_and_parts_are_reported(one_breed_run, tmp_path, monkeypatch):
    root, trained = one_breed_run
    run_path = tmp_path / "run"
    shutil.copytree(trained, run_path)
    seen = []
    choose = evaluate_module.choose_counting
    monkeypatch.setattr(evaluate_module, "choose_counting",
                        lambda model, records, *a, **k: seen.append([r.breed_id for r in records]) or choose(model, records, *a, **k))
    result = evaluate_detector(run_path, root, "val", choose_count=True, other_breeds=True, progress=False)
    own, other = result["parts"]["val"], result["parts"]["other_breeds"]
    assert other["n_photos"] == 6 and own["n_photos"] >= 1
    assert result["n_photos"] == own["n_photos"] + other["n_photos"]
    assert result["n_dogs"] == own["n_dogs"] + other["n_dogs"]
    # the count rule was chosen on both parts, the other breed's photos after the run's own
    assert len(seen) == 1 and seen[0][-6:] == [BREEDS[1]] * 6 and set(seen[0][:-6]) == {BREEDS[0]}
    assert "other breeds" in result["records_from"] and result["other_breeds_annotation_problems"] == {}
    extra = read_detector_meta(RunDir.locate(run_path).checkpoint())["extra"]
    assert extra["count_rule_chosen_on"] == "val+other_breeds"


def test_without_the_option_only_the_runs_val_photos_are_used(one_breed_run, tmp_path, monkeypatch):
    root, trained = one_breed_run
    run_path = tmp_path / "run"
    shutil.copytree(trained, run_path)
    result = evaluate_detector(run_path, root, "val", choose_count=True, progress=False)
    assert "parts" not in result and "other breeds" not in result["records_from"] and result["n_photos"] < 6
    assert read_detector_meta(RunDir.locate(run_path).checkpoint())["extra"]["count_rule_chosen_on"] == "val"
    assert result["count_objective"] == "multi"  # the default
    # --count-objective exact: passed to the choice, stored with the rule, reported
    seen = []
    choose = evaluate_module.choose_counting
    monkeypatch.setattr(evaluate_module, "choose_counting",
                        lambda *a, **k: seen.append(k.get("objective")) or choose(*a, **k))
    result = evaluate_detector(run_path, root, "val", choose_count=True, progress=False, count_objective="exact")
    assert seen == ["exact"] and result["count_objective"] == "exact"
    assert read_detector_meta(RunDir.locate(run_path).checkpoint())["extra"]["count_objective"] == "exact"


def test_refused_off_validation_on_another_root_and_without_other_breeds(one_breed_run, tiny_detector_run, box_root,
                                                                         mini_root, tmp_path):
    root, trained = one_breed_run
    with pytest.raises(DogbreedsError, match="--split val"):
        evaluate_detector(trained, root, "test", other_breeds=True)
    elsewhere = make_box_root(mini_root, tmp_path / "elsewhere", per_breed=3)
    with pytest.raises(DogbreedsError, match="the run's own --data"):
        evaluate_detector(trained, elsewhere, "val", other_breeds=True)
    with pytest.raises(DogbreedsError, match="every breed"):  # tiny_detector_run was trained on breeds="all"
        evaluate_detector(tiny_detector_run, box_root, "val", other_breeds=True)
