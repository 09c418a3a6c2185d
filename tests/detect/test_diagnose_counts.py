"""benchmarks/diagnose_counts.py: each missed dog and each extra box gets the cause it really has."""
import numpy as np

DOGS = np.array([[0, 0, 100, 100], [200, 0, 300, 100], [400, 0, 500, 100]], dtype=float)


def _pred(boxes, scores):
    return {"boxes": np.asarray(boxes, dtype=float), "scores": np.asarray(scores, dtype=float)}


def test_a_right_count_has_no_causes(benchmark_module):
    d = benchmark_module("diagnose_counts")
    row = d.diagnose_photo(_pred(DOGS[:2], [0.9, 0.8]), DOGS[:2], 0.5, (1.0, 1.0))
    assert (row["counted"], row["missed"], row["extra"]) == (2, [], [])


def test_each_missed_dog_gets_its_cause(benchmark_module):
    d = benchmark_module("diagnose_counts")
    boxes = [DOGS[0],                        # dog 0: counted
             [195, 0, 302, 100],             # dog 1: a box on it, under the threshold
             [0, 0, 305, 100]]               # a box around dogs 0 and 1 ... and dog 2 has nothing
    row = d.diagnose_photo(_pred(boxes, [0.9, 0.3, 0.2]), DOGS, 0.5, (1.0, 1.0))
    assert [m["cause"] for m in row["missed"]] == ["below_threshold", "no_box"]
    assert row["missed"][0]["best_score"] == 0.3
    # two dogs side by side (IoU 0.25), each with its own box: a count NMS at 0.2 drops the second
    close = np.array([[0, 0, 100, 100], [60, 0, 160, 100]], dtype=float)
    row = d.diagnose_photo(_pred(close, [0.9, 0.8]), close, 0.5, (0.2, 1.0))
    assert [m["cause"] for m in row["missed"]] == ["dropped_by_rule"]
    assert d.diagnose_photo(_pred(close, [0.9, 0.8]), close, 0.5, (0.3, 1.0))["missed"] == []
    # one counted box around two dogs, nothing else on either
    row = d.diagnose_photo(_pred([[0, 0, 300, 100]], [0.9]), DOGS[:2], 0.5, (1.0, 1.0))
    assert [m["cause"] for m in row["missed"]] == ["merged", "merged"]


def test_each_extra_box_gets_its_cause(benchmark_module):
    d = benchmark_module("diagnose_counts")
    boxes = [DOGS[0], [10, 10, 60, 60],          # a part of dog 0 (inside its box)
             [600, 0, 700, 100],                 # nothing there
             [0, 0, 300, 100]]                   # around dogs 0 and 1 (dog 1 has a box of its own too)
    row = d.diagnose_photo(_pred(boxes + [DOGS[1]], [0.9, 0.8, 0.7, 0.6, 0.55]), DOGS[:2], 0.5, (1.0, 1.0))
    assert row["counted"] == 5
    assert sorted(e["cause"] for e in row["extra"]) == ["duplicate", "elsewhere", "merged_box"]
    summary = d.summarise([row], 0.5)
    assert summary["extra_boxes_by_cause"] == {"duplicate": 1, "elsewhere": 1, "merged_box": 1}
    assert (summary["wrong_multi"], summary["multi_over"], summary["multi_under"]) == (1, 1, 0)


def test_each_dog_of_a_multi_dog_photo_says_where_its_breed_went(benchmark_module):
    d = benchmark_module("diagnose_counts")
    counted = np.array([DOGS[0], [195, 0, 302, 100], [10, 0, 90, 60]], dtype=float)  # dog 2 has no box
    tops = [["a", "b", "c"], ["b", "a", "c"], ["a"]]
    assert d.breed_causes(counted, tops, DOGS, "a") == ["right", "in_top3", "no_box"]
    assert d.breed_causes(counted, tops, DOGS, "c") == ["in_top3", "in_top3", "no_box"]
    assert d.breed_causes(counted, [["b"], ["b"], ["b"]], DOGS, "a") == ["wrong", "wrong", "no_box"]
    # a second box on dog 0 with the right top-1 makes it right; no counted box at all: every dog no_box
    assert d.breed_causes(np.vstack([counted, DOGS[:1]]), tops[:2] + [["b"], ["c"]], DOGS, "c")[0] == "right"
    assert d.breed_causes(np.zeros((0, 4)), [], DOGS, "a") == ["no_box"] * 3
