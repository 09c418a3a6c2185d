"""Repeat-factor sampling of multi-dog photos, the crop each dog gets before the breed run, and the
settings chosen on the validation photos (model NMS, crop) that travel in the run's checkpoint."""
from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest

from dogbreeds.detect import evaluate as evaluate_module
from dogbreeds.detect.data import DetRecord
from dogbreeds.detect.evaluate import choose_counting, choose_crop, save_settings
from dogbreeds.detect.infer import DEFAULT_MARGIN, Detector, crop_box, crop_dog
from dogbreeds.detect.model import DetectorConfig, load_detector, read_detector_meta
from dogbreeds.detect.train import _config_mismatches, epoch_plan, epoch_pool, quick_config, train_detector
from dogbreeds.errors import DogbreedsError
from dogbreeds.rundir import RunDir

from .conftest import tiny_config
from .test_detect_evaluate import _FakePredictor


# --- repeat-factor sampling ---

def test_epoch_pool_repeats_only_the_multi_dog_photos():
    counts = [1, 2, 1, 3, 4, 1]
    assert epoch_pool(DetectorConfig(multi_dog_repeat=1), counts) == list(range(6))
    pool = epoch_pool(DetectorConfig(multi_dog_repeat=3), counts)
    assert Counter(pool) == {0: 1, 1: 3, 2: 1, 3: 3, 4: 3, 5: 1}
    with pytest.raises(DogbreedsError, match="multi_dog_repeat"):
        epoch_pool(DetectorConfig(multi_dog_repeat=0), counts)


def test_epoch_plan_gives_each_repeat_its_own_flip_and_is_seeded():
    cfg = DetectorConfig(multi_dog_repeat=3, batch_size=4, hflip=0.5)
    batches, flips = epoch_plan(cfg, 40, 1)
    again, flips_again = epoch_plan(cfg, 40, 1)
    assert batches == again and np.array_equal(flips, flips_again)
    assert len(flips) == 40 and sorted(i for b in batches for i in b) == list(range(40))
    assert epoch_plan(cfg, 40, 2)[0] != batches


def test_training_sees_each_multi_dog_photo_repeat_times(box_root, tmp_path, monkeypatch):
    from dogbreeds.detect import data as data_module

    seen = []
    original = data_module.DetectionDataset.__getitem__

    def spy(self, index):
        image, target = original(self, index)
        if self.flips is not None:  # training (evaluation passes no flips)
            seen.append((self.records[index].path, len(target["boxes"])))
        return image, target

    monkeypatch.setattr(data_module.DetectionDataset, "__getitem__", spy)
    cfg = tiny_config(box_root, tmp_path / "run", multi_dog_repeat=2, batch_size=1, epochs=1)
    train_detector(cfg, progress=False)
    visits = Counter(path for path, _ in seen)
    multi = {path for path, dogs in seen if dogs >= 2}
    assert multi, "the tiny set has multi-dog photos"
    assert all(visits[p] == 2 for p in multi) and all(visits[p] == 1 for p in visits if p not in multi)
    steps = [line for line in RunDir(tmp_path / "run").read_metrics()]
    assert steps[0]["step"] == len(seen)  # the schedule counts the repeats


def test_a_run_from_before_the_sampler_resumes_only_without_repeats():
    old = {k: v for k, v in quick_config().to_dict().items() if k != "multi_dog_repeat"}
    assert _config_mismatches(old, quick_config(multi_dog_repeat=1)) == []
    assert any("multi_dog_repeat" in m for m in _config_mismatches(old, quick_config(multi_dog_repeat=3)))


def test_quick_repeats_multi_dog_photos_and_trains_every_level_after_the_first():
    import argparse

    from dogbreeds.detect import cli
    from dogbreeds.detect.model import build_detector

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    base = ["detect", "train", "--data", "d", "--backbone", "mobilenetv2_100", "--out", "o", "--quick"]
    cfg = cli.config_from_args(parser.parse_args(base))
    assert (cfg.multi_dog_repeat, cfg.frozen_levels, cfg.min_size, cfg.max_size) == (3, 1, 192, 192)
    told = cli.config_from_args(parser.parse_args(base + ["--multi-dog-repeat", "1", "--frozen-levels", "2",
                                                          "--min-size", "160", "--max-size", "160"]))
    assert (told.multi_dog_repeat, told.frozen_levels, told.min_size, told.max_size) == (1, 2, 160, 160)
    trainable = {}
    for levels in (1, 2):
        body = build_detector("mobilenetv2_100", None, min_size=64, max_size=64,
                              config=quick_config(frozen_levels=levels)).backbone.body
        trainable[levels] = {k for k, p in body.named_parameters() if p.requires_grad}
        assert not body.conv_stem.weight.requires_grad
    # the second feature level (blocks.3-4, stride 16) learns under --quick; fixed with two frozen levels
    assert trainable[2] < trainable[1]
    assert any(k.startswith("blocks.4.") for k in trainable[1] - trainable[2])
    assert not any(k.startswith(("blocks.2.", "blocks.3.", "blocks.4.")) for k in trainable[2])
    assert not any(k.startswith("blocks.2.") for k in trainable[1])


