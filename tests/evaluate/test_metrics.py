"""Metrics against hand-computed cases, and against scikit-learn as the oracle where it is installed."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dogbreeds.evaluate import metrics


def one_hot_probs(predictions, num_classes):
    probs = np.full((len(predictions), num_classes), 0.0)
    probs[np.arange(len(predictions)), predictions] = 1.0
    return probs


def test_perfect_predictions():
    labels = np.array([0, 1, 2, 2])
    probs = one_hot_probs(labels, 3)
    assert metrics.top_k_accuracy(probs, labels, 1) == 1.0
    assert metrics.mean_nll(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.0)
    scores = metrics.per_class_scores(metrics.confusion_matrix(labels, labels, 3))
    np.testing.assert_allclose(scores.precision, 1.0)
    np.testing.assert_allclose(scores.recall, 1.0)
    np.testing.assert_allclose(scores.f1, 1.0)
    np.testing.assert_array_equal(scores.support, [1, 1, 2])


def test_all_wrong_predictions():
    labels = np.array([0, 1, 2])
    predictions = np.array([1, 2, 0])
    probs = one_hot_probs(predictions, 3)
    assert metrics.top_k_accuracy(probs, labels, 1) == 0.0
    # Fully confident and always wrong: the worst possible calibration.
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(1.0)
    assert metrics.mean_nll(probs, labels) == pytest.approx(-math.log(1e-12))
    scores = metrics.per_class_scores(metrics.confusion_matrix(labels, predictions, 3))
    np.testing.assert_allclose(scores.precision, 0.0)
    np.testing.assert_allclose(scores.f1, 0.0)


def test_top5_edge_cases():
    # Fewer classes than k: every row is correct.
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert metrics.top_k_accuracy(probs, np.array([2, 0]), 5) == 1.0
    # Six classes, true class ranked exactly 5th (in) and 6th (out).
    row = np.array([0.30, 0.25, 0.20, 0.12, 0.08, 0.05])
    probs = np.stack([row, row])
    assert metrics.top_k_accuracy(probs, np.array([4, 5]), 5) == 0.5
    assert metrics.top_k_accuracy(probs, np.array([4, 5]), 1) == 0.0
    # Ties: broken towards the lower index, so with all-equal scores top-1 is class 0.
    flat = np.full((2, 6), 1 / 6)
    assert metrics.top_k_accuracy(flat, np.array([0, 5]), 1) == 0.5
    assert metrics.top_k_accuracy(flat, np.array([0, 5]), 5) == 0.5
    with pytest.raises(ValueError, match="k must be"):
        metrics.top_k_accuracy(flat, np.array([0, 1]), 0)


def test_ece_known_example():
    # 4 images with confidence 0.9 (3 correct) and 2 with confidence 0.6 (both wrong).
    # Bin of 0.9: |0.75 - 0.9| = 0.15, weight 4/6; bin of 0.6: |0 - 0.6| = 0.6, weight 2/6.
    probs = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 2)
    labels = np.array([0, 0, 0, 1, 1, 1])
    expected = 4 / 6 * 0.15 + 2 / 6 * 0.6
    assert metrics.expected_calibration_error(probs, labels, n_bins=15) == pytest.approx(expected)
    bins = metrics.calibration_bins(probs, labels, n_bins=15)
    assert bins.count.sum() == 6
    assert bins.count[13] == 4  # 0.9 lies in (13/15, 14/15]
    assert bins.count[8] == 2   # 0.6 lies in (8/15, 9/15]
    # A confidence exactly on an edge goes to the lower bin: (lo, hi].
    edge = np.array([[1 / 3, 1 / 3, 1 / 3]])
    assert metrics.calibration_bins(edge, np.array([0]), n_bins=15).count[4] == 1


def test_confusion_matrix_orientation():
    # Two images of class 0 predicted as class 2: the count sits at [true=0, predicted=2].
    matrix = metrics.confusion_matrix(np.array([0, 0, 1]), np.array([2, 2, 1]), 3)
    assert matrix[0, 2] == 2 and matrix[2, 0] == 0
    assert matrix[1, 1] == 1
    scores = metrics.per_class_scores(matrix)
    # Class 2 predicted twice, never right -> precision 0; class 0 never found -> recall 0.
    assert scores.precision[2] == 0.0 and scores.recall[0] == 0.0
    np.testing.assert_array_equal(scores.support, [2, 1, 0])


def test_input_validation_names_the_problem():
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        metrics.top_k_accuracy(np.full((1, 2), 0.5), np.array([3]), 1)
    with pytest.raises(ValueError, match=r"probs must be \(N, C\)"):
        metrics.mean_nll(np.zeros(3), np.array([0, 1, 2]))


def test_summarize_is_consistent():
    rng = np.random.default_rng(0)
    probs = metrics.softmax(rng.normal(size=(50, 7)))
    labels = rng.integers(0, 7, size=50)
    summary = metrics.summarize(probs, labels)
    # Checked against plain numpy, not against the functions summarize itself calls.
    predictions = probs.argmax(axis=1)
    assert summary["top1"] == pytest.approx(np.mean(predictions == labels))
    assert summary["loss"] == pytest.approx(-np.mean(np.log(probs[np.arange(50), labels])))
    matrix = np.asarray(summary["confusion_matrix"])
    np.testing.assert_array_equal(matrix.sum(axis=1), np.bincount(labels, minlength=7))
    np.testing.assert_array_equal(matrix.sum(axis=0), np.bincount(predictions, minlength=7))
    assert np.trace(matrix) == np.sum(predictions == labels)
    f1 = []
    for c in np.unique(labels):  # macro F1 over the classes present in the labels
        hits = np.sum((predictions == c) & (labels == c))
        precision = hits / max(1, np.sum(predictions == c))
        recall = hits / np.sum(labels == c)
        f1.append(0.0 if hits == 0 else 2 * precision * recall / (precision + recall))
    assert summary["macro_f1"] == pytest.approx(np.mean(f1))
    assert 0.0 <= summary["ece"] <= 1.0


def test_against_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(42)
    num_classes = 20
    logits = rng.normal(size=(300, num_classes)) * 2
    labels = rng.integers(0, num_classes, size=300)
    logits[np.arange(150), labels[:150]] += 3  # make it better than chance so every ratio is non-trivial
    probs = metrics.softmax(logits)
    predictions = probs.argmax(axis=1)
    all_classes = list(range(num_classes))

    assert metrics.top_k_accuracy(probs, labels, 1) == pytest.approx(sk.accuracy_score(labels, predictions))
    assert metrics.top_k_accuracy(probs, labels, 5) == pytest.approx(
        sk.top_k_accuracy_score(labels, probs, k=5, labels=all_classes))
    assert metrics.mean_nll(probs, labels) == pytest.approx(sk.log_loss(labels, probs, labels=all_classes))
    matrix = metrics.confusion_matrix(labels, predictions, num_classes)
    np.testing.assert_array_equal(matrix, sk.confusion_matrix(labels, predictions, labels=all_classes))
    precision, recall, f1, support = sk.precision_recall_fscore_support(
        labels, predictions, labels=all_classes, zero_division=0)
    scores = metrics.per_class_scores(matrix)
    np.testing.assert_allclose(scores.precision, precision)
    np.testing.assert_allclose(scores.recall, recall)
    np.testing.assert_allclose(scores.f1, f1)
    np.testing.assert_array_equal(scores.support, support)


def test_calibration_bins_against_sklearn_calibration_curve():
    # The max-probability reliability curve is sklearn's calibration_curve of
    # "was the top-1 prediction right" against "confidence".
    calibration = pytest.importorskip("sklearn.calibration")
    rng = np.random.default_rng(1)
    probs = metrics.softmax(rng.normal(size=(400, 5)) * 1.5)
    labels = rng.integers(0, 5, size=400)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(int)
    frac_pos, mean_pred = calibration.calibration_curve(correct, confidence, n_bins=15, strategy="uniform")
    bins = metrics.calibration_bins(probs, labels, n_bins=15)
    nonempty = bins.count > 0
    # sklearn's bins are [lo, hi) while ours are (lo, hi]; random floats never sit on an edge.
    np.testing.assert_allclose(bins.accuracy[nonempty], frac_pos)
    np.testing.assert_allclose(bins.confidence[nonempty], mean_pred)
