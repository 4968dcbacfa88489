"""Image helpers shared by the vision models: loading, input validation and letterboxing.

Letterboxing keeps the aspect ratio (a stretched face looks like a different face to a model
trained on undistorted ones) and records the transform so results map back to frame pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Check that ``image`` is an HxWx3 uint8 RGB frame (HxW grayscale is expanded); return it."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"empty image, shape {array.shape}")
    return array


def load_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 RGB array (EXIF orientation applied)."""
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


@dataclass(frozen=True)
class Letterbox:
    """Where a frame landed inside a letterboxed model input.

    The frame (``src_width`` x ``src_height``) was resized to ``content_width`` x
    ``content_height`` and placed at (``pad_x``, ``pad_y``) in a ``dst_width`` x ``dst_height``
    input. Coordinates are continuous pixel coordinates (pixel i spans [i, i+1)).
    """

    src_width: int
    src_height: int
    dst_width: int
    dst_height: int
    content_width: int
    content_height: int
    pad_x: int
    pad_y: int

    def to_source(self, points: np.ndarray) -> np.ndarray:
        """Map (..., 2) x/y points from input pixels to frame pixels."""
        scale = np.array(
            [self.src_width / self.content_width, self.src_height / self.content_height], dtype=np.float64
        )
        return (np.asarray(points, dtype=np.float64) - (self.pad_x, self.pad_y)) * scale

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Which (..., 2) input-pixel points fall on the frame rather than on the padding."""
        p = np.asarray(points)
        x_ok = (p[..., 0] >= self.pad_x) & (p[..., 0] <= self.pad_x + self.content_width)
        y_ok = (p[..., 1] >= self.pad_y) & (p[..., 1] <= self.pad_y + self.content_height)
        return x_ok & y_ok


def letterbox_geometry(src_width: int, src_height: int, dst_width: int, dst_height: int) -> Letterbox:
    scale = min(dst_width / src_width, dst_height / src_height)
    content_width = min(dst_width, max(1, round(src_width * scale)))
    content_height = min(dst_height, max(1, round(src_height * scale)))
    return Letterbox(
        src_width=src_width,
        src_height=src_height,
        dst_width=dst_width,
        dst_height=dst_height,
        content_width=content_width,
        content_height=content_height,
        pad_x=(dst_width - content_width) // 2,
        pad_y=(dst_height - content_height) // 2,
    )


def resize_rgb(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize an RGB uint8 image; area-averaging when shrinking, bilinear when enlarging.

    ``reducing_gap=1.0`` makes Pillow box-reduce by the integer part of the factor first and
    interpolate only the rest: as alias-free as a full bilinear filter and ~3x faster (0.4 ms
    instead of 1.5 ms for 640x480 -> 128x96 here).
    """
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    img = Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=1.0))


def letterbox(
    rgb: np.ndarray, *, width: int, height: int, out: np.ndarray | None = None, pad_value: int = 0
) -> tuple[np.ndarray, Letterbox]:
    """Fit ``rgb`` into ``width`` x ``height`` without distortion, centred, padded with ``pad_value``.

    Returns the uint8 input image and its Letterbox. ``out`` (a height x width x 3 uint8 array)
    is reused when given, to avoid an allocation per frame.
    """
    rgb = as_rgb_uint8(rgb)
    box = letterbox_geometry(rgb.shape[1], rgb.shape[0], width, height)
    if out is None:
        out = np.empty((height, width, 3), dtype=np.uint8)
    out.fill(pad_value)
    out[box.pad_y : box.pad_y + box.content_height, box.pad_x : box.pad_x + box.content_width] = resize_rgb(
        rgb, box.content_width, box.content_height
    )
    return out, box
