"""Records -> batches, reproducibly, skipping (and reporting) files that cannot be decoded.

A batch is a `Batch` named tuple:

    images   float32 (N, 3, H, W)   the transform's output, stacked
    labels   int64   (N,)           record.label
    indices  int64   (N,)           position of each sample in `records`
    skipped  tuple[SkippedSample]   files of this batch that failed to decode (index, path, reason)

N is the batch size minus the skipped files. A batch whose files all failed is not yielded;
its `skipped` still reaches the loader's report. Typical use:

    loader = make_loader(train_records, build_train_transform(pp), 64, shuffle=True, seed=0, workers=2)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels, indices, _ in loader:
            ...
        if loader.skipped:
            print(loader.skipped.report())

Signals: worker processes ignore Ctrl-C (SIGINT) and SIGTERM, which a terminal, `kill` of the
process group, SLURM or a container runtime may send to every process at once; the process
that owns the loader decides what to do (training saves and stops) and then shuts the workers
down. Left to themselves, the workers would die first and the loader would end the run with a
"DataLoader worker ... killed by signal" traceback. Workers still exit when their parent dies.

Reproducibility: every sample's augmentation is drawn from generators seeded with a hash of
(seed, epoch, index), and the shuffle order from (seed, epoch). So a run gives the same
tensors whatever the number of workers or processes, and each epoch sees new augmentations.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ImageDecodeError
from .listing import SKIPPED_LIST_LIMIT
from .records import Box, ImageRecord


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch; a hash, so nearby triples are unrelated."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Seed python `random`, numpy and torch's CPU generator for a block.

    timm's RandomResizedCrop and RandAugment draw from `random` and numpy, torchvision's flips
    and timm's RandomErasing from torch: all three must be pinned. In the main process
    (workers=0) their states are restored afterwards, so the training loop's own random
    streams do not depend on the loader; worker processes skip that (it costs ~0.25 ms).
    torch.manual_seed is avoided on purpose: it also seeds every accelerator (~0.5 ms).
    """
    torch_generator = torch.default_generator
    restore = torch.utils.data.get_worker_info() is None
    if restore:
        saved = random.getstate(), np.random.get_state(), torch_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch_generator.manual_seed(seed)
    try:
        yield
    finally:
        if restore:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch_generator.set_state(saved[2])


@dataclass(frozen=True)
class SkippedSample:
    index: int
    path: str
    reason: str


