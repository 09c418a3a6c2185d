"""Small Stanford Dogs roots with boxes, made from the real mini data in a temporary folder."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

# The tests here import their shared fakes by name (`from _detect_fakes import FixedBoxes`); with
# --import-mode=importlib pytest does not put this folder on sys.path itself.
sys.path.insert(0, str(Path(__file__).parent))

BREEDS = ("n02085936-Maltese_dog", "n02099601-golden_retriever")


def make_box_root(mini_root: Path, dest: Path, per_breed: int = 6, breeds=BREEDS) -> Path:
    """ROOT/Images/<breed>/*.jpg + ROOT/Annotation/<breed>/<stem>, no lists (a seeded split):
    the first photos of each breed, multi-dog photos first so that the tiny set has some."""
    for breed in breeds:
        images = sorted((mini_root / "Images" / breed).glob("*.jpg"))
        annotated = [p for p in images if (mini_root / "Annotation" / breed / p.stem).is_file()]
        multi = [p for p in annotated if (mini_root / "Annotation" / breed / p.stem).read_text().count("<bndbox>") > 1]
        chosen = (multi[:2] + [p for p in annotated if p not in multi])[:per_breed]
        (dest / "Images" / breed).mkdir(parents=True, exist_ok=True)
        (dest / "Annotation" / breed).mkdir(parents=True, exist_ok=True)
        for image in chosen:
            shutil.copy(image, dest / "Images" / breed / image.name)
            shutil.copy(mini_root / "Annotation" / breed / image.stem, dest / "Annotation" / breed / image.stem)
    return dest


@pytest.fixture(scope="session")
def box_root(mini_root, tmp_path_factory) -> Path:
    return make_box_root(mini_root, tmp_path_factory.mktemp("boxes"))


def tiny_config(root: Path, out: Path, **overrides):
    """A detector small enough to train in seconds: 64 px, batch 4, 1 epoch, no loader processes."""
    from dogbreeds.detect.model import DetectorConfig

    base = dict(backbone="mobilenetv2_100", data=str(root), out=str(out), breeds="all", min_size=64, max_size=64,
                epochs=1, batch_size=4, workers=0, lr=0.01, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                box_batch_size_per_image=16, roi_sampling_ratio=1, representation_size=64, fpn_channels=32,
                anchor_sizes=(16, 32, 64, 128))
    return DetectorConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def tiny_detector_run(box_root, tmp_path_factory) -> Path:
    from dogbreeds.detect.train import train_detector

    out = tmp_path_factory.mktemp("detector") / "run"
    train_detector(tiny_config(box_root, out), progress=False)
    return out
