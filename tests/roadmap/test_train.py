"""The training sweep: one recipe for every step, one run dir per step, resumable, a summary."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dogbreeds.errors import DogbreedsError
from dogbreeds.roadmap.train import RoadmapTraining, parse_steps, plot_roadmap, train_roadmap

BREEDS = ("n02088094-Afghan_hound", "n02086240-Shih-Tzu", "n02107683-Bernese_mountain_dog")


def test_parse_steps():
    assert parse_steps("0,3,11") == (0, 3, 11)
    assert parse_steps("11, 0-2") == (0, 1, 2, 11)
    assert parse_steps(None) == tuple(range(12))
    with pytest.raises(DogbreedsError, match="--steps 'first'"):
        parse_steps("first")
    with pytest.raises(DogbreedsError, match=r"steps \[12\] do not exist"):
        RoadmapTraining(data="x", steps=(0, 12)).validate()


def test_every_step_gets_the_same_recipe_but_its_model():
    plan = RoadmapTraining(data="dogs", out="sweep", epochs=3)
    first, last = plan.recipe(0).to_dict(), plan.recipe(11).to_dict()
    differ = {k for k in first if first[k] != last[k]}
    assert differ == {"model", "out"}
    assert (last["model"], last["out"], last["weights"]) == ("roadmap_step11", str(Path("sweep/step11")), None)


def test_plot_draws_dogs_beside_the_paper(tmp_path):
    rows = [{"step": s, "dogs_test_top1": 10.0 + s, "num_classes": 20} for s in (0, 5, 11)]
    path = plot_roadmap(rows, tmp_path / "roadmap.png", subtitle="test")
    assert path.stat().st_size > 10_000 and Image.open(path).size[0] > 800


def _tiny_dogs(mini_root: Path, out: Path, per_breed: int = 12, size: int = 48) -> Path:
    """Real photos, shrunk so decoding costs nothing, one folder per breed."""
    for breed in BREEDS:
        photos = sorted((mini_root / "Images" / breed).glob("*.jpg"))[:per_breed]
        assert len(photos) == per_breed
        (out / breed).mkdir(parents=True)
        for photo in photos:
            Image.open(photo).convert("RGB").resize((size, size)).save(out / breed / photo.name)
    return out


@pytest.mark.slow
def test_sweep_trains_tests_skips_and_refuses_another_recipe(mini_root, tmp_path):
    data = _tiny_dogs(mini_root, tmp_path / "dogs")
    plan = RoadmapTraining(data=str(data), out=str(tmp_path / "sweep"), steps=(11,), input_size=32, epochs=1,
                           batch_size=8, breeds="all", workers=0, device="cpu")
    log: list[str] = []
    rows = train_roadmap(plan, log=log.append)

    assert [r["step"] for r in rows] == [11]
    for row in rows:
        assert row["num_classes"] == 3 and row["epochs"] == 1 and row["test_images"] > 0
        assert 0 <= row["dogs_test_top1"] <= 100
        run_dir = Path(row["run_dir"])
        assert (run_dir / "checkpoints" / "best.safetensors").is_file()
        assert json.loads((run_dir / "eval" / "test.json").read_text())["model"] == row["model"]
    out = tmp_path / "sweep"
    assert (out / "roadmap.png").is_file()
    summary = (out / "roadmap.md").read_text()
    assert "| 11 | separate downsampling (ConvNeXt-T) |" in summary and "chance is 33.3%" in summary
    assert json.loads((out / "roadmap.json").read_text())["rows"] == rows

    # Again: nothing retrains, the summary is rebuilt from the run dirs.
    metrics = out / "step11" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    log.clear()
    assert train_roadmap(plan, log=log.append) == rows
    assert metrics.stat().st_mtime_ns == before
    assert sum("skipped" in line for line in log) == 1

    # Another recipe into the same folder is refused, not silently mixed.
    with pytest.raises(DogbreedsError, match="step11 was trained with another recipe.*lr"):
        train_roadmap(RoadmapTraining(**{**plan.__dict__, "lr": 5e-4}), log=log.append)


def test_a_step_is_finished_when_trained_under_the_plan_and_tested(tmp_path):
    from dogbreeds.roadmap.train import _is_finished
    from dogbreeds.rundir import RunDir

    plan = RoadmapTraining(data="dogs", out=str(tmp_path / "sweep"), steps=(3,), epochs=2)
    assert not _is_finished(plan, 3)
    run = RunDir(plan.run_dir(3))
    run.path.mkdir(parents=True)
    run.config.write_text(plan.recipe(3).to_yaml())
    run.metrics_file.write_text('{"epoch": 0, "val_top1": 0.1}\n{"epoch": 1, "val_top1": 0.2}\n')
    run.checkpoints.mkdir()
    run.checkpoint_path("last").write_bytes(b"")
    assert not _is_finished(plan, 3)  # trained but not tested
    run.write_json(run.eval_file("test"), {"top1": 0.2})
    assert _is_finished(plan, 3)
    with pytest.raises(DogbreedsError, match="step03 was trained with another recipe.*epochs"):
        _is_finished(RoadmapTraining(**{**plan.__dict__, "epochs": 3}), 3)
