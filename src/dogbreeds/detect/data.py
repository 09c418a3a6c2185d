"""Dog boxes for detection: the breed runs' split, with every box checked.

The split is the one breed runs use (`dogbreeds.data.sources.load_dataset`: the official
Stanford Dogs train/test lists, validation carved from train, seeded; top-20 breeds by
default), rebuilt here from the same functions because the breed loader treats a malformed
annotation as fatal, while detection reads the boxes itself and tolerates bad ones:

    malformed XML            the photo is left out (nothing is known of its dogs)
    no annotation file       the photo is left out
    a box partly outside     clipped to the photo
    a box wholly outside,    the box is dropped (a photo left with no box is left out)
      or of zero area

Every case is counted and named in `DetectionData.problems` (training prints them and keeps
them in split.json), never a crash. Boxes come only with the Stanford Dogs layout
(ROOT/Annotation/<wnid>-<breed>/<image stem>, Pascal-VOC XML); any other dataset is an error
that says so.
"""
from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..data.listing import shown_path

BOX_LAYOUT = ("the Stanford Dogs layout: ROOT/Images/<wnid>-<breed>/<stem>.jpg with a Pascal-VOC XML file per photo "
              "in ROOT/Annotation/<wnid>-<breed>/<stem> (Stanford Dogs' annotation.tar)")
PROBLEM_KINDS = ("malformed", "missing", "clipped", "outside", "zero_area", "no_box")


@dataclass(frozen=True)
class DetRecord:
    path: str                  # the image file
    breed_id: str              # its folder's breed (every dog of a Stanford Dogs photo has it)
    label: int                 # the breed's index in DetectionData.breeds
    split: str
    boxes: np.ndarray          # (N, 4) float32, x0 y0 x1 y1, in the photo's pixels, N >= 1
    size: tuple[int, int]      # (width, height)

    @property
    def count(self) -> int:
        return len(self.boxes)


@dataclass(frozen=True)
class BoxProblem:
    path: str                  # the annotation (or, when it is missing, the image) file
    kind: str                  # one of PROBLEM_KINDS
    detail: str

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "detail": self.detail}


@dataclass
class DetectionData:
    root: str
    breeds: tuple[str, ...]
    splits: dict[str, list[DetRecord]]
    problems: list[BoxProblem] = field(default_factory=list)
    test_split: str = "official"

    def split(self, name: str) -> list[DetRecord]:
        if name not in self.splits:
            raise DataError(f"unknown split {name!r}; expected one of {sorted(self.splits)}")
        return self.splits[name]

    def problem_counts(self) -> dict[str, int]:
        counts = Counter(p.kind for p in self.problems)
        return {k: counts[k] for k in PROBLEM_KINDS if counts[k]}

    def problem_report(self, limit: int = 5) -> str:
        """One line per kind of problem, naming the first files; '' when there are none."""
        lines = []
        for kind, n in self.problem_counts().items():
            names = [Path(p.path).name for p in self.problems if p.kind == kind]
            shown = ", ".join(names[:limit]) + (f", ... {n - limit} more" if n > limit else "")
            lines.append(f"{n} {_KIND_TEXT[kind]}: {shown}")
        return "\n".join(lines)

    def summary(self) -> dict:
        root = Path(self.root)

        def relative(path: str) -> str:
            p = Path(path)
            return p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix()

        return {
            "root": self.root, "breeds": list(self.breeds), "test_split": self.test_split,
            "counts": {s: len(r) for s, r in self.splits.items()},
            "dogs": {s: int(sum(x.count for x in r)) for s, r in self.splits.items()},
            "multi_dog_photos": {s: sum(x.count >= 2 for x in r) for s, r in self.splits.items()},
            "annotation_problems": self.problem_counts(),
            "annotation_problem_files": [p.to_dict() for p in self.problems],
            "files": {s: [relative(x.path) for x in r] for s, r in self.splits.items()},
        }


_KIND_TEXT = {
    "malformed": "malformed annotation file(s) (photo left out)",
    "missing": "photo(s) without an annotation file (left out)",
    "clipped": "box(es) partly outside the photo (clipped)",
    "outside": "box(es) wholly outside the photo (dropped)",
    "zero_area": "box(es) of zero area (dropped)",
    "no_box": "photo(s) left with no usable box (left out)",
}


