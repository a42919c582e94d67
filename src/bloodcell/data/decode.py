"""Decode one image file into the RGB uint8 array every stage uses.

This module must not import torch: the ONNX Runtime predictor uses it too. Training (through the decoded
cache), evaluation and every predictor call :func:`decode_image`, so a model always sees exactly the
preprocessing it was trained with.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: File suffixes accepted as images (lower case).
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
#: PIL format names accepted after opening (a ``.jpg`` that is really a GIF is refused).
ACCEPTED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "BMP", "TIFF", "MPO"})
#: Images with more pixels than this are refused as likely decompression bombs (about 8k x 8k).
DEFAULT_MAX_PIXELS = 64_000_000
#: Bumped whenever the same file may decode to other pixels or get another accept / refuse verdict
#: (2: EXIF orientation applied, 16-bit and float greyscale refused). The index's hash cache and the
#: decoded cache are keyed by it, so a new rule never meets a verdict or pixels from the old one.
DECODER_VERSION = 2
#: Single-channel modes wider than 8 bits. PIL's conversion to RGB clips them at 255 instead of scaling,
#: which turns a 16-bit smear into a blank white field; their range (12 or 16 bits? 0-1 floats?) cannot be
#: told from the file, so they are refused with a reason instead of guessed.
_WIDE_MODES: dict[str, str] = {
    "I;16": "16-bit greyscale", "I;16L": "16-bit greyscale", "I;16B": "16-bit greyscale",
    "I;16N": "16-bit greyscale", "I": "32-bit integer greyscale", "F": "32-bit float greyscale",
}  # fmt: skip


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` says why in words a user understands."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def open_rgb(
    source: str | os.PathLike[str] | bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
) -> Image.Image:
    """Open, validate and fully decode an image, converting any mode to RGB.

    Parameters
    ----------
    source: a path, or the raw bytes of an uploaded file.
    max_pixels: refuse images with more pixels than this (decompression bombs).
    max_side: refuse images whose width or height exceeds this.

    Returns the decoded RGB image. Raises :class:`ImageError` naming the source and the problem for
    zero-byte, non-image, truncated, oversized or unsupported files.
    """
    name = "<upload>" if isinstance(source, bytes) else str(source)
    data = source if isinstance(source, bytes) else None
    if data is None:
        try:
            size = Path(source).stat().st_size  # type: ignore[arg-type]
        except OSError as error:
            raise ImageError(name, f"cannot read file ({error.strerror or error})") from error
        if size == 0:
            raise ImageError(name, "empty file (0 bytes)")
    elif len(data) == 0:
        raise ImageError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns before it errors on bombs; we check the size ourselves and want one clear message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data) if data is not None else source)  # type: ignore[arg-type]
            if image.format not in ACCEPTED_FORMATS:
                raise ImageError(name, f"unsupported image format {image.format!r} (use JPEG, PNG, BMP or TIFF)")
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    name, f"image too large: {width}x{height} pixels exceeds the limit of {max_pixels:,} pixels"
                )
            if max_side is not None and max(width, height) > max_side:
                raise ImageError(name, f"image dimensions {width}x{height} exceed the limit of {max_side}x{max_side}")
            if width < 8 or height < 8:
                raise ImageError(name, f"image too small: {width}x{height} pixels")
            image.load()  # decode now so truncation is caught here, not later
            if image.mode in _WIDE_MODES:
                raise ImageError(name, f"{_WIDE_MODES[image.mode]} image (mode {image.mode}): bloodcell reads 8-bit "
                                       "colour images; convert it to 8-bit RGB first")  # fmt: skip
            # A camera's orientation tag: show the model the picture as a viewer (and the web page) shows it.
            ImageOps.exif_transpose(image, in_place=True)
    except ImageError:
        raise
    except UnidentifiedImageError as error:
        raise ImageError(name, "not an image file (or an unsupported format)") from error
    except Image.DecompressionBombError as error:
        raise ImageError(name, f"image too large (decompression bomb guard): {error}") from error
    except (OSError, SyntaxError, ValueError) as error:
        message = str(error)
        if "truncated" in message.lower() or "broken data stream" in message.lower():
            raise ImageError(name, f"truncated or corrupt image data ({message})") from error
        raise ImageError(name, f"cannot decode image ({message})") from error
    if image.mode != "RGB":
        # Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit RGB all become 8-bit RGB.
        image = image.convert("RGB")
    return image


def resize_rgb(image: Image.Image, size: int) -> np.ndarray:
    """Resize an RGB image to ``size`` x ``size`` and return a ``(size, size, 3)`` uint8 array.

    The whole field of view is kept (no crop): cells near the border matter. Bilinear resampling with
    PIL's antialiasing is used everywhere, so cache and predictors agree to the bit.
    """
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).copy()


def decode_image(source: str | os.PathLike[str] | bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``source`` to a ``(size, size, 3)`` uint8 RGB array (see :func:`open_rgb` for errors)."""
    return resize_rgb(open_rgb(source, max_pixels=max_pixels), size)
