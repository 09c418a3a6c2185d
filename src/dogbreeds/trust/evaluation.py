"""What `dogbreeds evaluate` reports about a run's calibration: `trust_metrics(run, probs, labels)`.

The evaluate path has probabilities (softmax of the logits); softmax(log(p) / T) equals
softmax(logits / T), so temperature scaling (and the top-label step after it) applies to them exactly.
"""
from __future__ import annotations

import numpy as np

from .calibration import Calibration
from .scores import set_metrics

ECE_BINS = 15


def calibrated(calibration: Calibration, probs: np.ndarray) -> np.ndarray:
    """The run's calibrated probabilities (temperature, then its top-label isotonic step if any)."""
    return calibration.calibrated_probs(np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-30, None)))


def trust_metrics(run, probs: np.ndarray, labels: np.ndarray, reliability_path=None, title: str = "") -> dict | None:
    """ECE before / after temperature scaling, conformal coverage and mean set size, for a
    split's probabilities; None when the run has no calibration. With `reliability_path`, the
    calibrated reliability diagram is drawn there (evaluate draws the uncalibrated one)."""
    from ..evaluate import metrics

    calibration = Calibration.load(run)
    if calibration is None:
        return None
    labels = np.asarray(labels)
    after = calibrated(calibration, probs)
    sets = calibration.breed_sets(after)
    result = {
        "temperature": calibration.temperature, "method": calibration.method,
        "choice": calibration.info.get("top_label"),
        "ece_before": metrics.expected_calibration_error(probs, labels, ECE_BINS),
        "ece_after": metrics.expected_calibration_error(after, labels, ECE_BINS),
        "top1_unchanged": bool((after.argmax(1) == np.asarray(probs).argmax(1)).all()),
        "coverage_target": calibration.coverage, "set_method": calibration.set_method,
        **set_metrics(sets, labels),
    }
    if reliability_path is not None:
        from ..evaluate import figures

        figures.plot_reliability(metrics.calibration_bins(after, labels, ECE_BINS), reliability_path,
                                 ece=result["ece_after"], title=f"{title} after {_method_words(calibration)}")
        result["reliability_figure"] = str(reliability_path)
    return result


def _method_words(calibration: Calibration) -> str:
    words = f"temperature scaling (T={calibration.temperature:.2f})"
    return words + (" + top-label isotonic" if calibration.top_label_x is not None else "")
