"""Fixtures for the models tests: a real photo as model input, and random weights."""
from __future__ import annotations

import re

import pytest
import torch


@pytest.fixture(scope="session")
def photo(mini_root) -> torch.Tensor:
    """One real Stanford Dogs photo, resized/cropped/normalised the ImageNet way: (1, 3, 224, 224)."""
    from dogbreeds.data.decode import decode_image
    from dogbreeds.data.transforms import build_eval_transform
    from dogbreeds.preprocessing import Preprocessing

    path = sorted((mini_root / "Images").rglob("*.jpg"))[0]
    return build_eval_transform(Preprocessing())(decode_image(path)).unsqueeze(0)


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every float tensor random values. Default inits hide mapping mistakes: layer scale
    starts at 1e-6 (blocks are no-ops), norms start at weight 1 / bias 0 (swaps look equal)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in module.state_dict().items():
            if not value.is_floating_point():
                continue
            if key.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=gen) + 0.5)
            else:
                value.copy_(torch.randn(value.shape, generator=gen) * 0.1)
    return module.eval()


@pytest.fixture(scope="session")
def randomize():
    return _randomize


def to_official_names(sd: dict) -> dict:
    """timm ConvNeXt keys -> the paper code's keys, written independently of the loader."""
    out = {}
    for key, value in sd.items():
        key = key.replace("stem.", "downsample_layers.0.")
        key = re.sub(r"stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", key)
        key = re.sub(r"stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", key)
        key = key.replace("conv_dw", "dwconv").replace("mlp.fc1", "pwconv1").replace("mlp.fc2", "pwconv2")
        key = key.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        out[key] = value
    return out


@pytest.fixture(scope="session")
def official_names():
    """timm ConvNeXt state dict -> facebookresearch/ConvNeXt key names."""
    return to_official_names
