"""`dogbreeds calibrate RUN --data DATA`: (re)fit a run's temperature, OOD thresholds and
conformal sets (see calibration.py), and store them in the run. torch is imported in the handler."""
from __future__ import annotations

import argparse

from .calibration import DEFAULT_COVERAGE, DEFAULT_DOG_K, DEFAULT_KEEP, DEFAULT_OOD_K
from .fractions import check_fraction, fraction_type

OTHER_BREED_PHOTOS = 20  # per breed the run does not know, in the bank that sets the 'not a dog' line


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="fit a run's calibrated probabilities, 'not a dog' / 'unknown breed' thresholds and breed sets",
        description="Fit temperature scaling and split-conformal sets on the run's validation split, store its "
                    "training photos' features as the bank the OOD score compares against, and choose the thresholds "
                    "that keep --keep of validation dogs as 'breed'. The data root's breeds the run does not know "
                    "(and --other-dogs) set the 'not a dog' threshold. Writes RUN/calibration.json and "
                    "RUN/calibration_bank.npz; `dogbreeds train` runs this at the end. See docs/trust.md.",
    )
    parser.add_argument("run", help="run directory written by `dogbreeds train`")
    parser.add_argument("--data", required=True, help="dataset root the run was trained on")
    parser.add_argument("--coverage", type=fraction_type("coverage"), default=DEFAULT_COVERAGE,
                        help=f"default coverage of the breed sets, in (0, 1) (default {DEFAULT_COVERAGE})")
    parser.add_argument("--set-method", choices=("auto", "raps", "lac"), default="auto",
                        help="breed sets: 'raps' (never empty), 'lac' (smallest on average, empty when no breed is "
                             "likely enough) or 'auto' (default: LAC when never-empty sets would over-cover the "
                             "coverage by more than 2 points in cross-validation on the validation split)")
    parser.add_argument("--keep", type=fraction_type("keep"), default=DEFAULT_KEEP,
                        help=f"share of in-breed validation dogs the thresholds keep, in (0, 1) (default {DEFAULT_KEEP})")
    parser.add_argument("--other-dogs", nargs="*", default=[], metavar="PATH",
                        help="more photos of dogs of other breeds or mixes (files, folders, globs) for the "
                             "'not a dog' threshold")
    parser.add_argument("--not-dogs", nargs="*", default=[], metavar="PATH",
                        help="photos of anything but dogs (files, folders, globs): fits a dog / not-dog head on the "
                             "features, which tells 'not a dog' far better than distances alone (docs/trust.md)")
    parser.add_argument("--no-other-breeds", action="store_true",
                        help="do not use the data root's breeds outside the run as other dogs")
    parser.add_argument("--ood-k", type=int, default=DEFAULT_OOD_K, help=argparse.SUPPRESS)
    parser.add_argument("--dog-k", type=int, default=DEFAULT_DOG_K, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: in this process)")
    parser.set_defaults(func=run_calibrate)


def run_calibrate(args) -> int:
    calibration = calibrate_run(args.run, args.data, coverage=args.coverage, keep=args.keep,
                                other_dogs=args.other_dogs, not_dogs=args.not_dogs,
                                other_breeds=not args.no_other_breeds,
                                ood_k=args.ood_k, dog_k=args.dog_k, batch_size=args.batch_size,
                                workers=args.workers, progress=True, set_method=args.set_method)
    info = calibration.info
    print(f"temperature {calibration.temperature:.3f} (validation NLL {info['val_nll_before']:.3f} -> "
          f"{info['val_nll_after']:.3f}); OOD score: {_ood_method(calibration)}, threshold {calibration.ood_threshold:.4f}; "
          f"not-a-dog threshold "
          f"{'none (no other dogs)' if calibration.not_a_dog_threshold is None else f'{calibration.not_a_dog_threshold:.4f}'}; "
          f"{info['train_photos']} training + {info['other_dogs']} other-dog photos in the bank; "
          f"dog / not-dog head: {'on ' + str(info['not_dogs']) + ' photos of non-dogs' if info['not_dogs'] else 'none (pass --not-dogs)'}; "
          f"breed-set coverage {calibration.coverage}")
    print(f"probabilities: {_probability_method(calibration)}")
    print(f"breed sets: {_set_method(calibration)}")
    return 0


def _probability_method(calibration) -> str:
    choice = calibration.info.get("top_label") or {}
    if choice.get("given"):
        return f"{calibration.method} (given)"
    if choice.get("cv_ece_temperature") is None:
        return f"{calibration.method} ({choice.get('reason', 'no cross-validation')})"
    return (f"{calibration.method}, chosen by {choice['folds']}-fold cross-validation on the "
            f"{choice['val_photos']} validation photos: out-of-fold ECE ({choice['bins']} bins) temperature alone "
            f"{choice['cv_ece_temperature']:.4f}, + top-label isotonic {choice['cv_ece_isotonic']:.4f} (isotonic "
            f"only if lower by {choice['margin']})")


