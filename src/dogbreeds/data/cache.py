"""Pre-decoded image cache: decode every JPEG once, store it resized as raw uint8.
(first version: only the shared resize; the cache itself follows.)
"""
from __future__ import annotations

import numpy as np
from PIL import Image

_PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) after scaling the short side to `short_side`, as torchvision's Resize(int)."""
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


def resize_short_side(image: np.ndarray, short_side: int, interpolation: str) -> np.ndarray:
    """Scale an HxWx3 uint8 array so its short side is `short_side`, keeping the aspect ratio.

    The one resize shared by the eval transform and the cache builder, so cached rows are
    pixel-identical to decoding and resizing on the fly (same as torchvision Resize on PIL).
    """
    if interpolation not in _PIL_INTERPOLATION:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {sorted(_PIL_INTERPOLATION)}")
    height, width = image.shape[:2]
    new_height, new_width = resized_shape(height, width, short_side)
    if (new_height, new_width) == (height, width):
        return image
    resized = Image.fromarray(image).resize((new_width, new_height), _PIL_INTERPOLATION[interpolation])
    return np.asarray(resized)