def annotation_path(root: Path, image_path: str | Path) -> Path:
    image_path = Path(image_path)
    return Path(root) / "Annotation" / image_path.parent.name / image_path.stem


def image_size(path: str | Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def read_annotation(xml_path: Path, size: tuple[int, int] | None) -> tuple[np.ndarray | None, list[BoxProblem]]:
    """(boxes (N,4) float32 inside the photo, problems) of one Pascal-VOC file. `size` is the
    photo's (width, height); None: the file's own <size>. Boxes None: the file is unusable."""
    problems: list[BoxProblem] = []
    name = str(xml_path)
    try:
        root = ElementTree.parse(xml_path).getroot()
        raw = []
        for bndbox in root.iter("bndbox"):
            raw.append([float(bndbox.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax")])
        if size is None:
            size = (int(float(root.findtext("size/width"))), int(float(root.findtext("size/height"))))
    except (ElementTree.ParseError, TypeError, ValueError, OSError) as exc:
        return None, [BoxProblem(name, "malformed", f"{type(exc).__name__}: {exc}")]
    width, height = size
    boxes = []
    for x0, y0, x1, y1 in raw:
        shown = f"[{x0:g}, {y0:g}, {x1:g}, {y1:g}] in a {width}x{height} photo"
        if not all(np.isfinite((x0, y0, x1, y1))) or x1 <= x0 or y1 <= y0:
            problems.append(BoxProblem(name, "zero_area", shown))
            continue
        cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
        if cx1 <= cx0 or cy1 <= cy0:
            problems.append(BoxProblem(name, "outside", shown))
            continue
        # Pascal-VOC corners are 1-based pixel indices: xmax == width is the last column, not outside.
        if x0 < 0 or y0 < 0 or x1 > width + 1 or y1 > height + 1:
            problems.append(BoxProblem(name, "clipped", shown))
        boxes.append([cx0, cy0, cx1, cy1])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), problems


def records_with_boxes(root: Path, records, split: str, label_of: dict) -> tuple[list[DetRecord], list[BoxProblem]]:
    out, problems = [], []
    for record in records:
        xml_path = annotation_path(root, record.path)
        if not xml_path.is_file():
            problems.append(BoxProblem(str(record.path), "missing", f"no {xml_path.relative_to(root).as_posix()}"))
            continue
        try:
            size = image_size(record.path)
        except Exception:  # an unreadable photo: its own check (dogbreeds data check) reports it
            size = None
        boxes, found = read_annotation(xml_path, size)
        problems.extend(found)
        if boxes is None:
            continue
        if not len(boxes):
            problems.append(BoxProblem(str(xml_path), "no_box", "no usable <bndbox>"))
            continue
        if size is None:
            size = (int(boxes[:, 2].max()), int(boxes[:, 3].max()))
        out.append(DetRecord(str(record.path), record.breed_id, label_of.get(record.breed_id, -1), split, boxes, size))
    return out, problems


def no_boxes_error(root, layout: str) -> DataError:
    return DataError(f"{shown_path(root)} ({layout} layout) has no dog boxes: detection trains on {BOX_LAYOUT}. "
                     "Point --data at such a root (e.g. ../shared/data/stanford-dogs-mini)")


def load_detection_data(root, breeds="top20", seed: int = 0, val_fraction: float = 0.1,
                        test_fraction: float = 0.2, all_as: str | None = None) -> DetectionData:
    """train/val/test photos with their dog boxes, split as breed runs split them.

    all_as: put every photo of the chosen breeds into this one split (a dataset that holds only
    test photos); otherwise the breed runs' split (official lists, else seeded)."""
    from ..data.sources import choose_breeds, has_official_split, scan_source, split_train_test, stratified_split

    root = Path(root).expanduser().resolve()
    layout, records = scan_source(root)
    if layout != "stanford_dogs" or not (root / "Annotation").is_dir():
        raise no_boxes_error(root, layout)
    counts = dict(Counter(r.breed_id for r in records))
    chosen = choose_breeds(breeds, counts)
    label_of = {b: i for i, b in enumerate(chosen)}
    selected = [r for r in records if r.breed_id in label_of]
    if all_as:
        parts = {all_as: selected}
    else:
        pool, test = split_train_test(selected, test_fraction, seed)
        train, val = stratified_split(pool, val_fraction, seed, salt="val")
        parts = {"train": train, "val": val, "test": test}
    splits, problems = {}, []
    for name, items in parts.items():
        items = sorted(items, key=lambda r: (label_of[r.breed_id], r.path))  # the order load_dataset gives
        splits[name], found = records_with_boxes(root, items, name, label_of)
        problems.extend(found)
    if not any(splits.values()):
        raise no_boxes_error(root, layout)
    test_split = all_as and "all" or ("official" if has_official_split(selected) else "seeded")
    return DetectionData(str(root), tuple(chosen), splits, problems, test_split)


# --- mosaic (training augmentation) ---

MOSAIC_FILL = 114          # the grey of the canvas where no photo lands (YOLO's letterbox grey)
MOSAIC_MIN_VISIBLE = 0.35  # a clipped box is kept when at least this share of its area is on the canvas ...
MOSAIC_MIN_SIDE = 6.0      # ... and both its sides are at least this many canvas pixels (tiny remnants dropped)


@dataclass(frozen=True)
class MosaicPlan:
    """The mosaic of every position of one epoch's pool (train.mosaic_plan, seeded by (seed, epoch)):

    use (n,) bool        this position is a mosaic (otherwise the ordinary photo)
    four (n,) bool       a 2x2 grid of four photos; otherwise two photos side by side
    across (n,) bool     two photos: split across a square canvas's width (else its height); a canvas
                         that is not square is always split across its longer side
    split (n, 2)         where the canvas is cut, as a share of its width and height (0.3-0.7)
    partners (n, 3)      the other photos, as positions in the pool (two photos use the first)
    slot (n,)            the tile the position's own photo takes (mod the number of tiles)
    partner_flips (n, 3) a horizontal flip per partner (the own photo keeps the epoch's flip)
    scale (n, 4)         per tile: 0 fits the photo inside its tile, 1 covers the tile (geometric between)
    offset (n, 4, 2)     per tile: where the resized photo sits, 0 = left / top, 1 = right / bottom
    """

    use: np.ndarray
    four: np.ndarray
    across: np.ndarray
    split: np.ndarray
    partners: np.ndarray
    slot: np.ndarray
    partner_flips: np.ndarray
    scale: np.ndarray
    offset: np.ndarray


def mosaic_tiles(width: int, height: int, four: bool, split, across: bool = True) -> list[tuple[int, int, int, int]]:
    """The tiles (x0, y0, x1, y1, integer canvas pixels) of a width x height canvas: four around the
    point (split[0] * width, split[1] * height), or two split at that share of the longer side."""
    cx = min(max(int(round(split[0] * width)), 1), width - 1)
    cy = min(max(int(round(split[1] * height)), 1), height - 1)
    if four:
        return [(0, 0, cx, cy), (cx, 0, width, cy), (0, cy, cx, height), (cx, cy, width, height)]
    if width > height or (width == height and across):
        return [(0, 0, cx, height), (cx, 0, width, height)]
    return [(0, 0, width, cy), (0, cy, width, height)]


def place_in_tile(canvas: np.ndarray, image: np.ndarray, boxes: np.ndarray, tile, scale: float,
                  offset) -> np.ndarray:
    """Resize `image` (HxWx3 uint8, its boxes (N, 4) x0 y0 x1 y1 in its pixels) and paste it into
    `tile` of `canvas` (in place); returns its boxes in canvas pixels, clipped to the tile, the
    remnants dropped (under MOSAIC_MIN_VISIBLE of the box, or a side under MOSAIC_MIN_SIDE px).

    scale 0: the whole photo fits in the tile; 1: it covers the tile (cut at the sides); between,
    geometric. offset (0-1, 0-1): where it sits in the tile (or which part of it shows)."""
    from PIL import Image

    x0, y0, x1, y1 = tile
    tw, th = x1 - x0, y1 - y0
    h, w = image.shape[:2]
    fit, cover = min(tw / w, th / h), max(tw / w, th / h)
    s = fit * (cover / fit) ** float(scale)
    rw, rh = max(1, int(round(w * s))), max(1, int(round(h * s)))
    resized = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BILINEAR)) if (rw, rh) != (w, h) else image
    ox = x0 + int(round((tw - rw) * float(offset[0])))  # canvas x of the resized photo's left edge
    oy = y0 + int(round((th - rh) * float(offset[1])))
    # the part of the resized photo inside the tile
    px0, py0 = max(x0, ox), max(y0, oy)
    px1, py1 = min(x1, ox + rw), min(y1, oy + rh)
    if px1 > px0 and py1 > py0:
        canvas[py0:py1, px0:px1] = resized[py0 - oy:py1 - oy, px0 - ox:px1 - ox]
    if not len(boxes):
        return np.zeros((0, 4), np.float32)
    sx, sy = rw / w, rh / h  # the exact scale of the pixels (after rounding the size)
    placed = boxes.astype(np.float64) * np.asarray([sx, sy, sx, sy]) + np.asarray([ox, oy, ox, oy])
    clipped = np.stack([np.clip(placed[:, 0], px0, px1), np.clip(placed[:, 1], py0, py1),
                        np.clip(placed[:, 2], px0, px1), np.clip(placed[:, 3], py0, py1)], axis=1)
    area = (placed[:, 2] - placed[:, 0]) * (placed[:, 3] - placed[:, 1])
    bw, bh = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    keep = (bw >= MOSAIC_MIN_SIDE) & (bh >= MOSAIC_MIN_SIDE) & (bw * bh >= MOSAIC_MIN_VISIBLE * area)
    return clipped[keep].astype(np.float32).reshape(-1, 4)


def compose_mosaic(width: int, height: int, sources, tiles, scales, offsets) -> tuple[np.ndarray, np.ndarray]:
    """A height x width x 3 uint8 canvas (MOSAIC_FILL where no photo lands) with sources[i] =
    (image, boxes) placed in tiles[i] (place_in_tile), and all their boxes in canvas pixels."""
    canvas = np.full((height, width, 3), MOSAIC_FILL, dtype=np.uint8)
    boxes = [place_in_tile(canvas, image, b, tile, scale, offset)
             for (image, b), tile, scale, offset in zip(sources, tiles, scales, offsets)]
    return canvas, np.concatenate(boxes, axis=0).reshape(-1, 4)


def _flip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    width = image.shape[1]
    return image[:, ::-1], np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)


