"""Small Stanford Dogs roots with boxes, made from the real mini data in a temporary folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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
