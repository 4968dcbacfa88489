"""SimCamera: the harness's camera, a sensor whose scene the harness switches.

It behaves like the Pi camera, not like a picture viewer: exposures happen every 1/fps
whether or not anybody reads them (a slow reader gets the newest one and sees a gap in
``seq``), the person in front of it moves a little, and every frame carries sensor noise,
so two consecutive frames are never identical.

Scenes:

* every sub-directory of ``scene_dir`` (e.g. ``uncovered/``, ``covered/``, ``two_faces/``)
  is a scene; each visit of a scene shows its next image (round robin in name order);
* :meth:`SimCamera.add_scene` registers one at run time from image paths or arrays;
* built in: ``nobody`` (an empty wall), ``frozen`` (exposures stop: ``read_lores`` times out,
  like a hung libcamera pipeline) and ``lost`` (device gone: reads raise CameraError at once).
  Leaving ``frozen`` or ``lost`` resumes streaming, like a pipeline restart or a re-plugged cable.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Self

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from atmguard.errors import CameraError
from atmguard.hardware.camera.base import Camera, Capture
from atmguard.hardware.camera.imageio import ImageReadError, as_rgb_array, list_images, load_rgb, resize_rgb

if TYPE_CHECKING:
    from atmguard.config import Settings

logger = logging.getLogger(__name__)

BUILTIN_SCENES = ("nobody", "frozen", "lost")

ImageSource = str | os.PathLike[str] | NDArray[np.uint8]

# Sensor noise bank: per-frame noise is a random window of one precomputed field, because
# drawing fresh Gaussian noise for a 1920x1080 frame costs ~100 ms; the margin gives
# _NOISE_MARGIN**2 distinct windows.
_NOISE_MARGIN = 32
_NOISE_BAND_ROWS = 64
_DECODED_CACHE_SIZE = 16


@dataclass
class _Scene:
    name: str
    sources: list[ImageSource]
    next_index: int = 0
    unreadable: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class _Motion:
    """How the customer sways: smooth sinusoids, phases drawn at each scene visit."""

    phase_x: float
    phase_y: float
    phase_s: float

    def pose(self, t_s: float) -> tuple[float, float, float]:
        """(dx, dy) as fractions of the frame height, and a scale factor, at time ``t_s``."""
        dx = 0.04 * math.sin(2 * math.pi * t_s / 3.1 + self.phase_x)
        dy = 0.02 * math.sin(2 * math.pi * t_s / 2.3 + self.phase_y)
        scale = 1.0 + 0.04 * math.sin(2 * math.pi * t_s / 4.7 + self.phase_s)
        return dx, dy, scale


@dataclass(frozen=True)
class _View:
    """What the sensor sees while a scene lasts: the person image (None: empty wall) and motion."""

    scene: str
    person: NDArray[np.uint8] | None
    motion: _Motion


class _SimCapture(Capture):
    def __init__(
        self, seq: int, t_monotonic_s: float, *, camera: SimCamera, view: _View, t_scene_s: float
    ) -> None:
        super().__init__(seq, t_monotonic_s)
        self._camera = camera
        self._view = view
        self._t_scene_s = t_scene_s
        self._rendered: dict[str, NDArray[np.uint8]] = {}

    def _render(self, stream: str, size: tuple[int, int]) -> NDArray[np.uint8]:
        image = self._rendered.get(stream)
        if image is None:
            image = self._camera._compose(self.seq, stream, size, self._view, self._t_scene_s)
            image.flags.writeable = False
            self._rendered[stream] = image
        return image

    def lores_rgb(self) -> NDArray[np.uint8]:
        return self._render("lores", self._camera.lores_size)

    def main_rgb(self) -> NDArray[np.uint8]:
        return self._render("main", self._camera.main_size)


class SimCamera(Camera):
    """A simulated Pi camera whose scene the harness switches with :meth:`set_scene`."""

    def __init__(
        self,
        scene_dir: str | os.PathLike[str] | None = None,
        *,
        lores_size: Sequence[int] = (640, 480),
        main_size: Sequence[int] = (1920, 1080),
        fps: float = 15.0,
        initial_scene: str = "nobody",
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        person_height_fraction: float = 0.6,
        noise_sigma: float = 2.5,
    ) -> None:
        super().__init__(lores_size=lores_size, main_size=main_size, fps=fps)
        if not 0.05 <= person_height_fraction <= 1.0:
            raise ValueError(f"person_height_fraction must be within 0.05..1, got {person_height_fraction}")
        if noise_sigma < 0:
            raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma}")
        self._scene_dir = Path(scene_dir) if scene_dir else None
        self._initial_scene = initial_scene
        self._seed = seed
        self._clock = clock
        self._person_height_fraction = person_height_fraction
        self._noise_sigma = noise_sigma
        self._scenes: dict[str, _Scene] = {}
        self._dir_scenes_loaded = False
        self._decoded: OrderedDict[tuple[str, int], NDArray[np.uint8]] = OrderedDict()
        self._visits = 0
        self._view = self._builtin_view("nobody")
        self._t0 = 0.0
        self._frozen = False
        self._lost = False
        self._resume_index = 1
        self._recent: OrderedDict[int, _SimCapture] = OrderedDict()
        self._backgrounds: dict[tuple[int, int], NDArray[np.uint8]] = {}
        self._noise: dict[tuple[int, int], NDArray[np.int8]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        from atmguard.config import relative_to_config

        camera = settings.camera
        scene_dir = relative_to_config(settings, camera.sim.scene_dir) if camera.sim.scene_dir else None
        return cls(
            scene_dir,
            lores_size=camera.lores_size,
            main_size=camera.main_size,
            fps=camera.fps,
            initial_scene=camera.sim.initial_scene,
            seed=camera.sim.seed,
        )

    # -- scenes -------------------------------------------------------------------------

    @property
    def scenes(self) -> list[str]:
        """Every scene name :meth:`set_scene` accepts now (directory scenes once opened)."""
        with self._cond:
            return [*BUILTIN_SCENES, *sorted(self._scenes)]

    @property
    def scene(self) -> str:
        with self._cond:
            return self._view.scene

    def add_scene(self, name: str, images: Sequence[ImageSource]) -> None:
        """Register (or replace) a scene made of image files and/or HxWx3 uint8 arrays."""
        if name in BUILTIN_SCENES:
            raise ValueError(f"scene name {name!r} is reserved for a built-in scene")
        if not name or "/" in name:
            raise ValueError(f"invalid scene name {name!r}")
        if isinstance(images, str | os.PathLike | np.ndarray):
            raise TypeError("images must be a sequence of paths or arrays, not a single one")
        sources: list[ImageSource] = []
        for image in images:
            if isinstance(image, np.ndarray):
                sources.append(as_rgb_array(image))
            elif isinstance(image, str | os.PathLike):
                sources.append(Path(image))
            else:
                kind = type(image).__name__
                raise TypeError(f"scene {name!r}: an image must be a path or a numpy array, got {kind}")
        if not sources:
            raise ValueError(f"scene {name!r} needs at least one image")
        with self._cond:
            self._scenes[name] = _Scene(name, sources)
            self._forget_decoded_locked(name)

    def set_scene(self, name: str, *, image_index: int | None = None) -> None:
        """Switch what the camera sees from the next exposure on.

        Unknown names raise KeyError listing the known ones. For image scenes ``image_index``
        picks the image; by default each visit shows the scene's next image. Before ``open()``
        this only chooses the scene to start with (checked by ``open()``, like ``initial_scene``).
        """
        with self._cond:
            if not self._open:
                self._initial_scene = name
                return
        self._switch_scene(name, image_index)

    def _switch_scene(self, name: str, image_index: int | None) -> None:
        with self._cond:
            if name in BUILTIN_SCENES:
                view = self._builtin_view(name)
            else:
                scene = self._scenes.get(name)
                if scene is None:
                    known = ", ".join(self.scenes)
                    raise KeyError(f"unknown scene {name!r}; known scenes: {known}")
                view = None
        if view is None:
            view = self._image_view(scene, image_index)
        with self._cond:
            now = self._clock()
            was = self._view.scene
            if was in ("frozen", "lost") and name != was:
                # The pipeline restarts: the first new exposure is one period from now.
                self._resume_index = self._latest_index(now) + 1
            # A hung pipeline delivers nothing more, not even an exposure already due.
            self._frozen = name == "frozen"
            self._lost = name == "lost"
            self._view = view
            self._cond.notify_all()
        logger.info("sim camera: scene %s -> %s", was, name)

    def _builtin_view(self, name: str) -> _View:
        return _View(scene=name, person=None, motion=_Motion(0.0, 0.0, 0.0))

    def _image_view(self, scene: _Scene, image_index: int | None) -> _View:
        with self._cond:
            self._visits += 1
            rng = np.random.default_rng([self._seed, self._visits])
            count = len(scene.sources)
            start = scene.next_index if image_index is None else image_index
            if image_index is not None and not 0 <= image_index < count:
                raise IndexError(f"scene {scene.name!r} has {count} image(s), no index {image_index}")
        for offset in range(count):
            index = (start + offset) % count
            if index in scene.unreadable:
                continue
            try:
                person = self._decoded_image(scene, index)
            except ImageReadError as exc:
                # Warned once; the file stays in the listing but is never tried again.
                logger.warning("sim camera: scene %s: skipping unreadable image: %s", scene.name, exc)
                with self._cond:
                    scene.unreadable.add(index)
                continue
            with self._cond:
                scene.next_index = (index + 1) % count
            motion = _Motion(*(float(p) for p in rng.uniform(0.0, 2 * math.pi, size=3)))
            return _View(scene=scene.name, person=person, motion=motion)
        raise ValueError(f"scene {scene.name!r}: none of its {count} image(s) can be decoded")

    def _decoded_image(self, scene: _Scene, index: int) -> NDArray[np.uint8]:
        source = scene.sources[index]
        if isinstance(source, np.ndarray):
            return source
        key = (scene.name, index)
        with self._cond:
            cached = self._decoded.get(key)
            if cached is not None:
                self._decoded.move_to_end(key)
                return cached
        image = load_rgb(source)
        image.flags.writeable = False
        with self._cond:
            self._decoded[key] = image
            while len(self._decoded) > _DECODED_CACHE_SIZE:
                self._decoded.popitem(last=False)
        return image

    def _forget_decoded_locked(self, name: str) -> None:
        for key in [k for k in self._decoded if k[0] == name]:
            del self._decoded[key]

    def _load_scene_dir(self) -> None:
        directory = self._scene_dir
        if directory is None:
            return
        if not directory.is_dir():
            raise CameraError(f"{directory}: scene directory does not exist")
        for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
            if sub.name in BUILTIN_SCENES:
                logger.warning("sim camera: %s ignored: %r is a built-in scene", sub, sub.name)
                continue
            images = list_images(sub)
            if not images:
                logger.warning("sim camera: %s ignored: no image files", sub)
                continue
            with self._cond:
                # Scenes added at run time under the same name win over the directory.
                self._scenes.setdefault(sub.name, _Scene(sub.name, list(images)))

    # -- backend hooks ------------------------------------------------------------------

    def _open_backend(self) -> None:
        if not self._dir_scenes_loaded:
            self._load_scene_dir()
            self._dir_scenes_loaded = True
        for size in (self.lores_size, self.main_size):
            self._background(size)
            self._noise_field(size)
        with self._cond:
            # Streaming starts now: the first exposure completes one frame period later.
            self._t0 = self._clock()
            self._resume_index = 1
            self._frozen = False
            self._lost = False
            self._recent.clear()
            self._view = self._builtin_view("nobody")
        try:
            self._switch_scene(self._initial_scene, None)
        except (KeyError, ValueError) as exc:
            raise CameraError(f"{self._name}: initial scene: {exc.args[0]}") from exc

    def _close_backend(self) -> None:
        with self._cond:
            self._recent.clear()

    def _check_alive_locked(self) -> None:
        if self._lost:
            raise CameraError(f"{self._name}: camera lost (disconnected): no device to read from")

    def _latest_index(self, now: float) -> int:
        # Exposure n ends at t0 + n/fps; the epsilon keeps an exactly-due frame from slipping.
        return math.floor((now - self._t0) * self._fps + 1e-9)

    def _newest_capture_locked(self, after_seq: int) -> Capture | None:
        now = self._clock()
        if self._frozen:
            return None
        index = self._latest_index(now)
        if index < self._resume_index or index <= after_seq:
            return None
        capture = self._recent.get(index)
        if capture is None:
            capture = _SimCapture(
                index,
                self._t0 + index / self._fps,
                camera=self,
                view=self._view,
                t_scene_s=index / self._fps,
            )
            self._recent[index] = capture
            while len(self._recent) > 4:
                self._recent.popitem(last=False)
        return capture

    def _wait_hint_locked(self, after_seq: int) -> float | None:
        if self._frozen:
            return None
        index = max(after_seq + 1, self._resume_index)
        return self._t0 + index / self._fps - self._clock()

    # -- rendering ----------------------------------------------------------------------

    def _background(self, size: tuple[int, int]) -> NDArray[np.uint8]:
        """The empty wall: a vertical light gradient with a faint blotchy texture."""
        cached = self._backgrounds.get(size)
        if cached is not None:
            return cached
        width, height = size
        rng = np.random.default_rng([self._seed, 7])
        # The texture is drawn at a fixed small size and scaled, so lores and main show the same wall.
        texture = rng.normal(0.0, 6.0, size=(27, 48)).astype(np.float32)
        texture_img = Image.fromarray(texture, mode="F").resize((width, height), Image.Resampling.BICUBIC)
        shade = np.linspace(1.0, 0.78, height, dtype=np.float32)[:, None]
        wall = np.asarray((196.0, 190.0, 178.0), dtype=np.float32)
        image = wall[None, None, :] * shade[:, :, None] + np.asarray(texture_img)[:, :, None]
        background = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        background.flags.writeable = False
        self._backgrounds[size] = background
        return background

    def _noise_field(self, size: tuple[int, int]) -> NDArray[np.int8]:
        cached = self._noise.get(size)
        if cached is not None:
            return cached
        width, height = size
        rng = np.random.default_rng([self._seed, 11, width, height])
        rows, columns = height + _NOISE_MARGIN, width + _NOISE_MARGIN
        # int8, drawn a band of rows at a time: a float64 draw of the whole 1080p field would
        # briefly take 50 MB, which glibc keeps in the process long after it is freed.
        noise = np.empty((rows, columns, 3), dtype=np.int8)
        for top in range(0, rows, _NOISE_BAND_ROWS):
            band = rng.standard_normal((min(_NOISE_BAND_ROWS, rows - top), columns, 3), dtype=np.float32)
            band *= self._noise_sigma
            np.clip(np.rint(band), -127, 127, out=band)
            noise[top : top + band.shape[0]] = band
        self._noise[size] = noise
        return noise

    def _compose(
        self, seq: int, stream: str, size: tuple[int, int], view: _View, t_scene_s: float
    ) -> NDArray[np.uint8]:
        """Render exposure ``seq``: wall, person at this instant's pose, sensor noise."""
        width, height = size
        frame = np.array(self._background(size), copy=True)
        person = view.person
        if person is not None:
            dx, dy, scale = view.motion.pose(t_scene_s)
            src_h, src_w = person.shape[:2]
            box_h = height * self._person_height_fraction * scale
            box_w = box_h * src_w / src_h
            if box_w > 0.9 * width:
                box_w, box_h = 0.9 * width, 0.9 * width * src_h / src_w
            pw, ph = max(1, round(box_w)), max(1, round(box_h))
            x = round(width / 2 + dx * height - pw / 2)
            y = round(height / 2 + dy * height - ph / 2)
            resized = resize_rgb(person, (pw, ph))
            # Clip the paste to the frame: a swaying customer may lean out of view.
            x0, y0 = max(x, 0), max(y, 0)
            x1, y1 = min(x + pw, width), min(y + ph, height)
            if x1 > x0 and y1 > y0:
                frame[y0:y1, x0:x1] = resized[y0 - y : y1 - y, x0 - x : x1 - x]
        if self._noise_sigma > 0:
            # Seeded by the exposure, so lores and main of one exposure get consistent noise
            # and a run with an injected clock is reproducible.
            rng = np.random.default_rng([self._seed, seq, 0 if stream == "lores" else 1])
            oy, ox = (int(v) for v in rng.integers(0, _NOISE_MARGIN, size=2))
            noise = self._noise_field(size)[oy : oy + height, ox : ox + width]
            noisy = frame.astype(np.int16)
            noisy += noise
            np.clip(noisy, 0, 255, out=noisy)
            frame = noisy.astype(np.uint8)
        return frame
