"""`dogbreeds evaluate`: score one run on one split and write RUN/eval/<split>.json + figures.

Which images are scored: the run's own split.json when the data root is the one it was
trained on (so the test set is exactly the one training held out), else `load_dataset` on the
new root with the run's breeds and seed. Either way the breeds must match the run's classes.

How the model runs (`engine`): "auto" (default) is the onnxruntime fast path of
`infer.engine.build_engine`, its ONNX export cached in RUN/export/ (keyed by the checkpoint's
hash, so `dogbreeds predict` and `serve` reuse it); "torch" is PyTorch eager. Both get the same
input tensors (the torch eval transform); the engine's export is checked against torch when it
is made. A model the engine cannot export is an error that names `--engine torch`.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..data.records import ClassInfo, ImageRecord
from ..errors import DataError, DogbreedsError
from . import figures, metrics

SPLITS = ("train", "val", "test")
TTA_CHOICES = (None, "flip")
ENGINES = ("auto", "torch")
ECE_BINS = 15


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}; is this a run directory written by `dogbreeds train`?") from exc


def _read_split_settings(run_dir: Path) -> dict:
    """Root, seed and fractions the run split its data with (split.json, else config.yaml)."""
    split_path = run_dir / "split.json"
    if split_path.is_file():
        return _read_json(split_path)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise DataError(f"{run_dir} has neither split.json nor config.yaml, so the breeds' split is unknown; "
                        "evaluate a run directory written by `dogbreeds train`")
    import yaml

    # A run's config.yaml is its Recipe: `data` is the root; seed and fractions sit beside it.
    config = yaml.safe_load(config_path.read_text()) or {}
    settings = {"root": config.get("data"), "seed": config.get("seed"),
                "val_fraction": config.get("val_fraction"), "test_fraction": config.get("test_fraction")}
    return {key: value for key, value in settings.items() if value is not None}


def _same_dir(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def records_for_split(run_dir: Path, data_root: str | Path, split: str, classes: ClassInfo) -> tuple[list[ImageRecord], str]:
    """The records to evaluate and a sentence saying where they came from.

    The breeds are always the run's own (classes.json), never re-chosen: "top20" may pick
    other breeds on another root. On the run's own root the split.json file list is the
    truth, and a file it names that is gone is an error (a silently smaller test set would
    make numbers incomparable)."""
    from ..data.sources import load_dataset

    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    settings = _read_split_settings(run_dir)
    # Only what the run recorded is passed on; anything it did not record keeps load_dataset's
    # own default, the same default training used. (test_fraction is None in split.json when
    # the data has an official test list, which load_dataset then uses instead.)
    split_args = {key: settings[key] for key in ("seed", "val_fraction", "test_fraction") if settings.get(key) is not None}
    dataset = load_dataset(data_root, breeds=list(classes.breed_ids), **split_args)
    if tuple(dataset.classes.breed_ids) != tuple(classes.breed_ids):
        raise DataError(f"breeds under {data_root} differ from {run_dir / 'classes.json'}; "
                        "evaluate on data that holds the run's breeds")
    listed = settings.get("files", {}).get(split) if isinstance(settings.get("files"), dict) else None
    if listed is None or not settings.get("root") or not _same_dir(settings["root"], data_root):
        return dataset.split(split), (f"load_dataset({dataset.root}, seed={dataset.seed}) with the run's "
                                      f"{len(classes)} breeds ({split} split re-made, not the run's split.json)")
    root = Path(dataset.root)
    by_relative = {}
    for name in SPLITS:
        for record in dataset.split(name):
            path = Path(record.path)
            by_relative[path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()] = record
    missing = [f for f in listed if f not in by_relative]
    if missing:
        raise DataError(f"{len(missing)} file(s) of the run's {split} split are no longer under {root} "
                        f"(first: {missing[0]}); restore them, or evaluate a copy of the data elsewhere")
    records = [replace(by_relative[f], split=split) for f in listed]
    return records, f"{run_dir / 'split.json'} (the run's own {split} list, {len(records)} files)"


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise DogbreedsError(f"unknown engine {engine!r}; choose 'auto' (onnxruntime fast path, export cached in "
                             "RUN/export/) or 'torch' (PyTorch eager)")


class EagerTorch:
    """`--engine torch`: the model itself in PyTorch eager, behind the engines' `probabilities`."""

    kind = "torch"
    description = "PyTorch eager"

    def __init__(self, model):
        self.model = model.eval()

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return torch.softmax(self.model(torch.from_numpy(batch)).float(), dim=1).numpy()


def make_engine(loaded, run_dir: Path, engine: str = "auto", threads: int | None = None):
    """What scores the images: the onnxruntime engine (export cached in RUN/export/) or eager torch."""
    check_engine(engine)
    if engine == "torch":
        return EagerTorch(loaded.model)
    from ..infer.engine import build_engine

    return build_engine(loaded.model, loaded.preprocessing, kind=engine, cache_dir=run_dir / "export",
                        threads=threads, checkpoint=loaded.path)


