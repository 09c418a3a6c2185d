"""The numpy eval transform, the one implementation: it must equal torchvision's reference
pipeline, and the torch transform of training/evaluate (data.transforms.EvalTransform) must give
exactly its numbers (it wraps it)."""
from __future__ import annotations

import numpy as np
import pytest

from dogbreeds.data.decode import decode_image
from dogbreeds.data.transforms import build_eval_transform
from dogbreeds.infer.preprocess_np import NumpyEvalTransform, crop_box
from dogbreeds.preprocessing import MINUS_ONE_TO_ONE_MEAN, MINUS_ONE_TO_ONE_STD, Preprocessing

CONFIGS = [
    Preprocessing(),  # ImageNet, 224, 0.875, bicubic
    Preprocessing(input_size=160, mean=MINUS_ONE_TO_ONE_MEAN, std=MINUS_ONE_TO_ONE_STD, crop_pct=1.0, interpolation="bilinear"),
    Preprocessing(input_size=97, crop_pct=0.95, interpolation="nearest"),
]


def _torchvision_eval(pp: Preprocessing):
    from torchvision import transforms as T

    return T.Compose([T.Resize(pp.resize_size, interpolation=T.InterpolationMode(pp.interpolation)),
                      T.CenterCrop(pp.input_size), T.ToTensor(), T.Normalize(pp.mean, pp.std)])


@pytest.mark.parametrize("preprocessing", CONFIGS, ids=["imagenet-224-bicubic", "keras-160-bilinear", "odd-97-nearest"])
def test_numpy_transform_matches_torchvision_and_the_torch_transform_wraps_it(preprocessing, photos):
    from PIL import Image

    reference, numpy_transform = _torchvision_eval(preprocessing), NumpyEvalTransform(preprocessing)
    torch_transform = build_eval_transform(preprocessing)
    tall = decode_image(photos[0])[:, :200]   # portrait crop of a real photo
    for image in [decode_image(p) for p in photos[:3]] + [np.ascontiguousarray(tall)]:
        expected = reference(Image.fromarray(image)).numpy()
        actual = numpy_transform(image)
        assert actual.shape == expected.shape == (3, preprocessing.input_size, preprocessing.input_size)
        assert actual.dtype == np.float32
        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(torch_transform(image).numpy(), actual)  # one implementation


def test_image_already_at_resize_size_is_not_resampled(photos):
    preprocessing = Preprocessing(input_size=64, crop_pct=0.5)  # resize short side to 128
    image = decode_image(photos[1])[:128, :150].copy()
    out = NumpyEvalTransform(preprocessing)(image)
    np.testing.assert_allclose(out, build_eval_transform(preprocessing)(image).numpy(), atol=1e-5)
    # the centre 64x64 of the untouched pixels, normalised
    top, left = 32, 43
    expected = (image[top:top + 64, left:left + 64].transpose(2, 0, 1) / 255.0 - np.reshape(preprocessing.mean, (3, 1, 1))) / np.reshape(preprocessing.std, (3, 1, 1))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_crop_box_is_where_the_model_input_lies():
    # 300x200 (HxW): short side 200 -> 256 (0.875 of 224 -> int(256)), long 384; crop 224.
    left, top, right, bottom = crop_box(300, 200, Preprocessing())
    scale = 200 / 256
    assert left == pytest.approx(16 * scale) and right == pytest.approx(240 * scale)
    assert top == pytest.approx(80 * scale) and bottom == pytest.approx(304 * scale)


def test_bad_inputs_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="interpolation"):
        NumpyEvalTransform(Preprocessing(interpolation="magic"))
    with pytest.raises(TypeError, match="HxWx3 uint8"):
        NumpyEvalTransform(Preprocessing())(np.zeros((10, 10), dtype=np.uint8))
