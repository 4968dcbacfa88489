"""The camera interface: frames, and the blocking read loop every backend shares.

A backend describes *when* a new exposure (a :class:`Capture`) exists; this base class owns
waiting for it with a timeout, the per-stream sequence rules and the open/closed state, so
that every backend times out, refuses to work when closed and reports a lost device the
same way (python-can's ``BusABC.recv`` is the model).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Self

import numpy as np
from numpy.typing import NDArray

from atmguard.errors import CameraError, CameraTimeout
from atmguard.hardware.device import Device

if TYPE_CHECKING:
    from atmguard.config import Settings

logger = logging.getLogger(__name__)

StreamName = Literal["lores", "main"]

# Shortest condition wait: a frame that is due "now" can still be a hair in the future after
# float rounding, and a zero wait would spin.
_MIN_WAIT_S = 0.0002


@dataclass(frozen=True, eq=False)
class Frame:
    """One image of one stream. ``rgb`` is a read-only HxWx3 uint8 array in R, G, B order."""

    rgb: NDArray[np.uint8]
    t_monotonic_s: float
    """When the exposure happened, on the ``time.monotonic()`` clock (or the backend's injected clock)."""
    seq: int
    """Strictly increasing per stream while the camera is open; a lores and a main frame with
    the same seq come from the same exposure. Gaps mean frames the reader did not take."""
    stream: StreamName

    def __post_init__(self) -> None:
        rgb = self.rgb
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            shape = getattr(rgb, "shape", None)
            raise ValueError(f"Frame.rgb must be an HxWx3 uint8 array, got {type(rgb).__name__} {shape}")
        if self.stream not in ("lores", "main"):
            raise ValueError(f"Frame.stream must be 'lores' or 'main', got {self.stream!r}")
        if rgb.flags.writeable:
            # A read-only view: consumers on several threads share one frame.
            view = rgb.view()
            view.flags.writeable = False
            object.__setattr__(self, "rgb", view)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels, the same convention as the config's sizes."""
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])


class Capture(ABC):
    """One exposure of the sensor; both streams are rendered from it on demand."""

    def __init__(self, seq: int, t_monotonic_s: float) -> None:
        self.seq = seq
        self.t_monotonic_s = t_monotonic_s

    @abstractmethod
    def lores_rgb(self) -> NDArray[np.uint8]:
        """The inference-stream image, exactly lores_size."""

    @abstractmethod
    def main_rgb(self) -> NDArray[np.uint8]:
        """The evidence-stream image, exactly main_size."""