class Batch(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: tuple[SkippedSample, ...]


class SkippedFiles:
    """The files one epoch skipped, to print or store at the end of the epoch."""

    def __init__(self):
        self._by_path: dict[str, SkippedSample] = {}

    def add(self, samples: Sequence[SkippedSample]) -> None:
        for sample in samples:
            self._by_path[sample.path] = sample

    def clear(self) -> None:
        self._by_path.clear()

    def __len__(self) -> int:
        return len(self._by_path)

    def __iter__(self) -> Iterator[SkippedSample]:
        return iter(sorted(self._by_path.values(), key=lambda s: s.index))

    def to_list(self) -> list[dict]:
        return [{"index": s.index, "path": s.path, "reason": s.reason} for s in self]

    def report(self, max_lines: int = 20) -> str:
        if not self:
            return "no files skipped"
        samples = list(self)
        lines = [f"skipped {len(samples)} file(s) that could not be decoded (fix or delete them):"]
        lines += [f"  {s.path}: {s.reason}" for s in samples[:max_lines]]
        if len(samples) > max_lines:
            lines.append(f"  ... and {len(samples) - max_lines} more")
        return "\n".join(lines)


def capped_skipped(items: Sequence[dict], limit: int = SKIPPED_LIST_LIMIT) -> list[dict]:
    """The first `limit` skipped-file entries ({'path', 'reason'}), for a JSON record."""
    return list(items)[:limit]


def skipped_report(items: Sequence[dict], what: str, max_lines: int = 20) -> str:
    """'skipped N <what> file(s) that could not be decoded (fix or delete them):' and one line per
    file (path: reason), for stderr. `items`: {'path', 'reason'} dicts (SkippedFiles.to_list())."""
    items = list(items)
    if not items:
        return ""
    lines = [f"skipped {len(items)} {what} file(s) that could not be decoded (fix or delete them):"]
    lines += [f"  {item['path']}: {item.get('reason', '?')}" for item in items[:max_lines]]
    if len(items) > max_lines:
        lines.append(f"  ... and {len(items) - max_lines} more")
    return "\n".join(lines)


class RecordDataset(Dataset):
    """records[i] -> (transform(image, boxes), label, i), or a SkippedSample for a bad file.

    With `cache` (an `ImageCache`), pixels come from the pre-decoded cache instead of the
    file, and the boxes are scaled to the cached size.
    """

    def __init__(self, records: Sequence[ImageRecord], transform: Callable, seed: int = 0, epoch: int = 0,
                 cache=None):
        self.records = list(records)
        self.transform = transform
        self.seed = seed
        self.epoch = epoch
        self.cache = cache

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, record: ImageRecord) -> tuple[np.ndarray, tuple[Box, ...]]:
        if self.cache is not None:
            image, (height, width) = self.cache.read(record.path)
            return image, scale_boxes(record.boxes, height, width, image.shape[0], image.shape[1])
        from .decode import decode_image

        return decode_image(record.path), record.boxes

    def __getitem__(self, key: int | tuple[int, int]):
        # make_loader's sampler sends (epoch, index), so persistent workers follow set_epoch
        # without a fresh copy of the dataset; a plain index uses self.epoch.
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        record = self.records[index]
        try:
            image, boxes = self.load_image(record)
        except ImageDecodeError as exc:
            return SkippedSample(index, record.path, f"{type(exc).__name__}: {exc.reason}")
        with seeded_rngs(sample_seed(self.seed, epoch, index)):
            tensor = self.transform(image, boxes)
        return tensor, record.label, index


def scale_boxes(boxes: Sequence[Box], height: int, width: int, new_height: int, new_width: int) -> tuple[Box, ...]:
    """Boxes of a height x width photo, in the coordinates of its resized copy (rounded outwards,
    so the scaled box still holds the whole dog)."""
    if (height, width) == (new_height, new_width):
        return tuple(boxes)
    sx, sy = new_width / width, new_height / height
    return tuple(Box(math.floor(b.xmin * sx), math.floor(b.ymin * sy), math.ceil(b.xmax * sx), math.ceil(b.ymax * sy))
                 for b in boxes)


def collate_skipping(samples: list) -> Batch:
    """Stack the good samples; carry the bad ones along as `skipped` (works across workers)."""
    skipped = tuple(s for s in samples if isinstance(s, SkippedSample))
    good = [s for s in samples if not isinstance(s, SkippedSample)]
    if not good:
        empty = torch.empty(0, dtype=torch.int64)
        return Batch(torch.empty(0), empty, empty.clone(), skipped)
    return Batch(
        torch.stack([s[0] for s in good]),
        torch.tensor([s[1] for s in good], dtype=torch.int64),
        torch.tensor([s[2] for s in good], dtype=torch.int64),
        skipped,
    )


