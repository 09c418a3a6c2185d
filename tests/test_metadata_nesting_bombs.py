"""Metadata read from a file is not trusted: JSON nested deeper than Python's recursion limit
(a few hundred KB of '[') must give the project's error naming the file, never a RecursionError."""
from __future__ import annotations

from pathlib import Path

import pytest

from dogbreeds.errors import DogbreedsError
from dogbreeds.infer.onnx_format import read_metadata
from dogbreeds.detect.infer import FORMAT_NAME, META_CONFIG, META_FORMAT, read_detector_metadata
from dogbreeds.trust.calibration import Calibration

BOMB = "[" * 200_000


def _breed_model():
    props = {"dogbreeds.classes": BOMB, "dogbreeds.preprocessing": "{}", "dogbreeds.output": "logits"}
    read_metadata(props, Path("hostile.onnx"))


def _detector():
    read_detector_metadata({META_FORMAT: FORMAT_NAME, META_CONFIG: BOMB}, Path("hostile.onnx"))


def _calibration():
    Calibration.from_metadata(BOMB, origin="hostile.onnx (dogbreeds.extra)")


@pytest.mark.parametrize("reader", [_breed_model, _detector, _calibration], ids=["breed", "detector", "calibration"])
def test_a_nesting_bomb_is_an_error_naming_the_file(reader):
    with pytest.raises(DogbreedsError, match="hostile.onnx") as info:
        reader()
    assert "unreadable" in str(info.value) and "re-export" in str(info.value)


def test_run_files_and_caches_with_a_nesting_bomb_are_errors_naming_the_file(tmp_path):
    from dogbreeds.data.cache import ImageCache
    from dogbreeds.rundir import RunDir

    (tmp_path / "split.json").write_text(BOMB)
    with pytest.raises(DogbreedsError, match="split.json"):
        RunDir(tmp_path).read_json(tmp_path / "split.json")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "index.json").write_text(BOMB)
    with pytest.raises(DogbreedsError, match="index.json.*data prepare"):
        ImageCache.open(cache)