def _check_size(name: str, size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or not all(isinstance(v, int | np.integer) and v > 0 for v in size):
        raise ValueError(f"{name} must be (width, height) in positive whole pixels, got {size!r}")
    return int(size[0]), int(size[1])


class Camera(Device):
    """A camera with a small ``lores`` stream for inference and a full-size ``main`` stream for evidence.

    Thread-safe: one thread may read lores frames while another captures evidence.
    """

    def __init__(self, *, lores_size: Sequence[int], main_size: Sequence[int], fps: float) -> None:
        self._lores_size = _check_size("lores_size", lores_size)
        self._main_size = _check_size("main_size", main_size)
        if not (isinstance(fps, int | float) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number, got {fps!r}")
        self._fps = float(fps)
        self._cond = threading.Condition()
        self._open = False
        self._last_seq: dict[StreamName, int] = {"lores": -1, "main": -1}
        self._last_lores_capture: Capture | None = None

    # -- construction -------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Settings) -> Self:
        """Build (without opening) from ``settings.camera``."""

    # -- properties ---------------------------------------------------------------------

    @property
    def fps(self) -> float:
        return self._fps

    @property
    def lores_size(self) -> tuple[int, int]:
        """(width, height) of every lores frame."""
        return self._lores_size

    @property
    def main_size(self) -> tuple[int, int]:
        """(width, height) of every main frame."""
        return self._main_size

    @property
    def is_open(self) -> bool:
        with self._cond:
            return self._open

    # -- lifecycle ----------------------------------------------------------------------

    def open(self) -> None:
        """Acquire the device and start streaming; a no-op when already open."""
        with self._cond:
            if self._open:
                return
        try:
            self._open_backend()
        except CameraError:
            raise
        except Exception as exc:
            raise CameraError(f"{self._name}: cannot open: {exc}") from exc
        with self._cond:
            self._open = True
            self._last_seq = {"lores": -1, "main": -1}
            self._last_lores_capture = None
        logger.info(
            "%s open: lores %dx%d, main %dx%d at %.3g fps",
            self._name,
            *self._lores_size,
            *self._main_size,
            self._fps,
        )

    def close(self) -> None:
        """Release the device; idempotent. Readers blocked in another thread get CameraError."""
        with self._cond:
            if not self._open:
                return
            self._open = False
            self._last_lores_capture = None
            self._cond.notify_all()
        self._close_backend()
        logger.info("%s closed", self._name)

    # -- reading ------------------------------------------------------------------------

    def read_lores(self, *, timeout_s: float) -> Frame:
        """Block until a lores frame newer than the last one returned; CameraTimeout after ``timeout_s``.

        A timeout is how a frozen or unplugged sensor shows: the caller must treat it as a
        camera fault, not retry forever.
        """
        capture = self._await_capture("lores", timeout_s)
        return Frame(capture.lores_rgb(), capture.t_monotonic_s, capture.seq, "lores")

    def capture_main(self, *, timeout_s: float) -> Frame:
        """Full-resolution evidence image of the same exposure as the last lores frame returned.

        When that exposure was already returned by ``capture_main`` (or no lores frame was read
        yet), this waits, like ``read_lores``, for the next exposure.
        """
        capture = self._await_capture("main", timeout_s)
        return Frame(capture.main_rgb(), capture.t_monotonic_s, capture.seq, "main")

    def _await_capture(self, stream: StreamName, timeout_s: float) -> Capture:
        if not (isinstance(timeout_s, int | float) and timeout_s >= 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be a finite number >= 0, got {timeout_s!r}")
        # The deadline is on the real monotonic clock even when a backend runs on an injected
        # clock, so that a stopped test clock cannot make a read hang.
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                if not self._open:
                    raise CameraError(f"{self._name}: camera is not open")
                self._check_alive_locked()
                after = self._last_seq[stream]
                capture = self._last_lores_capture if stream == "main" else None
                if capture is None or capture.seq <= after:
                    capture = self._newest_capture_locked(after)
                if capture is not None and capture.seq > after:
                    self._last_seq[stream] = capture.seq
                    if stream == "lores":
                        self._last_lores_capture = capture
                    self._delivered_locked(capture)
                    return capture
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    last = "none yet" if after < 0 else f"last seq {after}"
                    raise CameraTimeout(
                        f"{self._name}: no new {stream} frame within {timeout_s:.3g} s ({last})"
                    )
                hint = self._wait_hint_locked(after)
                self._cond.wait(remaining if hint is None else min(remaining, max(hint, _MIN_WAIT_S)))

    @property
    def _name(self) -> str:
        return type(self).__name__

    # -- backend hooks (all *_locked hooks run with self._cond held) -----------------------

    @abstractmethod
    def _open_backend(self) -> None:
        """Acquire the device; raise CameraError with a clear reason when it cannot be used."""

    @abstractmethod
    def _close_backend(self) -> None:
        """Release the device; called once per successful open, outside the lock."""

    @abstractmethod
    def _newest_capture_locked(self, after_seq: int) -> Capture | None:
        """The newest exposure available now, or None; may raise CameraTimeout when none can ever come."""

    def _wait_hint_locked(self, after_seq: int) -> float | None:
        """Seconds until an exposure newer than ``after_seq`` may exist; None: wait to be notified."""
        return None

    def _check_alive_locked(self) -> None:
        """Raise CameraError when the device is gone."""
        return None

    def _delivered_locked(self, capture: Capture) -> None:
        """Called when ``capture`` is handed to a reader (either stream)."""
        return None
