"""Pixels -> model input. Built only from the model's `Preprocessing`, so training, evaluation,
export and serving share one description of mean, std, size, crop and interpolation.

Every transform here is a callable `transform(image, boxes=()) -> torch.Tensor`:

- `image`: HxWx3 uint8 RGB numpy array, as `decode_image` returns it (or a cached row);
- `boxes`: dog bounding boxes in that array's pixel coordinates (used only by `crop_to_box`);
- result: float32 CHW tensor, normalised with the preprocessing's mean and std.

The training augmentations are timm's (RandomResizedCrop, RandAugment, RandomErasing, Mixup /
CutMix); this module only wires them to our config and numpy input. Randomness comes from the
global `random`, `numpy` and `torch` generators; `loaders.RecordDataset` seeds them per sample.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from ..preprocessing import Preprocessing
from ..infer.preprocess_np import NumpyEvalTransform
from .augment import PRESETS, AugmentConfig  # noqa: F401  (torch-free; re-exported here)
from .records import Box


def eval_resize_size(preprocessing: Preprocessing) -> int:
    """Short side the eval transform resizes to before the centre crop (timm's convention)."""
    return preprocessing.resize_size


def _check_preprocessing(preprocessing: Preprocessing) -> None:
    if not 0 < preprocessing.crop_pct <= 1:
        raise ValueError(
            f"preprocessing crop_pct must be in (0, 1], got {preprocessing.crop_pct!r}: "
            "a crop larger than the resized image would need padding, which we do not do"
        )


def _check_image(image) -> np.ndarray:
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        what = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}".strip()
        raise TypeError(f"transforms take an HxWx3 uint8 RGB numpy array (decode_image's output), got {what}")
    return image


class EvalTransform:
    """Resize the short side to int(input_size / crop_pct), centre-crop input_size, normalise:
    the numpy eval transform (infer/preprocess_np.py, the one implementation, which the
    torch-free prediction path runs too), its result as a torch tensor (no copy)."""

    def __init__(self, preprocessing: Preprocessing):
        _check_preprocessing(preprocessing)
        self.preprocessing = preprocessing
        self.resize_size = eval_resize_size(preprocessing)
        self._numpy = NumpyEvalTransform(preprocessing)

    def __call__(self, image: np.ndarray, boxes: Sequence[Box] = ()) -> torch.Tensor:
        return torch.from_numpy(self._numpy(_check_image(image)))

    def __repr__(self) -> str:
        p = self.preprocessing
        return (f"EvalTransform(resize={self.resize_size} {p.interpolation}, crop={p.input_size}, "
                f"mean={p.mean}, std={p.std})")


def build_eval_transform(preprocessing: Preprocessing) -> EvalTransform:
    return EvalTransform(preprocessing)


def crop_to_box(image: np.ndarray, boxes: Sequence[Box], mode: str, margin: float) -> np.ndarray:
    """Cut the dog(s) out of the photo, with `margin` of context; the whole photo when no box."""
    if not boxes:
        return image
    if mode == "largest":
        box = max(boxes, key=lambda b: (b.xmax - b.xmin) * (b.ymax - b.ymin))
        xmin, ymin, xmax, ymax = box.xmin, box.ymin, box.xmax, box.ymax
    else:
        xmin, ymin = min(b.xmin for b in boxes), min(b.ymin for b in boxes)
        xmax, ymax = max(b.xmax for b in boxes), max(b.ymax for b in boxes)
    pad_x, pad_y = margin * (xmax - xmin), margin * (ymax - ymin)
    height, width = image.shape[:2]
    left, top = max(0, int(xmin - pad_x)), max(0, int(ymin - pad_y))
    right, bottom = min(width, int(round(xmax + pad_x))), min(height, int(round(ymax + pad_y)))
    if right - left < 2 or bottom - top < 2:  # a degenerate or off-image box: keep the photo
        return image
    return image[top:bottom, left:right]


