"""create_model with a pretrained tag, through the real huggingface_hub client and timm, against a
loopback hub (conftest.FakeHub): download, cache, offline reuse, and no hub at all."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.data import resolve_data_config

from dogbreeds.errors import WeightsError
from dogbreeds.models.factory import create_model

MOBILENET = "mobilenetv2_100.ra_in1k"
REPO = "timm/" + MOBILENET
NO_HUB_LIMIT_S = 5.0  # the bound for "no hub reachable" -> error


def served_weights(hub, repo: str) -> dict[str, torch.Tensor]:
    return load_file(str(hub.folder(repo) / "model.safetensors"))


def assert_holds(model, weights: dict[str, torch.Tensor], skip_prefix: str = "classifier.") -> None:
    sd = model.state_dict()
    body = [k for k in weights if not k.startswith(skip_prefix)]
    assert body and all(torch.equal(sd[k], weights[k]) for k in body)


def test_download_cache_and_offline_reuse(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    weights = served_weights(hub, REPO)  # the repo is written first: a real hub answers at once
    hub.requests.clear()
    model = create_model(MOBILENET, num_classes=5)
    assert_holds(model, weights)
    assert model.classifier.weight.shape == (5, 1280)  # new head for 5 classes, body from the hub
    # What went over the wire: HEAD on the hub (our probe, then huggingface_hub's), a 302 to the
    # CDN, one GET of the blob there, all from timm's client (its user agent).
    assert [r.path for r in hub.calls("GET", "cdn")] == ["/" + hub.files_of(REPO)["model.safetensors"].sha256]
    heads = hub.calls("HEAD", "hub")
    assert heads and {r.path for r in heads} == {f"/{REPO}/resolve/main/model.safetensors"}
    assert all("timm/" in r.user_agent for r in hub.calls(where="cdn"))
    # huggingface_hub's cache layout: blob by sha256, snapshot by commit, refs/main -> commit
    cache = tmp_path / "hf-cache" / "models--timm--mobilenetv2_100.ra_in1k"
    commit = hub.commits[REPO]
    assert (cache / "refs" / "main").read_text() == commit
    assert (cache / "snapshots" / commit / "model.safetensors").is_file()
    assert (cache / "blobs" / hub.files_of(REPO)["model.safetensors"].sha256).is_file()
    # timm's convention holds for downloaded models too
    cfg, pre = resolve_data_config(model=model), model.preprocessing
    assert (cfg["input_size"][-1], tuple(cfg["mean"]), cfg["crop_pct"]) == (pre.input_size, pre.mean, pre.crop_pct)
    assert pre.source == "timm:" + MOBILENET

    # Online again: the hub is asked whether the file changed (HEAD), nothing is downloaded.
    hub.requests.clear()
    assert_holds(create_model(MOBILENET, num_classes=5), weights)
    assert hub.calls("HEAD", "hub") and not hub.calls("GET")

    # HF_HUB_OFFLINE=1: the cache alone, not one request.
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert_holds(create_model(MOBILENET, num_classes=5), weights)
    assert hub.requests == []


def test_hub_gone_but_cached_uses_the_cache_quickly(hub, tmp_path, point_hub, closed_port, caplog):
    weights = served_weights(hub, REPO)
    create_model(MOBILENET)  # fills this test's cache
    point_hub(f"http://127.0.0.1:{closed_port}", tmp_path / "hf-cache")
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="dogbreeds"):
        model = create_model(MOBILENET)
    assert time.perf_counter() - started < NO_HUB_LIMIT_S
    assert_holds(model, weights, skip_prefix="nothing")  # the 1000-class head too: the file's own
    assert "unreachable" in caplog.text and "local cache" in caplog.text


@pytest.mark.parametrize("kind", ["closed_port", "silent_port"])
def test_no_hub_is_an_error_within_5_s_that_says_how_to_pass_files(kind, request, point_hub, tmp_path):
    """Refused (nothing listens) and black-holed (accepts, never answers): huggingface_hub alone
    retries for about a minute; the probe in front of it answers within the limit."""
    endpoint = f"http://127.0.0.1:{request.getfixturevalue(kind)}"
    point_hub(endpoint, tmp_path / "empty-cache")
    started = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        create_model("convnext_tiny.fb_in22k_ft_in1k", num_classes=3)
    elapsed = time.perf_counter() - started
    assert elapsed < NO_HUB_LIMIT_S, f"{elapsed:.1f} s"
    message = str(info.value)
    assert endpoint in message and "unreachable" in message and "not in the local cache" in message
    assert "weights='path/to/file'" in message and "--weights path/to/file" in message
    assert "create_model('convnext_tiny'" in message and "HF_HUB_CACHE" in message


def test_a_repo_the_hub_does_not_have_is_a_weights_error(hub):
    # The hub answers 401 RepoNotFound: no retries, and the message says how to pass a file.
    started = time.perf_counter()
    with pytest.raises(WeightsError, match=r"resnet18.*weights='path/to/file'"):
        create_model("resnet18.a1_in1k", num_classes=3)
    assert time.perf_counter() - started < NO_HUB_LIMIT_S
    assert hub.calls("HEAD", "hub", "timm/resnet18.a1_in1k") and not hub.calls("GET")


def test_served_repo_is_timm_push_to_hub_layout(hub):
    """The fixture serves what timm writes: model.safetensors + config.json with timm's keys."""
    import json

    folder: Path = hub.folder(REPO)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "mobilenetv2_100" and config["num_classes"] == 1000
    assert config["pretrained_cfg"]["tag"] == "ra_in1k"


def test_pretrained_convnext_into_the_conv_mlp_layout_training_uses(hub):
    """Training builds ConvNeXt-T with conv_mlp=True (faster on CPUs); timm alone refuses to load
    its Linear-MLP hub file into that model. create_model moves the weights across."""
    name = "convnext_tiny.fb_in22k_ft_in1k"
    weights = served_weights(hub, "timm/" + name)
    hub.requests.clear()
    conv = create_model(name, num_classes=3, conv_mlp=True)
    linear = create_model(name, num_classes=3)
    assert {b.use_conv_mlp for b in conv.modules() if hasattr(b, "use_conv_mlp")} == {True}
    assert conv.stages[3].blocks[2].mlp.fc2.weight.ndim == 4
    assert torch.equal(conv.stages[3].blocks[2].mlp.fc2.weight.flatten(1), weights["stages.3.blocks.2.mlp.fc2.weight"])
    assert conv.pretrained_cfg["hf_hub_id"] == "timm/" + name and conv.preprocessing.source == "timm:" + name
    linear.head.fc.load_state_dict(conv.head.fc.state_dict())  # both heads are new: make them equal
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(conv.eval()(x), linear.eval()(x), atol=1e-4)
    assert len(hub.calls("GET", "cdn")) == 1  # downloaded once, the second model came from the cache
