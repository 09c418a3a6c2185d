"""Measure issue 11's trust scores on real photos: `python benchmarks/measure_trust.py RUN`.

Step 1 (slow, cached in RUN/trust_measure.npz): logits + pooled features of the run's train /
val / test photos, the data root's breeds the run does not know ("unknown breeds"), and the
cats and dogs photographed in the wild (../shared/data/cats-and-dogs).
Step 2 (seconds): fit everything with `dogbreeds.trust.fit` on fitting data only, and report on
held-out photos (the calibrated probabilities: temperature, plus the top-label isotonic step when
5-fold cross-validation on the validation split chooses it; both candidates' test ECE reported):
  - unknown breeds are split BY BREED (seeded): half the breeds may be used to fit, the other
    half only to report, so a reported unknown breed was never seen while fitting;
  - cats-and-dogs photos are split by file number: even numbers may fit, odd numbers report
    (the even cats are the --not-dogs of the dog / not-dog head; the even dogs are other dogs).
  - a run trained with outlier exposure (`dogbreeds train --outlier-exposure`) records its
    outliers in split.json: its outlier breeds are then the fitting unknown breeds, the others
    report, and a split that would report on a photo or breed used in training is refused.
Output: a JSON summary (stdout, and --out) that docs/trust.md quotes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path("../shared/data")


def _numbered(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jpg"), key=lambda p: int(re.findall(r"\d+", p.name)[-1]))


class _Mirrored:
    """The eval transform, then a left-right mirror of the tensor (for --flip-average)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, *boxes):
        import torch

        return torch.flip(self.transform(image, *boxes), dims=[-1])


