"""The count rule (`infer.count_keep`): duplicate boxes on one dog are not counted twice, two dogs
side by side stay two; `detect evaluate`, training and `Detector.detect` (both runtimes) share it."""
from pathlib import Path

import numpy as np
import pytest

from dogbreeds.detect.evaluate import best_counting, count_scores, evaluate_detector, score_detections
from dogbreeds.detect.infer import Detector, count_keep, detector_metadata, read_detector_metadata
from dogbreeds.errors import DogbreedsError
from _detect_fakes import FixedBoxes

DOG = [10, 10, 110, 110]
INSIDE = [20, 30, 90, 105]        # a duplicate box inside DOG (covers 100 % of itself, IoU 0.53)
NEXT_TO = [230, 10, 330, 110]     # a second dog beside the first (no overlap)
TOUCHING = [100, 10, 200, 110]    # a second dog overlapping the first a little (IoU 0.05)


def _rgb() -> np.ndarray:
    return np.zeros((120, 400, 3), np.uint8)


def test_a_contained_duplicate_is_dropped_and_two_side_by_side_dogs_are_kept():
    boxes = np.array([DOG, INSIDE, NEXT_TO, TOUCHING], np.float32)
    scores = np.array([0.95, 0.9, 0.7, 0.65], np.float32)
    # rule off: every box over the threshold counts
    assert list(count_keep(boxes, scores, 0.6)) == [0, 1, 2, 3]
    # containment 0.8: INSIDE lies within DOG (kept, better score); NEXT_TO and TOUCHING are other dogs
    assert list(count_keep(boxes, scores, 0.6, 1.0, 0.8)) == [0, 2, 3]
    # NMS at 0.45 alone also catches INSIDE (IoU 0.53 with DOG) but keeps the neighbours
    assert list(count_keep(boxes, scores, 0.6, 0.45, 1.0)) == [0, 2, 3]
    # the threshold still applies first, and the order is best first whatever the input order
    assert list(count_keep(boxes[::-1], scores[::-1], 0.68, 1.0, 0.8)) == [3, 1]


def test_a_better_box_around_two_dogs_suppresses_both_only_when_asked():
    pair = [10, 10, 330, 110]  # one box around DOG and NEXT_TO
    boxes = np.array([pair, DOG, NEXT_TO], np.float32)
    scores = np.array([0.9, 0.85, 0.8], np.float32)
    assert list(count_keep(boxes, scores, 0.5, 1.0, 0.8)) == [0]        # each dog lies inside the pair box
    assert list(count_keep(boxes, scores, 0.5, 0.45, 1.0)) == [0, 1, 2]  # IoU 0.31 each: NMS keeps them


def test_detector_detect_counts_with_the_rule_of_its_config():
    runner = FixedBoxes([DOG, INSIDE, NEXT_TO], [0.95, 0.9, 0.7])
    plain = Detector(runner, {"score_threshold": 0.6})
    assert len(plain.detect(_rgb())) == 3  # a run without the rule: as before
    ruled = Detector(runner, {"score_threshold": 0.6, "count_nms_iou": 1.0, "count_containment": 0.8})
    found = ruled.detect(_rgb())
    assert [d.box for d in found] == [tuple(map(float, DOG)), tuple(map(float, NEXT_TO))]
    assert [d.score for d in found] == pytest.approx([0.95, 0.7])


def test_an_onnx_export_carries_the_rule():
    """The ONNX detector reads its config from the file's metadata: the rule travels with it, so
    both runtimes drop the same boxes (the graph itself stays the model's)."""
    config = {"backbone": "mobilenetv2_100", "score_threshold": 0.6, "count_nms_iou": 0.45, "count_containment": 0.8}
    stored = read_detector_metadata(detector_metadata(config), Path("det.onnx"))
    threshold = stored.pop("__score_threshold__")
    runner = FixedBoxes([DOG, INSIDE, NEXT_TO], [0.95, 0.9, 0.7])
    from_file = Detector(runner, stored, threshold)
    in_memory = Detector(runner, config)
    assert from_file.detect(_rgb()) == in_memory.detect(_rgb()) and len(in_memory.detect(_rgb())) == 2


def _photos():
    """Validation-like photos: one dog with a high-scoring duplicate inside it, and two dogs the
    second of which scores under the duplicate. No threshold alone counts both photos right."""
    gts = [np.array([DOG], np.float32), np.array([DOG, NEXT_TO], np.float32)]
    preds = [{"boxes": np.array([DOG, INSIDE], np.float32), "scores": np.array([0.97, 0.9], np.float32)},
             {"boxes": np.array([DOG, NEXT_TO], np.float32), "scores": np.array([0.96, 0.6], np.float32)}]
    return preds, gts


def test_the_threshold_and_rule_are_chosen_together():
    preds, gts = _photos()
    best_plain = max(count_scores(preds, gts, t)["exact_count"] for t in np.arange(0.3, 0.96, 0.05))
    assert best_plain == 0.5
    threshold, nms_iou, containment = best_counting(preds, gts)
    assert threshold <= 0.6 and (nms_iou < 0.53 or containment < 1.0)
    scores = score_detections(preds, gts)  # no threshold given: chosen here, rule included
    assert scores["exact_count"] == 1.0 and scores["exact_count_multi"] == 1.0
    assert (scores["count_threshold"], scores["count_nms_iou"], scores["count_containment"]) == (
        threshold, nms_iou, containment)
    # given a threshold and no rule: the rule is off (a run trained before it)
    assert score_detections(preds, gts, 0.5)["exact_count"] == 0.5


@pytest.mark.parametrize("split", ["test", "train"])
def test_choose_count_only_on_validation(split, tmp_path):
    with pytest.raises(DogbreedsError, match="--split val"):
        evaluate_detector(tmp_path, tmp_path, split, choose_count=True)
