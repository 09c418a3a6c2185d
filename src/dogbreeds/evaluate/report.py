"""`dogbreeds evaluate`: score one run on one split and write RUN/eval/<split>.json + figures.

Which images are scored (`records_for_split`): the run's own split.json when the data root is
the one it was trained on (so the test set is exactly the one training held out). On another
root, the test split is someone else's test set: that root's official test list, or all its
photos of the run's breeds when it has none (no training images needed); breeds are matched by
id, photos of breeds the run does not know are reported, not scored, and photos the run trained
on are left out. Train/val on another root are re-made by `load_dataset` with the run's breeds
and seed. The eval JSON says which (`records`, `records_from`). Photos come from the decoded
cache of `dogbreeds data prepare` when there is one for the model's sizing (`prepared_cache`).

How the model runs (`engine`, a name of the backend registry in infer/backend.py): "auto"
(default) is the engine chosen for this machine (infer/auto.py: the fastest that agrees with fp32
on the run's validation photos, recorded in RUN/export/ beside its export, keyed by the
checkpoint's hash, so `dogbreeds predict` and `serve` reuse both); "torch" is PyTorch eager. Every
backend gets the same input tensors (the one eval transform) and gives logits; the softmax is
taken here. The export is checked against torch when it is made. A model that cannot be
exported is an error that names `--engine torch`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..data.listing import SKIPPED_LIST_LIMIT
from ..data.records import ClassInfo, ImageRecord
from ..errors import DataError
from ..infer.backend import check_engine, softmax
from ..rundir import RunDir
from . import figures, metrics
from ..data.listing import shown_path

SPLITS = ("train", "val", "test")
TTA_CHOICES = (None, "flip")
ECE_BINS = 15


@dataclass
class EvalRecords:
    """What `evaluate` scores: the records (labelled with the run's class indices) and where
    they came from, for the eval JSON."""

    records: list[ImageRecord]
    kind: str        # one of RECORD_KINDS
    source: str      # one sentence for people
    unknown_breeds: dict = field(default_factory=dict)    # breed id -> photos, breeds the run does not know
    breeds_without_photos: list = field(default_factory=list)  # the run's breeds absent from the data
    left_out_trained: list = field(default_factory=list)  # data files the run trained or validated on


# "run_split": the run's own split.json list (its own data root); "resplit": load_dataset with
# the run's breeds and seed; "test_list": another root's official test list; "all_photos":
# every photo of the run's breeds under another root that has no test list.
RECORD_KINDS = ("run_split", "resplit", "test_list", "all_photos")


def _split_settings(run: RunDir, split: str) -> dict:
    """Root, seed and fractions the run split its data with (split.json, else config.yaml). A
    checkpoint folder with neither can still be tested on another root's photos ({})."""
    if run.split_file.is_file():
        return run.read_split()
    # A run's config.yaml is its Recipe: `data` is the root; seed and fractions sit beside it.
    config = run.read_config()
    if not config:
        if split == "test":
            return {}
        raise DataError(f"{run.path} has neither {run.split_file.name} nor {run.config.name}, so its {split} "
                        "split is unknown; evaluate a run directory written by `dogbreeds train`, or --split test")
    settings = {"root": config.get("data"), "seed": config.get("seed"),
                "val_fraction": config.get("val_fraction"), "test_fraction": config.get("test_fraction")}
    return {key: value for key, value in settings.items() if value is not None}


def _same_dir(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _relative(path: str | Path, root: Path) -> str:
    path = Path(path)
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def records_for_split(run_dir: str | Path, data_root: str | Path, split: str, classes: ClassInfo) -> EvalRecords:
    """The records to evaluate, and where they came from.

    The breeds are always the run's own (classes.json), never re-chosen: "top20" may pick
    other breeds on another root. On the run's own root the split.json file list is the
    truth, and a file it names that is gone is an error (a silently smaller test set would
    make numbers incomparable). On another root the test split is that data's own test list,
    or all its photos of the run's breeds when it has none (someone else's test set needs no
    training images); see `_other_test_records`. Train and val on another root are re-made
    by load_dataset with the run's breeds and seed."""
    from ..data.sources import load_dataset

    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    run = RunDir(run_dir)
    settings = _split_settings(run, split)
    same_root = bool(settings.get("root")) and _same_dir(settings["root"], data_root)
    if split == "test" and not same_root:
        return _other_test_records(run, data_root, classes, settings)
    # Only what the run recorded is passed on; anything it did not record keeps load_dataset's
    # own default, the same default training used. (test_fraction is None in split.json when
    # the data has an official test list, which load_dataset then uses instead.)
    split_args = {key: settings[key] for key in ("seed", "val_fraction", "test_fraction") if settings.get(key) is not None}
    dataset = load_dataset(data_root, breeds=list(classes.breed_ids), **split_args)
    if tuple(dataset.classes.breed_ids) != tuple(classes.breed_ids):
        raise DataError(f"breeds under {shown_path(data_root)} differ from {run.classes_file}; "
                        "evaluate on data that holds the run's breeds")
    listed = settings.get("files", {}).get(split) if isinstance(settings.get("files"), dict) else None
    if listed is None or not same_root:
        return EvalRecords(dataset.split(split), "resplit",
                           f"load_dataset({dataset.root}, seed={dataset.seed}) with the run's {len(classes)} breeds "
                           f"({split} split re-made, not the run's {run.split_file.name})")
    root = Path(dataset.root)
    by_relative = {_relative(record.path, root): record for name in SPLITS for record in dataset.split(name)}
    missing = [f for f in listed if f not in by_relative]
    if missing:
        raise DataError(f"{len(missing)} file(s) of the run's {split} split are no longer under {shown_path(root)} "
                        f"(first: {missing[0]}); restore them, or evaluate a copy of the data elsewhere")
    records = [replace(by_relative[f], split=split) for f in listed]
    return EvalRecords(records, "run_split", f"{run.split_file} (the run's own {split} list, {len(records)} files)")


def _trained_files(run: RunDir, settings: dict) -> dict[tuple[str, str], int | None]:
    """(folder, file name) -> size in bytes (None when the run's copy is gone) of every file
    the run trained or validated on, from its split.json."""
    files = settings.get("files") if isinstance(settings.get("files"), dict) else {}
    root = Path(settings["root"]) if settings.get("root") else None
    trained = {}
    for name in ("train", "val"):
        for relative in files.get(name) or ():
            path = Path(relative)
            original = root / path if root is not None and not path.is_absolute() else path
            trained[(path.parent.name, path.name)] = _size(original)
    return trained


def _other_test_records(run: RunDir, data_root: str | Path, classes: ClassInfo, settings: dict) -> EvalRecords:
    """The test set of a data root the run was not trained on.

    Its official test list when it has one (Stanford Dogs lists; the train list may be empty),
    else every photo under it. Photos are matched to the run's breeds by breed id (the folder
    name, or the CSV label); photos of breeds the run does not know are counted and reported,
    not scored, and the run's breeds the data lacks are listed. A photo that is one the run
    trained or validated on (same breed folder and file name as a train/val file of its
    split.json, and the same size when that file is still there) is left out and listed: on a
    copy of the run's own data this leaves exactly its held-out photos."""
    from ..data import stanford_dogs
    from ..data.sources import has_official_split, scan_source

    root = Path(data_root).expanduser().resolve()
    layout, scanned = scan_source(root)
    official = has_official_split(scanned)
    pool = [r for r in scanned if r.split == "test"] if official else scanned
    label_of = {breed: i for i, breed in enumerate(classes.breed_ids)}
    unknown = dict(sorted(Counter(r.breed_id for r in pool if r.breed_id not in label_of).items()))
    known = [r for r in pool if r.breed_id in label_of]
    if not known:
        shown = ", ".join(list(unknown)[:5]) + (" ..." if len(unknown) > 5 else "")
        what = f"its test list holds {len(pool)} photo(s)" if official else f"it holds {len(pool)} photo(s)"
        raise DataError(f"{shown_path(root)} has no photo of the run's {len(classes)} breeds ({what}"
                        + (f" of {len(unknown)} unknown breed(s): {shown}" if unknown else "")
                        + f"); breeds are matched by id (folder name or CSV label), e.g. {classes.breed_ids[0]}: "
                        f"name the folders as in {run.classes_file}")
    trained = _trained_files(run, settings)
    records, left_out = [], []
    for record in known:
        path = Path(record.path)
        key = (path.parent.name, path.name)
        if key in trained and trained[key] in (None, _size(path)):
            left_out.append(str(path))
        else:
            records.append(replace(record, label=label_of[record.breed_id], split="test"))
    if layout == "stanford_dogs":
        records = stanford_dogs.attach_boxes(root, records)
    records.sort(key=lambda r: (r.label, r.path))
    present = {r.breed_id for r in records}
    absent = [b for b in classes.breed_ids if b not in present]
    kind = "test_list" if official else "all_photos"
    source = (f"the official test list of {shown_path(root)} ({len(records)} photos of the run's breeds)" if official else
              f"all photos of the run's breeds under {shown_path(root)} ({len(records)}; it has no test list)")
    if left_out:
        source += f"; {len(left_out)} photo(s) the run trained or validated on left out"
    if not isinstance(settings.get("files"), dict):
        source += f"; the run has no {run.split_file.name}, so photos it trained on could not be left out"
    if not records:
        raise DataError(f"every photo of the run's breeds under {shown_path(root)} ({len(left_out)}, first: {left_out[0]}) is one "
                        f"the run trained or validated on (see {run.split_file}); evaluate on photos it has not seen")
    return EvalRecords(records, kind, source, unknown, absent, left_out)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def prepared_cache(data_root: str | Path, preprocessing, records: list[ImageRecord], log=print):
    """The decoded cache `dogbreeds data prepare` wrote under DATA for this model's sizing, when it
    holds every record unchanged since; else None (the files are decoded). The log says which."""
    from ..data.cache import find_prepared_cache

    lookup = find_prepared_cache(Path(data_root).expanduser().resolve(), preprocessing, records)
    if lookup.message:
        log(f"[evaluate] {lookup.message}")
    return lookup.cache


def make_backend(loaded, run_dir: Path, engine: str = "auto", threads: int | None = None):
    """What scores the images: the backend of `engine` for the run's model (`load_run`'s); the
    onnxruntime engines keep their export in RUN/export/, keyed by the checkpoint (hashed once)."""
    from ..infer.backend import backend_for_loaded

    return backend_for_loaded(loaded, engine, cache_dir=RunDir(run_dir).export_dir, threads=threads)


def predict_probabilities(backend, records: list[ImageRecord], transform, batch_size: int, tta: str | None,
                          cache=None):
    """Softmax probabilities for every readable record, their labels, and the skipped files.

    backend: anything with `forward(float32 NCHW array) -> N x classes logits` (`make_backend`).
    With tta="flip" the probabilities of the photo and its mirror image are averaged (not the
    logits), so the result stays a distribution and its loss a proper negative log-likelihood."""
    from ..data.loaders import make_loader

    if tta not in TTA_CHOICES:
        raise ValueError(f"unknown TTA {tta!r}; choose 'flip' or leave it off")
    loader = make_loader(records, transform, batch_size=batch_size, shuffle=False, seed=0, epoch=0, workers=0,
                         cache=cache)  # cache: an ImageCache (`prepared_cache`) or None to decode the files
    all_probs, all_labels = [], []
    for images, labels, _, _ in loader:
        batch = images.numpy()
        probs = softmax(backend.forward(batch))
        if tta == "flip":
            probs = (probs + softmax(backend.forward(np.ascontiguousarray(batch[..., ::-1])))) / 2
        all_probs.append(probs)
        all_labels.append(labels.numpy())
    skipped = loader.skipped.to_list()  # files that failed to decode: path and reason
    probs = np.concatenate(all_probs) if all_probs else np.zeros((0, 0))
    labels = np.concatenate(all_labels) if all_labels else np.zeros((0,), dtype=np.int64)
    return probs, labels, skipped


def evaluate_run(run_dir: str | Path, data_root: str | Path, split: str = "test", tta: str | None = None,
                 batch_size: int = 32, engine: str = "auto", threads: int | None = None, log=print) -> dict:
    """Score the run's best checkpoint on `split`; writes eval/<split>.json and figures/.

    engine: "auto" (onnxruntime fast path, export cached in RUN/export/) or "torch" (eager);
    threads: the engine's intra-op threads (default: physical cores; torch's own setting for "torch").
    The photos come from the decoded cache of `dogbreeds data prepare` when DATA has one for the
    model's sizing that holds them all (`prepared_cache`); `log` says whether it was used."""
    from ..models.factory import load_run

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory not found: {run_dir}")
    check_engine(engine)  # before the model is loaded
    started = time.perf_counter()
    loaded = load_run(run_dir)
    chosen = records_for_split(run_dir, data_root, split, loaded.classes)
    records, records_source = chosen.records, chosen.source
    if not records:
        raise DataError(f"the {split} split of {run_dir} is empty ({records_source}); nothing to evaluate")
    if chosen.unknown_breeds:
        log(f"[evaluate] not scored: {sum(chosen.unknown_breeds.values())} photo(s) of {len(chosen.unknown_breeds)} "
            f"breed(s) the run does not know: {', '.join(chosen.unknown_breeds)}")
    from ..data.transforms import build_eval_transform

    transform = build_eval_transform(loaded.preprocessing)
    cache = prepared_cache(data_root, loaded.preprocessing, records, log=log)
    backend = make_backend(loaded, run_dir, engine, threads)
    probs, labels, skipped = predict_probabilities(backend, records, transform, batch_size, tta, cache=cache)
    if skipped:  # named on stderr, and in the eval JSON (count, and the first files by name)
        from ..data.loaders import skipped_report

        print(skipped_report(skipped, f"{split}-split"), file=sys.stderr, flush=True)
    if len(labels) == 0:
        raise DataError(f"every image of the {split} split was unreadable ({len(skipped)} skipped, first: "
                        f"{skipped[0]['path'] if skipped else '?'}); check {shown_path(data_root)}")
    summary = metrics.summarize(probs, labels, n_bins=ECE_BINS)
    scores = summary["scores"]
    result = {
        "split": split,
        "run": str(run_dir),
        "checkpoint": str(loaded.path),
        "model": loaded.name,
        "input_size": loaded.preprocessing.input_size,
        "tta": tta,
        "engine": backend.kind,
        "engine_detail": backend.description,
        "engine_choice": getattr(backend, "auto_choice", None),  # what "auto" measured on this machine (infer/auto.py)
        "records_from": records_source,
        "records": chosen.kind,
        "unknown_breeds": chosen.unknown_breeds,
        "breeds_without_photos": chosen.breeds_without_photos,
        "left_out_trained": chosen.left_out_trained,
        "cache": str(cache.directory) if cache is not None else None,
        "n_images": int(len(labels)),
        "skipped": len(skipped),
        "skipped_files": skipped[:SKIPPED_LIST_LIMIT],
        "top1": summary["top1"],
        "top5": summary["top5"],
        "loss": summary["loss"],
        "ece": summary["ece"],
        "ece_bins": ECE_BINS,
        "macro_f1": summary["macro_f1"],
        "classes": list(loaded.classes.breed_ids),
        "per_class": {
            breed: {"precision": float(scores.precision[i]), "recall": float(scores.recall[i]),
                    "f1": float(scores.f1[i]), "support": int(scores.support[i])}
            for i, breed in enumerate(loaded.classes.breed_ids)
        },
        "confusion_matrix": summary["confusion_matrix"],
        "confusion_matrix_orientation": "rows = true breed, columns = predicted breed (classes order)",
        "calibration": summary["calibration"].to_jsonable(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    from ..trust.evaluation import trust_metrics  # issue 11: ECE after temperature scaling, conformal coverage

    result["trust"] = trust_metrics(RunDir(run_dir), probs, labels, RunDir(run_dir).figure(
        f"reliability_{split}{'_' + tta if tta else ''}_calibrated.png"), title=f"{loaded.name} — {split}")
    write_eval(run_dir, result, loaded.classes, summary)
    return result


def write_eval(run_dir: Path, result: dict, classes: ClassInfo, summary: dict) -> None:
    run = RunDir(run_dir)
    split = result["split"]
    suffix = f"_{result['tta']}" if result["tta"] else ""
    out = run.write_json(run.eval_file(split, suffix), result)  # atomic: a reader never sees half a file
    label = f"{result['model']} — {split}{' + flip TTA' if result['tta'] else ''}"
    figures.plot_confusion_matrix(result["confusion_matrix"], classes.names, run.figure(f"confusion_{split}{suffix}.png"),
                                  title=f"Confusion matrix: {label} (top-1 {100 * result['top1']:.1f}%)")
    figures.plot_reliability(summary["calibration"], run.figure(f"reliability_{split}{suffix}.png"),
                             ece=result["ece"], title=f"Reliability: {label}")
    result["eval_path"] = str(out)


def format_summary(result: dict) -> str:
    lines = [f"{result['model']} on {result['split']} ({result['n_images']} images, {result['skipped']} skipped"
             f"{', flip TTA' if result['tta'] else ''}): top-1 {100 * result['top1']:.1f}%  "
             f"top-5 {100 * result['top5']:.1f}%  loss {result['loss']:.3f}  ECE {result['ece']:.3f}",
             f"images: {result['records_from']}"]
    if result.get("breeds_without_photos"):
        lines.append(f"no photo of {len(result['breeds_without_photos'])} of the run's breeds: "
                     f"{', '.join(result['breeds_without_photos'])}")
    trust = result.get("trust")
    lines.append(f"calibrated (T={trust['temperature']:.2f}{' + top-label isotonic' if trust.get('method', '').endswith('isotonic') else ''}): ECE {trust['ece_before']:.3f} -> {trust['ece_after']:.3f}; "
                 f"breed sets: coverage {100 * trust['coverage']:.1f}% (target {100 * trust['coverage_target']:.0f}%), "
                 f"mean size {trust['mean_set_size']:.2f}"
                 + (f", LAC sets, {100 * trust['empty_sets']:.1f}% empty" if trust.get("set_method") == "lac" else "")
                 if trust else
                 "no calibration in this run (ECE after scaling, breed sets): run `dogbreeds calibrate RUN --data DATA`")
    return "\n".join(lines + [f"wrote {result.get('eval_path', '')}"])


# --- the comparison report (DIR/report.md) -------------------------------------------------

def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def recipe_differences(recipes: dict[str, dict]) -> tuple[list[str], dict]:
    """(settings whose value differs between models, settings shared by all: name -> value).
    `out` (each run's own folder) is left out: it always differs and changes no number."""
    flat = {name: _flatten(r) for name, r in recipes.items()}
    keys = sorted({k for f in flat.values() for k in f} - {"out"})
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat.values()}) > 1]
    first = next(iter(flat.values()))
    shared = {k: first.get(k) for k in keys if k not in differ}
    return differ, shared


def _split_fingerprint(run_dir: Path) -> tuple:
    """Which files each split holds; equal fingerprints mean the models saw the same split."""
    summary = RunDir(run_dir).read_split()
    return tuple(tuple(summary["files"][s]) for s in SPLITS), summary


def _minutes(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def _pct(value) -> str:
    return f"{100 * value:.1f}%"


def write_compare_report(out: Path, options, rows: list[dict], machine: dict, seconds: float) -> Path:
    out = Path(out)
    fig_dir = out / "figures"
    names = [row["plan"].run_name for row in rows]
    histories = {}
    for row in rows:
        lines = row["history"]  # metrics.jsonl, read once by run_compare
        histories[row["plan"].model] = {
            "epoch": [line["epoch"] + 1 for line in lines],
            "val_top1": [line["val_top1"] for line in lines],
            "val_loss": [line["val_loss"] for line in lines],
            "train_loss": [line["train_loss"] for line in lines],
        }
    figures.plot_training_curves(histories, fig_dir / "curves.png")
    figures.plot_accuracy_vs_gmacs(
        [{"name": row["plan"].model, "gmacs": row["gmacs"], "top1": row["eval"]["top1"], "params_m": row["params_m"]}
         for row in rows], fig_dir / "accuracy_vs_gmacs.png",
        title="Test top-1 vs GMACs at each run's input size (bubble area ~ parameters)")
    for row, name in zip(rows, names):
        result = row["eval"]
        figures.plot_confusion_matrix(result["confusion_matrix"], ClassInfo(tuple(result["classes"])).names,
                                      fig_dir / f"confusion_{name}.png",
                                      title=f"{row['plan'].model}: test confusion (top-1 {_pct(result['top1'])})")

    fingerprints = [_split_fingerprint(row["run_dir"]) for row in rows]
    same_split = all(f[0] == fingerprints[0][0] for f in fingerprints)
    summary = fingerprints[0][1]
    counts = summary["counts"]
    differ, shared = recipe_differences({row["plan"].model: row["recipe"].to_dict() for row in rows})

    lines = [
        "# Model comparison",
        "",
        f"Data: `{options.data}` ({summary['source']}), breeds `{options.breeds}` ({summary['num_classes']} breeds), "
        f"seed {options.seed}: {counts['train']} train / {counts['val']} val / {counts['test']} test images "
        f"(test split: {summary['test_split']}). "
        + ("Every model used exactly the same split (file lists in each run's split.json are identical)."
           if same_split else "**WARNING: the runs' split.json file lists differ; the numbers are not comparable.**"),
        "",
        f"Mode: {'--quick' if options.quick else 'full'}{', --no-pretrained' if options.no_pretrained else ''}. "
        f"Chance is {_pct(1 / summary['num_classes'])}. Wall time of this command: {seconds / 60:.1f} min "
        f"(a resumed or skipped run counts only the time spent in this call).",
        "",
        "## Results on the test split",
        "",
        "| model | initialisation | input px | test top-1 | top-5 | loss | ECE | params (M) | GMACs @input | GMACs @224 "
        "| images/s | train time: wall / epochs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        result = row["eval"]
        lines.append(
            f"| {row['plan'].model} | {row['plan'].note} | {row['input_size']} | {_pct(result['top1'])} | "
            f"{_pct(result['top5'])} | {result['loss']:.3f} | {result['ece']:.3f} | {row['params_m']:.2f} | "
            f"{row['gmacs']:.3f} | {row['gmacs_224']:.2f} | {row['images_per_s']:.0f} | "
            f"{_minutes(row.get('train_wall_seconds'))} / {_minutes(row['train_seconds'])} |")
    lines += [
        "",
        f"Test set: {rows[0]['eval']['n_images']} images"
        + "".join(f", {row['eval']['skipped']} skipped for {row['plan'].model}" for row in rows if row['eval']['skipped'])
        + f". Loss is the mean negative log-likelihood of the true breed; ECE uses {ECE_BINS} equal-width confidence bins. "
        f"images/s: eval mode, batch {machine['speed_batch']}, fp32, random input at the run's input size, on the CPU "
        f"({machine['threads']} torch thread(s), {machine['cpu_count']} cores visible, torch {machine['torch']}); "
        "the models were measured in turn in one process, median of the rounds. Train time: wall time of "
        "train() in compare (feature extraction, validation and checkpoints included; n/a when the run was "
        "trained elsewhere) / sum of the epochs' training time from metrics.jsonl.",
        "",
        "## Training curves",
        "",
        "![validation top-1 and loss per epoch](figures/curves.png)",
        "",
        "## Accuracy vs compute",
        "",
        "![test top-1 against GMACs, bubble area proportional to parameters](figures/accuracy_vs_gmacs.png)",
        "",
        "## Confusion matrices (test split; rows true breed, columns predicted)",
        "",
    ]
    for row, name in zip(rows, names):
        lines += [f"### {row['plan'].model}", "", f"![confusion matrix of {row['plan'].model}](figures/confusion_{name}.png)", ""]
    lines += ["## What differed between runs", ""]
    if differ:
        lines += ["| setting | " + " | ".join(row["plan"].model for row in rows) + " |",
                  "|---|" + "---|" * len(rows)]
        flat = [_flatten(row["recipe"].to_dict()) for row in rows]
        for key in differ:
            values = [f.get(key) for f in flat]
            lines.append(f"| {key} | " + " | ".join(f"`{v}`" for v in values) + " |")
    else:
        lines.append("Only the run folder (`out`).")
    lines += ["", "Everything else was identical (besides each run's own `out` folder):", "",
              ", ".join(f"`{k}={v}`" for k, v in shared.items()), "",
              "## Runs", ""]
    lines += [f"- {row['plan'].model}: `{row['run_dir']}` (requested as `{row['plan'].requested}`)" for row in rows]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
