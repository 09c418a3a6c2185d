"""`load_dataset`: any supported root -> train/val/test records for the chosen breeds.

Layouts, tried in this order:
1. Stanford Dogs official (Images/<wnid>-<breed>/, optional Annotation/ and lists/*.mat);
2. a CSV (ROOT/labels.csv, Kaggle dog-breed-identification, or ROOT itself a .csv file) —
   checked before plain folders because the Kaggle layout also holds train/ and test/
   folders of images, which would otherwise look like two "breeds";
3. a folder per breed.

Test split: the official one when Stanford Dogs lists exist (test_fraction is then unused),
otherwise stratified by breed and seeded. Validation is always carved from the training
images, stratified and seeded. Each breed's split depends only on (seed, breed id, its files),
so a breed lands the same way whichever other breeds are chosen.
"""
from __future__ import annotations

import difflib
import re
import zlib
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import DataError
from . import folders, stanford_dogs
from .listing import LeftOut, left_out_summary, shown_path, warn_left_out
from .records import ClassInfo, ImageRecord, breed_display_name

SPLITS = ("train", "val", "test")
EXPECTED_LAYOUTS = (
    "Stanford Dogs (ROOT/Images/<wnid>-<breed>/*.jpg, optional Annotation/ and lists/*.mat), "
    "a CSV (ROOT/labels.csv with columns id,breed and images in ROOT/train/<id>.jpg, or a .csv file "
    "with columns image,label), or a folder per breed (ROOT/<breed>/*.jpg)"
)


@dataclass(frozen=True)
class Dataset:
    train: list[ImageRecord]
    val: list[ImageRecord]
    test: list[ImageRecord]
    classes: ClassInfo
    source: str                  # "stanford_dogs" | "folders" | "csv"
    root: str
    breeds: str = "top20"        # the breed choice as given
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    test_split: str = "seeded"   # "official" (Stanford Dogs lists) | "seeded"
    left_out: tuple[LeftOut, ...] = ()  # files under root not used, with why (see listing.py)

    def split(self, name: str) -> list[ImageRecord]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def split_summary(self) -> dict:
        """JSON-able description of the split (training writes it as split.json)."""
        root = Path(self.root)

        def relative(path: str) -> str:
            p = Path(path)
            return p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix()

        per_breed = {b: {s: 0 for s in SPLITS} for b in self.classes.breed_ids}
        for split in SPLITS:
            for record in self.split(split):
                per_breed[record.breed_id][split] += 1
        return {
            "source": self.source,
            "root": self.root,
            "breeds": self.breeds,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction if self.test_split == "seeded" else None,
            "test_split": self.test_split,
            "num_classes": len(self.classes),
            "classes": self.classes.to_json(),
            "counts": {s: len(self.split(s)) for s in SPLITS},
            "per_breed": per_breed,
            "files": {s: [relative(r.path) for r in self.split(s)] for s in SPLITS},
            # files under root that are not in any split, and why (the first few by name)
            "left_out": left_out_summary([replace(item, path=relative(item.path)) for item in self.left_out]),
        }


