"""Frozen-backbone training: pooled features computed once, then only the head trains on them.

The backbone never changes in this mode, so running it every epoch would repeat the same
work; one pass over the images (eval transform: no augmentation can help a frozen backbone
that sees each image once) turns an epoch into a few matrix multiplies. Features are cached
in the run directory under a key made of everything they depend on: model, weights file,
preprocessing and the exact list of files (with sizes and modification times).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..data.records import ImageRecord
from ..errors import DogbreedsError
from .checkpoint import atomic_write


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The input of the final linear layer (ConvNeXt: pooled + head.norm; MobileNetV2: pooled)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def _file_fingerprint(path: str) -> list:
    try:
        stat = os.stat(path)
        return [path, stat.st_size, stat.st_mtime_ns]
    except OSError:
        return [path, None, None]


def feature_cache_key(model_name: str, weights: str | None, preprocessing: dict,
                      splits: dict[str, list[ImageRecord]]) -> str:
    description = {
        "model": model_name,
        "weights": _file_fingerprint(str(Path(weights).resolve())) if weights and Path(weights).exists() else weights,
        "preprocessing": preprocessing,
        "files": {name: [_file_fingerprint(r.path) for r in records] for name, records in splits.items()},
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def extract_features(model: nn.Module, records: list[ImageRecord], transform, batch_size: int, workers: int,
                     seed: int, device: torch.device, autocast, channels_last: bool, progress: bool, cache=None):
    """(features float32 [N, D], labels int64 [N], skipped [{'path', 'reason'}]) for `records`
    (pixels from `cache`, a prepared `ImageCache`, when given)."""
    from tqdm import tqdm

    from ..data.loaders import make_loader

    model.eval()
    loader = make_loader(records, transform, batch_size, shuffle=False, seed=seed, workers=workers, cache=cache)
    features, labels = [], []
    for batch in tqdm(loader, desc="features", disable=not progress, leave=False):
        images = batch.images.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            features.append(pooled_features(model, images).float().cpu())
        labels.append(batch.labels)
    skipped = [{"path": s.path, "reason": s.reason} for s in loader.skipped]
    if not features:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), skipped
    return torch.cat(features), torch.cat(labels), skipped


def cached_features(cache_dir: Path, key: str, compute) -> dict:
    """Load `cache_dir/<key>.pt`, or compute() the dict of tensors and store it atomically."""
    path = Path(cache_dir) / f"{key[:24]}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file: say which and what to do
            raise DogbreedsError(f"cannot read the feature cache {path}: {exc}. Delete it; the features "
                                 "are recomputed on the next run") from None
        if isinstance(cached, dict) and cached.get("key") == key:
            return cached
    result = {"key": key, **compute()}
    atomic_write(path, lambda tmp: torch.save(result, tmp))
    return result


class FeatureBatches:
    """Shuffled mini-batches of cached features, ordered by (seed, epoch) like the image loader."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, shuffle: bool):
        self.features, self.labels = features, labels
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle

    def __len__(self) -> int:
        # Training drops the last partial batch (as the image loader does), evaluation keeps it.
        n = len(self.labels)
        return n // self.batch_size if self.shuffle else -(-n // self.batch_size)

    def batches(self, epoch: int, start: int = 0):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.labels), generator=generator)
        else:
            order = torch.arange(len(self.labels))
        for b in range(start, len(self)):
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.features[index], self.labels[index]
