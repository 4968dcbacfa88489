"""ReplayCamera: plays a directory of images (or one image) as a camera.

Each image is one exposure, letterboxed into lores_size and main_size like a sensor of fixed
resolution. Replay is *lossless*: every readable image is delivered once per pass, in name
order, never faster than ``fps``; a reader slower than ``fps`` slows playback down instead of
skipping images, so an evaluation run gives the same result on a fast and a slow machine.
(SimCamera is the one that drops frames like a real sensor.)

With ``loop = false`` the camera stops after the last image: every later ``read_lores``
raises CameraTimeout at once (no new frame will ever come), which the daemon treats exactly
like a frozen camera.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Self

import numpy as np
from numpy.typing import NDArray

from atmguard.errors import CameraError, CameraTimeout, ConfigError
from atmguard.hardware.camera.base import Camera, Capture
from atmguard.hardware.camera.imageio import (
    IMAGE_SUFFIXES,
    NEUTRAL_RGB,
    ImageReadError,
    letterbox,
    list_images,
    load_rgb,
)

if TYPE_CHECKING:
    from atmguard.config import Settings

logger = logging.getLogger(__name__)


class _ReplayCapture(Capture):
    def __init__(
        self,
        seq: int,
        t_monotonic_s: float,
        *,
        source: NDArray[np.uint8],
        lores_size: tuple[int, int],
        main_size: tuple[int, int],
        fill_rgb: Sequence[int],
    ) -> None:
        super().__init__(seq, t_monotonic_s)
        self._source = source
        self._sizes = {"lores": lores_size, "main": main_size}
        self._fill_rgb = fill_rgb
        self._rendered: dict[str, NDArray[np.uint8]] = {}

    def _render(self, stream: str) -> NDArray[np.uint8]:
        # Rendered lazily: most exposures are never asked for as evidence.
        image = self._rendered.get(stream)
        if image is None:
            image = letterbox(self._source, self._sizes[stream], fill_rgb=self._fill_rgb)
            image.flags.writeable = False
            self._rendered[stream] = image
        return image

    def lores_rgb(self) -> NDArray[np.uint8]:
        return self._render("lores")

    def main_rgb(self) -> NDArray[np.uint8]:
        return self._render("main")


class ReplayCamera(Camera):
    """Image files as a camera: directory in sorted name order, or a single file; looped or once."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lores_size: Sequence[int] = (640, 480),
        main_size: Sequence[int] = (1920, 1080),
        fps: float = 15.0,
        loop: bool = True,
        clock: Callable[[], float] = time.monotonic,
        fill_rgb: Sequence[int] = NEUTRAL_RGB,
    ) -> None:
        super().__init__(lores_size=lores_size, main_size=main_size, fps=fps)
        self._path = Path(path)
        self._loop = loop
        self._clock = clock
        self._fill_rgb = tuple(fill_rgb)
        self._files: list[Path] = []
        self._bad: set[Path] = set()
        self._cursor = -1
        self._current: _ReplayCapture | None = None
        self._current_delivered_t: float | None = None
        self._finished = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        from atmguard.config import relative_to_config

        camera = settings.camera
        if not camera.replay.path:
            # An empty path would silently replay the working directory.
            issue = f"{settings.source}: camera.replay.path: required for the replay backend"
            raise ConfigError(settings.source, [issue])
        return cls(
            relative_to_config(settings, camera.replay.path),
            lores_size=camera.lores_size,
            main_size=camera.main_size,
            fps=camera.fps,
            loop=camera.replay.loop,
        )

    @property
    def path(self) -> Path:
        return self._path

    @property
    def finished(self) -> bool:
        """True once a non-looping replay has delivered its last image."""
        with self._cond:
            return self._finished

    # -- backend hooks ------------------------------------------------------------------

    def _open_backend(self) -> None:
        path = self._path
        if path.is_dir():
            files = list_images(path)
            if not files:
                kinds = ", ".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
                raise CameraError(f"{path}: no image files ({kinds}) in this directory")
        elif path.is_file():
            files = [path]
        else:
            raise CameraError(f"{path}: no such image file or directory")
        with self._cond:
            self._files = files
            self._bad = set()
            self._cursor = -1
            self._current = None
            self._current_delivered_t = None
            self._finished = False
            # Decoding the first image now makes an unusable replay fail at open(), not later.
            first = self._next_capture_locked(seq=0, t_monotonic_s=self._clock())
        if first is None:
            raise CameraError(f"{path}: no readable image among {len(files)} file(s)")
        logger.info("replaying %d image file(s) from %s (loop=%s)", len(files), path, self._loop)

    def _close_backend(self) -> None:
        with self._cond:
            self._current = None

    def _newest_capture_locked(self, after_seq: int) -> Capture | None:
        current = self._current
        if current is None:
            raise CameraError(f"{self._name}: {self._path}: no readable image left")
        if current.seq > after_seq:
            return current
        if self._clock() < current.t_monotonic_s + 1.0 / self._fps:
            return None
        # Never earlier than one period after the previous image, nor before it was taken.
        t_next = max(current.t_monotonic_s + 1.0 / self._fps, self._current_delivered_t or 0.0)
        return self._next_capture_locked(seq=current.seq + 1, t_monotonic_s=t_next)

    def _wait_hint_locked(self, after_seq: int) -> float | None:
        if self._current is None:
            return None
        return self._current.t_monotonic_s + 1.0 / self._fps - self._clock()

    def _delivered_locked(self, capture: Capture) -> None:
        if capture is self._current and self._current_delivered_t is None:
            self._current_delivered_t = self._clock()

    # -- internals ----------------------------------------------------------------------

    def _next_capture_locked(self, *, seq: int, t_monotonic_s: float) -> _ReplayCapture | None:
        """Decode the next readable file into the current capture; None if there is none.

        Runs under the lock: a few ms per image, and it keeps "skip the unreadable, stop at
        the end" in one place. Letterboxing, the costly part, happens later, outside it.
        """
        if self._finished:
            raise CameraTimeout(
                f"{self._name}: replay of {self._path} finished after its last image (loop off): no new frame"
            )
        count = len(self._files)
        for _ in range(count):
            position = self._cursor + 1
            if position >= count:
                if not self._loop and self._current is not None:
                    self._finished = True
                    logger.info("replay of %s finished", self._path)
                    raise CameraTimeout(
                        f"{self._name}: replay of {self._path} finished after its last image (loop off): "
                        "no new frame"
                    )
                position = 0
            self._cursor = position
            file = self._files[position]
            if file in self._bad:
                continue
            try:
                source = load_rgb(file)
            except ImageReadError as exc:
                # One broken file must not stop the camera; name it so it can be fixed.
                logger.warning("replay: skipping unreadable image %s: %s", file, exc.__cause__ or exc)
                self._bad.add(file)
                continue
            self._current = _ReplayCapture(
                seq,
                t_monotonic_s,
                source=source,
                lores_size=self.lores_size,
                main_size=self.main_size,
                fill_rgb=self._fill_rgb,
            )
            self._current_delivered_t = None
            return self._current
        self._current = None
        return None
