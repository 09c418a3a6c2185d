"""The prepared cache: same pixels as decoding + resizing, stale files detected and redone."""
from __future__ import annotations

import argparse
import os
import shutil

import numpy as np
import pytest
import torch

from dogbreeds.data import cache as cache_module
from dogbreeds.data.cache import ImageCache, prepare_cache
from dogbreeds.data.resize import resize_short_side
from dogbreeds.data.decode import decode_image
from dogbreeds.data.loaders import make_loader
from dogbreeds.data.records import Box, ImageRecord
from dogbreeds.data.transforms import AugmentConfig, build_eval_transform, build_train_transform
from dogbreeds.errors import DataError
from dogbreeds.preprocessing import Preprocessing

PP = Preprocessing(input_size=96, crop_pct=0.875)  # cache short side int(96 / 0.875) = 109
SHORT = 109


@pytest.fixture
def photos(mini_root, tmp_path) -> list[str]:
    """Copies of a few real photos (copies, so tests may change them), one made non-square."""
    sources = sorted((mini_root / "Images" / "n02085936-Maltese_dog").glob("*.jpg"))[:4]
    paths = []
    for source in sources:
        target = tmp_path / "photos" / source.name
        target.parent.mkdir(exist_ok=True)
        shutil.copy(source, target)
        paths.append(str(target))
    from PIL import Image
    Image.fromarray(decode_image(paths[0])[:, :150]).save(tmp_path / "photos" / "wide.png")
    return paths + [str(tmp_path / "photos" / "wide.png")]


def test_cache_rows_are_pixel_identical_to_decode_and_resize(photos, tmp_path):
    summary = prepare_cache(photos, tmp_path / "cache", SHORT, "bicubic", workers=2, progress=False)
    assert (summary.total, summary.decoded, summary.reused, summary.failed) == (5, 5, 0, {})
    cache = ImageCache.open(tmp_path / "cache")
    for path in photos:
        decoded = decode_image(path)
        cached, original_size = cache.read(path)
        assert original_size == decoded.shape[:2]
        assert min(cached.shape[:2]) == SHORT
        np.testing.assert_array_equal(cached, resize_short_side(decoded, SHORT, "bicubic"))
    assert cache.read(photos[4])[0].shape == (int(SHORT * 224 / 150), SHORT, 3)  # 224 tall, 150 wide: aspect kept


def test_loader_from_cache_gives_the_same_eval_tensors(photos, tmp_path):
    prepare_cache(photos, tmp_path / "cache", SHORT, "bicubic", workers=1, progress=False)
    records = [ImageRecord(p, i % 2, "b", "val") for i, p in enumerate(photos)]
    transform = build_eval_transform(PP)
    plain = list(make_loader(records, transform, 5, shuffle=False, seed=0))[0]
    cached = list(make_loader(records, transform, 5, shuffle=False, seed=0, cache=tmp_path / "cache"))[0]
    assert torch.equal(plain.images, cached.images)


def test_train_transform_from_cache_scales_the_boxes(photos, tmp_path):
    prepare_cache(photos[:1], tmp_path / "cache", SHORT, "bicubic", workers=1, progress=False)
    # Box around the left half of a 224x224 photo -> left half of the 109x109 cached copy.
    record = ImageRecord(photos[0], 0, "b", "train", boxes=(Box(0, 0, 112, 224),))
    augment = AugmentConfig.preset("none", crop_to_box="largest", box_margin=0.0)
    loader = make_loader([record], build_train_transform(PP, augment), 1, shuffle=False, seed=0,
                         cache=ImageCache.open(tmp_path / "cache"))
    (batch,) = list(loader)
    cached, _ = ImageCache.open(tmp_path / "cache").read(photos[0])
    expected = build_eval_transform(PP)(np.ascontiguousarray(cached[:, :55]))
    assert torch.equal(batch.images[0], expected)