class BoxCropped:
    """`crop_to_box` (mode, margin), then `inner`: the eval transform of a frozen-backbone run
    whose training photos are cut to their dogs (train/session.py's cached features)."""

    def __init__(self, inner, mode: str, margin: float):
        self.inner, self.mode, self.margin = inner, mode, float(margin)

    def __call__(self, image: np.ndarray, boxes: Sequence[Box] = ()) -> torch.Tensor:
        return self.inner(crop_to_box(_check_image(image), boxes, self.mode, self.margin))

    def __repr__(self) -> str:
        return f"BoxCropped({self.mode}, margin={self.margin}, {self.inner!r})"


class TrainTransform:
    """Optional box crop, then timm's training pipeline on a PIL image."""

    def __init__(self, preprocessing: Preprocessing, augment: AugmentConfig):
        from timm.data import create_transform

        _check_preprocessing(preprocessing)
        self.preprocessing = preprocessing
        self.augment = augment
        if augment.deterministic:
            self._pipeline = EvalTransform(preprocessing)
            return
        self._pipeline = create_transform(
            input_size=preprocessing.input_size,
            is_training=True,
            scale=tuple(augment.rrc_scale),
            ratio=tuple(augment.rrc_ratio),
            hflip=augment.hflip,
            color_jitter=augment.color_jitter or None,
            auto_augment=augment.rand_augment,
            interpolation=preprocessing.interpolation,
            mean=tuple(preprocessing.mean),
            std=tuple(preprocessing.std),
            re_prob=augment.random_erase,
            re_mode=augment.random_erase_mode,
            re_count=augment.random_erase_count,
        )
        _allow_zero_bit_posterize(self._pipeline)

    def __call__(self, image: np.ndarray, boxes: Sequence[Box] = ()) -> torch.Tensor:
        image = _check_image(image)
        if self.augment.crop_to_box:
            image = crop_to_box(image, boxes, self.augment.crop_to_box, self.augment.box_margin)
        if self.augment.deterministic:
            return self._pipeline(image)
        return self._pipeline(Image.fromarray(image))

    def __repr__(self) -> str:
        return f"TrainTransform(crop_to_box={self.augment.crop_to_box}, pipeline={self._pipeline})"


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, but keeping 0 bits gives a black image instead of an error.

    timm's PosterizeIncreasing asks for 0 bits at magnitude 10, which m9 with mstd0.5 reaches
    about 2% of the time; Pillow 13 refuses bits=0 (older Pillow returned black), which would
    crash roughly one training image in 300. Black is what the recipe was published with.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _allow_zero_bit_posterize(pipeline) -> None:
    from timm.data.auto_augment import RandAugment

    for step in getattr(pipeline, "transforms", []):
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize


def build_train_transform(preprocessing: Preprocessing, augment: AugmentConfig | None = None) -> TrainTransform:
    return TrainTransform(preprocessing, augment or AugmentConfig())


def build_mixup(augment: AugmentConfig, num_classes: int):
    """timm `Mixup` for the recipe, or None when mixup and cutmix are both off.

    With a Mixup, the targets it returns are soft (label smoothing included): train with
    `timm.loss.SoftTargetCrossEntropy`. Without one, use
    `torch.nn.CrossEntropyLoss(label_smoothing=augment.label_smoothing)`.
    """
    if augment.mixup <= 0 and augment.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=augment.mixup,
        cutmix_alpha=augment.cutmix,
        prob=augment.mixup_prob,
        switch_prob=augment.mixup_switch_prob,
        mode=augment.mixup_mode,
        label_smoothing=augment.label_smoothing,
        num_classes=num_classes,
    )


def mix_batch(mixup, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply `mixup` to a batch of any size.

    timm's Mixup needs an even batch; a batch can turn odd when the loader skips a bad file,
    so the last sample of an odd batch is dropped (one sample, rarely) rather than crashing.
    """
    if len(images) % 2:
        images, labels = images[:-1], labels[:-1]
    if len(images) == 0:
        return images, labels.new_zeros((0, mixup.num_classes), dtype=torch.float32)
    return mixup(images, labels)
