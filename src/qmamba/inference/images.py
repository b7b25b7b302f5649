"""Reading images for IQA: every file becomes an RGB uint8 array without changing its pixels' quality."""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from qmamba.errors import QMambaError

__all__ = ["ImageReadError", "NamedBytes", "bomb_message", "read_rgb", "rgb_array"]


class ImageReadError(QMambaError):
    """An image file is missing, truncated or in an unsupported format."""


class NamedBytes(io.BytesIO):
    """An image's bytes (an upload, a tar member) that messages, Pillow's included, name by ``name`` instead of an
    object's address."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __repr__(self) -> str:
        return repr(self.name)


def read_rgb(path: str | os.PathLike[str] | BinaryIO, max_side: int | None = None,
             max_pixels: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB array of an image file (or an open binary file, named in messages by its ``name``).

    EXIF orientation is applied (phone photos); grayscale, palette, RGBA (alpha dropped) and CMYK images are
    converted to RGB; 16-bit images are rescaled to 8 bits by their bit depth, not by their content, and 32-bit
    float images from 0-1 (others are refused: their scale is unknown).

    ``max_side`` downscales an image whose longer side exceeds it (an opt-in for huge images: it changes the
    quality the model sees). JPEGs are then decoded at 1/2, 1/4 or 1/8 scale by the decoder itself (PIL's
    ``draft``), so a 12000x9000 photo never occupies its full 324 MB; the rest is a Lanczos reduction.
    ``max_pixels`` refuses an image with more pixels, from its header, before decoding (untrusted uploads).
    """
    name = path if isinstance(path, (str, os.PathLike)) else getattr(path, "name", "an open file")
    try:
        with Image.open(path) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ImageReadError(f"image {name} of {image.width}x{image.height} pixels is above the limit of "
                                     f"{max_pixels} pixels (a decompression bomb?)")
            if max_side is not None and max(image.size) > max_side:  # JPEG: decode at a reduced scale directly
                ratio = max_side / max(image.size)
                image.draft("RGB", (max(1, int(image.width * ratio)), max(1, int(image.height * ratio))))
            array = rgb_array(ImageOps.exif_transpose(image))
    except FileNotFoundError as err:
        raise ImageReadError(f"image file not found: {name}") from err
    except Image.DecompressionBombError as err:
        raise ImageReadError(bomb_message(name, err)) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"cannot read image {name}: {err} (corrupt or unsupported file)") from err
    if max_side is not None and max(array.shape[:2]) > max_side:
        image = Image.fromarray(array)
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        array = np.asarray(image)
    return array


def rgb_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB array of an opened image (the conversions :func:`read_rgb` describes)."""
    if image.mode == "F":  # 32-bit float: by convention 0-1; any other range has no scale to trust
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():
            raise ValueError("a 32-bit float image holds NaN or infinite values; save it as 8 or 16 bits")
        if array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(f"a 32-bit float image must hold values in 0-1 (this one spans {array.min():g} to "
                             f"{array.max():g}); save it as 8 or 16 bits")
        return np.repeat((array * 255.0).round().astype(np.uint8)[..., None], 3, -1)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        depth = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return np.repeat((array / depth * 255.0).round().clip(0, 255).astype(np.uint8)[..., None], 3, -1)
    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"))


def bomb_message(path: str | os.PathLike[str], err: Exception) -> str:
    """Why a huge image was refused, and how to accept it if it is genuine."""
    return (f"image {path} is refused as a possible decompression bomb ({err}); if the file is genuine, raise "
            "PIL.Image.MAX_IMAGE_PIXELS before loading, or downscale it")
