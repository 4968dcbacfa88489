"""Contract every camera backend must honour, run against each one.

ReplayCamera and SimCamera run everywhere. Picamera2Camera runs the same suite only where
picamera2 can be imported (a Raspberry Pi with a camera attached); elsewhere its cases are
skipped with that reason. Cases that need a scene we control (a pure red picture, a broken
file, a stopped sensor) cannot be staged on the real camera and say so when skipped.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atmguard.errors import CameraError, CameraTimeout
from atmguard.hardware.camera.base import Camera, Frame
from atmguard.hardware.camera.picamera2_backend import Picamera2Camera
from atmguard.hardware.camera.replay import ReplayCamera
from atmguard.hardware.camera.sim import SimCamera

HAVE_PICAMERA2 = importlib.util.find_spec("picamera2") is not None
NO_PICAMERA2 = (
    "picamera2 is not installed: Picamera2Camera runs this contract only on a Raspberry Pi with a camera"
)
NOT_STAGEABLE = "the real camera cannot be shown a chosen picture or made to stall on demand"

LORES = (160, 120)
MAIN = (320, 240)


def write_image(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path


@dataclass
class Rig:
    """How to build one backend for the contract: ``make(image_dir, fps)`` shows image_dir's pictures."""

    kind: str
    make: Callable[[Path, float], Camera]
    stageable: bool
    stall: Callable[[Camera], None] | None = None


def _make_replay(image_dir: Path, fps: float) -> Camera:
    return ReplayCamera(image_dir, lores_size=LORES, main_size=MAIN, fps=fps)


def _make_sim(image_dir: Path, fps: float) -> Camera:
    # The directory of pictures becomes the scene "shown" under a scene root.
    return SimCamera(
        image_dir.parent, lores_size=LORES, main_size=MAIN, fps=fps, initial_scene=image_dir.name
    )


def _make_picamera2(image_dir: Path, fps: float) -> Camera:
    return Picamera2Camera(lores_size=LORES, main_size=MAIN, fps=fps)


def _stall_replay(camera: Camera) -> None:
    # A non-looping replay stalls for good once its last picture is out.
    assert isinstance(camera, ReplayCamera)
    while True:
        try:
            camera.read_lores(timeout_s=1.0)
        except CameraTimeout:
            return


def _stall_sim(camera: Camera) -> None:
    assert isinstance(camera, SimCamera)
    camera.set_scene("frozen")


@pytest.fixture(
    params=[
        "replay",
        "sim",
        pytest.param("picamera2", marks=pytest.mark.skipif(not HAVE_PICAMERA2, reason=NO_PICAMERA2)),
    ]
)
def rig(request: pytest.FixtureRequest) -> Rig:
    if request.param == "replay":
        return Rig("replay", _make_replay, stageable=True, stall=_stall_replay)
    if request.param == "sim":
        return Rig("sim", _make_sim, stageable=True, stall=_stall_sim)
    return Rig("picamera2", _make_picamera2, stageable=False)


@pytest.fixture
def red_dir(tmp_path: Path) -> Path:
    write_image(tmp_path / "scenes" / "red" / "red.png", (255, 0, 0), size=(64, 48))
    return tmp_path / "scenes" / "red"


@pytest.fixture
def open_camera(rig: Rig, red_dir: Path):
    camera = rig.make(red_dir, 50.0)
    camera.open()
    yield camera
    camera.close()


