"""Mosaic augmentation for detector training (--mosaic P): the box arithmetic on synthetic photos
(boxes land on the pixels of their dogs, clipped to their tile, remnants dropped), the seeded plan,
the dataset path and the validation of P."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image

from dogbreeds.detect.data import (MOSAIC_FILL, DetectionDataset, DetRecord, MosaicPlan, compose_mosaic,
                                   mosaic_tiles, place_in_tile)
from dogbreeds.detect.model import DetectorConfig
from dogbreeds.detect.train import epoch_plan, mosaic_plan, quick_config, train_detector
from dogbreeds.errors import DogbreedsError

RED, GREEN, BLUE, YELLOW = (230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20)


def photo(width: int, height: int, boxes, colours) -> np.ndarray:
    """A black photo with each box filled in its colour."""
    image = np.zeros((height, width, 3), np.uint8)
    for (x0, y0, x1, y1), colour in zip(boxes, colours):
        image[int(y0):int(y1), int(x0):int(x1)] = colour
    return image


def colour_inside(canvas: np.ndarray, box, inset: int = 2) -> np.ndarray:
    """The pixels of the box, `inset` px in from its edges (bilinear resizing blurs one pixel)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return canvas[y0 + inset:y1 - inset, x0 + inset:x1 - inset].reshape(-1, 3)


def is_colour(pixels: np.ndarray, colour, tol: int = 12) -> bool:
    return len(pixels) > 0 and bool(np.all(np.abs(pixels.astype(int) - np.asarray(colour)) <= tol))


def test_tiles_cover_the_canvas_once():
    for four, split, across, (w, h) in [(True, (0.3, 0.62), True, (224, 224)), (False, (0.45, 0.5), True, (300, 200)),
                                        (False, (0.5, 0.7), True, (200, 300)), (False, (0.4, 0.6), False, (224, 224))]:
        tiles = mosaic_tiles(w, h, four, split, across)
        cover = np.zeros((h, w), int)
        for x0, y0, x1, y1 in tiles:
            assert x1 > x0 and y1 > y0
            cover[y0:y1, x0:x1] += 1
        assert (cover == 1).all() and len(tiles) == (4 if four else 2)
    assert mosaic_tiles(300, 200, False, (0.45, 0.5)) == [(0, 0, 135, 200), (135, 0, 300, 200)]  # across the width
    assert mosaic_tiles(200, 300, False, (0.5, 0.7)) == [(0, 0, 200, 210), (0, 210, 200, 300)]   # across the height
    assert mosaic_tiles(224, 224, True, (0.3, 0.62))[3] == (67, 139, 224, 224)


def test_a_fitted_photo_lands_scaled_and_shifted_on_the_right_pixels():
    boxes = np.array([[40, 20, 100, 80], [120, 10, 190, 60]], np.float32)
    image = photo(200, 100, boxes, (RED, GREEN))
    canvas = np.full((200, 200, 3), MOSAIC_FILL, np.uint8)
    # tile 100x100, scale 0 fits the 200x100 photo at exactly 0.5 (100x50), offset (0, 1): bottom of the tile
    placed = place_in_tile(canvas, image, boxes, (0, 100, 100, 200), 0.0, (0.0, 1.0))
    np.testing.assert_allclose(placed, [[20, 160, 50, 190], [60, 155, 95, 180]])
    assert is_colour(colour_inside(canvas, placed[0]), RED) and is_colour(colour_inside(canvas, placed[1]), GREEN)
    assert (canvas[100:150, :100] == MOSAIC_FILL).all()            # above the fitted photo: the fill
    assert (canvas[:100] == MOSAIC_FILL).all() and (canvas[:, 100:] == MOSAIC_FILL).all()  # other tiles untouched
    assert is_colour(canvas[170, 15:18], (0, 0, 0)) and is_colour(canvas[170, 52:58], (0, 0, 0))  # just outside
    # a scale between fit and cover is geometric: sqrt(0.5 * 1.0) of the photo, 141x71 px (each side rounded),
    # and the boxes follow the rounded sides
    canvas = np.full((200, 200, 3), MOSAIC_FILL, np.uint8)
    placed = place_in_tile(canvas, image, boxes[:1], (0, 0, 100, 100), 0.5, (0.0, 0.0))
    sx, sy = 141 / 200, 71 / 100
    np.testing.assert_allclose(placed, [[40 * sx, 20 * sy, 100 * sx, 80 * sy]], rtol=1e-6)
    assert is_colour(colour_inside(canvas, placed[0]), RED)


