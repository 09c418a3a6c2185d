"""fit_calibration / Calibration on synthetic features: clusters of 'breeds', other 'dogs' nearby,
and 'cats' elsewhere in feature space."""
from __future__ import annotations

import numpy as np
import pytest

from dogbreeds.errors import DogbreedsError
from dogbreeds.rundir import RunDir
from dogbreeds.trust import UNCALIBRATED_NOTE, Calibration, assess_uncalibrated, fit_calibration

DIM, CLASSES = 32, 5


def _world(seed=0):
    rng = np.random.default_rng(seed)
    dog_axis = np.zeros(DIM)
    dog_axis[0] = 6.0
    centres = dog_axis + rng.normal(size=(CLASSES + 3, DIM)) * np.r_[[0.2] * CLASSES, [1.0] * 3][:, None]  # 5 known, 3 unknown breeds
    cat_centre = -dog_axis + rng.normal(size=DIM)

    def photos(centre_index, n):
        labels = rng.integers(0, CLASSES, n) if centre_index is None else np.full(n, centre_index)
        return centres[labels] + rng.normal(size=(n, DIM)) * 0.5, labels

    weights = centres[:CLASSES].T * 1.0

    def logits(x):
        return x @ weights

    train_x, train_y = photos(None, 400)
    val_x, val_y = photos(None, 300)
    other_x = np.concatenate([photos(CLASSES + i, 40)[0] for i in range(3)])
    cats = cat_centre + rng.normal(size=(100, DIM)) * 0.5
    return dict(train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y, other_x=other_x, cats=cats,
                logits=logits, photos=photos)


@pytest.fixture(scope="module")
def world():
    return _world()


@pytest.fixture(scope="module")
def calibration(world):
    return fit_calibration(world["train_x"], world["val_x"], world["logits"](world["val_x"]), world["val_y"],
                           world["other_x"], coverage=0.9, keep=0.95)


def test_thresholds_keep_at_least_95_percent_of_fitting_dogs(world, calibration):
    answers = calibration.assess(world["logits"](world["val_x"]), world["val_x"])
    assert np.mean([a.verdict == "breed" for a in answers]) >= 0.95
    # and fresh photos of the same breeds too, within sampling error
    fresh_x, _ = world["photos"](None, 1000)
    fresh = calibration.assess(world["logits"](fresh_x), fresh_x)
    assert np.mean([a.verdict == "breed" for a in fresh]) >= 0.9


def test_cats_are_not_dogs_and_unknown_breeds_are_unknown(world, calibration):
    cats = calibration.assess(world["logits"](world["cats"]), world["cats"])
    assert np.mean([a.verdict == "not_a_dog" for a in cats]) >= 0.95
    unknown_x, _ = world["photos"](CLASSES + 1, 100)  # a breed the run does not know; its kind was seen as "other dogs"
    unknown = calibration.assess(world["logits"](unknown_x), unknown_x)
    assert np.mean([a.verdict == "unknown_breed" for a in unknown]) >= 0.8
    assert min(a.ood_score for a in cats) > max(a.ood_score for a in
                                                 calibration.assess(world["logits"](world["val_x"]), world["val_x"])[:50])


def test_temperature_keeps_top1(world, calibration):
    logits = world["logits"](world["val_x"])
    answers = calibration.assess(logits, world["val_x"])
    assert all(int(a.probs.argmax()) == int(row.argmax()) for a, row in zip(answers, logits))
    assert calibration.info["val_nll_after"] <= calibration.info["val_nll_before"]


def test_coverage_changes_the_sets(world, calibration):
    logits = world["logits"](world["val_x"])
    small = calibration.assess(logits, world["val_x"], coverage=0.5)
    large = calibration.assess(logits, world["val_x"], coverage=0.99)
    assert sum(len(a.breed_set) for a in large) > sum(len(a.breed_set) for a in small)


def test_ood_threshold_override(world, calibration):
    logits = world["logits"](world["val_x"])
    strict = calibration.assess(logits, world["val_x"], ood_threshold=1e-6)
    assert all(a.verdict != "breed" for a in strict)
    lenient = calibration.assess(logits, world["val_x"], ood_threshold=0.999999)
    assert all(a.verdict == "breed" for a in lenient)


