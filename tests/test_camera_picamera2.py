"""Pure parts of the picamera2 backend, checked without picamera2.

No fake picamera2 here: what talks to libcamera is covered by the contract suite on a Pi.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from atmguard.config import settings_from_mapping
from atmguard.errors import CameraError
from atmguard.hardware import registry
from atmguard.hardware.camera.picamera2_backend import (
    COLOUR_SPACE_ENCODINGS,
    REQUESTED_COLOUR_SPACE,
    Picamera2Camera,
    _Picamera2Capture,
    video_configuration_kwargs,
)
from atmguard.hardware.camera.yuv import YuvEncoding, bgr_to_rgb, split_yuv420, yuv420_to_rgb

# Reference Y'CbCr codes of the primaries and of white/black, from the ITU-R BT.601 / BT.709
# definitions (JFIF for full range), rounded to 8 bits.
REFERENCE = {
    YuvEncoding.BT601_FULL: {
        (255, 0, 0): (76, 85, 255),
        (0, 255, 0): (150, 44, 21),
        (0, 0, 255): (29, 255, 107),
        (255, 255, 255): (255, 128, 128),
        (0, 0, 0): (0, 128, 128),
    },
    YuvEncoding.BT601_LIMITED: {
        (255, 0, 0): (81, 90, 240),
        (0, 255, 0): (145, 54, 34),
        (0, 0, 255): (41, 240, 110),
        (255, 255, 255): (235, 128, 128),
        (0, 0, 0): (16, 128, 128),
    },
    YuvEncoding.BT709_LIMITED: {
        (255, 0, 0): (63, 102, 240),
        (0, 255, 0): (173, 42, 26),
        (0, 0, 255): (32, 240, 118),
        (255, 255, 255): (235, 128, 128),
        (0, 0, 0): (16, 128, 128),
    },
}


def pack_yuv420(blocks: np.ndarray, *, stride: int, junk: int = 0xA5) -> np.ndarray:
    """Build a picamera2-shaped YUV420 array from per-2x2-block (Y, Cb, Cr) codes, with row padding."""
    ch, cw = blocks.shape[:2]
    height, width = ch * 2, cw * 2
    buf = np.full(height * 3 // 2 * stride, junk, dtype=np.uint8)
    y_plane = buf[: height * stride].reshape(height, stride)
    y_plane[:, :width] = np.repeat(np.repeat(blocks[:, :, 0], 2, axis=0), 2, axis=1)
    chroma = buf[height * stride :]
    plane = (stride // 2) * ch
    chroma[:plane].reshape(ch, stride // 2)[:, :cw] = blocks[:, :, 1]
    chroma[plane : 2 * plane].reshape(ch, stride // 2)[:, :cw] = blocks[:, :, 2]
    return buf.reshape(height * 3 // 2, stride)


@pytest.mark.parametrize("encoding", list(YuvEncoding))
@pytest.mark.parametrize("rgb", [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)])
def test_known_colour_patch_converts_to_its_rgb(encoding: YuvEncoding, rgb: tuple[int, int, int]):
    code = REFERENCE[encoding][rgb]
    blocks = np.empty((3, 4, 3), dtype=np.uint8)
    blocks[...] = code
    yuv = pack_yuv420(blocks, stride=8 + 64)
    out = yuv420_to_rgb(yuv, width=8, height=6, encoding=encoding)
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - np.array(rgb)).max() <= 3, (encoding, rgb, out[0, 0])


def test_range_matters_limited_white_read_as_full_is_grey():
    blocks = np.empty((1, 1, 3), dtype=np.uint8)
    blocks[...] = (235, 128, 128)
    yuv = pack_yuv420(blocks, stride=2)
    assert (
        yuv420_to_rgb(yuv, width=2, height=2, encoding=YuvEncoding.BT601_LIMITED)[0, 0].tolist() == [255] * 3
    )
    assert yuv420_to_rgb(yuv, width=2, height=2, encoding=YuvEncoding.BT601_FULL)[0, 0].tolist() == [235] * 3


def test_plane_order_and_stride_padding_are_honoured():
    # Quadrants: red | green over blue | white, in a 12x8 image with 52 bytes of row padding.
    codes = REFERENCE[YuvEncoding.BT601_FULL]
    blocks = np.empty((4, 6, 3), dtype=np.uint8)
    blocks[:2, :3] = codes[(255, 0, 0)]
    blocks[:2, 3:] = codes[(0, 255, 0)]
    blocks[2:, :3] = codes[(0, 0, 255)]
    blocks[2:, 3:] = codes[(255, 255, 255)]
    yuv = pack_yuv420(blocks, stride=64, junk=0)
    out = yuv420_to_rgb(yuv, width=12, height=8).astype(int)
    expected = {(0, 0): (255, 0, 0), (0, 11): (0, 255, 0), (7, 0): (0, 0, 255), (7, 11): (255, 255, 255)}
    for (row, col), rgb in expected.items():
        assert np.abs(out[row, col] - rgb).max() <= 3, ((row, col), out[row, col])


def test_split_yuv420_rejects_wrong_geometry():
    with pytest.raises(ValueError, match="even"):
        split_yuv420(np.zeros((9, 8), np.uint8), width=7, height=6)
    with pytest.raises(ValueError, match="does not hold"):
        split_yuv420(np.zeros((8, 8), np.uint8), width=8, height=6)
    with pytest.raises(ValueError, match="does not hold"):
        split_yuv420(np.zeros((9, 6), np.uint8), width=8, height=6)


def test_bgr888_memory_order_becomes_rgb():
    bgr = np.zeros((2, 3, 3), dtype=np.uint8)
    bgr[..., 2] = 255  # picamera2 "RGB888": byte 2 of each pixel is red
    rgb = bgr_to_rgb(bgr)
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb.flags.c_contiguous
    assert bgr[0, 0].tolist() == [0, 0, 255]  # input untouched


def test_capture_object_converts_both_streams():
    codes = REFERENCE[YuvEncoding.BT601_FULL]
    blocks = np.empty((2, 2, 3), dtype=np.uint8)
    blocks[...] = codes[(0, 0, 255)]
    main = np.zeros((8, 8, 3), dtype=np.uint8)
    main[..., 0] = 255  # blue in BGR memory order
    capture = _Picamera2Capture(
        3,
        12.5,
        lores_yuv=pack_yuv420(blocks, stride=64),
        main_bgr=main,
        lores_size=(4, 4),
        encoding=YuvEncoding.BT601_FULL,
    )
    assert np.abs(capture.lores_rgb().astype(int) - (0, 0, 255)).max() <= 3
    assert capture.main_rgb()[0, 0].tolist() == [0, 0, 255]


def test_video_configuration_is_data_from_settings():
    kwargs = video_configuration_kwargs(
        lores_size=(640, 480), main_size=(1920, 1080), fps=15.0, buffer_count=4
    )
    assert kwargs["main"] == {"size": (1920, 1080), "format": "RGB888"}
    assert kwargs["lores"] == {"size": (640, 480), "format": "YUV420"}
    assert kwargs["controls"] == {"FrameDurationLimits": (66667, 66667)}
    assert kwargs["buffer_count"] == 4
    assert kwargs["display"] is None and kwargs["encode"] is None


@pytest.mark.parametrize(
    ("lores", "main", "match"),
    [((641, 480), (1920, 1080), "even"), ((1280, 720), (640, 480), "must not exceed")],
)
def test_impossible_stream_sizes_are_refused_at_construction(lores, main, match):
    with pytest.raises(ValueError, match=match):
        Picamera2Camera(lores_size=lores, main_size=main)


def test_lores_colour_space_requested_is_decoded_as_full_range_bt601():
    assert COLOUR_SPACE_ENCODINGS[REQUESTED_COLOUR_SPACE] is YuvEncoding.BT601_FULL
    assert COLOUR_SPACE_ENCODINGS["Rec709"] is YuvEncoding.BT709_LIMITED
    assert COLOUR_SPACE_ENCODINGS["Smpte170m"] is YuvEncoding.BT601_LIMITED


def test_registry_builds_it_from_settings_without_touching_a_camera():
    settings = settings_from_mapping(
        {"camera": {"backend": "picamera2", "lores_size": [320, 240], "fps": 10.0}}
    )
    camera = registry.build("camera", settings)
    assert isinstance(camera, Picamera2Camera)
    assert camera.lores_size == (320, 240) and camera.main_size == (1920, 1080) and camera.fps == 10.0
    assert not camera.is_open
    assert "picamera2" not in sys.modules or importlib.util.find_spec("picamera2") is not None


@pytest.mark.skipif(importlib.util.find_spec("picamera2") is not None, reason="picamera2 is installed here")
def test_open_without_picamera2_fails_closed_with_a_clear_error():
    camera = Picamera2Camera()
    with pytest.raises(CameraError, match="picamera2 is not available"):
        camera.open()
    assert not camera.is_open
    with pytest.raises(CameraError, match="not open"):
        camera.read_lores(timeout_s=0.01)
