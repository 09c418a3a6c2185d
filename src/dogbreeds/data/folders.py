"""Readers for people's own photos.

Folder per breed (any folder names; images found by extension, case-insensitive, the list in
`listing.image_extensions`):

    ROOT/<breed>/*.jpg|jpeg|png|...

Files that are not used (a notes.txt, a dangling symlink, a name with a newline, an image
lying in ROOT itself...) are never dropped silently: the readers add them to `left_out`
(see `listing.py`), which `sources.load_dataset` reports and records in split.json.

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
from .listing import HIDDEN, NOT_IMAGE, LeftOut, classify, describe_extensions, list_images
from .records import ImageRecord

UNSPLIT = "unsplit"
KAGGLE_CSV = "labels.csv"


def list_image_files(folder: Path, left_out: list[LeftOut] | None = None) -> list[Path]:
    """Image files directly in `folder` (by extension, case-insensitive), sorted by name so
    every later step is reproducible whatever order the file system lists them in. Every
    other entry goes to `left_out` (when given) with the reason."""
    listing = list_images(folder, recursive=False, in_breed_folder=True)
    if left_out is not None:
        left_out += listing.left_out
    return listing.files


# In ROOT itself, plain non-image files (README.md, notes) and hidden entries are expected and
# not reported; anything that looks like it was meant as a photo is.
_QUIET_IN_ROOT = (HIDDEN, NOT_IMAGE)


def breed_dirs(root: Path, left_out: list[LeftOut] | None = None) -> list[Path]:
    # Hidden folders (.git, .ipynb_checkpoints) are tooling, never breeds.
    folders = []
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        verdict = classify(p)
        if verdict is None and p.is_dir():
            folders.append(p)
        elif left_out is not None:
            if verdict is None:  # an image file: it has no breed
                verdict = ("in_root", "an image directly in the data root, not in a breed folder; "
                                      "move it into its breed's folder")
            if verdict[0] not in _QUIET_IN_ROOT:
                left_out.append(LeftOut(str(p), verdict[1], verdict[0]))
    return folders


def is_breed_folders(root: Path) -> bool:
    return root.is_dir() and any(list_image_files(d) for d in breed_dirs(root))


def read_breed_folders(root: Path, left_out: list[LeftOut] | None = None) -> list[ImageRecord]:
    """Records of ROOT/<breed>/<image>; what is not used goes to `left_out` with the reason."""
    records = []
    for folder in breed_dirs(root, left_out):
        skipped: list[LeftOut] = []
        files = list_image_files(folder, skipped)
        if not files:
            found = f"; found only: {'; '.join(f'{Path(s.path).name!r} ({s.reason})' for s in skipped[:3])}" if skipped else ""
            raise DataError(
                f"breed folder has no images: {folder} (expected {describe_extensions()} "
                f"files directly inside it{found}); add photos or remove the folder"
            )
        if left_out is not None:
            left_out += skipped
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
