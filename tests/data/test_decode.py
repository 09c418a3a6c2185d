"""decode_image on real photos and on broken / unusual files made here from them."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dogbreeds.data.decode import decode_image
from dogbreeds.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageDecodeError,
    NotAnImageError,
    TooManyPixelsError,
    TruncatedImageError,
)


@pytest.fixture(scope="module")
def photo_path(mini_root) -> Path:
    return sorted((mini_root / "Images" / "n02085620-Chihuahua").glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def photo(photo_path) -> np.ndarray:
    with Image.open(photo_path) as im:
        return np.array(im.convert("RGB"))


def _png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def test_real_jpeg_decodes_to_rgb_uint8(photo_path, photo):
    array = decode_image(photo_path)
    assert array.dtype == np.uint8 and array.shape == (224, 224, 3)
    np.testing.assert_array_equal(array, photo)
    # bytes and str paths give the same pixels
    np.testing.assert_array_equal(decode_image(photo_path.read_bytes()), photo)
    np.testing.assert_array_equal(decode_image(str(photo_path)), photo)


def test_truncated_jpeg_names_the_file(photo_path, tmp_path):
    data = photo_path.read_bytes()
    broken = tmp_path / "half.jpg"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedImageError) as info:
        decode_image(broken)
    assert str(broken) in str(info.value) and "truncated" in str(info.value)
    with pytest.raises(TruncatedImageError, match="<bytes>"):
        decode_image(data[:100])  # cut inside the header


def test_global_load_truncated_images_is_refused(monkeypatch, photo_path):
    from PIL import ImageFile

    from dogbreeds.errors import DogbreedsError

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DogbreedsError, match="LOAD_TRUNCATED_IMAGES") as info:
        decode_image(photo_path.read_bytes()[:3000])
    assert not isinstance(info.value, ImageDecodeError)  # a setting to fix, not a file to skip


def test_empty_file_and_empty_bytes(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(EmptyImageError, match="empty.jpg.*0 bytes"):
        decode_image(empty)
    with pytest.raises(EmptyImageError, match="<bytes>"):
        decode_image(b"")


@pytest.mark.parametrize(
    "content, hint",
    [
        (b"just some notes about my dog\n", "text"),
        (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "PDF"),
        (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "HTML"),
    ],
)
def test_not_an_image(tmp_path, content, hint):
    path = tmp_path / "dog.jpg"  # a misleading extension must not matter
    path.write_bytes(content)
    with pytest.raises(NotAnImageError, match=hint) as info:
        decode_image(path)
    assert str(path) in str(info.value)


def test_corrupt_png_data_stream(photo, tmp_path):
    data = bytearray(_png_bytes(Image.fromarray(photo)))
    start = data.index(b"IDAT") + 4
    data[start + 2 : start + 400] = bytes(398)  # zeros in the middle of the zlib stream
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    with pytest.raises((CorruptImageError, TruncatedImageError)) as info:
        decode_image(path)
    assert str(path) in str(info.value)


def test_corrupt_header_with_image_signature():
    with pytest.raises(CorruptImageError, match="starts like an image"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)


def test_cmyk_jpeg_becomes_rgb(photo):
    buffer = io.BytesIO()
    Image.fromarray(photo).convert("CMYK").save(buffer, format="JPEG", quality=95)
    with Image.open(io.BytesIO(buffer.getvalue())) as im:
        assert im.mode == "CMYK"
    array = decode_image(buffer.getvalue())
    assert array.shape == photo.shape and array.dtype == np.uint8
    assert np.abs(array.astype(int) - photo).mean() < 6  # same picture, JPEG loss only


def test_sixteen_bit_png_is_scaled_not_clipped(photo):
    gray8 = np.array(Image.fromarray(photo).convert("L"))
    gray16 = gray8.astype(np.uint16) * 257  # the standard 8 -> 16 bit widening
    data = _png_bytes(Image.fromarray(gray16))
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode.startswith("I")
    array = decode_image(data)
    assert array.shape == (*gray8.shape, 3)
    for channel in range(3):
        np.testing.assert_array_equal(array[..., channel], gray8)


def test_sixteen_bit_big_endian_tiff(photo):
    gray8 = np.array(Image.fromarray(photo).convert("L"))
    big_endian = (gray8.astype(np.uint16) * 257).astype(">u2")
    image = Image.frombytes("I;16B", (gray8.shape[1], gray8.shape[0]), big_endian.tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")
    np.testing.assert_array_equal(decode_image(buffer.getvalue())[..., 1], gray8)


def test_palette_png_with_transparency_is_on_white():
    palette_image = Image.new("P", (8, 4), 0)
    palette_image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette_image.paste(1, (4, 0, 8, 4))  # right half red, left half index 0
    data = _png_bytes(palette_image, transparency=0)  # index 0 (black) is transparent
    array = decode_image(data)
    assert array.shape == (4, 8, 3)
    assert (array[:, :4] == 255).all(), "transparent pixels must be white, not the black palette colour"
    assert (array[:, 4:] == (200, 30, 30)).all()


def test_rgba_and_la_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (0, 0, 255, 255)      # opaque blue
    rgba[0, 1] = (0, 0, 0, 0)          # fully transparent black
    rgba[1, :] = (0, 0, 0, 128)        # half-transparent black
    array = decode_image(_png_bytes(Image.fromarray(rgba, "RGBA")))
    assert tuple(array[0, 0]) == (0, 0, 255)
    assert tuple(array[0, 1]) == (255, 255, 255)
    assert 120 <= array[1, 0, 0] <= 135  # half-way between black and white
    la = Image.fromarray(np.array([[[0, 0], [10, 255]]], np.uint8), "LA")
    assert decode_image(_png_bytes(la)).tolist() == [[[255, 255, 255], [10, 10, 10]]]


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_modes_become_three_equal_channels(photo, mode):
    array = decode_image(_png_bytes(Image.fromarray(photo).convert(mode)))
    assert array.shape == photo.shape
    assert (array[..., 0] == array[..., 2]).all()


def test_exif_orientation_is_applied(photo):
    wide = photo[:150]  # 150 rows x 224 columns, so a rotation changes the shape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    array = decode_image(buffer.getvalue())
    assert array.shape == (224, 150, 3)
    clockwise = np.rot90(wide, k=-1)
    counter = np.rot90(wide, k=1)
    assert np.abs(array.astype(int) - clockwise).mean() < 4
    assert np.abs(array.astype(int) - counter).mean() > 20


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("pil_global", ["default", None, 10])
def test_pixel_bomb_refused_before_decoding(monkeypatch, tmp_path, photo_path, pil_global):
    if pil_global != "default":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_global)
    global_before = Image.MAX_IMAGE_PIXELS
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))  # 10 gigapixels in ~100 bytes
    assert bomb.stat().st_size < 200
    with pytest.raises(TooManyPixelsError) as info:
        decode_image(bomb)
    message = str(info.value)
    assert str(bomb) in message and "100000x100000" in message
    # Pillow's global limit neither blocks a normal photo nor is left changed by us.
    assert decode_image(photo_path).shape == (224, 224, 3)
    assert Image.MAX_IMAGE_PIXELS == global_before


def test_pillow_bomb_warning_as_error_does_not_leak(monkeypatch, photo_path):
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)  # the 50,176-pixel photo triggers Pillow's warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(photo_path).shape == (224, 224, 3)
        with pytest.raises(TooManyPixelsError):
            decode_image(photo_path, max_pixels=40_000)


def test_max_pixels_is_per_call(photo_path):
    with pytest.raises(TooManyPixelsError, match="50,176 pixels exceeds the limit of 50,000"):
        decode_image(photo_path, max_pixels=50_000)
    assert decode_image(photo_path, max_pixels=224 * 224).shape == (224, 224, 3)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageDecodeError, match="does not exist"):
        decode_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageDecodeError, match="directory"):
        decode_image(tmp_path)


def test_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, dogbreeds.data.decode; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
