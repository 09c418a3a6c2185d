"""Reader for the official Stanford Dogs layout (Khosla et al., 2011).

    ROOT/Images/<wnid>-<breed>/<wnid>_<n>.jpg
    ROOT/Annotation/<wnid>-<breed>/<wnid>_<n>      Pascal-VOC XML, one or more <object><bndbox>
    ROOT/lists/{file_list,train_list,test_list}.mat  (or the .mat files directly in ROOT,
                                                      which is how lists.tar unpacks)

The .mat lists hold `file_list` (paths relative to Images/), `annotation_list` and 1-based
`labels`. When train_list.mat and test_list.mat exist they define the official split;
otherwise the images have no split and `sources.load_dataset` makes a seeded one.
"""
from __future__ import annotations

import re
import warnings
import xml.etree.ElementTree as ElementTree
from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.io

from ..errors import DataError
from .folders import UNSPLIT, breed_dirs, list_image_files
from .listing import LeftOut
from .records import Box, ImageRecord

# A WordNet id ("n" + 8 digits), a dash, then the breed name: n02085936-Maltese_dog
BREED_FOLDER = re.compile(r"^n\d{8}-.+$")
LIST_NAMES = ("train_list.mat", "test_list.mat")


def is_stanford_dogs(root: Path) -> bool:
    images = root / "Images"
    return images.is_dir() and any(p.is_dir() and BREED_FOLDER.match(p.name) for p in images.iterdir())


def find_lists_dir(root: Path) -> Path | None:
    """Where train_list.mat and test_list.mat are, or None when there is no official split."""
    for candidate in (root / "lists", root):
        if all((candidate / name).is_file() for name in LIST_NAMES):
            return candidate
    return None


def read_stanford_dogs(root: Path, left_out: list[LeftOut] | None = None) -> list[ImageRecord]:
    """All images as records with label -1 (breeds are chosen later) and split "train"/"test"
    from the official lists, or UNSPLIT when there are no lists. Boxes are not read here
    (see `attach_boxes`): only the chosen breeds need them. Entries of Images/ that are not
    used (a notes file, a dangling link, a name with a newline...) go to `left_out` with why."""
    root = Path(root)
    images_dir = root / "Images"
    found: list[LeftOut] = []
    folders = breed_dirs(images_dir, found)
    files_of: dict[Path, list[Path]] = {}
    for folder in folders:
        files_of[folder] = list_image_files(folder, found)
        if not files_of[folder]:
            raise DataError(f"breed folder has no images: {folder} (remove the folder or put its photos back)")
    lists_dir = find_lists_dir(root)
    if lists_dir is None:
        if left_out is not None:
            left_out += found
        return [
            ImageRecord(path=str(path), label=-1, breed_id=folder.name, split=UNSPLIT)
            for folder in folders
            for path in files_of[folder]
        ]

    records: list[ImageRecord] = []
    folder_of_label: dict[int, str] = {}
    for split, list_name in (("train", "train_list.mat"), ("test", "test_list.mat")):
        relative_paths, labels = read_mat_list(lists_dir / list_name)
        _check_labels(lists_dir / list_name, relative_paths, labels, folder_of_label)
        missing = [rel for rel in relative_paths if not (images_dir / rel).is_file()]
        if missing:
            shown = ", ".join(missing[:5])
            raise DataError(
                f"{lists_dir / list_name} names {len(missing)} file(s) missing under {images_dir}: {shown}"
                f"{' ...' if len(missing) > 5 else ''}. Re-extract images.tar, or remove the lists "
                "to get a seeded split of the images that are there."
            )
        for rel in relative_paths:
            breed_id = Path(rel).parts[0]
            records.append(ImageRecord(path=str(images_dir / rel), label=-1, breed_id=breed_id, split=split))

    listed = {r.path for r in records}
    if left_out is not None:  # a file the lists name is used even when the folder listing would not take it
        left_out += [item for item in found if item.path not in listed]
    unlisted = [str(p) for folder in folders for p in files_of[folder] if str(p) not in listed]
    if unlisted:
        # Not an error (the official split is still well defined) but never silent.
        warnings.warn(
            f"{len(unlisted)} image(s) under {images_dir} are in neither {LIST_NAMES[0]} nor {LIST_NAMES[1]} "
            f"and are left out, e.g. {unlisted[0]}",
            stacklevel=2,
        )
    return records


def _check_labels(path: Path, relative_paths: list[str], labels: list[int] | None, folder_of_label: dict) -> None:
    """The breed comes from each file's folder; the 1-based `labels` must agree with it (one
    folder per label across both lists), or the lists belong to another copy of the data."""
    if labels is None:
        return
    if len(labels) != len(relative_paths):
        raise DataError(f"{path}: {len(relative_paths)} files but {len(labels)} labels; re-extract lists.tar")
    for rel, label in zip(relative_paths, labels):
        folder = Path(rel).parts[0]
        known = folder_of_label.setdefault(label, folder)
        if known != folder:
            raise DataError(
                f"{path}: label {label} is given to both {known}/ and {folder}/ (at {rel}); "
                "the lists do not match the Images/ folders — re-extract lists.tar"
            )


def read_mat_list(path: Path) -> tuple[list[str], list[int] | None]:
    """(`file_list`, `labels`) of a Stanford Dogs .mat list: paths relative to Images/ in list
    order, and their 1-based breed labels (None when the file has no `labels`)."""
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError...
        raise DataError(f"cannot read {path} as a MATLAB file ({exc}); re-extract lists.tar") from exc
    if "file_list" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path} has no 'file_list' entry (found {keys}); is it a Stanford Dogs list?")
    # loadmat gives an (N, 1) object array of 1-element string arrays.
    files = [str(np.asarray(cell).ravel()[0]) for cell in np.asarray(mat["file_list"]).ravel()]
    labels = [int(v) for v in np.asarray(mat["labels"]).ravel()] if "labels" in mat else None
    return files, labels


def attach_boxes(root: Path, records: list[ImageRecord]) -> list[ImageRecord]:
    """Return the records with `boxes` read from Annotation/<breed>/<stem>, when that folder
    exists. An image without an annotation file keeps no boxes; a malformed file is an error."""
    annotation_dir = Path(root) / "Annotation"
    if not annotation_dir.is_dir():
        return records
    out = []
    for record in records:
        image_path = Path(record.path)
        xml_path = annotation_dir / image_path.parent.name / image_path.stem
        out.append(replace(record, boxes=read_boxes(xml_path)) if xml_path.is_file() else record)
    return out


def read_boxes(xml_path: Path) -> tuple[Box, ...]:
    try:
        tree = ElementTree.parse(xml_path)
        boxes = []
        for bndbox in tree.getroot().iter("bndbox"):
            coords = [int(round(float(bndbox.findtext(tag)))) for tag in ("xmin", "ymin", "xmax", "ymax")]
            boxes.append(Box(*coords))
    except (ElementTree.ParseError, TypeError, ValueError) as exc:
        raise DataError(f"malformed annotation {xml_path}: {exc}; re-extract annotation.tar or delete the file") from exc
    return tuple(boxes)