# --- the crop of each dog ---

def test_square_crop_is_centred_moved_inside_and_clipped_when_larger_than_the_photo():
    image = np.arange(100 * 200 * 3, dtype=np.uint8).reshape(100, 200, 3)
    assert np.array_equal(crop_dog(image, (50, 20, 150, 70), 0.1), crop_box(image, (50, 20, 150, 70), 0.1))
    # a 40x20 box in the middle: a 40x40 square around its centre (margin 0), 48x48 with margin 0.1
    assert np.array_equal(crop_dog(image, (80, 40, 120, 60), 0.0, square=True), image[30:70, 80:120])
    assert crop_dog(image, (80, 40, 120, 60), 0.1, square=True).shape == (48, 48, 3)
    # at the left border the square is moved inside the photo, not cut
    assert np.array_equal(crop_dog(image, (0, 40, 40, 60), 0.0, square=True), image[30:70, 0:40])
    assert np.array_equal(crop_dog(image, (190, 0, 200, 60), 0.0, square=True), image[0:60, 140:200])
    # wider than the photo is tall: clipped to its height, still centred across
    assert np.array_equal(crop_dog(image, (20, 10, 180, 90), 0.0, square=True), image[0:100, 20:180])
    assert crop_dog(image, (199.5, 99.5, 199.6, 99.6), 0.0, square=True).shape[:2] == (1, 1)  # never empty


def test_detector_crops_as_its_config_says_and_old_runs_as_before():
    image = np.zeros((100, 200, 3), np.uint8)
    box = (80, 40, 120, 60)
    old = Detector(lambda chw: None, {"backbone": "x"})  # a config from before the crop settings
    assert old.crop_margin == DEFAULT_MARGIN and not old.crop_square
    assert old.crop(image, box).shape == crop_box(image, box, DEFAULT_MARGIN).shape == (24, 48, 3)
    chosen = Detector(lambda chw: None, {"backbone": "x", "crop_margin": 0.25, "crop_square": True, "crop_mirror": True})
    assert chosen.crop(image, box).shape == (60, 60, 3)
    assert chosen.crop_mirror and not old.crop_mirror
    assert chosen.crop(image, box, margin=0.0).shape == (40, 40, 3)  # an explicit margin wins


def _records(tmp_path, breed, boxes):
    from PIL import Image

    photo = tmp_path / f"{breed}.jpg"
    Image.new("RGB", (300, 200)).save(photo)
    return [DetRecord(str(photo), breed, 0, "val", np.array([b], np.float32), (300, 200)) for b in boxes]


@pytest.mark.parametrize("breed, square", [("pug", True), ("collie", False)])
def test_choose_crop_takes_the_shape_with_the_best_breed_accuracy(tmp_path, breed, square):
    # the fake breed run says 'pug' for a crop at least as wide as tall: a tall pug is named right only
    # when cropped as a square, a tall collie only with the box's own shape
    records = _records(tmp_path, breed, [[100, 20, 140, 180], [10, 10, 50, 150]])
    predictions = [{"boxes": r.boxes, "scores": np.array([0.9])} for r in records]
    margin, chosen_square, mirror = choose_crop(_FakePredictor(), records, predictions, 0.5, (1.0, 1.0))
    assert chosen_square is square and mirror is False
    if not square:
        assert margin == 0.1  # every margin ties: the crop used before the choice


def test_choose_crop_takes_the_mirror_only_where_it_names_more_dogs_right(tmp_path):
    from dogbreeds.detect.evaluate import breed_scores

    # the fake breed run names every crop 'beagle' only with the mirror averaging
    records = _records(tmp_path, "beagle", [[100, 20, 140, 180], [10, 10, 50, 150]])
    predictions = [{"boxes": r.boxes, "scores": np.array([0.9])} for r in records]
    assert choose_crop(_FakePredictor(), records, predictions, 0.5, (1.0, 1.0)) == (0.1, False, True)
    scores, _ = breed_scores(_FakePredictor(), records, predictions, 0.5, mirror=True)
    assert scores["breed_accuracy"] == 1.0
    # the breed run's own reference is given both ways: as predict answers a photo, and mirrored as the crops were
    assert scores["breed_run_single_dog_top1"] == 0.0 and scores["breed_run_single_dog_top1_mirror"] == 1.0
    assert "breed_run_single_dog_top1_mirror" not in breed_scores(_FakePredictor(), records, predictions, 0.5)[0]


class _SeesImages:
    """A detector stand-in: one box at x 10-30 on every photo; keeps what it was given."""
    training = False

    def __init__(self):
        self.seen = []

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, images):
        import torch

        self.seen.extend(images)
        return [{"boxes": torch.tensor([[10.0, 0.0, 30.0, 5.0]]), "scores": torch.tensor([0.9])} for _ in images]