def detect_layout(root: str | Path) -> str:
    """'stanford_dogs' | 'csv' | 'folders', or a DataError saying what was expected and found."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data root does not exist: {shown_path(root)}; check the path, or fetch Stanford Dogs there with "
                        f"`dogbreeds data download --dest {shown_path(root)}`")
    if root.is_dir() and stanford_dogs.is_stanford_dogs(root):
        return "stanford_dogs"
    if folders.find_csv(root) is not None:
        return "csv"
    if root.is_dir() and folders.is_breed_folders(root):
        return "folders"
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:10] if root.is_dir() else [root.name]
    raise DataError(f"{shown_path(root)} is not a dataset root. Expected {EXPECTED_LAYOUTS}. Found: {found or 'an empty folder'}")


def scan_source(root: str | Path, left_out: list[LeftOut] | None = None) -> tuple[str, list[ImageRecord]]:
    """(layout, every image as a record with label -1 and split 'train'/'test' or UNSPLIT).

    Files of the layout's folders that are not used go to `left_out` (with why) when it is
    given; otherwise they are reported on stderr (`listing.warn_left_out`), so never silently."""
    root = Path(root).expanduser().resolve()
    layout = detect_layout(root)
    found: list[LeftOut] = []
    if layout == "stanford_dogs":
        records = stanford_dogs.read_stanford_dogs(root, found)
    elif layout == "csv":
        records = folders.read_csv(folders.find_csv(root))
    else:
        records = folders.read_breed_folders(root, found)
    if left_out is None:
        warn_left_out(found, str(root))
    else:
        left_out += found
    return layout, records


def breed_counts(root: str | Path) -> dict[str, int]:
    """Images per breed id over all splits, for every breed in the root (sorted by id)."""
    _, records = scan_source(root)
    return dict(sorted(Counter(r.breed_id for r in records).items()))


def top_k_breeds(counts: dict[str, int], k: int) -> list[str]:
    """The k breeds with the most images; ties broken by breed id ascending. Sorted by id."""
    ranked = sorted(counts, key=lambda b: (-counts[b], b))
    return sorted(ranked[:k])


def choose_breeds(spec: str | list[str] | tuple[str, ...], counts: dict[str, int]) -> list[str]:
    """Breed ids (sorted) chosen by `spec`: "topN", "all", a comma list of ids or display
    names (case-insensitive), a list of those, or a path to a text file with one per line."""
    if not counts:
        raise DataError("the dataset has no breeds: no labelled images were found; check the data root's layout")
    if isinstance(spec, (list, tuple)):
        return _resolve_names(list(spec), counts, origin="breed list")
    text = str(spec).strip()
    if text.lower() == "all":
        return sorted(counts)
    top = re.fullmatch(r"top(\d+)", text.lower())
    if top:
        k = int(top.group(1))
        if not 1 <= k <= len(counts):
            raise DataError(f"--breeds {text}: the data has {len(counts)} breeds; choose top1..top{len(counts)} or 'all'")
        return top_k_breeds(counts, k)
    path = Path(text).expanduser()
    if path.is_file():
        lines = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
        names = [line for line in lines if line]
        if not names:
            raise DataError(f"breeds file {path} lists no breeds (one breed id or name per line)")
        return _resolve_names(names, counts, origin=str(path))
    if path.suffix.lower() == ".txt" or "/" in text:
        raise DataError(f"breeds file not found: {path}")
    return _resolve_names([n for n in text.split(",") if n.strip()], counts, origin="--breeds")


def _normalise(name: str) -> str:
    return breed_display_name(name.strip()).lower().replace("-", " ")


def _resolve_names(names: list[str], counts: dict[str, int], origin: str) -> list[str]:
    lookup: dict[str, str] = {}
    for breed_id in counts:
        for key in {breed_id.lower(), _normalise(breed_id)}:
            lookup.setdefault(key, breed_id)
    chosen, unknown = set(), []
    for name in names:
        match = lookup.get(name.strip().lower()) or lookup.get(_normalise(name))
        if match is None:
            unknown.append(name.strip())
        else:
            chosen.add(match)
    if unknown:
        readable = sorted({breed_display_name(b) for b in counts})
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(breed_display_name(name), readable, n=3, cutoff=0.5)
            hints.append(f"{name!r} (close: {', '.join(close)})" if close else repr(name))
        raise DataError(
            f"unknown breed(s) in {origin}: {'; '.join(hints)}. "
            "Run `dogbreeds data stats DATA` to list the breeds."
        )
    return sorted(chosen)


def stratified_split(records: list[ImageRecord], fraction: float, seed: int, salt: str) -> tuple[list, list]:
    """Split each breed's records into (kept, held out) with round(n * fraction) held out,
    never holding out a breed's last image. The shuffle of a breed is seeded by (seed, salt, breed id)."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"split fraction must be in [0, 1), got {fraction}")
    by_breed: dict[str, list[ImageRecord]] = {}
    for record in records:
        by_breed.setdefault(record.breed_id, []).append(record)
    kept, held = [], []
    for breed_id in sorted(by_breed):
        items = sorted(by_breed[breed_id], key=lambda r: r.path)
        rng = np.random.default_rng([seed, zlib.crc32(f"{salt}:{breed_id}".encode())])
        order = rng.permutation(len(items))
        n_held = min(int(np.floor(len(items) * fraction + 0.5)), len(items) - 1)
        held += [items[i] for i in order[:n_held]]
        kept += [items[i] for i in order[n_held:]]
    return kept, held


def has_official_split(records: list[ImageRecord]) -> bool:
    return all(r.split in ("train", "test") for r in records)


def split_train_test(records: list[ImageRecord], test_fraction: float, seed: int) -> tuple[list, list]:
    """The official train/test split when every record has one, else a stratified, seeded one."""
    if has_official_split(records):
        return [r for r in records if r.split == "train"], [r for r in records if r.split == "test"]
    return stratified_split(records, test_fraction, seed, salt="test")


def load_dataset(
    root: str | Path,
    breeds: str | list[str] = "top20",
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> Dataset:
    root = Path(root).expanduser().resolve()
    left_out: list[LeftOut] = []
    layout, records = scan_source(root, left_out)
    warn_left_out(left_out, str(root))
    counts = dict(Counter(r.breed_id for r in records))
    chosen = choose_breeds(breeds, counts)
    label_of = {breed_id: i for i, breed_id in enumerate(chosen)}
    selected = [r for r in records if r.breed_id in label_of]
    if layout == "stanford_dogs":
        selected = stanford_dogs.attach_boxes(root, selected)

    pool, test = split_train_test(selected, test_fraction, seed)
    train, val = stratified_split(pool, val_fraction, seed, salt="val")

    without_train = sorted(set(chosen) - {r.breed_id for r in train})
    if without_train:
        raise DataError(
            f"chosen breed(s) with no training image: {', '.join(without_train)}; "
            "add photos, lower --test-fraction/--val-fraction, or leave these breeds out"
        )

    def finish(items: list[ImageRecord], split: str) -> list[ImageRecord]:
        labelled = [replace(r, label=label_of[r.breed_id], split=split) for r in items]
        return sorted(labelled, key=lambda r: (r.label, r.path))

    return Dataset(
        train=finish(train, "train"),
        val=finish(val, "val"),
        test=finish(test, "test"),
        classes=ClassInfo(tuple(chosen)),
        source=layout,
        root=str(root),
        breeds=breeds if isinstance(breeds, str) else ",".join(breeds),
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        test_split="official" if has_official_split(selected) else "seeded",
        left_out=tuple(left_out),
    )
