"""Pixel-format conversions for the Pi camera streams (pure numpy, no picamera2).

picamera2 hands the lores stream over as one ``(height * 3 // 2, stride)`` uint8 array: a
Y plane of ``height`` rows, then the U plane and the V plane, each ``height / 2`` rows of
``stride / 2`` bytes (I420 / libcamera "YUV420"). ``stride`` may exceed ``width``: the
padding on the right of every row must be dropped. Its "RGB888" main stream is stored
[B, G, R] per pixel (libcamera/DRM naming), so it needs a channel swap to be RGB.
"""

from __future__ import annotations

import enum

import numpy as np
from numpy.typing import NDArray


class YuvEncoding(enum.Enum):
    """Y'CbCr matrix and quantisation range of a YUV stream (libcamera colour space)."""

    BT601_FULL = ("bt601", True)
    """libcamera ColorSpace.Sycc(): JPEG/sYCC, what picamera2 uses for stills and previews."""
    BT601_LIMITED = ("bt601", False)
    """ColorSpace.Smpte170m(): picamera2's video default below 1280x720."""
    BT709_LIMITED = ("bt709", False)
    """ColorSpace.Rec709(): picamera2's video default from 1280x720 up."""

    @property
    def matrix(self) -> str:
        return self.value[0]

    @property
    def full_range(self) -> bool:
        return self.value[1]


# Luma weights (Kr, Kb) of ITU-R BT.601 and BT.709; the inverse matrix follows from them.
_LUMA_WEIGHTS = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}


def _inverse_coefficients(matrix: str) -> tuple[float, float, float, float]:
    """(Cr->R, Cb->G, Cr->G, Cb->B) for normalised Y in [0, 1] and Cb/Cr in [-0.5, 0.5]."""
    kr, kb = _LUMA_WEIGHTS[matrix]
    kg = 1.0 - kr - kb
    return (
        2.0 * (1.0 - kr),
        -2.0 * kb * (1.0 - kb) / kg,
        -2.0 * kr * (1.0 - kr) / kg,
        2.0 * (1.0 - kb),
    )


def split_yuv420(yuv: NDArray[np.uint8], *, width: int, height: int) -> tuple[NDArray[np.uint8], ...]:
    """Return the (Y, U, V) planes of a picamera2 YUV420 array, row padding removed."""
    if width % 2 or height % 2:
        raise ValueError(f"YUV420 needs an even width and height, got {width}x{height}")
    if yuv.dtype != np.uint8 or yuv.ndim != 2:
        raise ValueError(f"YUV420 array must be 2-D uint8, got {yuv.dtype} with shape {yuv.shape}")
    rows, stride = yuv.shape
    if rows != height * 3 // 2 or stride < width:
        raise ValueError(f"YUV420 array of shape {yuv.shape} does not hold a {width}x{height} image")
    luma = yuv[:height, :width]
    # Chroma rows are stride/2 bytes long, so a chroma plane does not map onto whole rows of
    # the (rows, stride) view: slice the flat tail instead.
    chroma = np.ascontiguousarray(yuv[height:]).reshape(-1)
    c_stride, c_height, c_width = stride // 2, height // 2, width // 2
    plane = c_stride * c_height
    u = chroma[:plane].reshape(c_height, c_stride)[:, :c_width]
    v = chroma[plane : 2 * plane].reshape(c_height, c_stride)[:, :c_width]
    return luma, u, v


def yuv420_to_rgb(
    yuv: NDArray[np.uint8], *, width: int, height: int, encoding: YuvEncoding = YuvEncoding.BT601_FULL
) -> NDArray[np.uint8]:
    """Convert a picamera2 YUV420 array to a ``(height, width, 3)`` RGB uint8 array.

    Chroma is upsampled by pixel replication, as cheap as it gets and good enough for a
    face detector working on the lores stream.
    """
    luma, u, v = split_yuv420(yuv, width=width, height=height)
    cr_r, cb_g, cr_g, cb_b = _inverse_coefficients(encoding.matrix)
    y = luma.astype(np.float32)
    cb = u.astype(np.float32) - 128.0
    cr = v.astype(np.float32) - 128.0
    if encoding.full_range:
        y_scale, c_scale = 1.0, 1.0
    else:
        # Limited ("video") range: Y in 16..235, Cb/Cr in 16..240 around 128.
        y -= 16.0
        y_scale, c_scale = 255.0 / 219.0, 255.0 / 224.0
    if y_scale != 1.0:
        y *= y_scale
    # Chroma terms at half resolution, broadcast over each 2x2 luma block.
    y4 = y.reshape(height // 2, 2, width // 2, 2)
    out = np.empty((height // 2, 2, width // 2, 2, 3), dtype=np.float32)
    np.add(y4, (c_scale * cr_r * cr)[:, None, :, None], out=out[..., 0])
    np.add(y4, (c_scale * (cb_g * cb + cr_g * cr))[:, None, :, None], out=out[..., 1])
    np.add(y4, (c_scale * cb_b * cb)[:, None, :, None], out=out[..., 2])
    np.clip(out, 0.0, 255.0, out=out)
    np.rint(out, out=out)
    return out.reshape(height, width, 3).astype(np.uint8)


def bgr_to_rgb(bgr: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Swap [B, G, R] pixels (picamera2 "RGB888") into a new contiguous RGB array."""
    if bgr.ndim != 3 or bgr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 array, got shape {bgr.shape}")
    # Three plane copies beat a reversed-stride copy about 5x on a 1920x1080 frame.
    rgb = np.empty_like(bgr, order="C")
    rgb[..., 0] = bgr[..., 2]
    rgb[..., 1] = bgr[..., 1]
    rgb[..., 2] = bgr[..., 0]
    return rgb