def test_a_covering_photo_is_cut_at_the_tile_and_its_boxes_clipped_or_dropped():
    boxes = np.array([[100, 20, 160, 80],    # 60 wide, 50 on the tile at offset 0.5: clipped, kept
                      [30, 10, 70, 50],      # 40 wide, 20 on it (0.5 of its area): kept
                      [10, 55, 60, 95],      # 50 wide, 10 on it (0.2): a remnant, dropped
                      [80, 40, 84, 60],      # wholly on it but 4 px wide: dropped
                      [75, 92, 99, 100]],    # wholly on it, 8 px high: kept whole, shifted
                     np.float32)
    image = photo(200, 100, boxes, (RED, GREEN, BLUE, YELLOW, YELLOW))
    canvas = np.full((100, 300, 3), MOSAIC_FILL, np.uint8)
    # tile x 100-200: scale 1 covers it (no resize, 200x100 photo in a 100x100 tile), offset 0.5: photo x 50-150 shows
    placed = place_in_tile(canvas, image, boxes, (100, 0, 200, 100), 1.0, (0.5, 0.0))
    np.testing.assert_allclose(placed, [[150, 20, 200, 80], [100, 10, 120, 50], [125, 92, 149, 100]])
    assert (placed[:, [0, 2]] >= 100).all() and (placed[:, [0, 2]] <= 200).all()
    assert is_colour(colour_inside(canvas, placed[0]), RED) and is_colour(colour_inside(canvas, placed[1]), GREEN)
    assert (canvas[:, :100] == MOSAIC_FILL).all() and (canvas[:, 200:] == MOSAIC_FILL).all()  # nothing spills out
    assert np.array_equal(canvas[:, 100:200], image[:, 50:150])  # the visible part, pixel for pixel
    # offset 1: photo x 100-200 shows, the first box whole, the other four off the tile
    placed = place_in_tile(np.full((100, 300, 3), MOSAIC_FILL, np.uint8), image, boxes, (100, 0, 200, 100), 1.0,
                           (1.0, 0.0))
    np.testing.assert_allclose(placed, [[100, 20, 160, 80]])


def test_compose_puts_every_photo_in_its_tile():
    sources = [(photo(100, 100, [(10, 10, 60, 90)], [RED]), np.array([[10, 10, 60, 90]], np.float32)),
               (photo(80, 120, [(20, 30, 70, 110)], [GREEN]), np.array([[20, 30, 70, 110]], np.float32)),
               (photo(120, 60, [(5, 5, 50, 40), (60, 10, 115, 55)], [BLUE, YELLOW]),
                np.array([[5, 5, 50, 40], [60, 10, 115, 55]], np.float32)),
               (photo(90, 90, [], []), np.zeros((0, 4), np.float32))]
    tiles = mosaic_tiles(224, 160, True, (0.4, 0.55))
    canvas, boxes = compose_mosaic(224, 160, sources, tiles, [0.0] * 4, [(0.5, 0.5)] * 4)
    assert canvas.shape == (160, 224, 3) and canvas.dtype == np.uint8 and boxes.shape == (4, 4)
    owners = [0, 1, 2, 2]
    for box, owner, colour in zip(boxes, owners, (RED, GREEN, BLUE, YELLOW)):
        x0, y0, x1, y1 = tiles[owner]
        assert x0 <= box[0] < box[2] <= x1 and y0 <= box[1] < box[3] <= y1
        assert is_colour(colour_inside(canvas, box), colour)


def _write(tmp_path, name, image):
    path = tmp_path / f"{name}.png"
    Image.fromarray(image).save(path)
    return str(path)


