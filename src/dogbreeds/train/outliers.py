"""Outlier exposure during fine-tuning (Hendrycks, Mazeika & Dietterich, ICLR 2019).

Each training step also sees a micro-batch of outlier photos: dogs of breeds the run does not
learn (the data root's other breeds, all or a seeded share of them: `oe_breeds`) and photos
given by `outliers` (a glob, folder or file). Their loss is the cross-entropy to the uniform
distribution over the run's breeds, weighted by `oe_weight`:

    loss = CE(breed photos) + oe_weight * mean_i( logsumexp(z_i) - mean_k z_ik )

so the network learns features on which other dogs get flat, unsure answers. Which outliers
a run used is recorded in split.json (`outliers`): calibration takes them as its "other dogs",
and benchmarks/measure_trust.py fits on them and reports only on breeds never used in training.

The outlier stream is a pure function of (seed, epoch, rank, micro-batch index), so a resumed
run sees the same outliers as an unbroken one. No torch import at module level: the recipe
(torch-free) validates its settings here.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import DataError, DogbreedsError

SPLIT_KEY = "outliers"  # split.json's record of the run's outliers
SEED_SALT = 7_777_777   # the outliers' own augmentation / order stream (never the breed photos')


def parse_oe_breeds(spec: str) -> tuple[str, object]:
    """'all' -> ('all', None); 'none' -> ('none', None); '0.5' -> ('fraction', 0.5); 'a,b' -> ('list', [...]).
    A number outside (0, 1] is an error naming it."""
    text = str(spec).strip()
    if text.lower() in ("all", "none"):
        return text.lower(), None
    try:
        value = float(text)
    except ValueError:
        names = [part.strip() for part in text.split(",") if part.strip()]
        if not names:
            raise DogbreedsError(f"recipe oe_breeds={spec!r}: choose 'all', 'none', a fraction in (0, 1] "
                                 "or a comma-separated list of breed ids") from None
        return "list", names
    if not (0 < value <= 1) or math.isnan(value):
        raise DogbreedsError(f"recipe oe_breeds={spec!r}: a share of the other breeds must lie in (0, 1] "
                             "(e.g. 0.5 for a seeded half); 'none' uses no other breed")
    return "fraction", value


def check_oe_recipe(recipe) -> None:
    """Recipe.validate's part for outlier exposure (named errors, no torch)."""
    def bad(name, why):
        raise DogbreedsError(f"recipe {name}={getattr(recipe, name)!r}: {why}")

    if not recipe.outlier_exposure:
        bad("outliers", "outlier photos are only used with outlier_exposure (--outlier-exposure)")
    if not (recipe.oe_weight > 0 and math.isfinite(recipe.oe_weight)):
        bad("oe_weight", "must be a positive finite number (Hendrycks et al. use 0.5)")
    if not isinstance(recipe.oe_batch_size, int) or recipe.oe_batch_size < 1:
        bad("oe_batch_size", "must be a whole number >= 1")
    if recipe.oe_batch_size % recipe.accum_steps:
        bad("oe_batch_size", f"must be divisible by accum_steps={recipe.accum_steps}")
    kind, _ = parse_oe_breeds(recipe.oe_breeds)
    if kind == "none" and not recipe.outliers:
        bad("oe_breeds", "'none' with no --outliers photos leaves outlier exposure nothing to show")


def choose_outlier_breeds(other_ids: list[str], spec: str, seed: int) -> list[str]:
    """The other breeds (sorted ids) used as outliers. A fraction takes the first
    round(fraction * n) of a permutation seeded by `seed`: with seed 0 and 0.5 that is the same
    half benchmarks/measure_trust.py would fit on (it follows the record either way)."""
    import numpy as np

    other_ids = sorted(other_ids)
    kind, value = parse_oe_breeds(spec)
    if kind == "all":
        return other_ids
    if kind == "none":
        return []
    if kind == "list":
        unknown = [name for name in value if name not in other_ids]
        if unknown:
            raise DataError(f"recipe oe_breeds: {unknown[:3]} {'is' if len(unknown) == 1 else 'are'} not among the "
                            f"data root's {len(other_ids)} breeds outside the run (breeds the run learns cannot be "
                            f"outliers); e.g. {other_ids[:3]}")
        return sorted(set(value))
    count = max(1, int(round(value * len(other_ids)))) if other_ids else 0
    order = np.random.default_rng(seed).permutation(len(other_ids))[:count]
    return sorted(other_ids[i] for i in order)