def _set_method(calibration) -> str:
    choice = calibration.info.get("breed_set") or {}
    words = ("LAC (may be empty)" if calibration.set_method == "lac" else
             f"RAPS lambda {calibration.raps_lambda}, k_reg {calibration.raps_k_reg} (never empty)")
    if choice.get("given") or "raps" not in choice:
        return words + (" (given)" if choice.get("given") else "")
    raps, lac = choice["raps"], choice["lac"]
    return (f"{words}, chosen by 2-fold cross-validation on the validation photos at coverage {choice['coverage']}: "
            f"out-of-fold coverage RAPS {raps['cv_coverage']:.3f} (mean set {raps['cv_mean_size']:.2f}), LAC "
            f"{lac['cv_coverage']:.3f} ({lac['cv_mean_size']:.2f}); LAC only when RAPS over-covers by more than "
            f"{choice['margin']}")


def _ood_method(calibration) -> str:
    choice = calibration.info.get("ood_head") or {}
    parts = ["kNN distance"]
    if calibration.ood_head_w is not None:
        parts.append(f"outlier-exposure head (weight {calibration.ood_mix} on the kNN, head L2 {choice.get('l2')})")
    if calibration.ood_msp_weight > 0:
        parts.append(f"1 - max softmax (weight {calibration.ood_msp_weight})")
    words = " + ".join(parts)
    if "cv_auroc" not in choice:
        return words + (" (given)" if choice else "")
    return (f"{words}; cross-validated AUROC on other dogs {choice['cv_auroc']}, kNN alone {choice['knn_cv_auroc']}"
            + (f", without the max-softmax part {choice['cv_auroc_without_msp']}" if "cv_auroc_without_msp" in choice
               else ""))


def calibrate_run(run, data, coverage: float = DEFAULT_COVERAGE, keep: float = DEFAULT_KEEP,
                  other_dogs=(), not_dogs=(), other_breeds: bool = True, ood_k: int = DEFAULT_OOD_K, dog_k: int = DEFAULT_DOG_K,
                  batch_size: int = 32, workers: int = 0, progress: bool = False, set_method: str = "auto"):
    """Fit and store the calibration of `run` on its own train / val split under `data`."""
    import numpy as np
    import torch

    from pathlib import Path

    from ..data.cache import find_prepared_cache
    from ..data.records import ImageRecord
    from ..data.sources import scan_source
    from ..data.transforms import build_eval_transform
    from ..errors import DogbreedsError
    from ..evaluate.report import records_for_split
    from ..models.factory import load_run
    from ..rundir import RunDir
    from ..train.features import extract_features
    from .calibration import fit_calibration

    run = RunDir.locate(run)
    check_fraction("coverage", coverage)
    check_fraction("keep", keep)
    loaded = load_run(run.path)
    model = loaded.model.eval()
    transform = build_eval_transform(loaded.preprocessing)

    def embed(records, what, cache=None):
        import contextlib

        x, y, _ = extract_features(model, records, transform, batch_size, workers, 0, torch.device("cpu"),
                                   contextlib.nullcontext, False, progress, cache=cache)
        with torch.no_grad():
            logits = model.get_classifier()(x).float() if len(x) else torch.zeros(0, len(loaded.classes))
        if progress:
            print(f"  {what}: {len(y)} photos", flush=True)
        return x.numpy(), logits.numpy(), y.numpy()

    train = records_for_split(run.path, data, "train", loaded.classes).records
    val = records_for_split(run.path, data, "val", loaded.classes).records
    if not val:
        raise DogbreedsError(f"{run.path} has no validation photos under {data}; calibration fits on them: "
                             "train with --val-fraction > 0 (default 0.1)")
    others: list = []
    record = run_outlier_record(run)  # a run trained with outlier exposure: its outliers are the other dogs
    if other_breeds:
        known = set(loaded.classes.breed_ids)
        candidates = [r for r in scan_source(data)[1] if r.breed_id not in known]
        if record is not None:
            allowed = set(record.get("breeds", []))
            if progress:
                print(f"[calibrate] other breeds: the {len(allowed)} the run used as outliers (split.json), "
                      f"not the {len(record.get('other_breeds_not_used', []))} it never saw", flush=True)
            candidates = [r for r in candidates if r.breed_id in allowed]
        others = _capped_per_breed(candidates, OTHER_BREED_PHOTOS)
        ids = sorted({r.breed_id for r in others})  # label = breed number: the OOD head's folds split by breed
        others = [ImageRecord(r.path, ids.index(r.breed_id), r.breed_id, "test") for r in others]
    wild_photos = _given_photos(other_dogs, "--other-dogs")
    if record is not None and record.get("photos"):
        given = {str(Path(p).resolve()) for p in wild_photos}
        recorded = [Path(p) for p in record["photos"] if str(Path(p).resolve()) not in given]
        present = [p for p in recorded if p.is_file()]
        if progress or len(present) < len(recorded):
            print(f"[calibrate] other dogs: + {len(present)} outlier photos the run trained with ({record.get('pattern')})"
                  + (f"; {len(recorded) - len(present)} of them are not found from here and are left out"
                     if len(present) < len(recorded) else ""), flush=True)
        wild_photos = list(wild_photos) + present
    wild = [ImageRecord(str(p), -1, "other", "test") for p in wild_photos]
    not_dog_records = [ImageRecord(str(p), -1, "not_a_dog", "test") for p in _given_photos(not_dogs, "--not-dogs")]
    # the photos under DATA are read from `dogbreeds data prepare`'s cache when it holds them all
    lookup = find_prepared_cache(Path(data).expanduser().resolve(), loaded.preprocessing, train + val + others)
    if progress and lookup.message:
        print(f"[calibrate] {lookup.message}", flush=True)
    train_x, _, _ = embed(train, "training photos (the bank)", lookup.cache)
    val_x, val_logits, val_y = embed(val, "validation photos", lookup.cache)
    parts = [embed(group, what, cache) for group, what, cache in (
        (others, "other breeds under DATA", lookup.cache), (wild, "other dogs (--other-dogs)", None)) if group]
    parts = [part for part in parts if len(part[0])]  # a group whose every photo was unreadable
    other_x, other_logits, other_groups = (tuple(np.concatenate([part[i] for part in parts]) for i in range(3))
                                           if parts else (None, None, None))
    not_dog_x = embed(not_dog_records, "photos of non-dogs")[0] if not_dog_records else None
    calibration = fit_calibration(train_x, val_x, val_logits, val_y, other_x, not_dog_x, coverage=coverage, keep=keep,
                                  ood_k=ood_k, dog_k=dog_k, info={"data": str(data), "model": loaded.name},
                                  other_dog_groups=other_groups, set_method=set_method, other_dog_logits=other_logits)
    calibration.save(run)
    if calibration.ood_threshold >= 1.0 - 1e-5:
        print(f"note: {len(val_y)} validation photos are too few for a {keep:.0%} threshold (it needs "
              f"{int(np.ceil(1 / (1 - keep))) - 1} or more): every dog counts as a known breed until the run "
              "has more validation photos (--val-fraction), or pass --ood-threshold to predict", flush=True)
    return calibration


