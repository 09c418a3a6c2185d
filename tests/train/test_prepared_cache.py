"""`dogbreeds train` reads the cache `dogbreeds data prepare` wrote, when it fits the run, and says so."""
from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from dogbreeds.data import decode
from dogbreeds.data.augment import AugmentConfig
from dogbreeds.data.cache import default_cache_dir, find_prepared_cache, prepare_cache
from dogbreeds.data.sources import load_dataset
from dogbreeds.preprocessing import Preprocessing
from dogbreeds.train.loop import TrainHooks, TrainingStopped, train

# convnext_atto's preprocessing at --input-size 32: crop_pct 0.875, bicubic -> short side int(32 / 0.875)
PP = Preprocessing(input_size=32, crop_pct=0.875, interpolation="bicubic")


@pytest.fixture(autouse=True)
def no_calibration(monkeypatch):
    """The calibration that follows training reads the photos on its own (trust/); these tests are
    about what the training loop reads."""
    try:
        import dogbreeds.trust.cli as trust_cli
    except ImportError:
        return
    monkeypatch.setattr(trust_cli, "calibrate_after_training", lambda *args, **kwargs: None, raising=False)


@pytest.fixture
def data(tiny_data, tmp_path):
    """A private copy of the tiny photos: these tests write caches beside them."""
    return shutil.copytree(tiny_data, tmp_path / "dogs")


def _prepare(data):
    records = load_dataset(data, breeds="all").train + load_dataset(data, breeds="all").val
    records += load_dataset(data, breeds="all").test
    directory = default_cache_dir(data, PP.resize_size, PP.interpolation)
    prepare_cache([r.path for r in records], directory, PP.resize_size, PP.interpolation, workers=1, progress=False)
    return directory


def _no_decoding(monkeypatch):
    monkeypatch.setattr(decode, "decode_image", lambda path: pytest.fail(f"decoded {path}: the cache was not used"))


def test_lookup_says_what_it_found(data):
    records = load_dataset(data, breeds="all").train
    missing = find_prepared_cache(data, PP, records)
    assert missing.cache is None and "no prepared cache" in missing.message
    assert f"--size {PP.resize_size} --interpolation bicubic" in missing.message
    directory = _prepare(data)
    found = find_prepared_cache(data, PP, records)
    assert found.cache is not None and found.cache.directory == directory and "using the prepared cache" in found.message
    assert find_prepared_cache(data, Preprocessing(input_size=64), records).cache is None  # other sizing
    photo = records[0].path
    stat = os.stat(photo)
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # an edited photo
    stale = find_prepared_cache(data, PP, records)
    assert stale.cache is None and f"1 of {len(records)} images" in stale.message


def test_lookup_messages_name_paths_as_relative_ones(data, monkeypatch):
    """Callers resolve the data root; the messages still say where the data is relative to the
    working directory (`../dogs/...`), not where this machine keeps it."""
    records = load_dataset(data, breeds="all").train
    here = data.parent / "project"
    here.mkdir()
    monkeypatch.chdir(here)
    missing = find_prepared_cache(data.resolve(), PP, records)
    assert str(data.parent.resolve()) not in missing.message
    assert "at ../dogs/.dogbreeds-cache/" in missing.message and "`dogbreeds data prepare ../dogs --size" in missing.message
    _prepare(data)
    found = find_prepared_cache(data.resolve(), PP, records)
    assert found.cache is not None and "using the prepared cache ../dogs/.dogbreeds-cache/" in found.message


def test_train_reads_the_cache_and_gets_the_same_run(data, tiny_recipe, tmp_path, capsys, monkeypatch):
    """With the deterministic 'none' augmentation the cached rows are exactly what decoding and
    resizing give, so a run from the cache must equal a run from the files, bit for bit."""
    augment = AugmentConfig.preset("none")
    from_files = train(tiny_recipe(data, tmp_path / "files", epochs=1, augment=augment))
    assert "decoding images from files (no prepared cache" in capsys.readouterr().out
    _prepare(data)
    _no_decoding(monkeypatch)
    from_cache = train(tiny_recipe(data, tmp_path / "cache", epochs=1, augment=augment))
    assert "using the prepared cache" in capsys.readouterr().out
    a, b = (load_file(run / "checkpoints" / "last.safetensors") for run in (from_files, from_cache))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(from_cache / "checkpoints" / "resume.pt", weights_only=True)
    assert state["image_cache"] == str(default_cache_dir(data, PP.resize_size, PP.interpolation))


def test_frozen_backbone_features_come_from_the_cache(data, tiny_recipe, tmp_path, capsys, monkeypatch):
    _prepare(data)
    _no_decoding(monkeypatch)
    train(tiny_recipe(data, tmp_path / "frozen", freeze="backbone", epochs=1))
    assert "using the prepared cache" in capsys.readouterr().out


def _stop_at(epoch: int):
    """A hook that sends this process SIGTERM at the first micro-batch of `epoch`."""
    def hook(current, index, inputs):
        if current == epoch and index == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return inputs
    return TrainHooks(on_micro_batch=hook)


def test_a_resumed_run_keeps_reading_what_it_started_with(data, tiny_recipe, tmp_path, capsys):
    """A cache prepared while a run was stopped is not used by its resume: random crops of the
    cached (resized) rows differ from crops of the photos, and the resume must match an unbroken run."""
    recipe = tiny_recipe(data, tmp_path / "run", epochs=2, augment=AugmentConfig.preset("quick"))
    reference = train(tiny_recipe(data, tmp_path / "reference", epochs=2, augment=AugmentConfig.preset("quick")))
    with pytest.raises(TrainingStopped) as stopped:
        train(recipe, _stop_at(epoch=1))
    assert stopped.value.signum == signal.SIGTERM
    assert "SIGTERM" in capsys.readouterr().err
    _prepare(data)
    train(recipe)
    assert "decoding images from files as before the stop" in capsys.readouterr().out
    a, b = (load_file(run / "checkpoints" / "last.safetensors") for run in (reference, tmp_path / "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)