class SeededShuffleSampler(Sampler[int]):
    """A permutation of range(n) drawn from (seed, epoch): same order for the same pair."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class EpochTaggedSampler(Sampler):
    """Wraps an index sampler (or range(n)) to yield (epoch, index) pairs, the epoch read when
    an epoch's iteration starts. The sampler stays in the main process; only the pairs go
    to the workers."""

    def __init__(self, inner: Sampler | None, num_samples: int, epoch: int = 0):
        self.inner, self.num_samples, self.epoch = inner, num_samples, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch
        indices = range(self.num_samples) if self.inner is None else self.inner
        return ((epoch, index) for index in indices)

    def __len__(self) -> int:
        return self.num_samples if self.inner is None else len(self.inner)


class RecordLoader:
    """Iterates a DataLoader of `Batch`es and collects the epoch's skipped files in `skipped`.

    `len(loader)` counts batches before skipping; a batch whose files all failed is left out.
    """

    def __init__(self, dataloader: DataLoader, dataset: RecordDataset, sampler):
        self.dataloader, self.dataset, self.sampler = dataloader, dataset, sampler
        self.skipped = SkippedFiles()

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        """New augmentations and a new order (forwarded to a DistributedSampler too)."""
        self.dataset.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataloader)

    def __iter__(self) -> Iterator[Batch]:
        self.skipped.clear()
        with _stop_signals_held():  # workers start here: none may catch a signal before it ignores them
            batches = iter(self.dataloader)
        for batch in batches:
            self.skipped.add(batch.skipped)
            if len(batch.indices):
                yield batch


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _stop_signals_held():
    """Block SIGINT/SIGTERM in this thread for a moment: a signal that arrives meanwhile waits,
    and is handled (by this process) when the block ends. Forked workers inherit the block
    until `_ignore_stop_signals` runs in them."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: the loader's owner handles Ctrl-C and SIGTERM (see the module docstring).

    SIGINT is simply ignored. SIGTERM is taken by a thread that waits for it: sent by the parent
    (the DataLoader's shutdown, or multiprocessing's at exit, terminating its workers) the worker
    exits as it would have; sent by anyone else (a group kill, SLURM, a container runtime) it is
    ignored, and the parent's own handler decides.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if not hasattr(signal, "sigwaitinfo"):  # macOS: leave SIGTERM as torch set it
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        return
    # Blocked in this (the only) thread, so in every thread started later: only the waiter gets it.
    # A Python-level no-op handler (not SIG_IGN, which would discard it before the waiter sees it).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = os.getppid()

    def wait_for_parent() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait_for_parent, name="sigterm-from-parent", daemon=True).start()


def make_loader(
    records: Sequence[ImageRecord],
    transform: Callable,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    workers: int = 0,
    drop_last: bool = False,
    sampler: Sampler | None = None,
    cache=None,
    pin_memory: bool = False,
) -> RecordLoader:
    """A `RecordLoader` over `records` (see the module docstring for the batch layout).

    sampler: e.g. a `DistributedSampler` (which shuffles with its own seed); pass
        shuffle=False with it. `set_epoch` is forwarded to it.
    cache: an `ImageCache`, or the directory `dogbreeds data prepare` wrote; every record
        must be in it and unchanged since (checked here, with a DataError saying what to run).
    """
    if sampler is not None and shuffle:
        raise ValueError("pass shuffle=False with a sampler: the sampler decides the order "
                         "(e.g. DistributedSampler(dataset, shuffle=True, seed=seed))")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if cache is not None:
        from .cache import ImageCache

        if isinstance(cache, (str, Path)):
            cache = ImageCache.open(cache)
        cache.check_records(records)
        cache.check_transform(transform)
    dataset = RecordDataset(records, transform, seed=seed, epoch=epoch, cache=cache)
    if sampler is None and shuffle:
        sampler = SeededShuffleSampler(len(dataset), seed)
    tagged = EpochTaggedSampler(sampler, len(dataset))
    tagged.set_epoch(epoch)
    dataloader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=tagged,
        num_workers=workers,
        # Workers survive between epochs (their start-up is a few seconds on a busy machine);
        # the epoch reaches them with every index, see EpochTaggedSampler.
        persistent_workers=workers > 0,
        collate_fn=collate_skipping,
        drop_last=drop_last,
        pin_memory=pin_memory,
        worker_init_fn=_ignore_stop_signals if workers > 0 else None,
        # DataLoader draws its workers' base seed from this generator instead of torch's
        # global one, so creating a loader never shifts the training loop's random stream.
        generator=torch.Generator().manual_seed(seed),
    )
    return RecordLoader(dataloader, dataset, tagged)