def test_the_dataset_builds_the_planned_mosaic_with_flipped_partners(tmp_path):
    specs = [((120, 100), [(10, 10, 50, 90)], [RED]),
             ((100, 100), [(60, 20, 95, 70)], [GREEN]),              # flipped as a partner: x 5-40
             ((160, 80), [(10, 10, 60, 70), (100, 5, 150, 75)], [BLUE, YELLOW])]
    records = [DetRecord(_write(tmp_path, str(i), photo(w, h, b, c)), "b", 0, "train", np.array(b, np.float32), (w, h))
               for i, ((w, h), b, c) in enumerate(specs)]
    n = 3
    plan = MosaicPlan(use=np.array([True, False, True]), four=np.array([True, True, False]),
                      across=np.array([True, True, True]), split=np.full((n, 2), 0.5),
                      partners=np.array([[1, 2, 1], [0, 0, 0], [0, 1, 1]]), slot=np.array([1, 0, 0]),
                      partner_flips=np.array([[True, False, False]] * n), scale=np.zeros((n, 4)),
                      offset=np.full((n, 4, 2), 0.5))
    dataset = DetectionDataset(records, flips=np.array([False, True, False]), mosaic=plan)
    image, target = dataset[0]
    assert tuple(image.shape) == (3, 100, 120)  # the canvas is the own photo's size
    canvas = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    boxes = target["boxes"].numpy()
    # 2x2, own photo in slot 1; tiles 0, 1, 2, 3 hold partner 1 (flipped), photo 0, partner 2, partner 1 again
    expected = [GREEN, RED, BLUE, YELLOW, GREEN]
    assert len(boxes) == len(expected) and target["labels"].tolist() == [1] * len(expected)
    for box, colour in zip(boxes, expected):
        assert is_colour(colour_inside(canvas, box, inset=1), colour), (box, colour)
    green_tile0 = boxes[0]
    assert green_tile0[0] < 30  # the flipped partner's dog is on the left of its tile (x 5-40 of 100, at 0.5)
    # a position the plan leaves alone is the ordinary (here flipped) photo
    plain, plain_target = dataset[1]
    assert tuple(plain.shape) == (3, 100, 100)
    np.testing.assert_allclose(plain_target["boxes"].numpy(), [[5, 20, 40, 70]])
    # two side by side: the own photo (slot 0) on the left half
    _, side = dataset[2]
    assert len(side["boxes"]) == 3 and float(side["boxes"][:, 2].max()) <= 160


def test_the_plan_is_seeded_closes_at_the_end_and_leaves_the_order_alone():
    cfg = DetectorConfig(mosaic=0.5, close_mosaic=1, epochs=4, batch_size=4)
    a, b = mosaic_plan(cfg, 400, 1), mosaic_plan(cfg, 400, 1)
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    assert not np.array_equal(a.use, mosaic_plan(cfg, 400, 2).use)
    assert 0.4 < a.use.mean() < 0.6 and a.partners.max() < 400 and 0.3 <= a.split.min() and a.split.max() <= 0.7
    assert mosaic_plan(cfg, 400, 3) is None                      # the last epoch: ordinary photos
    assert mosaic_plan(DetectorConfig(mosaic=0.0), 400, 0) is None
    assert mosaic_plan(DetectorConfig(mosaic=1.0, epochs=4), 50, 0).use.all()
    plain_batches, plain_flips = epoch_plan(DetectorConfig(batch_size=4), 400, 1)
    batches, flips = epoch_plan(cfg, 400, 1)
    assert batches == plain_batches and np.array_equal(flips, plain_flips)


@pytest.mark.parametrize("field, value, message", [("mosaic", 1.5, "mosaic must be a probability .* got 1.5"),
                                                   ("mosaic", -0.1, "got -0.1"),
                                                   ("close_mosaic", -1, "close_mosaic .* got -1")])
def test_bad_mosaic_settings_are_refused_by_name(tmp_path, field, value, message):
    cfg = DetectorConfig(data=str(tmp_path / "no-data"), out=str(tmp_path / "run"), **{field: value})
    with pytest.raises(DogbreedsError, match=message):
        train_detector(cfg, progress=False)  # before any data is read
    with pytest.raises(DogbreedsError, match=message):
        mosaic_plan(cfg, 10, 0)


def test_the_cli_takes_mosaic_and_refuses_a_bad_one(capsys):
    from dogbreeds.detect import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    base = ["detect", "train", "--data", "d", "--backbone", "mobilenetv2_100", "--out", "o", "--quick"]
    cfg = cli.config_from_args(parser.parse_args(base + ["--mosaic", "0.5", "--close-mosaic", "1"]))
    assert (cfg.mosaic, cfg.close_mosaic, cfg.epochs) == (0.5, 1, quick_config().epochs)
    assert cli.config_from_args(parser.parse_args(base)).mosaic == quick_config().mosaic
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--mosaic", "2"])
    err = capsys.readouterr().err
    assert "--mosaic" in err and "between 0 and 1" in err and "got 2" in err


def test_a_config_from_before_mosaics_loads_and_resumes_without_them():
    from dogbreeds.detect.train import _config_mismatches

    old = {k: v for k, v in quick_config().to_dict().items() if k not in ("mosaic", "close_mosaic")}
    cfg = DetectorConfig.from_dict(old)
    assert (cfg.mosaic, cfg.close_mosaic) == (0.0, 0)
    assert _config_mismatches(old, quick_config(mosaic=0.0)) == []
    assert any("mosaic: saved 0.0, now 0.5" in m for m in _config_mismatches(old, quick_config(mosaic=0.5)))