def outlier_records(recipe, dataset) -> tuple[list, dict]:
    """(outlier ImageRecords, the record for split.json). Never a photo of the run's own splits."""
    from ..data.records import ImageRecord
    from ..data.sources import scan_source
    from ..trust.cli import _given_photos

    known = set(dataset.classes.breed_ids)
    _, everything = scan_source(recipe.data)
    others = [r for r in everything if r.breed_id not in known]
    other_ids = sorted({r.breed_id for r in others})
    chosen = choose_outlier_breeds(other_ids, recipe.oe_breeds, recipe.seed)
    assert not set(chosen) & known, "an outlier breed is one the run learns"
    chosen_set = set(chosen)
    records = [ImageRecord(r.path, -1, r.breed_id, "outlier") for r in others if r.breed_id in chosen_set]
    photos = _given_photos([recipe.outliers], "--outliers") if recipe.outliers else []
    own = {str(Path(r.path).resolve()) for split in ("train", "val", "test") for r in dataset.split(split)}
    clash = [str(p) for p in photos if str(Path(p).resolve()) in own]
    if clash:
        raise DataError(f"--outliers {recipe.outliers!r} includes {len(clash)} photo(s) of the run's own breeds and "
                        f"splits (e.g. {clash[0]}): outliers must be dogs the run does not learn")
    records += [ImageRecord(str(p), -1, "outlier_photo", "outlier") for p in photos]
    if not records:
        raise DataError(f"outlier exposure has no outlier photos: {recipe.data} holds no breed outside the run's "
                        f"{len(known)} and no --outliers were given; pass --outliers PHOTOS")
    summary = {
        "weight": recipe.oe_weight, "batch_size": recipe.oe_batch_size, "oe_breeds": recipe.oe_breeds,
        "seed": recipe.seed, "breeds": chosen, "breed_photos": len(records) - len(photos),
        "other_breeds_not_used": [b for b in other_ids if b not in chosen_set],
        "pattern": recipe.outliers, "photos": [str(p) for p in photos],
    }
    return records, summary


def oe_loss(logits):
    """Cross-entropy from the uniform distribution over the classes to softmax(logits), averaged
    over the batch: mean_i(logsumexp(z_i) - mean_k z_ik) (0 only for flat logits; ln K at worst
    is not a bound: confident logits cost more)."""
    import torch

    logits = logits.float()
    return (torch.logsumexp(logits, dim=-1) - logits.mean(dim=-1)).mean()


class OutlierSampler:
    """Indices of the outlier photos for micro-batches `start`.. of an epoch: a stream of seeded
    permutations (a new one each time the photos run out), a pure function of (seed, epoch, rank),
    so a resumed epoch continues exactly where the stopped one was."""

    def __init__(self, num_photos: int, per_micro: int, total_micro: int, seed: int, rank: int):
        self.num_photos, self.per_micro, self.total_micro = num_photos, per_micro, total_micro
        self.seed, self.rank = seed, rank
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _stream(self, first: int, count: int) -> list[int]:
        import torch

        out, round_, position = [], first // self.num_photos, first % self.num_photos
        while len(out) < count:
            generator = torch.Generator().manual_seed(
                hash_seed(self.seed, self.epoch, self.rank, round_))
            order = torch.randperm(self.num_photos, generator=generator).tolist()
            out.extend(order[position:])
            round_, position = round_ + 1, 0
        return out[:count]

    def __iter__(self):
        first = self.start * self.per_micro
        return iter(self._stream(first, (self.total_micro - self.start) * self.per_micro))

    def __len__(self) -> int:
        return max(0, self.total_micro - self.start) * self.per_micro


def hash_seed(*parts: int) -> int:
    import hashlib

    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class PartialCache:
    """A prepared `ImageCache` for the outlier photos it holds; the others are decoded from their
    files. (make_loader's cache must hold every record; the outliers given by glob never are.)"""

    def __init__(self, cache, cached_paths):
        self.cache, self.cached = cache, set(cached_paths)

    @property
    def directory(self):
        return self.cache.directory

    def check_records(self, records) -> None:
        self.cache.check_records([r for r in records if r.path in self.cached])

    def check_transform(self, transform) -> None:
        self.cache.check_transform(transform)

    def read(self, path: str):
        if path in self.cached:
            return self.cache.read(path)
        from ..data.decode import decode_image

        image = decode_image(path)
        return image, image.shape[:2]