def centre_median(frame: Frame) -> np.ndarray:
    h, w = frame.rgb.shape[:2]
    patch = frame.rgb[h // 2 - 5 : h // 2 + 5, w // 2 - 5 : w // 2 + 5].reshape(-1, 3)
    return np.median(patch, axis=0)


def test_lores_frame_is_lores_size_uint8_read_only(open_camera: Camera):
    frame = open_camera.read_lores(timeout_s=2.0)
    assert frame.stream == "lores"
    assert frame.size == LORES == open_camera.lores_size
    assert frame.rgb.shape == (LORES[1], LORES[0], 3)
    assert frame.rgb.dtype == np.uint8
    with pytest.raises(ValueError):
        frame.rgb[0, 0, 0] = 1


def test_red_scene_arrives_as_red_in_rgb_order(rig: Rig, open_camera: Camera):
    if not rig.stageable:
        pytest.skip(NOT_STAGEABLE)
    lores = open_camera.read_lores(timeout_s=2.0)
    main = open_camera.capture_main(timeout_s=2.0)
    for frame in (lores, main):
        r, g, b = centre_median(frame)
        assert r > 235 and g < 20 and b < 20, f"{frame.stream} centre is {r, g, b}, not red"


def test_seq_strictly_increases_and_each_read_is_newer(open_camera: Camera):
    frames = [open_camera.read_lores(timeout_s=2.0) for _ in range(6)]
    seqs = [f.seq for f in frames]
    times = [f.t_monotonic_s for f in frames]
    assert all(b > a for a, b in itertools.pairwise(seqs)), seqs
    assert all(b > a for a, b in itertools.pairwise(times)), times


def test_frames_are_paced_at_fps_not_faster(rig: Rig, red_dir: Path):
    fps = 40.0
    period = 1.0 / fps
    with rig.make(red_dir, fps) as camera:
        first = camera.read_lores(timeout_s=2.0)
        started = time.monotonic()
        frames = [first] + [camera.read_lores(timeout_s=2.0) for _ in range(7)]
        elapsed = time.monotonic() - started
    # Per sequence step: a reader delayed by the scheduler may legitimately see a gap in seq.
    steps = np.diff([f.t_monotonic_s for f in frames]) / np.diff([f.seq for f in frames])
    assert elapsed >= 7 * period * 0.9, f"7 frames in {elapsed:.3f} s is faster than {fps} fps"
    assert steps.min() >= 0.8 * period, steps
    assert 0.8 * period <= float(np.median(steps)) <= 1.5 * period, steps
    # Timestamps are on the monotonic clock, near "now" rather than in some other epoch.
    assert abs(frames[-1].t_monotonic_s - time.monotonic()) < 1.0


def test_short_timeout_raises_camera_timeout_promptly(rig: Rig, red_dir: Path):
    with rig.make(red_dir, 4.0) as camera:
        camera.read_lores(timeout_s=2.0)
        camera.read_lores(timeout_s=2.0)  # now in step with the sensor: the next is 250 ms away
        started = time.monotonic()
        with pytest.raises(CameraTimeout) as caught:
            camera.read_lores(timeout_s=0.03)
        elapsed = time.monotonic() - started
    assert 0.025 <= elapsed < 0.2
    assert isinstance(caught.value, TimeoutError)
    assert "no new lores frame" in str(caught.value)


def test_no_frames_means_camera_timeout(rig: Rig, red_dir: Path):
    if rig.stall is None:
        pytest.skip(NOT_STAGEABLE)
    camera = rig.make(red_dir, 50.0)
    if isinstance(camera, ReplayCamera):
        camera = ReplayCamera(red_dir, lores_size=LORES, main_size=MAIN, fps=50.0, loop=False)
    with camera:
        camera.read_lores(timeout_s=2.0)
        rig.stall(camera)
        started = time.monotonic()
        with pytest.raises(CameraTimeout):
            camera.read_lores(timeout_s=0.1)
        assert time.monotonic() - started < 0.5


def test_capture_main_is_main_size_from_the_same_exposure(open_camera: Camera):
    lores = open_camera.read_lores(timeout_s=2.0)
    main = open_camera.capture_main(timeout_s=2.0)
    assert main.stream == "main"
    assert main.size == MAIN == open_camera.main_size
    assert main.rgb.shape == (MAIN[1], MAIN[0], 3) and main.rgb.dtype == np.uint8
    assert (main.seq, main.t_monotonic_s) == (lores.seq, lores.t_monotonic_s)
    # Evidence is never handed out twice: the next capture waits for a new exposure.
    again = open_camera.capture_main(timeout_s=2.0)
    assert again.seq > main.seq


def test_capture_main_without_lores_waits_for_an_exposure(open_camera: Camera):
    main = open_camera.capture_main(timeout_s=2.0)
    assert main.size == MAIN
    lores = open_camera.read_lores(timeout_s=2.0)
    assert lores.seq >= main.seq


def test_reading_a_camera_that_is_not_open_raises_camera_error(rig: Rig, red_dir: Path):
    camera = rig.make(red_dir, 50.0)
    with pytest.raises(CameraError, match="not open"):
        camera.read_lores(timeout_s=0.1)
    camera.open()
    camera.read_lores(timeout_s=2.0)
    camera.close()
    camera.close()  # idempotent
    for read in (camera.read_lores, camera.capture_main):
        with pytest.raises(CameraError, match="not open") as caught:
            read(timeout_s=0.1)
        assert not isinstance(caught.value, CameraTimeout)


def test_context_manager_opens_and_closes(rig: Rig, red_dir: Path):
    with rig.make(red_dir, 50.0) as camera:
        assert camera.is_open
        camera.read_lores(timeout_s=2.0)
    assert not camera.is_open


def test_close_wakes_a_blocked_reader_with_camera_error(rig: Rig, red_dir: Path):
    camera = rig.make(red_dir, 1.0)
    camera.open()
    camera.read_lores(timeout_s=2.0)
    outcome: list[tuple[BaseException, float]] = []

    def reader() -> None:
        try:
            camera.read_lores(timeout_s=5.0)
        except BaseException as exc:
            outcome.append((exc, time.monotonic()))

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.05)
    started = time.monotonic()
    camera.close()
    thread.join(timeout=2.0)
    assert not thread.is_alive()
    assert len(outcome) == 1
    error, raised_at = outcome[0]
    assert isinstance(error, CameraError) and not isinstance(error, CameraTimeout)
    # Woken by close() itself, not by the next frame being due a second later.
    assert raised_at - started < 0.3


def test_negative_timeout_is_rejected(open_camera: Camera):
    with pytest.raises(ValueError):
        open_camera.read_lores(timeout_s=-1.0)


def test_unreadable_file_is_skipped_with_a_warning(rig: Rig, red_dir: Path, caplog: pytest.LogCaptureFixture):
    if not rig.stageable:
        pytest.skip(NOT_STAGEABLE)
    bad = red_dir / "a_broken.jpg"  # sorts before red.png, so it is met first
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    caplog.set_level(logging.WARNING)
    with rig.make(red_dir, 50.0) as camera:
        frames = [camera.read_lores(timeout_s=2.0) for _ in range(3)]
    assert all(centre_median(f)[0] > 235 for f in frames)
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "a_broken.jpg" in r.getMessage()
    ]
    assert warnings, [r.getMessage() for r in caplog.records]


def test_reopen_after_close_streams_again(rig: Rig, red_dir: Path):
    camera = rig.make(red_dir, 50.0)
    with camera:
        camera.read_lores(timeout_s=2.0)
    with camera:
        frame = camera.read_lores(timeout_s=2.0)
    assert frame.size == LORES
