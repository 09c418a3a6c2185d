"""`dogbreeds calibrate --not-dogs / --other-dogs`: what the options name is checked before any
photo is embedded (a pattern that matches nothing used to calibrate on 0 photos, silently)."""
import shutil
from pathlib import Path

import pytest

from dogbreeds.errors import DogbreedsError
from dogbreeds.trust.cli import _given_photos

CATS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cats-and-dogs" / "cats"


def test_not_given_is_no_photos():
    assert _given_photos(None, "--not-dogs") == [] and _given_photos((), "--other-dogs") == []


def test_a_pattern_that_matches_nothing_is_an_error_naming_option_and_pattern(tmp_path):
    with pytest.raises(DogbreedsError) as info:
        _given_photos([str(tmp_path / "nothing" / "*.jpg")], "--not-dogs")
    assert "--not-dogs" in str(info.value) and "nothing" in str(info.value) and "matches no file" in str(info.value)


def test_a_folder_gives_its_photos_and_a_glob_its_matches(tmp_path):
    for name in ("cat.1.jpg", "cat.2.jpg"):
        shutil.copy(CATS / name, tmp_path / name)
    assert sorted(p.name for p in _given_photos([str(tmp_path)], "--not-dogs")) == ["cat.1.jpg", "cat.2.jpg"]
    assert [p.name for p in _given_photos([str(tmp_path / "cat.1.*")], "--other-dogs")] == ["cat.1.jpg"]
