"""Weight formats: each is loaded by create_model and by its reference implementation, and the
logits on a real photo must agree (fp32, max |diff| <= 1e-4)."""
from __future__ import annotations

import logging

import pytest
import timm
import torch

from dogbreeds.models.factory import create_model

TOL = 1e-4


def logits(model, x):
    with torch.no_grad():
        out = model.eval()(x)
    return getattr(out, "logits", out)


def assert_close(ours, reference):
    assert ours.shape == reference.shape
    diff = (ours - reference).abs().max().item()
    assert diff <= TOL, f"max |diff| {diff:.3g} > {TOL}"
    assert reference.std() > 1e-3, "reference logits are flat: the comparison would prove nothing"


# ---------------------------------------------------------------- official facebookresearch/ConvNeXt

@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory, randomize, official_names):
    reference = randomize(timm.create_model("convnext_tiny"), seed=1)
    sd = official_names(reference.state_dict())
    assert "downsample_layers.0.0.weight" in sd and "stages.0.0.pwconv1.weight" in sd and "head.weight" in sd
    path = tmp_path_factory.mktemp("official") / "convnext_tiny_1k_224.pth"
    torch.save({"model": sd}, path)
    return path, sd


def test_official_checkpoint_matches_timm(official_tiny, photo):
    path, _ = official_tiny
    reference = timm.create_model("convnext_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ours = create_model(None, weights=path)  # architecture read from the file
    assert ours.dogbreeds_name == "convnext_tiny" and ours.num_classes == 1000
    assert ours.preprocessing.crop_pct == 0.875 and ours.preprocessing.input_size == 224
    assert_close(logits(ours, photo), logits(reference, photo))


def test_official_22k_head_is_reinitialised_for_20_classes(official_tiny, photo, tmp_path, caplog):
    _, sd = official_tiny
    sd = dict(sd, **{"head.weight": torch.randn(21841, 768) * 0.02, "head.bias": torch.zeros(21841)})
    path = tmp_path / "convnext_tiny_22k_224.pth"
    torch.save({"model": sd}, path)
    with caplog.at_level(logging.INFO, logger="dogbreeds"):
        ours = create_model("convnext_tiny", num_classes=20, weights=path)
    assert "21841 classes" in caplog.text and "re-initialised" in caplog.text
    assert ours.head.fc.weight.shape == (20, 768)
    reference = timm.create_model("convnext_tiny", pretrained=True, num_classes=20,
                                  pretrained_cfg_overlay=dict(file=str(path)))
    with torch.no_grad():
        features = ours.eval().forward_head(ours.forward_features(photo), pre_logits=True)
        expected = reference.eval().forward_head(reference.forward_features(photo), pre_logits=True)
    assert_close(features, expected)


# ---------------------------------------------------------------- timm's own checkpoints

@pytest.fixture(scope="module")
def atto(randomize):
    return randomize(timm.create_model("convnext_atto", num_classes=7), seed=2)


@pytest.mark.parametrize("layout", ["pth", "safetensors", "state_dict_ema+module", "model+compile"])
def test_timm_checkpoints(layout, atto, photo, tmp_path):
    from safetensors.torch import save_file

    sd = atto.state_dict()
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.bin")
    if layout == "pth":
        torch.save(sd, path)
    elif layout == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif layout == "state_dict_ema+module":
        # a training checkpoint: optimizer state beside the weights, DDP prefixes, EMA copy
        torch.save({"epoch": 3, "state_dict": {"module." + k: torch.zeros_like(v) for k, v in sd.items()},
                    "state_dict_ema": {"module." + k: v for k, v in sd.items()}}, path)
    else:
        torch.save({"model": {"_orig_mod." + k: v for k, v in sd.items()}}, path)
    ours = create_model(None, weights=path)  # architecture inferred from shapes
    assert ours.dogbreeds_name == "convnext_atto" and ours.num_classes == 7
    assert torch.equal(logits(ours, photo), logits(atto, photo))


def test_timm_checkpoint_with_name_and_new_head(atto, photo, tmp_path, caplog):
    path = tmp_path / "atto.pth"
    torch.save(atto.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="dogbreeds"):
        ours = create_model("convnext_atto", num_classes=3, weights=path)
    assert "re-initialised" in caplog.text and ours.num_classes == 3
    with torch.no_grad():
        assert torch.equal(ours.eval().forward_features(photo), atto.forward_features(photo))


def test_headless_model_drops_the_file_head(atto, photo, tmp_path, caplog):
    path = tmp_path / "atto.safetensors"
    from safetensors.torch import save_file

    save_file(atto.state_dict(), str(path))
    with caplog.at_level(logging.INFO, logger="dogbreeds"):
        features = create_model(None, num_classes=0, weights=path)
    assert "dropped" in caplog.text
    with torch.no_grad():
        assert torch.equal(features.eval()(photo), atto.forward_head(atto.forward_features(photo), pre_logits=True))


# ---------------------------------------------------------------- Hugging Face transformers

@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory, randomize):
    transformers = pytest.importorskip("transformers")
    config = transformers.ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768], num_labels=10)
    model = randomize(transformers.ConvNextForImageClassification(config), seed=3)
    folder = tmp_path_factory.mktemp("hf") / "convnext-tiny-dogs"
    model.save_pretrained(folder)
    return folder, model


