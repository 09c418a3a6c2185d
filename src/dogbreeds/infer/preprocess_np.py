"""The eval transform, in numpy + Pillow only: the one implementation, run by every prediction
backend (the torch-free ONNX path included) and, wrapped as a tensor, by training's validation
and `evaluate` (data.transforms.EvalTransform).

Resize the short side to int(input_size / crop_pct) with the model's interpolation (Pillow's
resampler, as torchvision's Resize on PIL images uses; an image already at that size, such as
a row of the prepared cache, is not resampled), centre-crop input_size with torchvision's
offsets, then (x / 255 - mean) / std in CHW order, in torchvision's float32 arithmetic (tests
compare it with torchvision's own transform).
"""
from __future__ import annotations

import numpy as np

from ..data.resize import check_interpolation, resize_short_side, resized_shape
from ..preprocessing import Preprocessing


def crop_box(height: int, width: int, preprocessing: Preprocessing) -> tuple[float, float, float, float]:
    """Where the model's input square lies in the original photo: (left, top, right, bottom)
    in original pixel coordinates. Used to paste a Grad-CAM map back onto the photo."""
    short = preprocessing.resize_size
    new_height, new_width = resized_shape(height, width, short)
    top, left = _crop_offsets(new_height, new_width, preprocessing.input_size)
    scale_y, scale_x = height / new_height, width / new_width
    size = preprocessing.input_size
    return left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y


def _crop_offsets(height: int, width: int, crop: int) -> tuple[int, int]:
    # torchvision CenterCrop rounds half to even (Python's round), so do we.
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


class NumpyEvalTransform:
    """HxWx3 uint8 RGB array -> float32 CHW array, exactly like the torch eval transform."""

    def __init__(self, preprocessing: Preprocessing):
        if not 0 < preprocessing.crop_pct <= 1:
            raise ValueError(f"preprocessing crop_pct must be in (0, 1], got {preprocessing.crop_pct!r}")
        check_interpolation(preprocessing.interpolation)
        self.preprocessing = preprocessing
        self.resize_size = preprocessing.resize_size
        self._mean = np.asarray(preprocessing.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(preprocessing.std, dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
            what = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}".strip()
            raise TypeError(f"the eval transform takes an HxWx3 uint8 RGB numpy array (decode_image's output), got {what}")
        image = resize_short_side(image, self.resize_size, self.preprocessing.interpolation)
        new_height, new_width = image.shape[:2]
        crop = self.preprocessing.input_size
        top, left = _crop_offsets(new_height, new_width, crop)
        # One copy (HWC uint8 -> CHW float32), then in place: it also detaches the result from
        # read-only inputs (PIL-backed arrays, the cache's memmap).
        chw = np.ascontiguousarray(image[top:top + crop, left:left + crop].transpose(2, 0, 1), dtype=np.float32)
        chw /= np.float32(255)
        chw -= self._mean
        chw /= self._std
        return chw
