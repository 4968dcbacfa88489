"""Image files to RGB arrays, and fitting them into a fixed camera frame.

Shared by the replay and simulated cameras: both read ordinary image files and must hand out
frames of exactly the configured size, as a sensor does, without distorting faces.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".pgm", ".bmp"})
"""File types a replay directory or a scene directory may hold (compared case-insensitively)."""

NEUTRAL_RGB = (128, 128, 128)
"""Letterbox fill: mid grey biases neither a detector's exposure nor its colour statistics."""


class ImageReadError(ValueError):
    """An image file cannot be decoded (message names the file)."""


def list_images(directory: Path) -> list[Path]:
    """Image files directly inside ``directory``, sorted by name; other files are ignored."""
    return sorted(
        (p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: p.name,
    )


def load_rgb(path: str | os.PathLike[str]) -> NDArray[np.uint8]:
    """Decode one image file to an HxWx3 uint8 RGB array, EXIF orientation applied."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                # 16-bit greyscale (PGM with maxval > 255): keep the top 8 bits.
                grey = np.asarray(image, dtype=np.uint32) >> 8
                image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8))
            elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                # Flatten transparency onto the neutral background rather than onto black.
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (*NEUTRAL_RGB, 255))
                image = Image.alpha_composite(background, rgba)
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        # Pillow reports truncated or malformed files with any of these.
        raise ImageReadError(f"{os.fspath(path)}: cannot decode image: {exc}") from exc
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageReadError(f"{os.fspath(path)}: image is empty")
    return rgb


def as_rgb_array(image: NDArray[np.generic]) -> NDArray[np.uint8]:
    """Validate an in-memory image (HxWx3 or HxW uint8) and return it as a read-only HxWx3 array."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"image must be HxWx3 (or HxW greyscale), got shape {array.shape}")
    array = np.array(array, copy=True)
    array.flags.writeable = False
    return array


def fit_rect(source_wh: Sequence[int], target_wh: Sequence[int]) -> tuple[int, int, int, int]:
    """Largest undistorted placement of ``source_wh`` centred in ``target_wh``: (x, y, w, h)."""
    src_w, src_h = source_wh
    dst_w, dst_h = target_wh
    scale = min(dst_w / src_w, dst_h / src_h)
    width = max(1, min(dst_w, round(src_w * scale)))
    height = max(1, min(dst_h, round(src_h * scale)))
    return (dst_w - width) // 2, (dst_h - height) // 2, width, height


def resize_rgb(rgb: NDArray[np.uint8], size: Sequence[int]) -> NDArray[np.uint8]:
    """Resize an RGB array to ``size`` = (width, height) with bilinear filtering."""
    width, height = int(size[0]), int(size[1])
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    resized = Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def letterbox(
    rgb: NDArray[np.uint8], size: Sequence[int], *, fill_rgb: Sequence[int] = NEUTRAL_RGB
) -> NDArray[np.uint8]:
    """Fit ``rgb`` undistorted into a new frame of ``size`` = (width, height), padded with ``fill_rgb``."""
    width, height = int(size[0]), int(size[1])
    x, y, w, h = fit_rect((rgb.shape[1], rgb.shape[0]), (width, height))
    frame = np.empty((height, width, 3), dtype=np.uint8)
    # Broadcasting a 3-vector over the frame is ~40x slower than copying one prepared row.
    frame[:] = np.tile(np.asarray(fill_rgb, dtype=np.uint8), width).reshape(width, 3)
    frame[y : y + h, x : x + w] = resize_rgb(rgb, (w, h))
    return frame