@pytest.mark.parametrize("name,kwargs", [("ood threshold", {"ood_threshold": 1.2}), ("coverage", {"coverage": 0.0}),
                                         ("coverage", {"coverage": 1})])
def test_bad_values_are_errors_naming_them(world, calibration, name, kwargs):
    with pytest.raises(DogbreedsError, match=name) as info:
        calibration.assess(world["logits"](world["val_x"][:2]), world["val_x"][:2], **kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_stored_in_the_run_and_in_metadata_give_the_same_answers(world, calibration, tmp_path):
    run = RunDir(tmp_path / "run")
    assert Calibration.load(run) is None
    calibration.save(run)
    loaded = Calibration.load(run)
    from_meta = Calibration.from_metadata(calibration.to_metadata())
    x = np.concatenate([world["val_x"][:20], world["cats"][:20]])
    logits = world["logits"](x)
    for other in (loaded, from_meta):
        for a, b in zip(calibration.assess(logits, x), other.assess(logits, x)):
            assert (a.verdict, a.breed_set) == (b.verdict, b.breed_set)
            assert a.ood_score == b.ood_score and a.dog_score == b.dog_score
            np.testing.assert_array_equal(a.probs, b.probs)


def test_damaged_calibration_is_an_error_naming_the_file(calibration, tmp_path):
    run = RunDir(tmp_path / "run")
    calibration.save(run)
    run.calibration_bank_file.unlink()
    with pytest.raises(DogbreedsError, match="calibration_bank.npz"):
        Calibration.load(run)
    run.calibration_bank_file.write_bytes(b"not an npz")
    with pytest.raises(DogbreedsError, match="calibrate"):
        Calibration.load(run)


@pytest.mark.parametrize("key,value", [("knn_std", 0.0), ("head_std", -1.0), ("msp_std", float("inf")),
                                       ("knn_mean", float("nan"))])
def test_stored_ood_statistics_that_would_divide_by_zero_are_refused(calibration, key, value):
    """The file is not trusted: a standard deviation of 0 (or a non-finite statistic) would turn every
    ood_score into nan or 0/1; loading says which file and what to rerun."""
    import json

    meta = json.loads(json.dumps(calibration.to_json()))
    assert Calibration.from_parts(meta, calibration.banks_npz(), "ok.json").ood_stats
    meta["ood"]["stats"][key] = value
    with pytest.raises(DogbreedsError, match=r"bad\.json.*standard deviations.*dogbreeds calibrate"):
        Calibration.from_parts(meta, calibration.banks_npz(), "bad.json")


def test_without_other_dogs_there_is_no_not_a_dog(world):
    calibration = fit_calibration(world["train_x"], world["val_x"], world["logits"](world["val_x"]), world["val_y"])
    assert calibration.not_a_dog_threshold is None
    cats = calibration.assess(world["logits"](world["cats"]), world["cats"])
    assert {a.verdict for a in cats} == {"unknown_breed"}


def test_uncalibrated_answers_carry_the_note():
    logits = np.array([[5.0, 0, 0, 0, 0], [0.1, 0, 0.05, 0, 0]])
    answers = assess_uncalibrated(logits)
    assert [a.verdict for a in answers] == ["breed", "unknown_breed"]
    assert all(a.note == UNCALIBRATED_NOTE and "dogbreeds calibrate" in a.note for a in answers)
    assert answers[0].breed_set == [0]


def test_dog_head_from_not_dog_photos(world, tmp_path):
    rng = np.random.default_rng(9)
    fit_cats, test_cats = world["cats"][:50], world["cats"][50:]
    calibration = fit_calibration(world["train_x"], world["val_x"], world["logits"](world["val_x"]), world["val_y"],
                                  world["other_x"], not_dog_features=fit_cats)
    assert calibration.dog_head_w is not None and calibration.info["not_dogs"] == 50
    val = calibration.assess(world["logits"](world["val_x"]), world["val_x"])
    assert np.mean([a.dog_score <= calibration.not_a_dog_threshold for a in val]) >= 0.95
    cats = calibration.assess(world["logits"](test_cats), test_cats)
    assert np.mean([a.verdict == "not_a_dog" for a in cats]) >= 0.95
    run = RunDir(tmp_path / "run")
    calibration.save(run)
    again = Calibration.load(run)
    x = np.concatenate([test_cats, world["val_x"][:10] + rng.normal(size=(10, DIM))])
    np.testing.assert_array_equal(again.dog_scores(x), calibration.dog_scores(x))


def test_evaluate_reports_ece_before_after_coverage_and_draws_the_diagram(tmp_path):
    from dogbreeds.evaluate.metrics import expected_calibration_error
    from dogbreeds.trust.evaluation import trust_metrics
    from dogbreeds.trust.scores import softmax

    rng = np.random.default_rng(5)
    true_logits = rng.normal(size=(3000, 6)) * 1.5
    labels = np.array([rng.choice(6, p=p / p.sum()) for p in softmax(true_logits).astype(np.float64)])
    logits = true_logits * 3  # over-confident
    features = rng.normal(size=(3000, 8))
    calibration = fit_calibration(features[:500], features[500:1500], logits[500:1500], labels[500:1500])
    run = RunDir(tmp_path / "run")
    assert trust_metrics(run, softmax(logits[1500:]), labels[1500:]) is None  # not calibrated yet
    calibration.save(run)
    figure = run.figure("reliability_test_calibrated.png")
    result = trust_metrics(run, softmax(logits[1500:]), labels[1500:], figure, title="synthetic")
    assert result["ece_before"] == pytest.approx(expected_calibration_error(softmax(logits[1500:]), labels[1500:]))
    assert result["ece_after"] < result["ece_before"] / 2 and result["top1_unchanged"]
    assert abs(result["coverage"] - 0.9) < 0.03 and 1 <= result["mean_set_size"] <= 6
    assert figure.is_file() and figure.stat().st_size > 1000


def test_dog_head_catches_not_dogs_the_knn_lets_through(world, tmp_path):
    """On a fine-tuned model cats can sit among the training dogs in cosine distance (docs/trust.md:
    59% of cats were "breed" when only the kNN decided who the head may look at). With not-dog
    photos the head decides for every photo, its L2 penalty is chosen by cross-validation, and at
    least 95% of validation dogs still stay "breed"."""
    rng = np.random.default_rng(3)
    shift = np.zeros(DIM)
    shift[-1] = 2.0  # a direction dogs never take; small next to the dogs' norm (~6)

    def lookalikes(n):
        return world["train_x"][rng.integers(0, len(world["train_x"]), n)] + shift + rng.normal(size=(n, DIM)) * 0.1

    fit_cats, report_cats = lookalikes(100), lookalikes(200)
    calibration = fit_calibration(world["train_x"], world["val_x"], world["logits"](world["val_x"]), world["val_y"],
                                  world["other_x"], not_dog_features=fit_cats)
    assert calibration.head_on_all and calibration.info["dog_head_l2"] in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
    cats = calibration.assess(world["logits"](report_cats), report_cats)
    within_knn = np.mean([a.ood_score <= calibration.ood_threshold for a in cats])
    assert within_knn > 0.5  # the kNN alone would call most of them a breed
    assert np.mean([a.verdict == "not_a_dog" for a in cats]) >= 0.9
    val = calibration.assess(world["logits"](world["val_x"]), world["val_x"])
    assert np.mean([a.verdict == "breed" for a in val]) >= 0.95
    # stored and read back: same rule; a file from before the rule existed keeps the old one
    run = RunDir(tmp_path / "run")
    calibration.save(run)
    assert Calibration.load(run).head_on_all
    meta = run.read_json(run.calibration_file)
    del meta["not_a_dog"]["applies_to"]
    old = Calibration.from_parts(meta, run.calibration_bank_file.read_bytes(), "old")
    assert not old.head_on_all
    old_cats = old.assess(world["logits"](report_cats), report_cats)
    assert np.mean([a.verdict == "breed" for a in old_cats]) == pytest.approx(within_knn)


def _shared_offset_world(seed=0):
    """Known breeds, and other breeds that differ from them by one shared direction (small against
    the photo noise): the kNN distance barely sees it, a linear outlier-exposure head does."""
    rng = np.random.default_rng(seed)
    base, offset = np.zeros(DIM), np.zeros(DIM)
    base[0], offset[1] = 6.0, 1.5
    known = base + rng.normal(size=(CLASSES, DIM)) * 0.3
    unknown = base + rng.normal(size=(8, DIM)) * 0.3 + offset

    def photos(centres, labels):
        return centres[labels] + rng.normal(size=(len(labels), DIM))

    other_breeds = np.repeat(np.arange(6), 30)  # breeds 6 and 7 are never seen while fitting
    val_y = rng.integers(0, CLASSES, 300)
    return dict(train_x=photos(known, rng.integers(0, CLASSES, 400)), val_x=photos(known, val_y), val_y=val_y,
                other_x=photos(unknown, other_breeds), other_breeds=other_breeds,
                fresh_known=photos(known, rng.integers(0, CLASSES, 300)),
                fresh_unknown=photos(unknown, np.repeat([6, 7], 100)), weights=known.T)


def test_outlier_exposure_head_catches_unseen_breeds_the_knn_misses(tmp_path):
    from dogbreeds.trust.scores import auroc

    w = _shared_offset_world()
    args = (w["train_x"], w["val_x"], w["val_x"] @ w["weights"], w["val_y"], w["other_x"])
    mixed = fit_calibration(*args, other_dog_groups=w["other_breeds"])
    knn_alone = fit_calibration(*args, other_dog_groups=w["other_breeds"], ood_head=False)
    assert mixed.ood_head_w is not None and mixed.ood_mix < 1.0 and knn_alone.ood_head_w is None
    assert mixed.info["ood_head"]["cv_auroc"] > mixed.info["ood_head"]["knn_cv_auroc"]
    gains = [auroc(c.ood_scores(w["fresh_known"]), c.ood_scores(w["fresh_unknown"])) for c in (mixed, knn_alone)]
    assert gains[0] > gains[1] + 0.1, gains  # on two breeds no fit saw
    scores = mixed.ood_scores(w["fresh_unknown"])
    assert scores.min() > 0 and scores.max() < 1
    val = mixed.assess(w["val_x"] @ w["weights"], w["val_x"])
    assert np.mean([a.verdict == "breed" for a in val]) >= 0.95  # the threshold is on the mixed score
    run = RunDir(tmp_path / "run")
    mixed.save(run)
    for again in (Calibration.load(run), Calibration.from_metadata(mixed.to_metadata())):
        np.testing.assert_array_equal(again.ood_scores(w["fresh_unknown"]), scores)


def test_max_softmax_part_joins_ood_score_when_cross_validation_prefers_it(tmp_path):
    """Other dogs whose logits are flat while the features barely tell them apart: the third z-score (1 - max
    softmax of the raw logits) is chosen, is stored, travels, and needs the logits at prediction time."""
    from dogbreeds.trust.calibration import ood_msp
    from dogbreeds.trust.scores import auroc

    w = _shared_offset_world(1)
    rng = np.random.default_rng(1)

    def logits(labels, peaked):  # peaked on the breed for known dogs, flat (no breed) for other ones
        z = rng.normal(size=(len(labels), CLASSES))
        if peaked:
            z[np.arange(len(labels)), labels % CLASSES] += 6.0
        return z

    args = (w["train_x"], w["val_x"], logits(w["val_y"], True), w["val_y"], w["other_x"])
    with_msp = fit_calibration(*args, other_dog_groups=w["other_breeds"],
                               other_dog_logits=logits(w["other_breeds"], False))
    without = fit_calibration(*args, other_dog_groups=w["other_breeds"])  # no other-dog logits: as before
    choice = with_msp.info["ood_head"]
    assert with_msp.ood_msp_weight > 0 and choice["msp_weight"] == with_msp.ood_msp_weight
    assert choice["cv_auroc"] > choice["cv_auroc_without_msp"] + 1e-3
    assert without.ood_msp_weight == 0 and without.info["ood_head"]["msp_weight"] == 0
    assert without.info["ood_head"]["cv_auroc"] == choice["cv_auroc_without_msp"]
    fresh_known, fresh_unknown = logits(np.arange(300), True), logits(np.arange(200), False)
    scores = [auroc(c.ood_scores(w["fresh_known"], fresh_known), c.ood_scores(w["fresh_unknown"], fresh_unknown))
              for c in (with_msp, without)]
    assert scores[0] > scores[1] + 0.02, scores
    val = with_msp.assess(args[2], w["val_x"])
    assert np.mean([a.verdict == "breed" for a in val]) >= 0.95  # the threshold is on the score with the part
    with pytest.raises(DogbreedsError, match="pass the logits"):
        with_msp.ood_scores(w["fresh_unknown"])
    assert "max-softmax" in with_msp.to_json()["ood"]["method"]
    run = RunDir(tmp_path / "run")
    with_msp.save(run)
    expected = with_msp.ood_scores(w["fresh_unknown"], fresh_unknown)
    for again in (Calibration.load(run), Calibration.from_metadata(with_msp.to_metadata())):
        assert again.ood_msp_weight == with_msp.ood_msp_weight
        np.testing.assert_array_equal(again.ood_scores(w["fresh_unknown"], fresh_unknown), expected)
    # a version-4 file (no max-softmax part, four statistics) reads as weight 0 and scores as it did
    meta = without.to_json()
    meta["version"] = 4
    del meta["ood"]["msp_weight"], meta["ood"]["stats"]["msp_mean"], meta["ood"]["stats"]["msp_std"]
    old = Calibration.from_parts(meta, without.banks_npz(), "v4.json")
    assert old.ood_msp_weight == 0
    np.testing.assert_array_equal(old.ood_scores(w["fresh_unknown"]), without.ood_scores(w["fresh_unknown"]))
    assert ood_msp(np.zeros((1, CLASSES)))[0] == pytest.approx(1 - 1 / CLASSES)
    # hostile metadata: a weight outside [0, 1), or a mix that needs a head the file does not have
    for key, value in (("msp_weight", 1.5), ("msp_weight", -0.1)):
        bad = with_msp.to_json()
        bad["ood"][key] = value
        with pytest.raises(DogbreedsError, match="run.json"):
            Calibration.from_parts(bad, with_msp.banks_npz(), "run.json")
    bad = without.to_json()
    bad["ood"]["head_bias"] = None
    assert without.ood_mix < 1.0
    with pytest.raises(DogbreedsError, match="needs the outlier-exposure head"):
        Calibration.from_parts(bad, without.banks_npz(), "run.json")


def test_knn_alone_when_other_dogs_teach_nothing_more(world, calibration):
    # the kNN already separates this world's other breeds: cross-validation keeps it (ties go to it)
    assert calibration.ood_head_w is None and calibration.info["ood_head"]["mix"] == 1.0
    assert calibration.to_json()["ood"]["method"] == "knn-cosine"


def test_version_1_calibration_files_still_load_as_knn_alone(world, calibration, tmp_path):
    import io
    import json

    meta = calibration.to_json()
    meta["version"] = 1
    for key in ("mix", "head_bias", "stats"):
        del meta["ood"][key]
    with np.load(io.BytesIO(calibration.banks_npz())) as arrays:
        buffer = io.BytesIO()
        np.savez(buffer, **{k: arrays[k] for k in ("bank", "dog_bank", "dog_head")})
    old = Calibration.from_parts(json.loads(json.dumps(meta)), buffer.getvalue(), "old.json")
    from dogbreeds.trust.scores import knn_distance

    np.testing.assert_array_equal(old.ood_scores(world["val_x"]), knn_distance(world["val_x"], old.bank, old.ood_k))
    newer = dict(meta, version=99)
    with pytest.raises(DogbreedsError, match="old.json"):
        Calibration.from_parts(newer, buffer.getvalue(), "old.json")


# --- the top-label isotonic step (temperature + isotonic, chosen on the validation split) ---

def _random_probs(rng, n, k):
    logits = rng.normal(size=(n, k)) * rng.choice([0.05, 1.0, 4.0, 20.0], size=(n, 1))
    logits[: n // 10, 1] = logits[: n // 10, 0]  # exact ties for the top-1
    from dogbreeds.trust.scores import softmax

    return softmax(logits)


@pytest.mark.parametrize("k", [2, 5, 120])
def test_top_label_step_never_changes_the_argmax(k):
    from dogbreeds.trust.calibration import apply_top_label

    rng = np.random.default_rng(k)
    probs = _random_probs(rng, 4000, k)
    # adversarial maps: everything to 0 (pushes every top-1 down onto its bound), to 1, and a random staircase
    for x, y in ((np.array([0.0, 1.0]), np.array([0.0, 0.0])), (np.array([0.0, 1.0]), np.array([1.0, 1.0])),
                 (np.sort(rng.uniform(size=30)), np.sort(rng.uniform(size=30)))):
        out = apply_top_label(probs, x, y)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out.argmax(1), probs.argmax(1))
        np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)
        top = out.max(1)
        assert (top >= 1.0 / k - 1e-6).all() and (top <= 1.0).all() and (out >= 0).all()
    # the identity map changes nothing beyond the tie-breaking gap (1e-5 relative, at exact ties)
    x, y = np.array([0.0, 1.0]), np.array([0.0, 1.0])
    np.testing.assert_allclose(apply_top_label(probs, x, y), probs, atol=1e-5)
    untied = probs[len(probs) // 10:]
    np.testing.assert_allclose(apply_top_label(untied, x, y)[untied.max(1) > 0.6], untied[untied.max(1) > 0.6], atol=1e-6)


def _flat_accuracy(seed, n):
    """Logits whose top-1 is right 70% of the time whatever its confidence: no single temperature
    calibrates that (confidences stay spread), a map of the top-1 probability does."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 6)) * 3
    top = logits.argmax(1)
    labels = np.where(rng.uniform(size=n) < 0.7, top, (top + rng.integers(1, 6, n)) % 6)
    return logits, labels


def test_isotonic_is_chosen_by_cross_validation_and_stored(tmp_path):
    import json

    from dogbreeds.evaluate.metrics import expected_calibration_error
    from dogbreeds.trust.calibration import ISOTONIC, TEMPERATURE, VERSION
    from dogbreeds.trust.scores import softmax

    logits, labels = _flat_accuracy(7, 6000)
    features = np.random.default_rng(0).normal(size=(len(labels), 8))
    cal = fit_calibration(features[:500], features[500:2500], logits[500:2500], labels[500:2500], raps=(0.0, 0))
    choice = cal.info["top_label"]
    assert choice["folds"] == 5 and choice["margin"] > 0
    assert choice["cv_ece_isotonic"] < choice["cv_ece_temperature"] - choice["margin"]
    assert cal.method == ISOTONIC and cal.top_label_x is not None
    test_logits, test_labels = logits[2500:], labels[2500:]
    after = cal.calibrated_probs(test_logits)
    plain = softmax(test_logits, cal.temperature)
    np.testing.assert_array_equal(after.argmax(1), test_logits.argmax(1))
    assert expected_calibration_error(after, test_labels) < expected_calibration_error(plain, test_labels)
    # conformal scores come from the final probabilities, and the file round-trips them exactly
    from dogbreeds.trust.scores import conformal_scores

    np.testing.assert_allclose(cal.conformal_scores, conformal_scores(
        cal.calibrated_probs(logits[500:2500]), labels[500:2500], 0.0, 0), atol=1e-6)
    run = RunDir(tmp_path / "run")
    cal.save(run)
    stored = json.loads(run.calibration_file.read_text())
    assert stored["version"] == VERSION == 5 and stored["probabilities"]["method"] == ISOTONIC
    assert stored["probabilities"]["choice"]["cv_ece_isotonic"] == choice["cv_ece_isotonic"]
    again = Calibration.load(run)
    np.testing.assert_array_equal(again.calibrated_probs(test_logits), after)
    np.testing.assert_allclose(again.assess(test_logits[:3], features[:3])[0].probs, after[0], atol=1e-6)  # assess: float32 logits
    # forced temperature: no isotonic step
    forced = fit_calibration(features[:500], features[500:2500], logits[500:2500], labels[500:2500],
                             raps=(0.0, 0), top_label="temperature")
    assert forced.method == TEMPERATURE and forced.to_json()["probabilities"]["isotonic_x"] is None
    with pytest.raises(DogbreedsError, match="'sometimes'"):
        fit_calibration(features[:500], features[500:2500], logits[500:2500], labels[500:2500], top_label="sometimes")


def test_temperature_alone_when_it_is_already_calibrated(world, calibration):
    # the synthetic world's logits are calibrated by one temperature: the margin keeps it
    choice = calibration.info["top_label"]
    assert choice["cv_ece_temperature"] is not None and calibration.method == "temperature"
    assert calibration.top_label_x is None
    small = fit_calibration(world["train_x"], world["val_x"][:30], world["logits"](world["val_x"][:30]),
                            world["val_y"][:30])
    assert small.method == "temperature" and "under" in small.info["top_label"]["reason"]


def test_version_2_calibration_files_still_load_as_temperature_alone(world, calibration):
    import json

    from dogbreeds.trust.scores import softmax

    meta = json.loads(json.dumps(calibration.to_json()))
    meta["version"] = 2
    del meta["probabilities"]
    old = Calibration.from_parts(meta, calibration.banks_npz(), "v2.json")
    logits = world["logits"](world["val_x"])
    assert old.top_label_x is None
    np.testing.assert_array_equal(old.calibrated_probs(logits), softmax(logits, old.temperature))
    bad = json.loads(json.dumps(calibration.to_json()))
    bad["probabilities"]["isotonic_x"], bad["probabilities"]["isotonic_y"] = [0.5, 0.2], [0.1, 0.3]
    with pytest.raises(DogbreedsError, match="bad.json"):
        Calibration.from_parts(bad, calibration.banks_npz(), "bad.json")


def test_calibrate_and_evaluate_say_which_probabilities_they_use(tmp_path):
    from dogbreeds.evaluate.report import format_summary
    from dogbreeds.trust.cli import _probability_method
    from dogbreeds.trust.evaluation import trust_metrics
    from dogbreeds.trust.scores import softmax

    logits, labels = _flat_accuracy(3, 3000)
    features = np.random.default_rng(1).normal(size=(len(labels), 8))
    chosen = fit_calibration(features[:300], features[300:1500], logits[300:1500], labels[300:1500], raps=(0.0, 0))
    words = _probability_method(chosen)
    choice = chosen.info["top_label"]
    assert words.startswith("temperature + isotonic, chosen by 5-fold cross-validation on the 1200 validation photos")
    assert f"{choice['cv_ece_isotonic']:.4f}" in words and f"{choice['cv_ece_temperature']:.4f}" in words
    forced = fit_calibration(features[:300], features[300:1500], logits[300:1500], labels[300:1500], raps=(0.0, 0),
                             top_label="temperature")
    assert _probability_method(forced) == "temperature (given)"
    run = RunDir(tmp_path / "run")
    chosen.save(run)
    trust = trust_metrics(run, softmax(logits[1500:]), labels[1500:])
    assert trust["method"] == "temperature + isotonic" and trust["top1_unchanged"]
    assert trust["ece_after"] < trust["ece_before"] / 2
    result = {"model": "m", "split": "test", "n_images": 1500, "skipped": 0, "tta": None, "top1": 0.7, "top5": 1.0,
              "loss": 1.0, "ece": trust["ece_before"], "records_from": "x", "trust": trust}
    assert f"+ top-label isotonic): ECE {trust['ece_before']:.3f} -> {trust['ece_after']:.3f}" in format_summary(result)
    forced.save(run)
    result["trust"] = trust_metrics(run, softmax(logits[1500:]), labels[1500:])
    assert "isotonic" not in format_summary(result)


# --- the breed-set method: RAPS (never empty) or LAC (may be empty), chosen on the validation split ---

def _accurate_model(seed, n, classes=8, sharpness=10.0):
    """Calibrated logits whose top-1 is right about 90% of the time (sharpness 10) or less (lower)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * sharpness
    from dogbreeds.trust.scores import softmax

    probs = softmax(logits).astype(np.float64)
    labels = np.array([rng.choice(classes, p=p / p.sum()) for p in probs])
    return logits, labels, rng.normal(size=(n, 8))


@pytest.mark.parametrize("sharpness,coverage,expected", [(10.0, 0.8, "lac"), (1.5, 0.9, "raps")])
def test_lac_is_chosen_only_when_never_empty_sets_over_cover(sharpness, coverage, expected, tmp_path):
    from dogbreeds.trust.cli import _set_method
    from dogbreeds.trust.evaluation import trust_metrics
    from dogbreeds.trust.scores import softmax

    logits, labels, features = _accurate_model(0, 4000, sharpness=sharpness)
    cal = fit_calibration(features[:300], features[300:1500], logits[300:1500], labels[300:1500], coverage=coverage,
                          raps=(0.0, 0), top_label="temperature")
    choice = cal.info["breed_set"]
    assert cal.set_method == expected == choice["method"]
    assert (choice["raps"]["cv_coverage"] > coverage + 0.02) == (expected == "lac")
    words = _set_method(cal)
    assert words.startswith("LAC (may be empty)" if expected == "lac" else "RAPS lambda 0.0, k_reg 0 (never empty)")
    assert f"{choice['raps']['cv_coverage']:.3f}" in words
    run = RunDir(tmp_path / "run")
    cal.save(run)
    loaded = Calibration.load(run)
    assert loaded.set_method == expected
    trust = trust_metrics(run, softmax(logits[1500:]), labels[1500:])
    assert trust["set_method"] == expected
    accuracy = np.mean(logits[1500:].argmax(1) == labels[1500:])
    if expected == "lac":  # held-out coverage near the target although top-1 alone is above it
        assert accuracy > coverage + 0.04
        assert abs(trust["coverage"] - coverage) <= 0.03 and trust["empty_sets"] > 0
        answers = loaded.assess(logits[1500:1600], features[1500:1600])
        assert any(a.breed_set == [] for a in answers)
    else:
        assert trust["empty_sets"] == 0 and trust["coverage"] >= coverage - 0.03


def test_set_method_given_stored_and_a_bad_one_in_a_file_is_an_error_naming_it(world, calibration):
    import json

    logits = world["logits"](world["val_x"])
    lac = fit_calibration(world["train_x"], world["val_x"], logits, world["val_y"], world["other_x"],
                          set_method="lac")
    assert lac.set_method == "lac" and lac.info["breed_set"] == {"method": "lac", "given": True}
    from dogbreeds.trust.scores import conformal_scores

    np.testing.assert_allclose(lac.conformal_scores, conformal_scores(lac.calibrated_probs(logits), world["val_y"],
                                                                      method="lac"))
    meta = json.loads(json.dumps(lac.to_json()))
    assert meta["conformal"]["method"] == "lac"
    assert Calibration.from_parts(meta, lac.banks_npz(), "x.json").set_method == "lac"
    old = json.loads(json.dumps(calibration.to_json()))
    old["version"] = 3
    del old["conformal"]["method"]
    assert Calibration.from_parts(old, calibration.banks_npz(), "v3.json").set_method == "raps"
    meta["conformal"]["method"] = "aps"
    with pytest.raises(DogbreedsError, match="bad.json.*'aps'"):
        Calibration.from_parts(meta, lac.banks_npz(), "bad.json")
    with pytest.raises(DogbreedsError, match="'aps'"):
        fit_calibration(world["train_x"], world["val_x"], logits, world["val_y"], set_method="aps")


def test_an_empty_set_is_said_in_words():
    from dogbreeds.trust.present import verdict_text

    assert verdict_text("breed", 20, "Beagle", []) == "Probably Beagle, but not sure enough to name a breed"
    assert verdict_text("breed", 20, "Beagle", ["Beagle"]) == "Beagle"
    assert verdict_text("breed", 20, "Beagle", None) == "Beagle"
