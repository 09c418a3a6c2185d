"""RunDir: finding a run from whatever a user passes, and reading what training wrote."""
import json

import pytest

from dogbreeds.errors import DogbreedsError
from dogbreeds.rundir import RunDir, atomic_write_text


def _fake_run(root):
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "last.safetensors").write_bytes(b"x")
    (root / "checkpoints" / "last.json").write_text("{}")
    return root


def test_locate_accepts_run_folder_checkpoints_folder_checkpoint_and_sidecar(tmp_path):
    run = _fake_run(tmp_path / "run")
    for given in (run, run / "checkpoints", run / "checkpoints" / "last.safetensors", run / "checkpoints" / "last.json"):
        found = RunDir.locate(given)
        assert found.path == run, given
        assert found.checkpoint() == run / "checkpoints" / "last.safetensors"


def test_best_is_preferred_to_last_unless_a_checkpoint_was_named(tmp_path):
    run = _fake_run(tmp_path / "run")
    (run / "checkpoints" / "best.safetensors").write_bytes(b"y")
    assert RunDir.locate(run).checkpoint().name == "best.safetensors"
    assert RunDir.locate(run / "checkpoints" / "last.safetensors").checkpoint().name == "last.safetensors"


def test_missing_run_and_missing_checkpoint_say_what_was_expected(tmp_path):
    with pytest.raises(DogbreedsError, match="not found"):
        RunDir.locate(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DogbreedsError, match="best.safetensors"):
        RunDir.locate(tmp_path / "empty").checkpoint()


def test_read_metrics_drops_a_torn_last_line_but_not_a_bad_middle_one(tmp_path):
    run = RunDir(tmp_path)
    atomic_write_text(run.metrics_file, json.dumps({"epoch": 1}) + "\n" + json.dumps({"epoch": 2}) + "\n{\"epo")
    assert [row["epoch"] for row in run.read_metrics()] == [1, 2]
    assert run.epochs_done() == 2
    atomic_write_text(run.metrics_file, "{bad\n" + json.dumps({"epoch": 2}) + "\n")
    with pytest.raises(DogbreedsError, match="line 1"):
        run.read_metrics()


def test_damaged_config_and_split_name_the_file(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_config() == {}
    run.config.write_text("- just\n- a list\n")
    with pytest.raises(DogbreedsError, match="config.yaml"):
        run.read_config()
    run.split_file.write_text("{not json")
    with pytest.raises(DogbreedsError, match="split.json"):
        run.read_split()


def test_is_trained_needs_the_last_checkpoint_and_every_epoch(tmp_path):
    run = RunDir(_fake_run(tmp_path / "run"))
    run.write_json(run.metrics_file, {"epoch": 1}, indent=None)
    assert run.is_trained(1) and not run.is_trained(2)
    run.checkpoint_path("last").unlink()
    assert not run.is_trained(1)