def test_predict_records_mirror_runs_the_mirror_image_and_mirrors_the_boxes_back(tmp_path):
    from PIL import Image

    from dogbreeds.detect.evaluate import predict_records

    records = _records(tmp_path, "pug", [[0, 0, 10, 10]])
    pixels = np.zeros((200, 300, 3), np.uint8)
    pixels[:, :100] = 255  # the left third white
    Image.fromarray(pixels).save(records[0].path, quality=95)
    model = _SeesImages()
    plain = predict_records(model, records)
    mirrored = predict_records(model, records, mirror=True)
    np.testing.assert_allclose(plain[0]["boxes"], [[10, 0, 30, 5]])
    np.testing.assert_allclose(mirrored[0]["boxes"], [[270, 0, 290, 5]])  # 300 - 30, 300 - 10
    assert float(model.seen[0][:, :, :50].mean()) > 0.9 and float(model.seen[1][:, :, -50:].mean()) > 0.9


class _Heads:
    nms_thresh = 0.5


class _Model:
    roi_heads = _Heads()


def test_choose_counting_takes_the_model_nms_that_keeps_both_dogs(monkeypatch):
    # two dogs side by side overlapping at IoU ~0.54: the model's NMS at 0.5 keeps only one of them
    gt = np.array([[0, 0, 100, 100], [35, 0, 135, 100]], np.float32)
    records = [DetRecord("p.jpg", "pug", 0, "val", gt, (200, 200))]

    def fake_predict(model, recs):
        boxes = gt if model.roi_heads.nms_thresh > 0.55 else gt[:1]
        return [{"boxes": boxes, "scores": np.array([0.9, 0.8][:len(boxes)], np.float32)}]

    monkeypatch.setattr(evaluate_module, "predict_records", fake_predict)
    model = _Model()
    nms, preds, (threshold, nms_iou, containment), _ = choose_counting(model, records, fake_predict(model, records),
                                                                      0.5, 1.0)
    assert nms == 0.6 and model.roi_heads.nms_thresh == 0.6 and len(preds[0]["boxes"]) == 2
    assert nms_iou > 0.54 and containment > 0.65  # the count rule keeps them too


# --- settings chosen on val travel in the checkpoint ---

def test_saved_settings_reach_the_loaded_model_and_the_detector(tiny_detector_run, tmp_path):
    run_path = tmp_path / "run"
    shutil.copytree(tiny_detector_run, run_path)
    run = RunDir(run_path)
    before = run.checkpoint().read_bytes()
    cfg = save_settings(run, box_nms_thresh=0.6, crop_margin=0.3, crop_square=True)
    assert (cfg.box_nms_thresh, cfg.crop_margin, cfg.crop_square) == (0.6, 0.3, True)
    meta = read_detector_meta(run.checkpoint())
    assert set(meta["extra"]["chosen_on_val"]) == {"box_nms_thresh", "crop_margin", "crop_square"}
    assert "count_rule_chosen_on" not in meta["extra"] or meta["extra"].get("count_rule_chosen_on") == "val"
    model, loaded = load_detector(run_path)
    assert model.roi_heads.nms_thresh == 0.6 and loaded.crop_square
    detector = Detector.from_run_torch(run_path)
    assert (detector.crop_margin, detector.crop_square) == (0.3, True)
    assert run.checkpoint().read_bytes() != before


def test_a_config_from_before_the_new_fields_loads_with_the_old_behaviour():
    old = {k: v for k, v in quick_config().to_dict().items()
           if k not in ("multi_dog_repeat", "crop_margin", "crop_square", "crop_mirror")}
    cfg = DetectorConfig.from_dict(old)
    assert (cfg.multi_dog_repeat, cfg.crop_margin, cfg.crop_square, cfg.crop_mirror) == (1, DEFAULT_MARGIN, False, False)


@pytest.mark.parametrize("split, breeds_run, message", [("test", "runs/b", "--split val"),
                                                        ("val", None, "--breeds-run")])
def test_choose_margin_only_on_validation_and_with_a_breed_run(tmp_path, split, breeds_run, message):
    from dogbreeds.detect.evaluate import evaluate_detector

    with pytest.raises(DogbreedsError, match=message):
        evaluate_detector(tmp_path, tmp_path, split, breeds_run=breeds_run, choose_margin=True)


def test_the_cli_passes_the_new_options(monkeypatch):
    import argparse

    from dogbreeds.detect import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["detect", "train", "--data", "d", "--backbone", "mobilenetv2_100", "--out", "o",
                              "--quick", "--multi-dog-repeat", "2"])
    assert cli.config_from_args(args).multi_dog_repeat == 2
    seen = {}
    monkeypatch.setattr(evaluate_module, "evaluate_detector", lambda *a, **k: seen.update(k) or {"figure": "f"})
    args = parser.parse_args(["detect", "evaluate", "r", "--data", "d", "--split", "val", "--choose-margin",
                              "--breeds-run", "b"])
    assert args.func(args) == 0 and seen["choose_margin"] is True and seen["breeds_run"] == "b"
