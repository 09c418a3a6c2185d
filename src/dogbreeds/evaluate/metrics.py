"""Classification metrics as pure numpy functions (no torch), so they are easy to test by hand.

Conventions used everywhere in this module:
- `probs` is an (N, C) array of class probabilities (rows sum to 1), `labels` an (N,) array of
  true class indices in 0..C-1.
- Confusion matrix rows are the TRUE class, columns the PREDICTED class (scikit-learn's
  orientation), so row i sums to the support of class i.
- A per-class ratio whose denominator is 0 (a class never predicted, or absent from the split)
  is reported as 0.0, like scikit-learn's zero_division=0. The support tells which case it is.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must be (N,) with N={probs.shape[0]}, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must lie in 0..{probs.shape[1] - 1}, got {labels.min()}..{labels.max()}")
    return probs, labels.astype(np.int64)


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)  # avoids overflow in exp
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose true class is among the k highest probabilities.

    Ties are broken towards the lower class index (stable sort), so the result is deterministic.
    With k >= C every row counts as correct (top-5 of a 3-class problem is 1.0).
    """
    probs, labels = _check(probs, labels)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if labels.size == 0:
        return float("nan")
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def mean_nll(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class.

    Computed from probabilities (not logits) so it stays meaningful when test-time augmentation
    averages probabilities; without TTA it equals the cross-entropy loss used in training.
    `eps` keeps a confident wrong answer finite (-log(1e-12) ~ 27.6).
    """
    probs, labels = _check(probs, labels)
    if labels.size == 0:
        return float("nan")
    picked = probs[np.arange(labels.size), labels]
    return float(np.mean(-np.log(np.clip(picked, eps, 1.0))))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: [true class, predicted class]."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


@dataclass(frozen=True)
class PerClass:
    precision: np.ndarray  # (C,)
    recall: np.ndarray     # (C,)
    f1: np.ndarray         # (C,)
    support: np.ndarray    # (C,) number of true examples per class


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def per_class_scores(matrix: np.ndarray) -> PerClass:
    """Precision, recall, F1 and support per class from a confusion matrix [true, predicted]."""
    matrix = np.asarray(matrix, dtype=np.float64)
    true_positive = np.diag(matrix)
    predicted = matrix.sum(axis=0)  # column sums: how often each class was predicted
    support = matrix.sum(axis=1)    # row sums: how often each class was the truth
    precision = _safe_divide(true_positive, predicted)
    recall = _safe_divide(true_positive, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    return PerClass(precision, recall, f1, support.astype(np.int64))


@dataclass(frozen=True)
class CalibrationBins:
    """Equal-width confidence bins over [0, 1]; bin i holds confidences in (edges[i], edges[i+1]]."""

    edges: np.ndarray       # (B+1,)
    count: np.ndarray       # (B,) images per bin
    accuracy: np.ndarray    # (B,) fraction correct per bin (0 where empty)
    confidence: np.ndarray  # (B,) mean max-probability per bin (0 where empty)

    def to_jsonable(self) -> dict:
        return {key: getattr(self, key).tolist() for key in ("edges", "count", "accuracy", "confidence")}


def calibration_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> CalibrationBins:
    probs, labels = _check(probs, labels)
    confidence = probs.max(axis=1)
    # argmax picks the lowest index on ties, the same tie rule as top_k_accuracy.
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" on the inner edges puts a confidence equal to an edge in the lower bin,
    # i.e. bins are (lo, hi], the convention of Guo et al. (2017).
    which = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(which, minlength=n_bins).astype(np.int64)
    accuracy = _safe_divide(np.bincount(which, weights=correct, minlength=n_bins), count)
    mean_conf = _safe_divide(np.bincount(which, weights=confidence, minlength=n_bins), count)
    return CalibrationBins(edges, count, accuracy, mean_conf)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE = sum over bins of (images in bin / N) * |accuracy(bin) - mean confidence(bin)|."""
    bins = calibration_bins(probs, labels, n_bins)
    total = bins.count.sum()
    if total == 0:
        return float("nan")
    return float(np.sum(bins.count / total * np.abs(bins.accuracy - bins.confidence)))


def summarize(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict:
    """Every headline metric for one split, as plain Python values (JSON-ready)."""
    probs, labels = _check(probs, labels)
    num_classes = probs.shape[1]
    matrix = confusion_matrix(labels, probs.argmax(axis=1), num_classes)
    scores = per_class_scores(matrix)
    present = scores.support > 0  # macro averages over classes that occur in this split
    return {
        "top1": top_k_accuracy(probs, labels, 1),
        "top5": top_k_accuracy(probs, labels, 5),
        "loss": mean_nll(probs, labels),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "macro_f1": float(scores.f1[present].mean()) if present.any() else float("nan"),
        "confusion_matrix": matrix.tolist(),
        "scores": scores,
        "calibration": calibration_bins(probs, labels, n_bins),
    }
