"""Behaviour of the trust scores on synthetic data whose truth is known."""
from __future__ import annotations

import numpy as np
import pytest

from dogbreeds.errors import DogbreedsError
from dogbreeds.trust.scores import (auroc, check_fraction, conformal_quantile, conformal_scores, fit_temperature,
                                    fpr_at_tpr, knn_distance, nll, normalise, prediction_sets, softmax)


def _sample(rng, n, classes=10, sharpness=3.0):
    """Labels drawn from softmax(true_logits): the true logits are calibrated by construction."""
    logits = rng.normal(size=(n, classes)) * 2.0
    probs = softmax(logits).astype(np.float64)
    labels = np.array([rng.choice(classes, p=p / p.sum()) for p in probs])
    return logits * sharpness, labels  # an over-confident model: true logits x 3


def test_temperature_lowers_held_out_nll_and_keeps_argmax():
    rng = np.random.default_rng(0)
    fit_logits, fit_labels = _sample(rng, 2000)
    test_logits, test_labels = _sample(rng, 2000)
    t = fit_temperature(fit_logits, fit_labels)
    assert 2.4 < t < 3.6  # the over-confidence factor is 3
    assert nll(test_logits, test_labels, t) < nll(test_logits, test_labels) - 0.1
    assert (softmax(test_logits, t).argmax(1) == test_logits.argmax(1)).all()


def test_temperature_finds_the_minimum():
    rng = np.random.default_rng(1)
    logits, labels = _sample(rng, 500, sharpness=0.5)  # under-confident: T < 1
    t = fit_temperature(logits, labels)
    assert t < 1
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 400))
    assert nll(logits, labels, t) <= min(nll(logits, labels, g) for g in grid) + 1e-9


@pytest.mark.parametrize("lam,k_reg", [(0.0, 0), (0.05, 2)])
def test_conformal_coverage_on_exchangeable_data(lam, k_reg):
    rng = np.random.default_rng(2)
    coverages = []
    for _ in range(5):
        cal_logits, cal_labels = _sample(rng, 500, sharpness=1.0)
        test_logits, test_labels = _sample(rng, 2000, sharpness=1.0)
        qhat = conformal_quantile(conformal_scores(softmax(cal_logits), cal_labels, lam, k_reg), 0.9)
        sets = prediction_sets(softmax(test_logits), qhat, lam, k_reg)
        coverages.append(np.mean([label in s for label, s in zip(test_labels, sets)]))
        assert all(len(s) >= 1 for s in sets)
    assert 0.88 <= np.mean(coverages) <= 0.93


def test_sets_grow_with_coverage_and_hold_the_most_probable_breeds():
    rng = np.random.default_rng(3)
    logits, labels = _sample(rng, 300, sharpness=1.0)
    probs = softmax(logits)
    scores = conformal_scores(probs, labels)
    small = prediction_sets(probs, conformal_quantile(scores, 0.5))
    large = prediction_sets(probs, conformal_quantile(scores, 0.95))
    assert sum(map(len, large)) > sum(map(len, small))
    for row, s in zip(probs, large):
        assert s == list(np.argsort(-row, kind="stable")[:len(s)])


def test_conformal_quantile_is_infinite_when_too_few_photos():
    assert conformal_quantile(np.array([0.1, 0.2, 0.3]), 0.9) == float("inf")


def test_knn_distance_matches_brute_force():
    rng = np.random.default_rng(4)
    bank, query = normalise(rng.normal(size=(50, 8))), rng.normal(size=(7, 8))
    sims = normalise(query) @ bank.T
    for k in (1, 3, 10):
        expected = (1 - np.sort(sims, axis=1)[:, -k]) / 2
        np.testing.assert_allclose(knn_distance(query, bank, k), expected, atol=1e-6)
    # a bank row scored against the bank with exclude_self skips its own match
    own = knn_distance(bank[:5], bank, 1, exclude_self=True)
    assert (own > 1e-4).all()
    assert np.allclose(knn_distance(bank[:5], bank, 1), 0, atol=1e-6)