def extract(run: Path, data: Path, wild: Path, batch_size: int, workers: int, flip: bool = False) -> dict:
    import torch

    from dogbreeds.data.records import ImageRecord
    from dogbreeds.data.sources import scan_source
    from dogbreeds.data.transforms import build_eval_transform
    from dogbreeds.evaluate.report import records_for_split
    from dogbreeds.models.factory import load_run
    from dogbreeds.train.features import extract_features

    loaded = load_run(run)
    model, classes = loaded.model.eval(), loaded.classes
    transform = build_eval_transform(loaded.preprocessing)
    if flip:
        transform = _Mirrored(transform)
    groups: dict[str, list] = {}
    for split in ("train", "val", "test"):
        groups[split] = records_for_split(run, data, split, classes).records
    known = set(classes.breed_ids)
    _, everything = scan_source(data)
    unknown = [r for r in everything if r.breed_id not in known]
    other_ids = sorted({r.breed_id for r in unknown})
    groups["unknown"] = [ImageRecord(r.path, other_ids.index(r.breed_id), r.breed_id, "test") for r in unknown]
    for name in ("cats", "dogs"):
        files = _numbered(wild / name)
        groups[f"wild_{name}"] = [ImageRecord(str(p), int(re.findall(r"\d+", p.name)[-1]), name, "test") for p in files]
    out = {"other_breed_ids": np.array(other_ids)}
    classifier = model.get_classifier()
    for name, records in groups.items():
        start = time.perf_counter()
        x, y, skipped = extract_features(model, records, transform, batch_size, workers, 0, torch.device("cpu"),
                                         contextlib.nullcontext, False, True)
        with torch.no_grad():
            logits = classifier(x).float()
        kept = {s["path"] for s in skipped}
        out[f"{name}_x"], out[f"{name}_logits"], out[f"{name}_y"] = x.numpy(), logits.numpy(), y.numpy()
        out[f"{name}_paths"] = np.array([r.path for r in records if r.path not in kept])
        print(f"{name}: {len(y)} photos ({len(skipped)} skipped) in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--data", default=str(SHARED / "stanford-dogs-mini"))
    parser.add_argument("--wild", default=str(SHARED / "cats-and-dogs"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the JSON summary here too")
    parser.add_argument("--explore", action="store_true", help="also print every candidate score's AUROCs")
    parser.add_argument("--coverage", type=float, default=None,
                        help="target coverage of the breed sets (default: calibrate's, 0.9)")
    parser.add_argument("--flip-average", action="store_true",
                        help="features (and logits) averaged over each photo and its mirror image; the mirrored "
                             "photos' are cached in RUN/trust_measure_flip.npz")
    args = parser.parse_args(argv)
    run = Path(args.run)
    arrays = _cached(run / "trust_measure.npz", run, args, flip=False)
    from dogbreeds.trust.cli import run_outlier_record

    try:
        if args.flip_average:
            arrays = flip_average(arrays, _cached(run / "trust_measure_flip.npz", run, args, flip=True))
        coverage = {} if args.coverage is None else {"coverage": args.coverage}
        summary = report(arrays, explore=args.explore, outliers=run_outlier_record(run), **coverage)
    except (LeakingSplit, CacheMismatch) as exc:
        print(f"measure_trust.py: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def _cached(cache: Path, run: Path, args, flip: bool) -> dict:
    if cache.is_file():
        return dict(np.load(cache, allow_pickle=False))
    arrays = extract(run, Path(args.data), Path(args.wild), args.batch_size, args.workers, flip=flip)
    np.savez(cache, **arrays)
    return arrays


def flip_average(arrays: dict, mirrored: dict) -> dict:
    """The mean of each photo's features and logits and its mirror image's (the classifier is linear, so the
    mean logits are the classifier of the mean features). Refused when the two caches hold other photos."""
    out = dict(arrays)
    for key, value in arrays.items():
        if key.endswith("_paths") or key.endswith("_y") or key == "other_breed_ids":
            if not np.array_equal(value, mirrored[key]):
                raise CacheMismatch(f"trust_measure.npz and trust_measure_flip.npz hold different photos ({key}); "
                                   "delete both and rerun")
        elif key.endswith("_x") or key.endswith("_logits"):
            out[key] = ((value.astype(np.float64) + mirrored[key]) / 2.0).astype(value.dtype)
    return out


# --- step 2: fit on fitting photos, report on held-out photos ---

class LeakingSplit(ValueError):
    """The fitting / report split would report on photos or breeds the run trained with."""


class CacheMismatch(ValueError):
    """The run's two feature caches (--flip-average) were made from different photos."""


def splits(arrays: dict, seed: int = 0, outliers: dict | None = None) -> dict:
    """Index masks: unknown breeds halved by breed (seeded), wild photos by file-number parity.

    With `outliers` (split.json's record of an outlier-exposure run) the fitting unknown breeds
    are the run's outlier breeds and every other unknown breed reports; LeakingSplit when a
    reported photo or breed was used in training (or none is left to report on)."""
    other = [str(b) for b in arrays["other_breed_ids"]]
    if outliers is None:
        rng = np.random.default_rng(seed)
        fit_breeds = set(rng.permutation(len(other))[: len(other) // 2].tolist())
    else:
        recorded = [str(b) for b in outliers.get("breeds", [])]
        fit_breeds = {other.index(b) for b in recorded if b in other}
        if len(fit_breeds) == len(other):
            raise LeakingSplit(f"the run trained on all {len(other)} unknown breeds as outliers (oe_breeds="
                               f"{outliers.get('oe_breeds')!r}), so none is left to report on; measure a run trained "
                               "with --oe-breeds 0.5")
    unknown_fit = np.isin(arrays["unknown_y"], list(fit_breeds))
    masks = {
        "unknown_fit": unknown_fit, "unknown_report": ~unknown_fit,
        "cats_fit": arrays["wild_cats_y"] % 2 == 0, "cats_report": arrays["wild_cats_y"] % 2 == 1,
        "dogs_fit": arrays["wild_dogs_y"] % 2 == 0, "dogs_report": arrays["wild_dogs_y"] % 2 == 1,
    }
    if outliers is not None:
        reported_breeds = {other[i] for i in np.unique(arrays["unknown_y"][masks["unknown_report"]])}
        used = reported_breeds & set(outliers.get("breeds", []))
        if used:
            raise LeakingSplit(f"{len(used)} reported unknown breed(s) were outliers in training, e.g. {sorted(used)[0]}")
        trained = {str(Path(p).resolve()) for p in outliers.get("photos", [])}
        for group, key in (("test", None), ("unknown", "unknown_report"), ("wild_cats", "cats_report"),
                           ("wild_dogs", "dogs_report")):
            paths = arrays.get(f"{group}_paths")
            if paths is None:
                continue
            if key is not None:
                paths = paths[masks[key]]
            leaked = [str(p) for p in paths if str(Path(str(p)).resolve()) in trained]
            if leaked:
                raise LeakingSplit(f"{len(leaked)} photo(s) this benchmark reports on ({group}) were outliers the run "
                                   f"trained with (--outliers {outliers.get('pattern')!r}), e.g. {leaked[0]}; train "
                                   "with outliers among the fitting photos only (e.g. the even-numbered wild dogs)")
    return masks


def candidate_scores(arrays: dict, bank_x: np.ndarray, bank_y: np.ndarray, num_classes: int) -> dict:
    """name -> function(features, logits) -> score (higher = further), for the exploration."""
    from dogbreeds.trust.scores import knn_distance, log_softmax, normalise

    bank = normalise(bank_x)
    out = {
        "msp": lambda x, z: 1 - np.exp(log_softmax(z)).max(1),
        "max_logit": lambda x, z: -z.max(1),
        "energy": lambda x, z: -np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) - z.max(1),
    }
    for k in (1, 3, 5, 10, 20, 50):
        out[f"knn_k{k}"] = (lambda k: lambda x, z: knn_distance(x, bank, k))(k)
    for k in (1, 3, 5):
        def class_knn(x, z, k=k):
            pred = z.argmax(1)
            result = np.empty(len(x), np.float32)
            for c in range(num_classes):
                sel = pred == c
                if sel.any():
                    result[sel] = knn_distance(x[sel], bank[bank_y == c], k)
            return result
        out[f"class_knn_k{k}"] = class_knn
    # Mahalanobis with class means and a shared covariance, on normalised features
    means = np.stack([bank[bank_y == c].mean(0) for c in range(num_classes)])
    centred = bank - means[bank_y]
    cov = centred.T @ centred / len(bank) + 1e-3 * np.eye(bank.shape[1], dtype=np.float32)
    precision = np.linalg.inv(cov).astype(np.float32)

    def mahalanobis(x, z):
        q = normalise(x)
        d = np.stack([(((q - m) @ precision) * (q - m)).sum(1) for m in means], 1)  # einsum here took minutes
        return d.min(1)
    out["mahalanobis"] = mahalanobis
    return out


def report(arrays: dict, explore: bool = False, outliers: dict | None = None, **fit_kwargs) -> dict:
    from dogbreeds.trust.scores import auroc, fpr_at_tpr

    masks = splits(arrays, outliers=outliers)
    num_classes = arrays["train_logits"].shape[1]
    data = {
        "val": (arrays["val_x"], arrays["val_logits"]),
        "test": (arrays["test_x"], arrays["test_logits"]),
        "unknown_fit": (arrays["unknown_x"][masks["unknown_fit"]], arrays["unknown_logits"][masks["unknown_fit"]]),
        "unknown_report": (arrays["unknown_x"][masks["unknown_report"]],
                           arrays["unknown_logits"][masks["unknown_report"]]),
        "cats_fit": (arrays["wild_cats_x"][masks["cats_fit"]], arrays["wild_cats_logits"][masks["cats_fit"]]),
        "cats_report": (arrays["wild_cats_x"][masks["cats_report"]], arrays["wild_cats_logits"][masks["cats_report"]]),
        "dogs_fit": (arrays["wild_dogs_x"][masks["dogs_fit"]], arrays["wild_dogs_logits"][masks["dogs_fit"]]),
        "dogs_report": (arrays["wild_dogs_x"][masks["dogs_report"]], arrays["wild_dogs_logits"][masks["dogs_report"]]),
    }
    summary: dict = {"counts": {name: int(len(v[0])) for name, v in data.items()},
                     "fitting_unknown_breeds": ("the run's outlier breeds (split.json)" if outliers is not None
                                                else "a seeded half")}
    if explore:
        table = {}
        for name, score in candidate_scores(arrays, arrays["train_x"], arrays["train_y"], num_classes).items():
            s = {group: score(*data[group]) for group in data}
            table[name] = {
                "fit_cats": round(auroc(s["val"], s["cats_fit"]), 4),
                "fit_unknown": round(auroc(s["val"], s["unknown_fit"]), 4),
                "report_cats": round(auroc(s["test"], s["cats_report"]), 4),
                "report_unknown": round(auroc(s["test"], s["unknown_report"]), 4),
                "report_cats_fpr95": round(fpr_at_tpr(s["test"], s["cats_report"]), 4),
            }
        summary["explore"] = table
        summary["calibrators"] = calibrator_table(arrays)
    summary["shipped_with_not_dogs"] = chosen_method(arrays, data, masks, with_not_dogs=True, **fit_kwargs)
    summary["shipped_without_not_dogs"] = chosen_method(arrays, data, masks, with_not_dogs=False, **fit_kwargs)
    summary["knn_alone_with_not_dogs"] = chosen_method(arrays, data, masks, with_not_dogs=True, ood_head=False,
                                                       **fit_kwargs)
    return summary


def calibrator_table(arrays: dict) -> dict:
    """Test ECE (15 bins) of argmax-preserving calibrators fitted on the validation split only
    (docs/trust.md), and the test-ECE-optimal temperature as an oracle (not a method)."""
    from scipy.optimize import minimize

    from dogbreeds.evaluate.metrics import expected_calibration_error
    from dogbreeds.trust.scores import fit_temperature, softmax

    zv, yv, zt, yt = arrays["val_logits"], arrays["val_y"], arrays["test_logits"], arrays["test_y"]
    t = fit_temperature(zv, yv)
    rng = np.random.default_rng(0)
    bagged = float(np.median([fit_temperature(zv[i], yv[i]) for i in
                              (rng.integers(0, len(yv), len(yv)) for _ in range(200))]))

    def top_label_platt():  # 2 parameters on logit(top-1 confidence) after T; the others rescaled
        def logit_top(z):
            p = softmax(z, t).astype(np.float64)
            c = np.clip(p.max(1), 1e-12, 1 - 1e-12)
            return p, c, np.log(c / (1 - c))
        p, c, lv = logit_top(zv)
        right = p.argmax(1) == yv
        loss = lambda ab: np.mean(np.where(right, np.logaddexp(0, -(ab[0] * lv + ab[1])),
                                           np.logaddexp(0, ab[0] * lv + ab[1])))
        a, b = minimize(loss, [1.0, 0.0], method="Nelder-Mead").x
        p, c, lt = logit_top(zt)
        new = 1 / (1 + np.exp(-(a * lt + b)))
        q = p * ((1 - new) / (1 - c))[:, None]
        q[np.arange(len(q)), p.argmax(1)] = new
        return q.astype(np.float32)

    def top_label_isotonic():  # after T: isotonic regression of "top-1 is right" on the top-1 confidence
        from sklearn.isotonic import IsotonicRegression

        p = softmax(zv, t)
        fit = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p.max(1), p.argmax(1) == yv)
        p = softmax(zt, t)
        c = p.max(1)
        new = np.clip(fit.predict(c), 1e-6, 1 - 1e-6)
        q = p * ((1 - new) / np.clip(1 - c, 1e-12, None))[:, None]
        q[np.arange(len(q)), p.argmax(1)] = new
        return q.astype(np.float32)

    ece = lambda probs: round(expected_calibration_error(probs, yt, 15), 4)
    grid = np.exp(np.linspace(np.log(0.3), np.log(3.0), 400))
    oracle = float(min(grid, key=lambda g: expected_calibration_error(softmax(zt, g), yt, 15)))
    platt = top_label_platt()
    iso = top_label_isotonic()
    return {"none": ece(softmax(zt)), "temperature_nll": [round(t, 3), ece(softmax(zt, t))],
            "temperature_bagged": [round(bagged, 3), ece(softmax(zt, bagged))],
            "top_label_platt": [ece(platt), int((platt.argmax(1) != zt.argmax(1)).sum())],
            "top_label_isotonic": [ece(iso), int((iso.argmax(1) != zt.argmax(1)).sum())],
            "oracle_test_temperature": [round(oracle, 3), ece(softmax(zt, oracle))]}


def chosen_method(arrays: dict, data: dict, masks: dict, with_not_dogs: bool = True, **fit_kwargs) -> dict:
    """The shipped method (dogbreeds.trust.fit_calibration), fitted on fitting photos only:
    bank = training photos; thresholds and temperature from the validation split; other dogs =
    the fitting half of the unknown breeds + the even-numbered wild dogs. Reported on the rest."""
    from dogbreeds.evaluate.metrics import expected_calibration_error
    from dogbreeds.trust import fit_calibration
    from dogbreeds.trust.scores import auroc, fpr_at_tpr, set_metrics, softmax

    other = np.concatenate([data["unknown_fit"][0], data["dogs_fit"][0]])
    other_logits = np.concatenate([data["unknown_fit"][1], data["dogs_fit"][1]])
    start = time.perf_counter()
    groups = np.r_[arrays["unknown_y"][masks["unknown_fit"]], np.full(len(data["dogs_fit"][0]), -1)]  # breed; -1: wild
    cal = fit_calibration(arrays["train_x"], arrays["val_x"], arrays["val_logits"], arrays["val_y"], other,
                          data["cats_fit"][0] if with_not_dogs else None, other_dog_groups=groups,
                          other_dog_logits=other_logits, **fit_kwargs)
    fit_seconds = time.perf_counter() - start
    answers = {}
    timing = {}
    for group in ("test", "unknown_report", "cats_report", "dogs_report"):
        x, z = data[group]
        start = time.perf_counter()
        answers[group] = cal.assess(z, x)
        timing[group] = (time.perf_counter() - start) / max(1, len(x))
    x, z = data["test"]
    start = time.perf_counter()
    for i in range(100):  # one photo at a time: the latency a single request pays
        cal.assess(z[i:i + 1], x[i:i + 1])
    timing["single_photo"] = (time.perf_counter() - start) / 100
    ood = {g: np.array([a.ood_score for a in answers[g]]) for g in answers}
    dog = {g: np.array([a.dog_score for a in answers[g]]) for g in answers}
    verdicts = {g: {v: round(float(np.mean([a.verdict == v for a in answers[g]])), 4)
                    for v in ("breed", "unknown_breed", "not_a_dog")} for g in answers}
    test_y = arrays["test_y"]
    before = softmax(arrays["test_logits"])
    after = np.stack([a.probs for a in answers["test"]])
    # the test ECE of both candidates, whichever the validation-only rule chose (reported, never used to choose)
    from dogbreeds.trust.calibration import apply_top_label, fit_top_label_isotonic

    t_val = softmax(arrays["val_logits"], cal.temperature)
    t_test = softmax(arrays["test_logits"].astype(np.float32), cal.temperature)
    iso_test = apply_top_label(t_test, *fit_top_label_isotonic(t_val, arrays["val_y"]))
    sets = [a.breed_set for a in answers["test"]]
    return {
        "not_dogs_for_the_head": int(len(data["cats_fit"][0])) if with_not_dogs else 0,
        "raps": [cal.raps_lambda, cal.raps_k_reg],
        "temperature": cal.temperature, "ood_threshold": cal.ood_threshold,
        "not_a_dog_threshold": cal.not_a_dog_threshold, "ood_k": cal.ood_k, "dog_k": cal.dog_k,
        "dog_head_l2": cal.info.get("dog_head_l2"), "head_on_all": cal.head_on_all,
        "ood_head": cal.info.get("ood_head"),
        "bank": {"train": len(cal.bank), "other_dogs": len(cal.dog_bank)},
        "cats_vs_test_dogs": {"ood_auroc": auroc(ood["test"], ood["cats_report"]),
                              "ood_fpr95": fpr_at_tpr(ood["test"], ood["cats_report"]),
                              "dog_auroc": auroc(dog["test"], dog["cats_report"]),
                              "dog_fpr95": fpr_at_tpr(dog["test"], dog["cats_report"])},
        "cats_vs_wild_dogs": {"dog_auroc": auroc(dog["dogs_report"], dog["cats_report"]),
                              "dog_fpr95": fpr_at_tpr(dog["dogs_report"], dog["cats_report"])},
        "unknown_vs_known": {"ood_auroc": auroc(ood["test"], ood["unknown_report"]),
                             "ood_fpr95": fpr_at_tpr(ood["test"], ood["unknown_report"])},
        "verdicts": verdicts,
        "top1_before": float((before.argmax(1) == test_y).mean()), "top1_after": float((after.argmax(1) == test_y).mean()),
        "ece_before": expected_calibration_error(before, test_y, 15), "ece_after": expected_calibration_error(after, test_y, 15),
        "probabilities": cal.info.get("top_label"),
        "top1_changed_photos": int((after.argmax(1) != before.argmax(1)).sum()),
        "test_ece_temperature_alone": expected_calibration_error(t_test, test_y, 15),
        "test_ece_temperature_isotonic": expected_calibration_error(iso_test, test_y, 15),
        "top1_changed_photos_isotonic": int((iso_test.argmax(1) != before.argmax(1)).sum()),
        "coverage_target": cal.coverage, **set_metrics(sets, test_y),
        "set_method": cal.set_method, "set_choice": cal.info.get("breed_set"),
        "sets_by_method": _sets_by_method(cal, arrays, after),  # both methods on test, for the record
        "fit_seconds": fit_seconds,
        "assess_ms_per_photo": {g: round(1000 * t, 4) for g, t in timing.items()},
    }


def _sets_by_method(cal, arrays, test_probs) -> dict:
    """Test coverage, mean size and empty share of RAPS and LAC sets, each fitted on the validation split
    (the run's calibrated probabilities): what the validation-only choice between them would have given."""
    from dogbreeds.trust.scores import SET_METHODS, conformal_quantile, conformal_scores, prediction_sets, set_metrics

    val_probs = cal.calibrated_probs(arrays["val_logits"])
    out = {}
    for method in SET_METHODS:
        scores = conformal_scores(val_probs, arrays["val_y"], cal.raps_lambda, cal.raps_k_reg, method)
        sets = prediction_sets(test_probs, conformal_quantile(scores, cal.coverage), cal.raps_lambda, cal.raps_k_reg,
                               method)
        out[method] = set_metrics(sets, arrays["test_y"])
    return out


if __name__ == "__main__":
    sys.exit(main())
