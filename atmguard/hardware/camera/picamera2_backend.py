"""Picamera2Camera: the Raspberry Pi camera through picamera2/libcamera.

picamera2 is imported inside ``open()`` only: it cannot even be imported off a Pi. One
capture thread takes every completed request, copies out both streams and releases the
request at once (so libcamera never runs out of buffers), and publishes the copy as the
newest exposure. A hung pipeline simply stops publishing: ``read_lores`` then times out.

Facts this relies on (checked against picamera2's source and manual):

* on Pi 4 and earlier (VC4 ISP) the lores stream must be YUV (``check_camera_config``
  raises "lores stream must be YUV"); YUV420 also works on a Pi 5, so it is used everywhere;
* ``make_array("lores")`` returns YUV420 as ``(height * 3 // 2, stride)``, chroma planes
  following the Y plane at half stride;
* "RGB888" main buffers are ordered [B, G, R] per pixel, hence ``bgr_to_rgb``;
* the lores stream gets the configuration's colour space; we ask for sYCC (BT.601, full
  range) explicitly because ``create_video_configuration`` otherwise picks SMPTE170M or
  Rec709 (limited range) from the main size, and we read back what libcamera granted;
* ``SensorTimestamp`` is in nanoseconds on CLOCK_MONOTONIC (picamera2 itself compares it
  with ``time.monotonic_ns()``), so frame times share the daemon's monotonic clock.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any, Self

import numpy as np
from numpy.typing import NDArray

from atmguard.errors import CameraError
from atmguard.hardware.camera.base import Camera, Capture
from atmguard.hardware.camera.yuv import YuvEncoding, bgr_to_rgb, yuv420_to_rgb

if TYPE_CHECKING:
    from collections.abc import Sequence

    from atmguard.config import Settings

logger = logging.getLogger(__name__)

# libcamera ColorSpace presets picamera2 uses, by constructor name, and how their YUV decodes.
COLOUR_SPACE_ENCODINGS = {
    "Sycc": YuvEncoding.BT601_FULL,
    "Smpte170m": YuvEncoding.BT601_LIMITED,
    "Rec709": YuvEncoding.BT709_LIMITED,
}
REQUESTED_COLOUR_SPACE = "Sycc"

# How often the capture thread looks at its stop flag while waiting for a frame: bounds close().
_POLL_S = 0.1


def video_configuration_kwargs(
    *, lores_size: Sequence[int], main_size: Sequence[int], fps: float, buffer_count: int
) -> dict[str, Any]:
    """Keyword arguments for ``Picamera2.create_video_configuration`` (colour space added at open)."""
    lores_w, lores_h = (int(v) for v in lores_size)
    main_w, main_h = (int(v) for v in main_size)
    if lores_w % 2 or lores_h % 2 or main_w % 2 or main_h % 2:
        raise ValueError(f"stream sizes must be even: lores {lores_w}x{lores_h}, main {main_w}x{main_h}")
    if lores_w > main_w or lores_h > main_h:
        # picamera2 refuses this too ("lores stream dimensions may not exceed main stream").
        raise ValueError(f"lores {lores_w}x{lores_h} must not exceed main {main_w}x{main_h}")
    if buffer_count < 2:
        raise ValueError(f"buffer_count must be at least 2, got {buffer_count}")
    frame_us = round(1_000_000 / fps)
    return {
        "main": {"size": (main_w, main_h), "format": "RGB888"},
        "lores": {"size": (lores_w, lores_h), "format": "YUV420"},
        "buffer_count": buffer_count,
        # Equal limits pin the frame rate; otherwise the AGC stretches exposures in dim light
        # and the frame rate (and the daemon's timeout budget) would drift.
        "controls": {"FrameDurationLimits": (frame_us, frame_us)},
        "display": None,
        "encode": None,
    }


class _Picamera2Capture(Capture):
    def __init__(
        self,
        seq: int,
        t_monotonic_s: float,
        *,
        lores_yuv: NDArray[np.uint8],
        main_bgr: NDArray[np.uint8],
        lores_size: tuple[int, int],
        encoding: YuvEncoding,
    ) -> None:
        super().__init__(seq, t_monotonic_s)
        self._lores_yuv = lores_yuv
        self._main_bgr = main_bgr
        self._lores_size = lores_size
        self._encoding = encoding
        self._lores: NDArray[np.uint8] | None = None
        self._main: NDArray[np.uint8] | None = None

    def lores_rgb(self) -> NDArray[np.uint8]:
        # Converted by the reader, not the capture thread: only frames somebody reads cost CPU.
        if self._lores is None:
            width, height = self._lores_size
            self._lores = yuv420_to_rgb(self._lores_yuv, width=width, height=height, encoding=self._encoding)
        return self._lores

    def main_rgb(self) -> NDArray[np.uint8]:
        if self._main is None:
            self._main = bgr_to_rgb(self._main_bgr)
        return self._main


class Picamera2Camera(Camera):
    """The Pi camera (libcamera) via picamera2; lores YUV420 for inference, main RGB for evidence."""

    def __init__(
        self,
        camera_num: int = 0,
        *,
        lores_size: Sequence[int] = (640, 480),
        main_size: Sequence[int] = (1920, 1080),
        fps: float = 15.0,
        buffer_count: int = 4,
    ) -> None:
        super().__init__(lores_size=lores_size, main_size=main_size, fps=fps)
        self._camera_num = camera_num
        self._buffer_count = buffer_count
        # Validate now, so a bad size is reported when the daemon is built, not at first use.
        self._config_kwargs = video_configuration_kwargs(
            lores_size=self.lores_size, main_size=self.main_size, fps=fps, buffer_count=buffer_count
        )
        self._picam2: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._latest: _Picamera2Capture | None = None
        self._failure: str | None = None
        self._encoding = YuvEncoding.BT601_FULL

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        camera = settings.camera
        return cls(
            camera.picamera2.camera_num,
            lores_size=camera.lores_size,
            main_size=camera.main_size,
            fps=camera.fps,
            buffer_count=camera.picamera2.buffer_count,
        )

    # -- backend hooks ------------------------------------------------------------------

    def _open_backend(self) -> None:
        try:
            import libcamera
            from picamera2 import Picamera2
        except ImportError as exc:
            raise CameraError(
                f"{self._name}: picamera2 is not available here ({exc}); on Raspberry Pi OS install "
                "python3-picamera2 and create the venv with --system-site-packages"
            ) from exc
        picam2 = None
        try:
            picam2 = Picamera2(self._camera_num)
            colour_space = getattr(libcamera.ColorSpace, REQUESTED_COLOUR_SPACE)()
            config = picam2.create_video_configuration(colour_space=colour_space, **self._config_kwargs)
            picam2.configure(config)
            granted = picam2.camera_configuration()
            self._check_granted(granted)
            self._encoding = self._encoding_of(granted["colour_space"], libcamera)
            picam2.start()
        except Exception as exc:
            if picam2 is not None:
                _close_quietly(picam2)
            if isinstance(exc, CameraError):
                raise
            raise CameraError(f"{self._name}: camera {self._camera_num} cannot be started: {exc}") from exc
        self._warn_if_stretched()
        with self._cond:
            self._picam2 = picam2
            self._latest = None
            self._failure = None
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._capture_loop, args=(picam2,), name="camera-capture", daemon=True
        )
        self._thread.start()

    def _close_backend(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=_POLL_S + 1.0)
            if thread.is_alive():
                logger.warning("camera capture thread did not stop within %.1f s", _POLL_S + 1.0)
        with self._cond:
            picam2, self._picam2 = self._picam2, None
            self._latest = None
        if picam2 is not None:
            _close_quietly(picam2)

    def _check_alive_locked(self) -> None:
        if self._failure is not None:
            raise CameraError(f"{self._name}: camera {self._camera_num} failed: {self._failure}")

    def _newest_capture_locked(self, after_seq: int) -> Capture | None:
        return self._latest

    # -- capture thread -----------------------------------------------------------------

    def _capture_loop(self, picam2: Any) -> None:
        job = None
        seq = 0
        last_frame_at = time.monotonic()
        stalled = False
        # Silence this long is worth a log line; the daemon's read timeout decides what it means.
        stall_s = max(1.0, 3.0 / self.fps)
        try:
            while not self._stop.is_set():
                if job is None:
                    # One outstanding job, waited on repeatedly: re-submitting after a timeout
                    # would leave the old job to swallow a request nobody ever releases.
                    job = picam2.capture_request(wait=False)
                try:
                    request = job.get_result(timeout=_POLL_S)
                except TimeoutError:
                    if not stalled and time.monotonic() - last_frame_at > stall_s:
                        stalled = True
                        logger.warning("camera %d: no frame for %.1f s", self._camera_num, stall_s)
                    continue
                except CancelledError:
                    job = None
                    continue
                job = None
                try:
                    seq += 1
                    capture = self._copy_request(request, seq)
                finally:
                    request.release()
                now = time.monotonic()
                if stalled:
                    stalled = False
                    logger.info(
                        "camera %d: frames resumed after %.1f s", self._camera_num, now - last_frame_at
                    )
                last_frame_at = now
                with self._cond:
                    self._latest = capture
                    self._cond.notify_all()
        except Exception as exc:
            if not self._stop.is_set():
                logger.error("camera %d: capture thread failed: %s", self._camera_num, exc)
                with self._cond:
                    self._failure = str(exc) or type(exc).__name__
                    self._cond.notify_all()
        finally:
            if job is not None:
                _release_if_done(job)

    def _copy_request(self, request: Any, seq: int) -> _Picamera2Capture:
        metadata = request.get_metadata()
        timestamp_ns = metadata.get("SensorTimestamp")
        t = timestamp_ns / 1e9 if isinstance(timestamp_ns, int) and timestamp_ns > 0 else time.monotonic()
        # make_array copies out of the dma buffer, so the request can go back right away.
        lores = request.make_array("lores")
        main = request.make_array("main")
        (lores_w, lores_h), (main_w, main_h) = self.lores_size, self.main_size
        if lores.shape[0] != lores_h * 3 // 2 or lores.shape[1] < lores_w:
            raise CameraError(f"lores buffer {lores.shape} does not hold a {lores_w}x{lores_h} YUV420 image")
        if main.shape != (main_h, main_w, 3):
            raise CameraError(f"main buffer {main.shape} is not {main_w}x{main_h} RGB888")
        return _Picamera2Capture(
            seq, t, lores_yuv=lores, main_bgr=main, lores_size=self.lores_size, encoding=self._encoding
        )

    # -- configuration checks -----------------------------------------------------------

    def _check_granted(self, granted: dict[str, Any]) -> None:
        for stream, wanted, fmt in (("main", self.main_size, "RGB888"), ("lores", self.lores_size, "YUV420")):
            got = granted[stream]
            if tuple(got["size"]) != wanted or got["format"] != fmt:
                # Fail closed: a silently different size would break every consumer's geometry.
                raise CameraError(
                    f"{self._name}: libcamera adjusted the {stream} stream to {got['format']} "
                    f"{got['size'][0]}x{got['size'][1]} (asked {fmt} {wanted[0]}x{wanted[1]}); "
                    "choose a size this camera supports"
                )

    def _encoding_of(self, colour_space: Any, libcamera: Any) -> YuvEncoding:
        for name, encoding in COLOUR_SPACE_ENCODINGS.items():
            if colour_space == getattr(libcamera.ColorSpace, name)():
                if name != REQUESTED_COLOUR_SPACE:
                    logger.warning(
                        "camera %d: libcamera chose colour space %s for lores", self._camera_num, name
                    )
                return encoding
        raise CameraError(f"{self._name}: unsupported colour space {colour_space} for the lores stream")

    def _warn_if_stretched(self) -> None:
        (lw, lh), (mw, mh) = self.lores_size, self.main_size
        if abs(lw / lh - mw / mh) > 0.01 * (mw / mh):
            # The ISP scales one field of view into both streams, so lores pixels are not square.
            logger.warning(
                "lores %dx%d and main %dx%d differ in aspect ratio: lores images are stretched",
                lw,
                lh,
                mw,
                mh,
            )


def _close_quietly(picam2: Any) -> None:
    for step in (picam2.stop, picam2.close):
        try:
            step()
        except Exception as exc:  # closing must not mask the error that made us close
            logger.warning("camera: %s failed while closing: %s", step.__name__, exc)


def _release_if_done(job: Any) -> None:
    try:
        request = job.get_result(timeout=0)
    except Exception:  # still pending, cancelled or failed: nothing was handed to us
        return
    request.release()