def run_outlier_record(run) -> dict | None:
    """split.json's record of the outliers a run was trained with (outlier exposure), or None."""
    from ..rundir import RunDir
    from ..train.outliers import SPLIT_KEY

    run = run if isinstance(run, RunDir) else RunDir.locate(run)
    if not run.split_file.is_file():
        return None
    record = run.read_split().get(SPLIT_KEY)
    return record if isinstance(record, dict) else None


def calibrate_after_training(run_dir, data, progress: bool = False) -> None:
    """`dogbreeds train`'s last step: calibrate the run; a failure is a note, never a failed run."""
    from ..errors import DogbreedsError

    print("calibrating (temperature, 'not a dog' / 'unknown breed' thresholds, breed sets) ...", flush=True)
    try:
        calibration = calibrate_run(run_dir, data, progress=progress)
    except (DogbreedsError, ValueError, RuntimeError, OSError) as exc:
        print(f"note: the run is trained but not calibrated ({exc}); predictions work without it. Fix that, then run "
              f"`dogbreeds calibrate {run_dir} --data {data}`", flush=True)
        return
    print(f"calibrated: temperature {calibration.temperature:.3f} ({calibration.method}), OOD threshold {calibration.ood_threshold:.4f} "
          f"(see docs/trust.md)", flush=True)


def _capped_per_breed(records, limit: int) -> list:
    """At most `limit` photos of each breed (the first by path): the 'other dogs' part of the bank
    needs breadth, not depth, and calibration must not cost more than training on a big dataset
    (the full Stanford Dogs has ~17,000 photos outside a top 20)."""
    kept, seen = [], {}
    for record in sorted(records, key=lambda r: (r.breed_id, str(r.path))):
        seen[record.breed_id] = seen.get(record.breed_id, 0) + 1
        if seen[record.breed_id] <= limit:
            kept.append(record)
    return kept


def _given_photos(specs, option: str) -> list:
    """The photos an option names (none when it is not given); the files left out are listed on
    stderr, and an option that names no photo at all is an error."""
    if not specs:
        return []
    from ..errors import DogbreedsError
    from ..infer.predictor import collect_images_or_fail

    photos = collect_images_or_fail(list(specs), f"{option} {list(specs)}")
    missing = [str(p) for p in photos if not p.exists()]
    if missing:
        raise DogbreedsError(f"{option}: {missing[0]!r} matches no file ({len(missing)} such); pass photo files, "
                             "folders or a quoted glob such as 'cats/*.jpg'")
    return photos