def predict_probabilities(engine, records: list[ImageRecord], transform, batch_size: int, tta: str | None):
    """Softmax probabilities for every readable record, their labels, and the skipped files.

    engine: anything with `probabilities(float32 NCHW array) -> N x classes` (`make_engine`).
    With tta="flip" the probabilities of the photo and its mirror image are averaged (not the
    logits), so the result stays a distribution and its loss a proper negative log-likelihood."""
    from ..data.loaders import make_loader

    if tta not in TTA_CHOICES:
        raise ValueError(f"unknown TTA {tta!r}; choose 'flip' or leave it off")
    loader = make_loader(records, transform, batch_size=batch_size, shuffle=False, seed=0, epoch=0, workers=0)
    all_probs, all_labels = [], []
    for images, labels, _, _ in loader:
        batch = images.numpy()
        probs = engine.probabilities(batch)
        if tta == "flip":
            probs = (probs + engine.probabilities(np.ascontiguousarray(batch[..., ::-1]))) / 2
        all_probs.append(probs)
        all_labels.append(labels.numpy())
    skipped = loader.skipped.to_list()  # files that failed to decode: path and reason
    probs = np.concatenate(all_probs) if all_probs else np.zeros((0, 0))
    labels = np.concatenate(all_labels) if all_labels else np.zeros((0,), dtype=np.int64)
    return probs, labels, skipped


def evaluate_run(run_dir: str | Path, data_root: str | Path, split: str = "test", tta: str | None = None,
                 batch_size: int = 32, engine: str = "auto", threads: int | None = None) -> dict:
    """Score the run's best checkpoint on `split`; writes eval/<split>.json and figures/.

    engine: "auto" (onnxruntime fast path, export cached in RUN/export/) or "torch" (eager);
    threads: the engine's intra-op threads (default: physical cores; torch's own setting for "torch")."""
    from ..models.factory import load_run

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory not found: {run_dir}")
    check_engine(engine)  # before the model is loaded
    started = time.perf_counter()
    loaded = load_run(run_dir)
    records, records_source = records_for_split(run_dir, data_root, split, loaded.classes)
    if not records:
        raise DataError(f"the {split} split of {run_dir} is empty ({records_source}); nothing to evaluate")
    from ..data.transforms import build_eval_transform

    transform = build_eval_transform(loaded.preprocessing)
    scorer = make_engine(loaded, run_dir, engine, threads)
    probs, labels, skipped = predict_probabilities(scorer, records, transform, batch_size, tta)
    if len(labels) == 0:
        raise DataError(f"every image of the {split} split was unreadable ({len(skipped)} skipped, first: "
                        f"{skipped[0]['path'] if skipped else '?'}); check {data_root}")
    summary = metrics.summarize(probs, labels, n_bins=ECE_BINS)
    scores = summary["scores"]
    result = {
        "split": split,
        "run": str(run_dir),
        "checkpoint": str(loaded.path),
        "model": loaded.name,
        "input_size": loaded.preprocessing.input_size,
        "tta": tta,
        "engine": scorer.kind,
        "engine_detail": scorer.description,
        "records_from": records_source,
        "n_images": int(len(labels)),
        "skipped": len(skipped),
        "skipped_files": skipped,
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
    write_eval(run_dir, result, loaded.classes, summary)
    return result


def write_eval(run_dir: Path, result: dict, classes: ClassInfo, summary: dict) -> None:
    split = result["split"]
    suffix = f"_{result['tta']}" if result["tta"] else ""
    out = run_dir / "eval" / f"{split}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)  # atomic: a reader never sees half a file
    label = f"{result['model']} — {split}{' + flip TTA' if result['tta'] else ''}"
    figures.plot_confusion_matrix(result["confusion_matrix"], classes.names,
                                  run_dir / "figures" / f"confusion_{split}{suffix}.png",
                                  title=f"Confusion matrix: {label} (top-1 {100 * result['top1']:.1f}%)")
    figures.plot_reliability(summary["calibration"], run_dir / "figures" / f"reliability_{split}{suffix}.png",
                             ece=result["ece"], title=f"Reliability: {label}")
    result["eval_path"] = str(out)


def format_summary(result: dict) -> str:
    return (f"{result['model']} on {result['split']} ({result['n_images']} images, {result['skipped']} skipped"
            f"{', flip TTA' if result['tta'] else ''}): top-1 {100 * result['top1']:.1f}%  "
            f"top-5 {100 * result['top5']:.1f}%  loss {result['loss']:.3f}  ECE {result['ece']:.3f}\n"
            f"wrote {result.get('eval_path', '')}")


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
    summary = _read_json(run_dir / "split.json")
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
