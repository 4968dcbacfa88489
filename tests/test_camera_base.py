"""Frame: the value every camera hands out."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from atmguard.errors import CameraError, CameraTimeout
from atmguard.hardware.camera import Camera, Frame
from atmguard.hardware.camera.base import Capture


def test_frame_is_read_only_and_reports_width_height():
    rgb = np.zeros((48, 64, 3), dtype=np.uint8)
    frame = Frame(rgb, 1.5, 7, "lores")
    assert frame.size == (64, 48)
    with pytest.raises(ValueError):
        frame.rgb[0, 0, 0] = 255
    with pytest.raises(AttributeError):
        frame.seq = 8  # type: ignore[misc]


@pytest.mark.parametrize(
    "rgb",
    [
        np.zeros((4, 4, 3), dtype=np.float32),
        np.zeros((4, 4), dtype=np.uint8),
        np.zeros((4, 4, 4), dtype=np.uint8),
        [[0, 0, 0]],
    ],
)
def test_frame_rejects_anything_but_hxwx3_uint8(rgb):
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        Frame(rgb, 0.0, 0, "main")


def test_frame_rejects_unknown_stream():
    with pytest.raises(ValueError, match="stream"):
        Frame(np.zeros((2, 2, 3), dtype=np.uint8), 0.0, 0, "raw")  # type: ignore[arg-type]


class _Shot(Capture):
    def __init__(self, seq: int, value: int) -> None:
        super().__init__(seq, float(seq))
        self.value = value

    def lores_rgb(self) -> np.ndarray:
        return np.full((2, 4, 3), self.value, dtype=np.uint8)

    def main_rgb(self) -> np.ndarray:
        return np.full((4, 8, 3), self.value, dtype=np.uint8)


class PushCamera(Camera):
    """The shape of a push backend (a capture thread publishing exposures), driven by the test."""

    def __init__(self) -> None:
        super().__init__(lores_size=(4, 2), main_size=(8, 4), fps=10.0)
        self.latest: Capture | None = None

    @classmethod
    def from_settings(cls, settings):
        return cls()

    def publish(self, seq: int, value: int) -> None:
        with self._cond:
            self.latest = _Shot(seq, value)
            self._cond.notify_all()

    def _open_backend(self) -> None:
        self.latest = None

    def _close_backend(self) -> None:
        self.latest = None

    def _newest_capture_locked(self, after_seq: int) -> Capture | None:
        return self.latest


def test_latest_exposure_is_returned_once_then_the_reader_waits_for_a_newer_one():
    with PushCamera() as camera:
        camera.publish(1, 10)
        first = camera.read_lores(timeout_s=0.1)
        assert (first.seq, int(first.rgb[0, 0, 0])) == (1, 10)
        with pytest.raises(CameraTimeout):
            camera.read_lores(timeout_s=0.05)  # the same exposure is not handed out twice
        timer = threading.Timer(0.05, camera.publish, args=(2, 20))
        timer.start()
        started = time.monotonic()
        second = camera.read_lores(timeout_s=1.0)
        assert time.monotonic() - started < 0.5
        assert (second.seq, int(second.rgb[0, 0, 0])) == (2, 20)


def test_capture_main_prefers_the_exposure_of_the_last_lores_frame():
    with PushCamera() as camera:
        camera.publish(5, 50)
        lores = camera.read_lores(timeout_s=0.1)
        camera.publish(6, 60)  # newer, but the caller is looking at exposure 5
        main = camera.capture_main(timeout_s=0.1)
        assert (main.seq, main.size, int(main.rgb[0, 0, 0])) == (5, (8, 4), 50)
        assert lores.seq == main.seq
        following = camera.capture_main(timeout_s=0.1)
        assert (following.seq, int(following.rgb[0, 0, 0])) == (6, 60)


def test_backend_failures_at_open_become_camera_errors():
    class Broken(PushCamera):
        def _open_backend(self) -> None:
            raise OSError("no such device")

    camera = Broken()
    with pytest.raises(CameraError, match="no such device"):
        camera.open()
    assert not camera.is_open