def test_changed_file_is_detected_and_only_it_is_decoded_again(photos, tmp_path):
    prepare_cache(photos, tmp_path / "cache", SHORT, "bicubic", workers=1, progress=False)
    records = [ImageRecord(p, 0, "b", "train") for p in photos]
    shutil.copy(photos[1], photos[2])  # a different photo now under photos[2]'s name
    os.utime(photos[2], ns=(1, 1))
    transform = build_eval_transform(PP)
    with pytest.raises(DataError, match=r"stale: 1 of 5 files.*" + os.path.basename(photos[2]) + ".*prepare"):
        make_loader(records, transform, 2, shuffle=False, seed=0, cache=tmp_path / "cache")

    summary = prepare_cache(photos, tmp_path / "cache", SHORT, "bicubic", workers=1, progress=False)
    assert (summary.decoded, summary.reused) == (1, 4)
    cache = ImageCache.open(tmp_path / "cache")
    np.testing.assert_array_equal(cache.read(photos[2])[0], cache.read(photos[1])[0])
    assert len(list((tmp_path / "cache").glob("pixels-*.u8"))) == 1  # the old pixels file is gone
    make_loader(records, transform, 2, shuffle=False, seed=0, cache=cache)  # fresh again


def test_bad_file_is_remembered_and_skipped_by_the_loader(photos, tmp_path):
    broken = tmp_path / "photos" / "broken.jpg"
    broken.write_bytes(open(photos[0], "rb").read()[:2000])
    summary = prepare_cache(photos[:2] + [str(broken)], tmp_path / "cache", SHORT, "bicubic", workers=1,
                            progress=False)
    assert list(summary.failed) == [str(broken)] and "TruncatedImageError" in summary.failed[str(broken)]
    records = [ImageRecord(p, 0, "b", "train") for p in photos[:2] + [str(broken)]]
    loader = make_loader(records, build_eval_transform(PP), 3, shuffle=False, seed=0, cache=tmp_path / "cache")
    (batch,) = list(loader)
    assert batch.indices.tolist() == [0, 1]
    assert [s.path for s in loader.skipped] == [str(broken)]


def test_cache_that_does_not_fit_the_model_is_refused(photos, tmp_path):
    prepare_cache(photos[:1], tmp_path / "cache", SHORT, "bicubic", workers=1, progress=False)
    records = [ImageRecord(photos[0], 0, "b", "train")]
    with pytest.raises(DataError, match=r"needs bilinear with at least 109.*--interpolation bilinear"):
        make_loader(records, build_eval_transform(Preprocessing(96, interpolation="bilinear")), 1, False, 0,
                    cache=tmp_path / "cache")
    with pytest.raises(DataError, match=r"at least 256 .*--size 256"):
        make_loader(records, build_eval_transform(Preprocessing(224)), 1, False, 0, cache=tmp_path / "cache")
    with pytest.raises(DataError, match="not an image cache"):
        ImageCache.open(tmp_path)


def test_prepare_command_over_real_data(mini_root, tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    cache_module.register_cli(parser.add_subparsers())
    args = parser.parse_args(["prepare", str(mini_root), "--size", "64", "--breeds", "n02085620-Chihuahua",
                              "--out", str(tmp_path / "cache"), "--workers", "2"])
    assert args.func(args) == 0
    cache = ImageCache.open(tmp_path / "cache")
    chihuahuas = sorted((mini_root / "Images" / "n02085620-Chihuahua").glob("*.jpg"))
    assert len(cache) == len(chihuahuas)
    cached, _ = cache.read(str(chihuahuas[-1]))
    np.testing.assert_array_equal(cached, resize_short_side(decode_image(chihuahuas[-1]), 64, "bicubic"))


def test_find_cache_picks_the_default_folder_for_the_models_sizing(photos, tmp_path):
    from dogbreeds.data.cache import default_cache_dir, find_cache

    prepare_cache(photos[:1], default_cache_dir(tmp_path, SHORT, "bicubic"), SHORT, "bicubic", workers=1,
                  progress=False)
    found = find_cache(tmp_path, PP)
    assert found is not None and found.short_side == SHORT and len(found) == 1
    assert find_cache(tmp_path, Preprocessing(224)) is None  # needs 256: not prepared
