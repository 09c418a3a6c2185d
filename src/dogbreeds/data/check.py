"""Leakage check: the same photo (or nearly the same) in two splits inflates test accuracy.

`find_duplicates(records)` hashes every file twice:
- sha256 of the bytes: exact duplicates (the same file copied);
- a perceptual hash (imagehash.phash, 64 bits, from a 32x32 grayscale DCT of the decoded
  photo): near duplicates, i.e. pairs whose Hamming distance is <= `threshold`. These catch
  re-encoded, resized or lightly edited copies that sha256 misses.
Files that `decode_image` refuses are reported as unreadable.

Only pairs whose two files are in *different* splits are listed (that is the leak); pairs
inside one split are only counted.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from multiprocessing import Pool

import imagehash
import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import ImageDecodeError
from .decode import decode_image
from .records import ImageRecord

# Measured on the mini data (docs/data.md): JPEG re-encodes and resizes of a photo land at
# distance 0-4 from it, while different photos are almost never closer than 10 (a handful of
# near-identical shots of one dog aside). 8 leaves margin on both sides.
NEAR_DUPLICATE_THRESHOLD = 8
# Below this many files a process pool costs more than it saves.
_POOL_MIN_FILES = 64


@dataclass(frozen=True)
class FileHashes:
    sha256: str
    phash: int | None       # 64-bit perceptual hash, None when unreadable
    error: str | None       # decode error message when unreadable


@dataclass(frozen=True)
class DuplicatePair:
    kind: str               # "exact" | "near"
    first: ImageRecord
    second: ImageRecord
    distance: int           # phash Hamming distance (0 for exact copies)

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "distance": self.distance,
            "first": {"path": self.first.path, "split": self.first.split, "breed_id": self.first.breed_id},
            "second": {"path": self.second.path, "split": self.second.split, "breed_id": self.second.breed_id},
        }


@dataclass
class DuplicateReport:
    num_images: int
    threshold: int
    exact: list[DuplicatePair] = field(default_factory=list)        # across splits
    near: list[DuplicatePair] = field(default_factory=list)         # across splits, not exact
    unreadable: list[tuple[ImageRecord, str]] = field(default_factory=list)
    within_split_exact: int = 0
    within_split_near: int = 0

    @property
    def clean(self) -> bool:
        return not (self.exact or self.near or self.unreadable)

    def to_json(self) -> dict:
        return {
            "images": self.num_images,
            "threshold": self.threshold,
            "cross_split_exact": [p.to_json() for p in self.exact],
            "cross_split_near": [p.to_json() for p in self.near],
            "unreadable": [{"path": r.path, "split": r.split, "reason": reason} for r, reason in self.unreadable],
            "within_split": {"exact": self.within_split_exact, "near": self.within_split_near},
        }


def hash_file(path: str) -> FileHashes:
    """sha256 of the bytes and phash of the decoded photo (top-level so a Pool can pickle it)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return FileHashes("", None, f"{path}: cannot read ({exc.strerror or exc})")
    sha = hashlib.sha256(data).hexdigest()
    try:
        pixels = decode_image(data)
    except ImageDecodeError as exc:
        return FileHashes(sha, None, exc.reason)
    image = Image.fromarray(pixels)
    # phash only looks at 32x32 gray; shrinking first with a cheap filter makes big photos fast.
    image.thumbnail((128, 128), Image.Resampling.BILINEAR)
    bits = imagehash.phash(image).hash.ravel()
    return FileHashes(sha, int.from_bytes(np.packbits(bits).tobytes(), "big"), None)


def hash_files(paths: list[str], workers: int | None = None, progress: bool = True) -> list[FileHashes]:
    workers = workers or os.cpu_count() or 1
    bar = dict(total=len(paths), desc="hashing", unit="img", disable=not progress)
    if workers <= 1 or len(paths) < _POOL_MIN_FILES:
        return [hash_file(p) for p in tqdm(paths, **bar)]
    with Pool(workers) as pool:
        return list(tqdm(pool.imap(hash_file, paths, chunksize=32), **bar))