def test_auroc_and_fpr():
    assert auroc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert auroc(np.array([0.3, 0.4]), np.array([0.1, 0.2])) == 0.0
    assert auroc(np.array([0.5, 0.5]), np.array([0.5])) == 0.5
    neg = np.linspace(0, 1, 101)
    assert fpr_at_tpr(neg, np.array([0.5, 0.9, 0.99, 2.0])) == pytest.approx(2 / 4)  # threshold 0.95


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, float("nan"), "abc"])
def test_fractions_outside_zero_one_are_errors_naming_the_value(bad):
    with pytest.raises(DogbreedsError, match="coverage") as info:
        check_fraction("coverage", bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("argv,text", [
    (["calibrate", "RUN", "--data", "D", "--coverage", "1.5"], "1.5"),
    (["calibrate", "RUN", "--data", "D", "--keep", "0"], "0"),
    (["predict", "RUN", "x.jpg", "--ood-threshold", "-0.2"], "-0.2"),
    (["predict", "RUN", "x.jpg", "--coverage", "1"], "1"),
    (["serve", "RUN", "--ood-threshold", "1.5"], "1.5"),
    (["serve", "RUN", "--coverage", "0"], "0"),
])
def test_cli_refuses_values_outside_zero_one_naming_them(argv, text, capsys):
    from dogbreeds.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert "strictly between 0 and 1" in err and repr(text) in err


# --- LAC sets (may be empty): coverage near the target even when top-1 alone beats it ---

def _accurate(rng, n, classes=10):
    """Calibrated probabilities of a model whose top-1 is right about 90% of the time."""
    probs = softmax(rng.normal(size=(n, classes)) * 10.0).astype(np.float64)
    labels = np.array([rng.choice(classes, p=p / p.sum()) for p in probs])
    return probs, labels


def test_lac_sets_cover_near_the_target_where_never_empty_sets_cannot():
    rng = np.random.default_rng(5)
    lac, raps, empty = [], [], []
    for _ in range(5):
        cal_probs, cal_labels = _accurate(rng, 500)
        test_probs, test_labels = _accurate(rng, 2000)
        for method, out in (("lac", lac), ("raps", raps)):
            qhat = conformal_quantile(conformal_scores(cal_probs, cal_labels, method=method), 0.8)
            sets = prediction_sets(test_probs, qhat, method=method)
            out.append(np.mean([label in s for label, s in zip(test_labels, sets)]))
            if method == "lac":
                empty.append(np.mean([not s for s in sets]))
                threshold = 1.0 - qhat
                for row, s in zip(test_probs, sets):  # exactly the breeds at least that likely, most probable first
                    assert s == [int(i) for i in np.argsort(-row, kind="stable") if row[i] >= threshold - 1e-12]
    accuracy = np.mean(test_probs.argmax(1) == test_labels)
    assert np.mean(raps) >= accuracy - 0.02 > 0.82  # never empty: at least the top-1 accuracy, far over 80%
    assert 0.78 <= np.mean(lac) <= 0.83
    assert np.mean(empty) > 0.05


def test_lac_takes_every_breed_when_the_quantile_is_infinite_and_bad_methods_are_errors():
    probs = softmax(np.random.default_rng(6).normal(size=(4, 7)))
    assert all(sorted(s) == list(range(7)) for s in prediction_sets(probs, float("inf"), method="lac"))
    with pytest.raises(DogbreedsError, match="'aps'"):
        prediction_sets(probs, 0.5, method="aps")
    with pytest.raises(DogbreedsError, match="'aps'"):
        conformal_scores(probs, np.zeros(4, int), method="aps")


def test_set_metrics_count_coverage_size_and_empty_sets():
    from dogbreeds.trust.scores import set_metrics

    got = set_metrics([[1, 2], [], [0]], np.array([2, 1, 3]))
    assert got == {"coverage": pytest.approx(1 / 3), "mean_set_size": 1.0, "empty_sets": pytest.approx(1 / 3)}
    assert all(np.isnan(v) for v in set_metrics([], np.array([])).values())
