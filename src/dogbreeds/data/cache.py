"""Pre-decoded image cache (`dogbreeds data prepare`): decode every photo once, keep it resized.

Layout of a cache directory:

    index.json          format, short_side, interpolation, the pixels file's name, and per
                        source path: offset, cached height/width, original height/width and
                        the source file's size and mtime (to detect a changed file);
                        files that failed to decode, with the reason
    pixels-<id>.u8      every image's HxWx3 uint8 rows, back to back, read through a memory map

Choice: each photo keeps its aspect ratio, with its short side scaled to `short_side`
(torchvision's Resize(int) rule). Storing the centre square would fit a fixed (N, S, S, 3)
array, but it would cut the sides the random crop and the dog boxes need, and its centre crop
can land one pixel off the full photo's. With short_side = int(input_size / crop_pct) the
eval transform needs no resize at all, so cached and decoded inputs are pixel-identical.

This module avoids torch so the CLI stays light; only numpy and Pillow.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

from ..errors import DataError, ImageDecodeError
from .listing import shown_path
from .resize import PIL_INTERPOLATION, resize_short_side

FORMAT = "dogbreeds-image-cache"
VERSION = 1
CACHE_DIR_NAME = ".dogbreeds-cache"


def cache_key(path: str | Path) -> str:
    # realpath, not abspath: load_dataset resolves its root, so a data folder reached through a
    # symlink must map to the same entries whichever spelling of the path asks.
    return os.path.realpath(path)


def _file_version(path: str) -> dict | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class ImageCache:
    """Read side of a prepared cache. Picklable: each worker process maps the pixels itself."""

    def __init__(self, directory: str | Path, index: dict):
        self.directory = Path(directory)
        self.index = index
        self._pixels = None

    @classmethod
    def open(cls, directory: str | Path) -> "ImageCache":
        index_path = Path(directory) / "index.json"
        if not index_path.is_file():
            raise DataError(f"{shown_path(directory)} is not an image cache (no index.json); create it with "
                            "`dogbreeds data prepare DATA --size N --out DIR`")
        try:
            index = json.loads(index_path.read_text())
        except (ValueError, RecursionError) as exc:  # RecursionError: a nesting bomb
            raise DataError(f"{shown_path(index_path)} is not valid JSON ({type(exc).__name__}); delete the folder "
                            "and run `dogbreeds data prepare` again") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
            raise DataError(f"{index_path} is not a version-{VERSION} dogbreeds image cache; "
                            "delete the folder and run `dogbreeds data prepare` again")
        return cls(directory, index)

    @property
    def short_side(self) -> int:
        return int(self.index["short_side"])

    @property
    def interpolation(self) -> str:
        return self.index["interpolation"]

    def __len__(self) -> int:
        return len(self.index["entries"])

    def __getstate__(self):
        return {"directory": self.directory, "index": self.index, "_pixels": None}

    def _pixel_map(self) -> np.ndarray:
        if self._pixels is None:
            path = self.directory / self.index["pixels_file"]
            self._pixels = np.memmap(path, dtype=np.uint8, mode="r") if self.index["total_bytes"] else np.empty(0, np.uint8)
        return self._pixels

    def read(self, path: str) -> tuple[np.ndarray, tuple[int, int]]:
        """(cached HxWx3 uint8 view, (original height, original width)).

        Raises the ImageDecodeError the file gave when the cache was built, or DataError when
        the file is not in the cache at all.
        """
        key = cache_key(path)
        entry = self.index["entries"].get(key)
        if entry is None:
            failure = self.index["failed"].get(key)
            if failure is not None:
                raise ImageDecodeError(path, f"{failure} (when the cache was prepared)")
            raise DataError(f"{path} is not in the image cache {self.directory}; run `dogbreeds data prepare` "
                            "again for the breeds you train on")
        height, width = entry["height"], entry["width"]
        start = entry["offset"]
        image = self._pixel_map()[start:start + height * width * 3].reshape(height, width, 3)
        return image, (entry["orig_height"], entry["orig_width"])

    def is_fresh(self, path: str) -> bool:
        """True when `path` is in the cache (decoded or failed) and unchanged since."""
        key = cache_key(path)
        entry = self.index["entries"].get(key) or self.index["failed_versions"].get(key)
        return entry is not None and _file_version(path) == {"size": entry["size"], "mtime_ns": entry["mtime_ns"]}

    def check_records(self, records: Iterable) -> None:
        """DataError naming the first few records missing from the cache or changed since."""
        paths = [r.path for r in records]
        outdated = [p for p in paths if not self.is_fresh(p)]
        if outdated:
            shown = ", ".join(outdated[:3]) + (" ..." if len(outdated) > 3 else "")
            raise DataError(
                f"the image cache {self.directory} is stale: {len(outdated)} of {len(paths)} files are missing "
                f"from it or changed since it was prepared ({shown}). Run `dogbreeds data prepare DATA "
                f"--size {self.short_side} --interpolation {self.interpolation} --out {self.directory}` again "
                "(only those files are decoded again)")

    def check_transform(self, transform) -> None:
        """DataError when the cached pixels cannot feed `transform` as decoded files would."""
        preprocessing = getattr(transform, "preprocessing", None)
        if preprocessing is None:
            return  # a custom callable: nothing known to check against
        needed = preprocessing.resize_size
        if preprocessing.interpolation != self.interpolation or self.short_side < needed:
            raise DataError(
                f"the image cache {self.directory} holds {self.interpolation} resizes with short side "
                f"{self.short_side}, but the model needs {preprocessing.interpolation} with at least {needed} "
                f"(int({preprocessing.input_size} / {preprocessing.crop_pct})); run `dogbreeds data prepare DATA "
                f"--size {needed} --interpolation {preprocessing.interpolation}`")


@dataclass
class PrepareSummary:
    directory: Path
    total: int        # paths asked for
    decoded: int      # decoded in this run (new or changed files)
    reused: int       # copied from the previous cache, unchanged
    failed: dict      # path -> reason, files that could not be decoded
    bytes: int


def default_cache_dir(data_root: str | Path, short_side: int, interpolation: str) -> Path:
    return Path(data_root) / CACHE_DIR_NAME / f"short{short_side}-{interpolation}"


def find_cache(data_root: str | Path, preprocessing) -> ImageCache | None:
    """The cache `prepare` wrote by default for this model's sizing under DATA, if there is one
    (`find_prepared_cache` without the records check or the log line)."""
    return find_prepared_cache(data_root, preprocessing).cache


class CacheLookup(NamedTuple):
    """What `find_prepared_cache` found: the cache to pass to `make_loader` (or None) and one
    line for the log saying which it is and why ('' when there is nothing to say)."""

    cache: ImageCache | None
    message: str


def find_prepared_cache(data_root: str | Path, preprocessing, records: Iterable = ()) -> CacheLookup:
    """The cache `dogbreeds data prepare DATA` wrote by default for this model's sizing, if it
    covers every one of `records` unchanged since; else None with the reason.

    Only the exact sizing (short side int(input_size / crop_pct), the model's interpolation) is
    looked up: then the eval transform reads cached rows as they are, pixel-identical to decoding.
    A cache that is stale or lacks some of the records is not used (the files are decoded as
    usual); the message names the command that brings it up to date.
    """
    short_side, interpolation = preprocessing.resize_size, preprocessing.interpolation
    directory = default_cache_dir(data_root, short_side, interpolation)
    command = f"`dogbreeds data prepare {shown_path(data_root)} --size {short_side} --interpolation {interpolation}`"
    if not (directory / "index.json").is_file():
        return CacheLookup(None, f"decoding images from files (no prepared cache at {shown_path(directory)}; {command} "
                                 "writes one)")
    try:
        cache = ImageCache.open(directory)
    except (DataError, OSError, ValueError) as exc:
        return CacheLookup(None, f"not using the prepared cache {shown_path(directory)}: {exc}")
    paths = [r.path for r in records]
    outdated = sum(not cache.is_fresh(p) for p in paths)
    if outdated:
        return CacheLookup(None, f"not using the prepared cache {shown_path(directory)}: {outdated} of {len(paths)} images are "
                                 f"missing from it or changed since it was prepared; {command} updates it")
    return CacheLookup(cache, f"using the prepared cache {shown_path(directory)} ({len(paths)} images, no decoding)")


def _decode_one(job: tuple[str, int, str]) -> dict:
    """Decode and resize one file (top level so a process pool can pickle it)."""
    from .decode import decode_image

    path, short_side, interpolation = job
    version = _file_version(path)  # taken before reading, so a later change is seen as stale
    try:
        image = decode_image(path)
    except ImageDecodeError as exc:
        return {"path": path, "error": f"{type(exc).__name__}: {exc.reason}", "version": version}
    resized = resize_short_side(image, short_side, interpolation)
    return {"path": path, "pixels": np.ascontiguousarray(resized), "orig": image.shape[:2], "version": version}


def prepare_cache(paths: Iterable[str], out_dir: str | Path, short_side: int, interpolation: str = "bicubic",
                  workers: int = 2, progress: bool = True) -> PrepareSummary:
    """Build or refresh the cache in `out_dir`; unchanged files are copied, not decoded again."""
    from tqdm import tqdm

    if interpolation not in PIL_INTERPOLATION:
        raise DataError(f"unknown interpolation {interpolation!r}; choose one of {sorted(PIL_INTERPOLATION)}")
    if short_side < 16:
        raise DataError(f"--size {short_side} is too small; use int(input_size / crop_pct), e.g. 256 for 224 / 0.875")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(cache_key(p) for p in paths))
    old = None
    if (out_dir / "index.json").is_file():
        old = ImageCache.open(out_dir)
        if (old.short_side, old.interpolation) != (short_side, interpolation):
            old = None  # other sizing: nothing reusable
    reuse = [k for k in keys if old is not None and old.is_fresh(k)]
    reuse_set = set(reuse)
    todo = [k for k in keys if k not in reuse_set]

    pixels_name = f"pixels-{uuid.uuid4().hex[:12]}.u8"
    entries, failed, failed_versions, offset = {}, {}, {}, 0
    with open(out_dir / pixels_name, "wb") as out:
        for key in reuse:  # copy unchanged rows from the old cache
            if key in old.index["failed"]:
                failed[key], failed_versions[key] = old.index["failed"][key], old.index["failed_versions"][key]
                continue
            image, _ = old.read(key)
            out.write(image.tobytes())
            entries[key] = {**old.index["entries"][key], "offset": offset}
            offset += image.nbytes
        jobs = [(k, short_side, interpolation) for k in todo]
        bar = tqdm(total=len(jobs), unit="img", desc=f"prepare {short_side}px", disable=not progress)
        pool = get_context("fork").Pool(workers) if workers > 1 and len(jobs) > 1 else None
        try:
            results = pool.imap(_decode_one, jobs, chunksize=8) if pool else map(_decode_one, jobs)
            for result in results:
                bar.update(1)
                key, version = result["path"], result["version"] or {"size": -1, "mtime_ns": -1}
                if "error" in result:
                    failed[key], failed_versions[key] = result["error"], version
                    continue
                pixels = result["pixels"]
                out.write(pixels.tobytes())
                entries[key] = {"offset": offset, "height": pixels.shape[0], "width": pixels.shape[1],
                                "orig_height": int(result["orig"][0]), "orig_width": int(result["orig"][1]),
                                **version}
                offset += pixels.nbytes
        finally:
            bar.close()
            if pool:
                pool.close()
                pool.join()
    index = {"format": FORMAT, "version": VERSION, "short_side": short_side, "interpolation": interpolation,
             "pixels_file": pixels_name, "total_bytes": offset, "entries": entries, "failed": failed,
             "failed_versions": failed_versions}
    temporary = out_dir / "index.json.tmp"
    temporary.write_text(json.dumps(index))
    # The index names its pixels file, so readers see the old pair or the new pair, never a mix.
    os.replace(temporary, out_dir / "index.json")
    for stale_file in out_dir.glob("pixels-*.u8"):
        if stale_file.name != pixels_name:
            stale_file.unlink()
    return PrepareSummary(out_dir, len(keys), len(todo), len(reuse), failed, offset)


def register_cli(data_subparsers) -> None:
    parser = data_subparsers.add_parser(
        "prepare",
        help="decode every photo once into a resized uint8 cache for fast training",
        description="Decode every image of DATA (the chosen breeds) once, resize its short side to --size "
                    "(keeping the aspect ratio) and store the pixels in one memory-mapped file plus "
                    "index.json. Running it again only decodes new or changed files.",
    )
    parser.add_argument("data", metavar="DATA", help="dataset root (Stanford Dogs, breed folders or labels.csv)")
    parser.add_argument("--size", type=int, default=256,
                        help="short side in pixels: int(input_size / crop_pct) of the model, e.g. 256 for "
                             "224 / 0.875, 235 for 224 / 0.95 (default: 256)")
    parser.add_argument("--interpolation", default="bicubic", choices=sorted(PIL_INTERPOLATION),
                        help="resize filter; must be the model's preprocessing interpolation (default: bicubic)")
    parser.add_argument("--breeds", default="all", help="which breeds to cache: all, topN, or a comma list (default: all)")
    parser.add_argument("--out", metavar="DIR",
                        help=f"cache directory (default: DATA/{CACHE_DIR_NAME}/short<SIZE>-<INTERPOLATION>)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="decoding processes")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from .sources import load_dataset

    dataset = load_dataset(args.data, args.breeds)
    records = dataset.train + dataset.val + dataset.test
    out = Path(args.out) if args.out else default_cache_dir(dataset.root, args.size, args.interpolation)
    summary = prepare_cache([r.path for r in records], out, args.size, args.interpolation, workers=args.workers)
    print(f"cache {summary.directory}: {summary.total - len(summary.failed)} images, {summary.bytes / 2**20:.0f} MiB "
          f"({summary.decoded} decoded, {summary.reused} unchanged)")
    for path, reason in sorted(summary.failed.items()):
        print(f"  not cached: {path}: {reason}")
    return 0