def near_pairs(hashes: np.ndarray, threshold: int, block: int = 2048) -> list[tuple[int, int, int]]:
    """All (i, j, distance) with i < j and Hamming(hashes[i], hashes[j]) <= threshold.
    Compares every pair (vectorised, in row blocks to bound memory): 20k images is 200M
    popcounts, a few seconds."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    found = []
    for start in range(0, len(hashes), block):
        rows = hashes[start : start + block]
        distance = np.bitwise_count(rows[:, None] ^ hashes[None, :])
        i, j = np.nonzero(distance <= threshold)
        keep = start + i < j
        found += zip((start + i[keep]).tolist(), j[keep].tolist(), distance[i[keep], j[keep]].tolist())
    return found


def find_duplicates(
    records: list[ImageRecord],
    threshold: int = NEAR_DUPLICATE_THRESHOLD,
    workers: int | None = None,
    progress: bool = True,
) -> DuplicateReport:
    if not 0 <= threshold <= 64:
        raise ValueError(f"threshold is a Hamming distance between 64-bit hashes: 0..64, got {threshold}")
    hashes = hash_files([r.path for r in records], workers=workers, progress=progress)
    report = DuplicateReport(num_images=len(records), threshold=threshold)
    report.unreadable = [(r, h.error) for r, h in zip(records, hashes) if h.error]

    by_sha: dict[str, list[int]] = {}
    for index, h in enumerate(hashes):
        if h.sha256:
            by_sha.setdefault(h.sha256, []).append(index)
    exact_keys = set()
    for group in by_sha.values():
        for a_pos, a in enumerate(group):
            for b in group[a_pos + 1 :]:
                exact_keys.add((a, b))
                _add(report, DuplicatePair("exact", records[a], records[b], 0), "exact")

    readable = [i for i, h in enumerate(hashes) if h.phash is not None]
    values = np.array([hashes[i].phash for i in readable], dtype=np.uint64)
    for i, j, distance in near_pairs(values, threshold):
        a, b = readable[i], readable[j]
        if (a, b) not in exact_keys:
            _add(report, DuplicatePair("near", records[a], records[b], distance), "near")
    report.near.sort(key=lambda p: (p.distance, p.first.path, p.second.path))
    return report


def _add(report: DuplicateReport, pair: DuplicatePair, kind: str) -> None:
    if pair.first.split == pair.second.split:
        if kind == "exact":
            report.within_split_exact += 1
        else:
            report.within_split_near += 1
    else:
        (report.exact if kind == "exact" else report.near).append(pair)


def format_report(report: DuplicateReport, root: str | None = None) -> str:
    def show(record: ImageRecord) -> str:
        path = record.path
        if root and path.startswith(root.rstrip("/") + "/"):
            path = path[len(root.rstrip("/")) + 1 :]
        return f"{record.split:5s} {path}"

    lines = [f"exact duplicates across splits (same bytes): {len(report.exact)} pair(s)"]
    lines += [f"  {show(p.first)}  ==  {show(p.second)}" for p in report.exact]
    lines.append(f"near duplicates across splits (phash distance <= {report.threshold}): {len(report.near)} pair(s)")
    lines += [f"  d={p.distance:<2d} {show(p.first)}  ~  {show(p.second)}" for p in report.near]
    lines.append(f"unreadable files: {len(report.unreadable)}")
    lines += [f"  {show(r)}: {reason}" for r, reason in report.unreadable]
    lines.append(
        f"summary: {report.num_images} images; across splits {len(report.exact)} exact and {len(report.near)} "
        f"near-duplicate pair(s); {len(report.unreadable)} unreadable; within one split "
        f"{report.within_split_exact} exact and {report.within_split_near} near pair(s) (not a leak)"
    )
    return "\n".join(lines)