# --- torch side ---

class DetectionDataset:
    """records -> (image float (3,H,W) in [0,1], target {'boxes', 'labels'}); a horizontal flip
    when flip(index) says so (decided by the caller, so that order and flips are seeded); with a
    MosaicPlan, the positions it marks are mosaics of the record and its partners on a canvas of
    the record's own size (so a step costs what an ordinary one does)."""

    def __init__(self, records: list[DetRecord], flips: np.ndarray | None = None, mosaic: MosaicPlan | None = None):
        self.records = records
        self.flips = flips
        self.mosaic = mosaic

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(HxWx3 uint8 photo, its boxes (N, 4) float32 in the file's pixels), flipped when asked."""
        from ..data.decode import decode_image

        record = self.records[index]
        image = decode_image(record.path)
        boxes = record.boxes.copy()
        height, width = image.shape[:2]
        if (width, height) != tuple(record.size):  # boxes are in the annotation's pixels: scale to the file
            sx, sy = width / record.size[0], height / record.size[1]
            boxes *= np.asarray([sx, sy, sx, sy], dtype=np.float32)
        if flip:
            image, boxes = _flip(image, boxes)
        return image, boxes

    def mosaic_of(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        plan = self.mosaic
        own = self.load(index, bool(self.flips is not None and self.flips[index]))
        height, width = own[0].shape[:2]
        tiles = mosaic_tiles(width, height, bool(plan.four[index]), plan.split[index], bool(plan.across[index]))
        partners = [self.load(int(j), bool(f)) for j, f in
                    zip(plan.partners[index][:len(tiles) - 1], plan.partner_flips[index])]
        slot = int(plan.slot[index]) % len(tiles)
        sources = partners[:slot] + [own] + partners[slot:]
        return compose_mosaic(width, height, sources, tiles, plan.scale[index], plan.offset[index])

    def __getitem__(self, index: int):
        import torch

        if self.mosaic is not None and self.mosaic.use[index]:
            image, boxes = self.mosaic_of(index)
        else:
            image, boxes = self.load(index, bool(self.flips is not None and self.flips[index]))
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
        target = {"boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)).reshape(-1, 4),
                  "labels": torch.ones(len(boxes), dtype=torch.int64)}
        return tensor, target


def collate(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)
