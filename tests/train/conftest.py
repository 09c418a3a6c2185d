"""Tiny real data for training tests: a few Stanford Dogs photos per breed, shrunk to 40x40
so decoding costs nothing, in the folder-per-breed layout."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from dogbreeds.train.recipe import Recipe

BREEDS = ("n02088094-Afghan_hound", "n02086240-Shih-Tzu", "n02107683-Bernese_mountain_dog")


def make_tiny_dataset(mini_root: Path, out: Path, per_breed: int = 10, size: int = 40) -> Path:
    for breed in BREEDS:
        photos = sorted((mini_root / "Images" / breed).glob("*.jpg"))[:per_breed]
        assert len(photos) == per_breed, f"need {per_breed} photos of {breed} in {mini_root}"
        (out / breed).mkdir(parents=True, exist_ok=True)
        for photo in photos:
            Image.open(photo).convert("RGB").resize((size, size)).save(out / breed / photo.name, quality=90)
    return out


@pytest.fixture(scope="session")
def tiny_data(mini_root, tmp_path_factory) -> Path:
    return make_tiny_dataset(mini_root, tmp_path_factory.mktemp("tiny-dogs"))


@pytest.fixture(scope="session")
def tiny_recipe():
    """recipe(data, out, **overrides) -> Recipe for tiny runs."""
    return make_tiny_recipe


def make_tiny_recipe(data: Path, out: Path, **overrides) -> Recipe:
    """convnext_atto at 32 px on ~20 train images: deterministic, fp32, a second per epoch. The full
    ConvNeXt augmentation (RandAugment, erasing, mixup/cutmix), so every random stream is exercised."""
    settings = dict(model="convnext_atto", data=str(data), breeds="all", out=str(out), epochs=2, batch_size=4,
                    augment=Recipe().augment.preset("convnext"),
                    input_size=32, workers=0, precision="fp32", deterministic=True, lr=1e-3, warmup_epochs=0.5,
                    val_fraction=0.2, test_fraction=0.2, drop_path=0.1, ema_decay=0.9, channels_last=False,
                    calibrate=False)  # tests/trust/ covers the calibration after training
    settings.update(overrides)
    return Recipe(**settings)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """On a shared 2-core machine torch's default thread count thrashes (0.5 s vs 20 s for a tiny epoch, measured once); one thread
    per process keeps tiny runs at about a second per epoch. Subprocesses inherit the env."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
