"""ReplayCamera: file handling, letterboxing, once/loop, lossless pacing."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atmguard.config import settings_from_mapping
from atmguard.errors import CameraError, CameraTimeout, ConfigError
from atmguard.hardware import registry
from atmguard.hardware.camera.imageio import NEUTRAL_RGB, fit_rect
from atmguard.hardware.camera.replay import ReplayCamera

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def write_image(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path


def colour(frame_rgb: np.ndarray) -> tuple[int, ...]:
    h, w = frame_rgb.shape[:2]
    return tuple(int(v) for v in frame_rgb[h // 2, w // 2])


@pytest.fixture
def rgb_dir(tmp_path: Path) -> Path:
    write_image(tmp_path / "03_blue.bmp", BLUE)
    write_image(tmp_path / "01_red.png", RED)
    write_image(tmp_path / "02_green.jpg", GREEN)
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def camera(path: Path, **kwargs) -> ReplayCamera:
    kwargs.setdefault("lores_size", (64, 48))
    kwargs.setdefault("main_size", (128, 72))
    kwargs.setdefault("fps", 100.0)
    return ReplayCamera(path, **kwargs)


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 12) -> bool:
    return max(abs(int(a) - int(e)) for a, e in zip(actual, expected, strict=True)) <= tol


def test_once_mode_plays_each_image_in_name_order_then_times_out_at_once(rgb_dir: Path):
    with camera(rgb_dir, loop=False) as cam:
        seen = [colour(cam.read_lores(timeout_s=1.0).rgb) for _ in range(3)]
        assert all(close_to(s, e) for s, e in zip(seen, [RED, GREEN, BLUE], strict=True)), seen
        started = time.monotonic()
        with pytest.raises(CameraTimeout, match="finished"):
            cam.read_lores(timeout_s=5.0)
        assert time.monotonic() - started < 0.5  # no point waiting: nothing will ever come
        assert cam.finished
        with pytest.raises(CameraTimeout):
            cam.read_lores(timeout_s=0.01)
        # The last exposure is still available as evidence once.
        assert close_to(colour(cam.capture_main(timeout_s=0.1).rgb), BLUE)


def test_loop_mode_wraps_around_with_seq_still_increasing(rgb_dir: Path):
    with camera(rgb_dir, loop=True) as cam:
        frames = [cam.read_lores(timeout_s=1.0) for _ in range(5)]
    assert [f.seq for f in frames] == [0, 1, 2, 3, 4]
    assert close_to(colour(frames[3].rgb), RED) and close_to(colour(frames[4].rgb), GREEN)
    assert not cam.finished


def test_slow_reader_slows_playback_but_skips_nothing(rgb_dir: Path):
    fps = 200.0
    with camera(rgb_dir, fps=fps, loop=False) as cam:
        frames = []
        for _ in range(3):
            frames.append(cam.read_lores(timeout_s=1.0))
            time.sleep(0.03)  # six frame periods
    assert [f.seq for f in frames] == [0, 1, 2]
    assert all(close_to(colour(f.rgb), c) for f, c in zip(frames, [RED, GREEN, BLUE], strict=True))
    dts = np.diff([f.t_monotonic_s for f in frames])
    # Never closer than one period; the sensor holds one exposure while the reader is busy,
    # so playback as a whole stretches to the reader's pace.
    assert dts.min() >= 1.0 / fps - 1e-9
    assert frames[2].t_monotonic_s - frames[0].t_monotonic_s >= 0.03


def test_stopped_clock_means_no_new_frame(rgb_dir: Path):
    now = [100.0]
    with camera(rgb_dir, fps=10.0, clock=lambda: now[0]) as cam:
        first = cam.read_lores(timeout_s=1.0)
        assert first.t_monotonic_s == 100.0
        with pytest.raises(CameraTimeout):
            cam.read_lores(timeout_s=0.02)
        now[0] += 0.25
        second = cam.read_lores(timeout_s=0.02)
        third = cam.read_lores(timeout_s=0.02)
    # The exposure after the first was taken one period later and waited for the reader;
    # the one after that could only be taken once the reader had freed it.
    assert second.seq == 1 and second.t_monotonic_s == pytest.approx(100.1)
    assert third.seq == 2 and third.t_monotonic_s == pytest.approx(100.25)


def test_letterbox_keeps_aspect_and_pads_with_neutral_grey(tmp_path: Path):
    write_image(tmp_path / "square.png", RED, size=(50, 50))
    with camera(tmp_path / "square.png", lores_size=(64, 48), main_size=(160, 90)) as cam:
        lores = cam.read_lores(timeout_s=1.0).rgb
        main = cam.capture_main(timeout_s=1.0).rgb
    assert lores.shape == (48, 64, 3) and main.shape == (90, 160, 3)
    # 48x48 red square centred in 64x48: grey bars 8 px wide left and right.
    assert lores[:, :7].reshape(-1, 3).tolist() == [list(NEUTRAL_RGB)] * (48 * 7)
    assert lores[:, 57:].reshape(-1, 3).tolist() == [list(NEUTRAL_RGB)] * (48 * 7)
    assert close_to(tuple(lores[24, 9]), RED) and close_to(tuple(lores[24, 54]), RED)
    assert close_to(tuple(main[45, 36]), RED) and close_to(tuple(main[45, 123]), RED)
    assert main[45, 33].tolist() == list(NEUTRAL_RGB) and main[45, 126].tolist() == list(NEUTRAL_RGB)


def test_fit_rect_centres_without_distortion():
    assert fit_rect((100, 100), (640, 480)) == (80, 0, 480, 480)
    assert fit_rect((400, 100), (640, 480)) == (0, 160, 640, 160)
    assert fit_rect((640, 480), (640, 480)) == (0, 0, 640, 480)


def test_exif_orientation_is_applied(tmp_path: Path):
    # Stored landscape, left half red; EXIF 6 says "rotate 90 degrees clockwise to display".
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(Image.new("RGB", (20, 20), RED), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    with camera(path, lores_size=(40, 80), main_size=(40, 80)) as cam:
        rgb = cam.read_lores(timeout_s=1.0).rgb
    # Displayed upright it is portrait 20x40 with red on top: fills 40x80 exactly.
    assert close_to(tuple(rgb[10, 20]), RED, tol=30) and close_to(tuple(rgb[70, 20]), BLUE, tol=30)


def test_greyscale_pgm_becomes_rgb(tmp_path: Path):
    path = tmp_path / "grey.pgm"
    Image.new("L", (32, 24), 77).save(path)
    with camera(path) as cam:
        rgb = cam.read_lores(timeout_s=1.0).rgb
    assert rgb.shape == (48, 64, 3) and rgb[24, 32].tolist() == [77, 77, 77]


def test_unreadable_file_warned_once_even_when_looping(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    write_image(tmp_path / "a.png", RED)
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    caplog.set_level(logging.WARNING)
    with camera(tmp_path) as cam:
        frames = [cam.read_lores(timeout_s=1.0) for _ in range(4)]
    assert all(close_to(colour(f.rgb), RED) for f in frames)
    assert sum("b.png" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda d: d / "missing", "no such image file or directory"),
        (lambda d: d, "no image files"),
        (lambda d: (d / "x.jpg").write_bytes(b"garbage") and d, "no readable image among 1 file"),
    ],
)
def test_unusable_source_fails_at_open(tmp_path: Path, setup, match):
    path = setup(tmp_path)
    cam = camera(path)
    with pytest.raises(CameraError, match=match):
        cam.open()
    assert not cam.is_open


def test_from_settings_resolves_path_against_the_config_file(tmp_path: Path):
    write_image(tmp_path / "media" / "a.png", GREEN)
    settings = settings_from_mapping(
        {"camera": {"backend": "replay", "fps": 30.0, "replay": {"path": "media", "loop": False}}},
        source=str(tmp_path / "atmguard.toml"),
    )
    cam = registry.build("camera", settings)
    assert isinstance(cam, ReplayCamera)
    assert cam.path == tmp_path / "media" and cam.fps == 30.0
    with cam:
        assert close_to(colour(cam.read_lores(timeout_s=1.0).rgb), GREEN)
        with pytest.raises(CameraTimeout):
            cam.read_lores(timeout_s=1.0)


def test_from_settings_without_a_path_is_a_config_error():
    settings = settings_from_mapping({})
    with pytest.raises(ConfigError, match=r"camera\.replay\.path"):
        ReplayCamera.from_settings(settings)


def test_constructor_touches_no_file(tmp_path: Path):
    cam = camera(tmp_path / "does-not-exist-yet")
    assert not cam.is_open
