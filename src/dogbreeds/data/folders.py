"""Readers for people's own photos.

Folder per breed (any folder names; images found by extension, case-insensitive):

    ROOT/<breed>/*.jpg|jpeg|png|...

CSV in the Kaggle dog-breed-identification layout:

    ROOT/labels.csv         columns id,breed
    ROOT/train/<id>.jpg

or any CSV with columns image,label where `image` is a path relative to the CSV's folder
(ROOT may then be the .csv file itself). Neither layout has an official split: the records
come back with split UNSPLIT and `sources.load_dataset` makes a stratified, seeded one.
"""
from __future__ import annotations

import csv
from pathlib import Path

from ..errors import DataError
from .records import ImageRecord

UNSPLIT = "unsplit"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
KAGGLE_CSV = "labels.csv"


def list_image_files(folder: Path) -> list[Path]:
    """Image files directly in `folder` (by extension, case-insensitive), sorted by name so
    every later step is reproducible whatever order the file system lists them in."""
    return sorted(
        p for p in Path(folder).iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def _breed_dirs(root: Path) -> list[Path]:
    # Hidden folders (.git, .ipynb_checkpoints) are tooling, never breeds.
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def is_breed_folders(root: Path) -> bool:
    return root.is_dir() and any(list_image_files(d) for d in _breed_dirs(root))


def read_breed_folders(root: Path) -> list[ImageRecord]:
    records = []
    for folder in _breed_dirs(root):
        files = list_image_files(folder)
        if not files:
            raise DataError(
                f"breed folder has no images: {folder} (expected {', '.join(sorted(IMAGE_EXTENSIONS))} "
                "files directly inside it); add photos or remove the folder"
            )
        records += [ImageRecord(path=str(p), label=-1, breed_id=folder.name, split=UNSPLIT) for p in files]
    return records


def find_csv(root: Path) -> Path | None:
    if root.is_file() and root.suffix.lower() == ".csv":
        return root
    if (root / KAGGLE_CSV).is_file():
        return root / KAGGLE_CSV
    return None


def read_csv(csv_path: Path) -> list[ImageRecord]:
    base = csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if {"id", "breed"} <= set(columns):
            image_key, label_key, to_path = "id", "breed", lambda v: base / "train" / f"{v}.jpg"
        elif {"image", "label"} <= set(columns):
            image_key, label_key, to_path = "image", "label", lambda v: base / v
        else:
            raise DataError(
                f"{csv_path}: expected columns id,breed (Kaggle dog-breed-identification) or image,label; "
                f"found {columns}"
            )
        reader.fieldnames = columns
        rows = [(row[image_key].strip(), row[label_key].strip()) for row in reader]

    problems = [f"line {i + 2}: {row}" for i, row in enumerate(rows) if not row[0] or not row[1]]
    if problems:
        raise DataError(f"{csv_path}: {len(problems)} row(s) with an empty image or label, e.g. {problems[0]}")
    seen: dict[str, str] = {}
    for image, label in rows:
        if image in seen and seen[image] != label:
            raise DataError(f"{csv_path}: image {image!r} has two labels, {seen[image]!r} and {label!r}")
        seen[image] = label
    records = [
        ImageRecord(path=str(to_path(image)), label=-1, breed_id=label, split=UNSPLIT)
        for image, label in sorted(seen.items())
    ]
    missing = [r.path for r in records if not Path(r.path).is_file()]
    if missing:
        raise DataError(
            f"{csv_path} names {len(missing)} image(s) that do not exist, e.g. {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; fix the CSV or copy the images"
        )
    return records
