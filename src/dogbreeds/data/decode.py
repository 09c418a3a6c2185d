"""One door from a file (or bytes) to pixels: an HxWx3 uint8 RGB array, or a typed error.

Training skips and counts the files this refuses; prediction and the service answer with the
error. Pillow only (no torch), so the ONNX prediction path can use it too.

Guarantees of `decode_image`:
- EXIF orientation is applied, so the array is the photo as a person sees it.
- Every colour mode becomes RGB uint8: grayscale (1, L, LA), palette (P, with or without
  transparency), CMYK, YCbCr, RGBA, and 16-bit grayscale (I;16*, I) scaled to 8 bits.
  Multi-frame files (GIF, MPO, TIFF) give their first frame.
- Transparent pixels are composited on white (see `_flatten_alpha`).
- The pixel count (width * height, read from the header) is checked against `max_pixels`
  before any pixel is decoded; this does not depend on Pillow's global MAX_IMAGE_PIXELS.
- Failures raise a subclass of `dogbreeds.errors.ImageDecodeError` whose message names the
  path (or "<bytes>") and the reason: EmptyImageError, TruncatedImageError, CorruptImageError,
  NotAnImageError, TooManyPixelsError.
"""
from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import (
    CorruptImageError,
    DogbreedsError,
    EmptyImageError,
    ImageDecodeError,
    NotAnImageError,
    TooManyPixelsError,
    TruncatedImageError,
)

# 50 megapixels: above every photo in Stanford Dogs (the largest is under 10 MP) and above
# most phone cameras' default output, while the decoded RGB array (150 MB) still fits
# comfortably in memory. Raise it per call for panoramas or 100+ MP sensors.
DEFAULT_MAX_PIXELS = 50_000_000

BYTES_NAME = "<bytes>"

# File signatures of the raster formats Pillow reads. A file that starts like an image but
# cannot be opened is *corrupt*; anything else is *not an image*.
_IMAGE_MAGIC = (
    b"\xff\xd8\xff",          # JPEG
    b"\x89PNG\r\n\x1a\n",     # PNG
    b"GIF87a", b"GIF89a",
    b"BM",                    # BMP
    b"II*\x00", b"MM\x00*",   # TIFF
    b"RIFF",                  # WebP (RIFF....WEBP)
)
# Serialises the rare fallback that lifts Pillow's global pixel limit (see `_open`).
_PIL_LIMIT_LOCK = threading.Lock()


def decode_image(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_short_side: int | None = None) -> np.ndarray:
    """Decode a path or raw bytes into an HxWx3 uint8 RGB array (EXIF-oriented).

    min_short_side: the caller will scale the short side down to this many pixels, so decode
    no more than that needs (a bounded decode, e.g. for the service): a JPEG decodes at 1/2,
    1/4 or 1/8 scale (Pillow's draft mode), other formats are box-reduced by an integer factor
    right after decoding, each only while the short side stays >= 3 * min_short_side (the
    margin of Pillow's own `resize(reducing_gap=3)`). Images under 6 * min_short_side on the
    short side decode exactly as without it.

    Raises an ImageDecodeError subclass naming the file and the reason; never returns a
    partial or placeholder image.
    """
    name, data, path = _describe(source)
    if data is not None and len(data) == 0:
        raise EmptyImageError(name, "the data is empty (0 bytes)")
    if path is not None:
        try:
            if path.is_dir():
                raise ImageDecodeError(name, "is a directory, not an image file")
            if path.stat().st_size == 0:
                raise EmptyImageError(name, "the file is empty (0 bytes); re-copy or delete it")
        except FileNotFoundError:
            raise ImageDecodeError(name, "file does not exist") from None
        except PermissionError:
            raise ImageDecodeError(name, "permission denied when reading the file") from None

    image = _open(name, data, path)
    try:
        width, height = image.size
        if width * height > max_pixels:
            raise TooManyPixelsError(
                name,
                f"{width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} "
                "(possible decompression bomb); resize the image or pass a larger max_pixels",
            )
        if min_short_side:
            return _decode_reduced(name, image, min_short_side)
        _load(name, image)
        try:
            oriented = ImageOps.exif_transpose(image)
        except Exception as exc:  # Pillow raises many types on malformed EXIF blocks
            raise CorruptImageError(name, f"unreadable EXIF orientation data ({exc})") from exc
        return _to_rgb_array(name, oriented)
    finally:
        image.close()


# Modes Image.reduce averages correctly; others are converted first (palette indices and
# 1-bit pixels cannot be averaged; 16-bit gray widens to I, exactly).
_REDUCIBLE = {"L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA", "I": "I", "F": "F", "1": "L",
              "I;16": "I", "I;16L": "I", "I;16B": "I", "I;16N": "I", "CMYK": "RGB", "YCbCr": "RGB",
              "PA": "RGBA", "La": "LA", "RGBa": "RGBA"}
