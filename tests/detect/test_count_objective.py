"""--count-objective multi: the count rule that counts the most multi-dog photos right while keeping
MULTI_COUNT_FLOOR of all photos right, on detections whose truth is known."""
from __future__ import annotations

import numpy as np
import pytest

from dogbreeds.detect.evaluate import MULTI_COUNT_FLOOR, best_counting, count_objective_key, count_scores
from dogbreeds.errors import DogbreedsError

DOG, SECOND, FALSE = [0, 0, 10, 10], [50, 50, 60, 60], [80, 80, 90, 90]


def _photos(single: int, false_dets: int, multi: int):
    """`single` one-dog photos (the dog at 0.9; `false_dets` of them also have a spurious box at 0.32) and
    `multi` two-dog photos whose second dog scores only 0.32: a low threshold finds the second dogs and the
    spurious boxes alike."""
    predictions, truth = [], []
    for i in range(single):
        boxes, scores = [DOG], [0.9]
        if i < false_dets:
            boxes, scores = boxes + [FALSE], scores + [0.32]
        predictions.append({"boxes": np.array(boxes, np.float32), "scores": np.array(scores, np.float32)})
        truth.append(np.array([DOG], np.float32))
    for _ in range(multi):
        predictions.append({"boxes": np.array([DOG, SECOND], np.float32), "scores": np.array([0.9, 0.32], np.float32)})
        truth.append(np.array([DOG, SECOND], np.float32))
    return predictions, truth


def test_multi_trades_single_dog_photos_for_multi_dog_ones_above_the_floor():
    predictions, truth = _photos(single=100, false_dets=8, multi=6)
    exact_rule = best_counting(predictions, truth)
    multi_rule = best_counting(predictions, truth, objective="multi")
    exact, multi = count_scores(predictions, truth, *exact_rule), count_scores(predictions, truth, *multi_rule)
    assert exact_rule[0] > 0.32 >= multi_rule[0]
    assert exact["exact_count"] == pytest.approx(100 / 106) and exact["exact_count_multi"] == 0.0
    assert multi["exact_count"] == pytest.approx(98 / 106) and 98 / 106 >= MULTI_COUNT_FLOOR
    assert multi["exact_count_multi"] == 1.0


def test_multi_keeps_the_exact_order_when_no_rule_reaches_the_floor():
    predictions, truth = _photos(single=20, false_dets=8, multi=6)  # the low threshold: 18 / 26 < 0.88
    assert best_counting(predictions, truth, objective="multi") == best_counting(predictions, truth)
    assert count_objective_key({"exact_count": 0.5, "exact_count_multi": 0.9}, "multi") < \
        count_objective_key({"exact_count": 0.6, "exact_count_multi": 0.1}, "multi")
    with pytest.raises(DogbreedsError, match="'most'"):
        count_objective_key({"exact_count": 0.5, "exact_count_multi": 0.5}, "most")


def test_evaluate_refuses_a_count_objective_without_choosing(tmp_path):
    from dogbreeds.detect.evaluate import evaluate_detector

    with pytest.raises(DogbreedsError, match="--choose-count"):
        evaluate_detector(tmp_path / "missing", tmp_path, split="val", count_objective="multi")
