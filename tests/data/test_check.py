"""Leakage check on real photos copied into tmp splits with planted duplicates."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dogbreeds.data.check import NEAR_DUPLICATE_THRESHOLD, find_duplicates, format_report, hash_files, near_pairs
from dogbreeds.data.records import ImageRecord


def _record(path: Path, split: str) -> ImageRecord:
    return ImageRecord(path=str(path), label=0, breed_id=path.parent.name, split=split)


@pytest.fixture()
def planted(mini_root, tmp_path):
    """train: a b c broken | val: e | test: a-copy, b-resized-reencoded, d, d-copy."""
    breeds = sorted((mini_root / "Images").iterdir())
    a, b, c, d, e = (sorted(breed.glob("*.jpg"))[0] for breed in breeds[:5])
    folder = tmp_path / "photos"
    folder.mkdir()

    def put(src: Path, name: str) -> Path:
        shutil.copy(src, folder / name)
        return folder / name

    b_small = folder / "b_small.jpg"
    with Image.open(b) as image:
        image.convert("RGB").resize((150, 150), Image.Resampling.BICUBIC).save(b_small, quality=70)
    broken = folder / "broken.jpg"
    broken.write_bytes(c.read_bytes()[:3000])
    records = [
        _record(put(a, "a.jpg"), "train"), _record(put(b, "b.jpg"), "train"), _record(put(c, "c.jpg"), "train"),
        _record(broken, "train"),
        _record(put(e, "e.jpg"), "val"),
        _record(put(a, "a_copy.jpg"), "test"), _record(b_small, "test"),
        _record(put(d, "d.jpg"), "test"), _record(put(d, "d_copy.jpg"), "test"),
    ]
    return records


def _names(pair) -> set[str]:
    return {Path(pair.first.path).name, Path(pair.second.path).name}


def test_planted_duplicates_are_found(planted):
    report = find_duplicates(planted, workers=1, progress=False)
    assert [_names(p) for p in report.exact] == [{"a.jpg", "a_copy.jpg"}]
    assert [_names(p) for p in report.near] == [{"b.jpg", "b_small.jpg"}]
    assert report.near[0].distance <= NEAR_DUPLICATE_THRESHOLD
    assert {report.near[0].first.split, report.near[0].second.split} == {"train", "test"}
    assert [Path(r.path).name for r, _ in report.unreadable] == ["broken.jpg"]
    assert "truncated" in report.unreadable[0][1]
    assert report.within_split_exact == 1 and report.within_split_near == 0  # d / d_copy, both test
    assert not report.clean
    text = format_report(report)
    assert "1 exact and 1 near-duplicate pair(s); 1 unreadable" in text and "broken.jpg" in text


def test_threshold_zero_keeps_only_identical_hashes(planted):
    report = find_duplicates(planted, threshold=0, workers=1, progress=False)
    assert len(report.exact) == 1
    assert all(p.distance == 0 for p in report.near)


def test_clean_set_reports_nothing(planted):
    unrelated = [r for r in planted if Path(r.path).name in ("a.jpg", "b.jpg", "c.jpg", "e.jpg", "d.jpg")]
    report = find_duplicates(unrelated, workers=1, progress=False)
    assert report.clean and report.to_json()["cross_split_near"] == []


def test_pool_gives_the_same_hashes(mini_root):
    paths = [str(p) for p in sorted((mini_root / "Images").glob("n0209*/*.jpg"))[:70]]
    assert hash_files(paths, workers=2, progress=False) == hash_files(paths, workers=1, progress=False)


def test_near_pairs_matches_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=40, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, size=40).astype(np.uint64)
    hashes = np.concatenate([base, base ^ flips])  # every base hash has a twin at distance 1
    expected = sorted(
        (i, j, bin(int(hashes[i]) ^ int(hashes[j])).count("1"))
        for i in range(80) for j in range(i + 1, 80)
        if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 20
    )
    assert sorted(near_pairs(hashes, 20, block=7)) == expected
    assert {(i, j) for i, j, _ in near_pairs(hashes, 1)} >= {(i, i + 40) for i in range(40)}