_ORIENTATION_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                          6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _decode_reduced(name: str, image: Image.Image, min_short_side: int) -> np.ndarray:
    """decode_image's bounded path (see `min_short_side`): at most one full-size copy of the
    pixels (Pillow's own buffer, for formats without draft mode; two while a palette or 16-bit
    image is converted), freed before the array is made."""
    keep = 3 * int(min_short_side)
    if image.format == "JPEG" and min(image.size) >= 2 * keep:
        image.draft(None, (keep, keep))  # DCT scaling: the decoder never builds the full size
    _load(name, image)
    try:
        orientation = image.getexif().get(0x0112)  # read from the file before any copy is made
    except Exception as exc:  # Pillow raises many types on malformed EXIF blocks
        raise CorruptImageError(name, f"unreadable EXIF orientation data ({exc})") from exc
    factor = min(image.size) // keep
    reduced = image
    if factor >= 2:
        mode = image.mode
        if mode == "P":
            mode = "RGBA" if "transparency" in image.info else "RGB"
        elif mode not in _REDUCIBLE:
            raise CorruptImageError(name, f"unsupported colour mode {mode!r}; convert the file to 8-bit RGB")
        target = _REDUCIBLE.get(mode, mode)
        source = image if image.mode == target else image.convert(target)
        reduced = source.reduce(factor)
        if source is not image:
            source.close()
        image.close()  # the full-size pixels go before the array is made (closing twice is harmless)
    if orientation in _ORIENTATION_TRANSPOSE:
        reduced = reduced.transpose(_ORIENTATION_TRANSPOSE[orientation])
    return _to_rgb_array(name, reduced)


def _describe(source) -> tuple[str, bytes | None, Path | None]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return BYTES_NAME, bytes(source), None
    if isinstance(source, (str, Path)):
        return str(source), None, Path(source)
    raise TypeError(f"decode_image takes a path or bytes, got {type(source).__name__}")


def _open(name: str, data: bytes | None, path: Path | None) -> Image.Image:
    """Read the header only (Pillow opens lazily); pixels are decoded later by `_load`."""

    def open_once():
        return Image.open(io.BytesIO(data) if data is not None else path)

    try:
        try:
            return open_once()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            # Pillow applies its own *global* limit inside Image.open (a warning, or an error
            # at twice the limit). Our limit is the per-call `max_pixels`, checked by the
            # caller, so reopen with Pillow's check lifted for just this header read.
            with _PIL_LIMIT_LOCK:
                saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
                try:
                    return open_once()
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
    except UnidentifiedImageError:
        head = data[:64] if data is not None else _read_head(path)
        if head.startswith(_IMAGE_MAGIC):
            raise CorruptImageError(name, "starts like an image file but its header cannot be parsed") from None
        raise NotAnImageError(name, f"not an image Pillow can read ({_sniff(head)})") from None
    except OSError as exc:
        if "truncated" in str(exc).lower():
            raise TruncatedImageError(name, f"the file ends inside the image header ({exc}); re-download or re-copy it") from exc
        raise CorruptImageError(name, f"cannot open: {exc}") from exc


def _load(name: str, image: Image.Image) -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone enabled Pillow's global "pad truncated images with grey": that would be a
        # silent fallback. It is a setting, not a bad file, so it stops the caller (training
        # would otherwise skip every file as if it were broken).
        raise DogbreedsError(
            f"cannot decode {name} safely: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True, which hides truncated "
            "files; set it back to False"
        )
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Some formats (GIF, TIFF tiles) size frames while loading; Pillow's global check fires there.
        raise TooManyPixelsError(name, f"a frame is too large to decode safely ({exc})") from exc
    except (EOFError, OSError, ValueError, SyntaxError) as exc:
        message = str(exc) or type(exc).__name__
        if isinstance(exc, EOFError) or "truncated" in message.lower() or "end of file" in message.lower():
            raise TruncatedImageError(name, f"the file ends before the image data does ({message}); re-download or re-copy it") from exc
        raise CorruptImageError(name, f"the image data cannot be decoded ({message})") from exc


def _to_rgb_array(name: str, image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        rgb = image
    elif mode.startswith("I;16") or mode == "I":
        rgb = _sixteen_bit_gray_to_rgb(name, image)
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgb = _flatten_alpha(image)
    elif mode in ("1", "L", "P", "CMYK", "YCbCr"):
        rgb = image.convert("RGB")
    else:  # F (float), LAB, HSV, ...: no single right mapping to display RGB
        raise CorruptImageError(name, f"unsupported colour mode {mode!r}; convert the file to 8-bit RGB")
    array = np.array(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise CorruptImageError(name, f"decoded to shape {array.shape}, expected HxWx3")
    return array


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite on white: the colour under fully transparent pixels is arbitrary (often black
    or leftover editing junk), so dropping alpha would show it. Cut-out photos are made to be
    seen on a light page, and white keeps the dog's outline as the author saw it."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _sixteen_bit_gray_to_rgb(name: str, image: Image.Image) -> Image.Image:
    """16-bit gray (PNG/TIFF) -> 8-bit. Pillow's convert('L') clips instead of scaling, so scale
    by 255/65535 (v/257, exact for 8-bit data widened by *257) and round."""
    values = np.array(image, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise CorruptImageError(
            name,
            f"32-bit integer pixels in {values.min()}..{values.max()} have no defined 8-bit scale; "
            "convert the file to 8-bit RGB",
        )
    gray = np.round(values / 257.0).astype(np.uint8)
    return Image.fromarray(np.stack([gray] * 3, axis=-1))


def _read_head(path: Path, size: int = 64) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


def _sniff(head: bytes) -> str:
    """A short human description of what the file looks like instead."""
    stripped = head.lstrip()
    if stripped.startswith(b"%PDF"):
        return "looks like a PDF document"
    if stripped[:15].lower().startswith((b"<!doctype html", b"<html")):
        return "looks like an HTML page, e.g. an error page saved instead of the photo"
    if stripped.startswith((b"PK\x03\x04",)):
        return "looks like a ZIP archive"
    for cut in range(4):  # the 64-byte head may end inside a multi-byte UTF-8 character
        try:
            head[: len(head) - cut].decode("utf-8")
            return "looks like a text file"
        except UnicodeDecodeError:
            continue
    return f"unknown format, first bytes {head[:8].hex(' ')}"