def test_transformers_folder_matches_transformers(hf_tiny, photo):
    folder, reference = hf_tiny
    ours = create_model(None, weights=folder)
    assert ours.dogbreeds_name == "convnext_tiny" and ours.dogbreeds_kwargs == {} and ours.num_classes == 10
    assert_close(logits(ours, photo), logits(reference, photo))


def test_transformers_weight_file_alone(hf_tiny, photo):
    folder, reference = hf_tiny
    ours = create_model("convnext_tiny", weights=folder / "model.safetensors")  # no config.json beside it
    assert_close(logits(ours, photo), logits(reference, photo))


def test_transformers_preprocessor_config_is_used(hf_tiny, tmp_path):
    import shutil

    from transformers import ConvNextImageProcessor

    folder = tmp_path / "with-processor"
    shutil.copytree(hf_tiny[0], folder)
    ConvNextImageProcessor(crop_pct=0.9, resample=2, size={"shortest_edge": 224}).save_pretrained(folder)
    pre = create_model(None, weights=folder).preprocessing
    assert (pre.crop_pct, pre.interpolation, pre.input_size) == (0.9, "bilinear", 224)


# ---------------------------------------------------------------- torchvision

def test_torchvision_convnext_tiny(photo, tmp_path, randomize):
    torchvision = pytest.importorskip("torchvision")
    reference = randomize(torchvision.models.convnext_tiny(), seed=4)
    path = tmp_path / "convnext_tiny-tv.pth"
    torch.save(reference.state_dict(), path)
    ours = create_model(None, weights=path)
    assert ours.dogbreeds_name == "convnext_tiny"
    assert ours.preprocessing.interpolation == "bilinear"
    assert_close(logits(ours, photo), logits(reference, photo))


@pytest.mark.parametrize("width, name", [(1.0, "mobilenetv2_100"), (0.5, "mobilenetv2_050")])
def test_torchvision_mobilenet_v2(width, name, photo, tmp_path, randomize):
    # Random BatchNorm statistics too: equal outputs then prove the BN eps (1e-5 in both),
    # ReLU6 and symmetric padding really agree, not just the key names.
    torchvision = pytest.importorskip("torchvision")
    reference = randomize(torchvision.models.mobilenet_v2(width_mult=width, num_classes=20), seed=5)
    path = tmp_path / "mnv2.pth"
    torch.save(reference.state_dict(), path)
    ours = create_model(None, weights=path)
    assert ours.dogbreeds_name == name and ours.num_classes == 20
    assert_close(logits(ours, photo), logits(reference, photo))


# ---------------------------------------------------------------- every ConvNeXt format into a conv-MLP model

@pytest.fixture(scope="module")
def torchvision_tiny(tmp_path_factory, randomize):
    torchvision = pytest.importorskip("torchvision")
    path = tmp_path_factory.mktemp("tv") / "convnext_tiny-tv.pth"
    torch.save(randomize(torchvision.models.convnext_tiny(), seed=6).state_dict(), path)
    return path


@pytest.mark.parametrize("source", ["official", "transformers", "torchvision"])
def test_convnext_formats_load_into_conv_mlp_model(source, request, photo):
    """Training builds ConvNeXt-T with conv_mlp=True: every format's Linear MLP weights must fit it."""
    path = {"official": lambda: request.getfixturevalue("official_tiny")[0],
            "transformers": lambda: request.getfixturevalue("hf_tiny")[0],
            "torchvision": lambda: request.getfixturevalue("torchvision_tiny")}[source]()
    linear = create_model("convnext_tiny", weights=path)
    conv = create_model("convnext_tiny", conv_mlp=True, weights=path)
    assert {b.use_conv_mlp for b in conv.modules() if hasattr(b, "use_conv_mlp")} == {True}
    assert conv.stages[2].blocks[8].mlp.fc2.weight.ndim == 4 and linear.stages[2].blocks[8].mlp.fc2.weight.ndim == 2
    assert_close(logits(conv, photo), logits(linear, photo))


# ---------------------------------------------------------------- Keras: delegation contract only

def test_keras_h5_is_delegated_by_content(tmp_path, monkeypatch, atto, photo):
    """An HDF5 file (any name) goes to formats.keras.load_keras_weights; its ConvertedWeights,
    model_kwargs included, decide the model. The Keras converter itself is tested elsewhere."""
    import sys
    import types

    h5py = pytest.importorskip("h5py")
    from dogbreeds.models.formats import ConvertedWeights
    from dogbreeds.preprocessing import MINUS_ONE_TO_ONE_MEAN, MINUS_ONE_TO_ONE_STD, Preprocessing

    path = tmp_path / "weights.bin"  # misleading suffix on purpose
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=[1, 2, 3])
    calls = []

    def load_keras_weights(p, name=None):
        calls.append((p, name))
        pre = Preprocessing(mean=MINUS_ONE_TO_ONE_MEAN, std=MINUS_ONE_TO_ONE_STD, source="keras")
        return ConvertedWeights("keras", "convnext_atto", atto.state_dict(), 7, pre, {"drop_path_rate": 0.0})

    monkeypatch.setitem(sys.modules, "dogbreeds.models.formats.keras",
                        types.SimpleNamespace(load_keras_weights=load_keras_weights))
    ours = create_model(None, weights=path)
    assert calls == [(path, None)]
    assert ours.preprocessing.mean == MINUS_ONE_TO_ONE_MEAN and ours.dogbreeds_kwargs == {"drop_path_rate": 0.0}
    assert torch.equal(logits(ours, photo), logits(atto, photo))
