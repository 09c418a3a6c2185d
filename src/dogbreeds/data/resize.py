"""The one short-side resize (PIL, no torch) shared by the eval transform, the image cache and
the onnxruntime-only prediction path, so all three produce the same pixels."""
from __future__ import annotations

import numpy as np
from PIL import Image

PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def check_interpolation(interpolation: str) -> None:
    if interpolation not in PIL_INTERPOLATION:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {sorted(PIL_INTERPOLATION)}")


def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) after scaling the short side to `short_side`, as torchvision's Resize(int):
    the long side is truncated, not rounded."""
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


def resize_short_side(image: np.ndarray, short_side: int, interpolation: str) -> np.ndarray:
    """Scale an HxWx3 uint8 array so its short side is `short_side`, keeping the aspect ratio
    (the same pixels as torchvision's Resize on a PIL image)."""
    check_interpolation(interpolation)
    height, width = image.shape[:2]
    new_height, new_width = resized_shape(height, width, short_side)
    if (new_height, new_width) == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((new_width, new_height), PIL_INTERPOLATION[interpolation]))
