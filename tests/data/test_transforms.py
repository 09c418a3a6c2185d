"""Transforms on real photos, checked against torchvision's reference pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from dogbreeds.data.decode import decode_image
from dogbreeds.data.loaders import seeded_rngs
from dogbreeds.data.records import Box
from dogbreeds.data.transforms import (
    AugmentConfig,
    build_eval_transform,
    build_mixup,
    build_train_transform,
    crop_to_box,
    mix_batch,
)
from dogbreeds.preprocessing import MINUS_ONE_TO_ONE_MEAN, MINUS_ONE_TO_ONE_STD, Preprocessing


@pytest.fixture(scope="module")
def photos(mini_root) -> list[np.ndarray]:
    paths = sorted((mini_root / "Images" / "n02085620-Chihuahua").glob("*.jpg"))[:3]
    images = [decode_image(p) for p in paths]
    # The mini photos are all 224x224; cut non-square views so aspect handling is exercised.
    return images + [images[0][:, :161], images[1][37:, :]]


def _torchvision_eval(pp: Preprocessing):
    mode = T.InterpolationMode(pp.interpolation)
    return T.Compose([
        T.Resize(int(pp.input_size / pp.crop_pct), interpolation=mode),
        T.CenterCrop(pp.input_size),
        T.ToTensor(),
        T.Normalize(pp.mean, pp.std),
    ])


@pytest.mark.parametrize("pp", [
    Preprocessing(),                                   # 224 / 0.875 -> 256, even crop offsets
    Preprocessing(input_size=224, crop_pct=0.95),      # 235: odd margin, rounding of offsets matters
    Preprocessing(input_size=160, crop_pct=1.0, interpolation="bilinear",
                  mean=MINUS_ONE_TO_ONE_MEAN, std=MINUS_ONE_TO_ONE_STD),  # Keras MobileNetV2 style
])
def test_eval_transform_matches_torchvision(photos, pp):
    ours, reference = build_eval_transform(pp), _torchvision_eval(pp)
    for image in photos:
        got = ours(image)
        assert got.shape == (3, pp.input_size, pp.input_size) and got.dtype == torch.float32
        torch.testing.assert_close(got, reference(Image.fromarray(image)), atol=1e-6, rtol=0)


def test_eval_transform_refuses_non_uint8_arrays(photos):
    with pytest.raises(TypeError, match="uint8"):
        build_eval_transform(Preprocessing())(photos[0].astype(np.float32))


def test_train_transform_is_seeded_and_random(photos):
    transform = build_train_transform(Preprocessing(input_size=96), AugmentConfig())
    with seeded_rngs(1):
        first = transform(photos[0])
    with seeded_rngs(1):
        again = transform(photos[0])
    with seeded_rngs(2):
        other = transform(photos[0])
    assert first.shape == (3, 96, 96)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_strongest_posterize_of_the_recipe_gives_black_not_an_error(photos):
    # RandAugment m9 mstd0.5 reaches magnitude 10 (posterize to 0 bits) ~2% of the time;
    # Pillow 13 raises on 0 bits, which would crash an epoch.
    from timm.data.auto_augment import RandAugment

    transform = build_train_transform(Preprocessing(input_size=64), AugmentConfig())
    (rand_augment,) = [t for t in transform._pipeline.transforms if isinstance(t, RandAugment)]
    (posterize,) = [op for op in rand_augment.ops if op.name == "PosterizeIncreasing"]
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0
    out = np.asarray(posterize(Image.fromarray(photos[0])))
    assert out.shape == photos[0].shape and out.max() == 0


def test_none_preset_is_the_eval_transform_and_has_no_mixup(photos):
    pp = Preprocessing(input_size=128)
    augment = AugmentConfig.preset("none")
    train = build_train_transform(pp, augment)
    assert torch.equal(train(photos[3]), build_eval_transform(pp)(photos[3]))
    assert build_mixup(augment, num_classes=5) is None
    assert build_mixup(AugmentConfig.preset("quick"), num_classes=5) is None


def test_crop_to_box_union_largest_and_margin():
    image = np.zeros((100, 200, 3), np.uint8)
    small, big = Box(10, 10, 30, 30), Box(100, 20, 180, 90)
    assert crop_to_box(image, [small, big], "largest", 0.0).shape == (70, 80, 3)
    assert crop_to_box(image, [small, big], "union", 0.0).shape == (80, 170, 3)
    # 10% margin of an 80x70 box is 8 / 7 pixels each side, clipped at the image border.
    assert crop_to_box(image, [big], "largest", 0.1).shape == (84, 96, 3)
    assert crop_to_box(image, [], "union", 0.1) is image


def test_train_transform_crops_to_the_box_first(photos):
    # A box in the top-left quarter: with a deterministic pipeline the output must equal
    # the eval transform of that quarter alone.
    pp = Preprocessing(input_size=64)
    augment = AugmentConfig.preset("none", crop_to_box="largest", box_margin=0.0)
    image = photos[0]
    out = build_train_transform(pp, augment)(image, (Box(0, 0, 112, 112),))
    assert torch.equal(out, build_eval_transform(pp)(np.ascontiguousarray(image[:112, :112])))


def test_mixup_gives_soft_targets_and_survives_odd_batches():
    mixup = build_mixup(AugmentConfig(), num_classes=4)
    images, labels = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0])
    mixed, targets = mix_batch(mixup, images, labels)
    assert mixed.shape == (4, 3, 8, 8) and targets.shape == (4, 4)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert targets.min() > 0  # label smoothing 0.1 puts mass on every class


def test_augment_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="crop_to_box"):
        AugmentConfig(crop_to_box="dog")
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        AugmentConfig.preset("heavy")
    config = AugmentConfig.preset("quick", hflip=0.0)
    assert AugmentConfig.from_dict(config.to_dict()) == config
