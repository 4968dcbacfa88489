"""SimCamera: scenes, sensor-like timing, motion and noise."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atmguard.config import settings_from_mapping
from atmguard.datasets import shared_datasets_dir
from atmguard.errors import CameraError, CameraTimeout
from atmguard.hardware import registry
from atmguard.hardware.camera.sim import SimCamera

DATASET = shared_datasets_dir() / "faces-covered"
LORES, MAIN = (160, 120), (320, 240)


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (40, 50)) -> np.ndarray:
    image = np.empty((size[1], size[0], 3), dtype=np.uint8)
    image[...] = rgb
    return image


def centre(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    return np.median(rgb[h // 2 - 3 : h // 2 + 3, w // 2 - 3 : w // 2 + 3].reshape(-1, 3), axis=0)


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sim(**kwargs) -> SimCamera:
    kwargs.setdefault("lores_size", LORES)
    kwargs.setdefault("main_size", MAIN)
    kwargs.setdefault("fps", 50.0)
    return SimCamera(kwargs.pop("scene_dir", None), **kwargs)


def test_consecutive_frames_differ_by_sensor_noise_only_when_nobody_is_there():
    with sim() as cam:
        a, b = cam.read_lores(timeout_s=1.0), cam.read_lores(timeout_s=1.0)
    assert cam.scene == "nobody"
    assert not np.array_equal(a.rgb, b.rgb)
    diff = np.abs(a.rgb.astype(int) - b.rgb.astype(int))
    assert 0.5 < diff.mean() < 6.0  # noise, not a different picture
    # An empty wall: no saturated colour anywhere.
    spread = a.rgb.astype(int).max(axis=2) - a.rgb.astype(int).min(axis=2)
    assert spread.max() < 60


def test_switching_scene_changes_what_the_next_frame_shows():
    with sim() as cam:
        cam.add_scene("red", [solid((255, 0, 0))])
        cam.add_scene("blue", [solid((0, 0, 255))])
        cam.set_scene("red")
        red = centre(cam.read_lores(timeout_s=1.0).rgb)
        cam.set_scene("blue")
        blue = centre(cam.read_lores(timeout_s=1.0).rgb)
        evidence = centre(cam.capture_main(timeout_s=1.0).rgb)
    assert red[0] > 230 and red[2] < 25
    assert blue[2] > 230 and blue[0] < 25
    assert evidence[2] > 230 and evidence[0] < 25


def test_frozen_scene_times_out_and_resumes_when_left():
    with sim(fps=100.0) as cam:
        before = cam.read_lores(timeout_s=1.0)
        cam.capture_main(timeout_s=1.0)
        cam.set_scene("frozen")
        started = time.monotonic()
        with pytest.raises(CameraTimeout):
            cam.read_lores(timeout_s=0.1)
        assert time.monotonic() - started >= 0.1  # a hung pipeline: we really waited
        with pytest.raises(CameraTimeout):
            cam.capture_main(timeout_s=0.02)
        switched_at = time.monotonic()
        cam.set_scene("nobody")
        after = cam.read_lores(timeout_s=1.0)
    assert after.seq > before.seq
    assert after.t_monotonic_s > switched_at


def test_lost_camera_raises_camera_error_immediately_until_replugged():
    with sim() as cam:
        cam.read_lores(timeout_s=1.0)
        cam.set_scene("lost")
        for read in (cam.read_lores, cam.capture_main):
            started = time.monotonic()
            with pytest.raises(CameraError, match="lost") as caught:
                read(timeout_s=1.0)
            assert not isinstance(caught.value, CameraTimeout)
            assert time.monotonic() - started < 0.05
        cam.set_scene("nobody")
        assert cam.read_lores(timeout_s=1.0).size == LORES


def test_unknown_scene_is_a_key_error_listing_the_known_ones():
    cam = sim()
    cam.add_scene("two_faces", [solid((10, 20, 30))])
    with cam, pytest.raises(KeyError) as caught:
        cam.set_scene("masked")
    message = str(caught.value)
    for name in ("nobody", "frozen", "lost", "two_faces"):
        assert name in message


@pytest.mark.parametrize(
    ("name", "images", "error"),
    [
        ("frozen", [solid((1, 2, 3))], ValueError),
        ("empty", [], ValueError),
        ("float", [np.zeros((4, 4, 3), dtype=np.float32)], ValueError),
        ("wrong", [42], TypeError),
        ("single", solid((1, 2, 3)), TypeError),
    ],
)
def test_add_scene_rejects_bad_input(name, images, error):
    with pytest.raises(error):
        sim().add_scene(name, images)


def test_customer_moves_between_frames():
    clock = ManualClock()
    with sim(clock=clock, fps=10.0, noise_sigma=0.0) as cam:
        cam.add_scene("red", [solid((255, 0, 0), size=(30, 40))])
        cam.set_scene("red")
        boxes = []
        for step in (0.2, 0.8):
            clock.now += step
            rgb = cam.read_lores(timeout_s=0.1).rgb.astype(int)
            ys, xs = np.nonzero((rgb[..., 0] > 200) & (rgb[..., 1] < 60))
            boxes.append((xs.min(), ys.min(), xs.max(), ys.max()))
    assert boxes[0] != boxes[1]
    # It moves a little, it does not jump around the frame.
    assert max(abs(a - b) for a, b in zip(boxes[0], boxes[1], strict=True)) < 0.15 * LORES[0]


def test_main_is_the_same_composition_as_lores():
    with sim(lores_size=(160, 90), main_size=(640, 360)) as cam:
        cam.add_scene("green", [solid((0, 200, 0), size=(30, 40))])
        cam.set_scene("green")
        lores = cam.read_lores(timeout_s=1.0)
        main = cam.capture_main(timeout_s=1.0)
    assert main.seq == lores.seq
    shrunk = np.asarray(Image.fromarray(main.rgb).resize((160, 90), Image.Resampling.BOX)).astype(int)
    assert np.abs(shrunk - lores.rgb.astype(int)).mean() < 6.0


def test_frames_are_dropped_not_queued_when_the_reader_is_slow():
    clock = ManualClock()
    with sim(clock=clock, fps=10.0) as cam:
        t0 = clock.now
        with pytest.raises(CameraTimeout):  # a stopped clock: no exposure has completed yet
            cam.read_lores(timeout_s=0.02)
        clock.now += 0.1
        first = cam.read_lores(timeout_s=0.02)
        clock.now += 0.35
        late = cam.read_lores(timeout_s=0.02)
    assert first.seq == 1 and first.t_monotonic_s == pytest.approx(t0 + 0.1)
    assert late.seq == 4 and late.t_monotonic_s == pytest.approx(t0 + 0.4)


def test_same_seed_and_clock_reproduce_the_same_frames():
    def run(seed: int) -> list[np.ndarray]:
        clock = ManualClock()
        with sim(clock=clock, seed=seed) as cam:
            cam.add_scene("grey", [solid((90, 90, 90))])
            cam.set_scene("grey")
            frames = []
            for _ in range(3):
                clock.now += 0.02
                frames.append(cam.read_lores(timeout_s=0.1).rgb)
        return frames

    first, again, other = run(1), run(1), run(2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


def test_scene_dir_images_are_shown_in_turn_and_broken_ones_skipped(tmp_path: Path, caplog):
    people = tmp_path / "people"
    people.mkdir()
    Image.new("RGB", (30, 40), (255, 0, 0)).save(people / "1.png")
    (people / "2.jpg").write_bytes(b"broken")
    Image.new("RGB", (30, 40), (0, 0, 255)).save(people / "3.png")
    (tmp_path / "frozen").mkdir()
    Image.new("RGB", (30, 40), (0, 255, 0)).save(tmp_path / "frozen" / "x.png")
    caplog.set_level(logging.WARNING)
    with sim(scene_dir=tmp_path, initial_scene="people") as cam:
        assert cam.scenes == ["nobody", "frozen", "lost", "people"]
        first = centre(cam.read_lores(timeout_s=1.0).rgb)
        cam.set_scene("nobody")
        cam.set_scene("people")
        second = centre(cam.read_lores(timeout_s=1.0).rgb)
        cam.set_scene("people", image_index=0)
        third = centre(cam.read_lores(timeout_s=1.0).rgb)
        cam.set_scene("frozen")  # the directory named "frozen" does not replace the built-in
        with pytest.raises(CameraTimeout):
            cam.read_lores(timeout_s=0.05)
    assert first[0] > 230 and second[2] > 230 and third[0] > 230
    messages = [r.getMessage() for r in caplog.records]
    assert any("2.jpg" in m for m in messages)
    assert any("frozen" in m and "built-in" in m for m in messages)


def test_settings_choose_scene_dir_and_initial_scene(tmp_path: Path):
    (tmp_path / "scenes" / "blue").mkdir(parents=True)
    Image.new("RGB", (30, 40), (0, 0, 255)).save(tmp_path / "scenes" / "blue" / "b.png")
    config = {"camera": {"backend": "sim", "lores_size": [160, 120], "main_size": [320, 240], "fps": 50.0}}
    config["camera"]["sim"] = {"scene_dir": "scenes", "initial_scene": "blue"}
    cam = registry.build("camera", settings_from_mapping(config, source=str(tmp_path / "atmguard.toml")))
    assert isinstance(cam, SimCamera)
    with cam:
        assert centre(cam.read_lores(timeout_s=1.0).rgb)[2] > 230
    config["camera"]["sim"]["initial_scene"] = "nope"
    cam = registry.build("camera", settings_from_mapping(config, source=str(tmp_path / "atmguard.toml")))
    with pytest.raises(CameraError, match="nope"):
        cam.open()
    assert not cam.is_open


def test_missing_scene_dir_fails_at_open(tmp_path: Path):
    with pytest.raises(CameraError, match="does not exist"):
        sim(scene_dir=tmp_path / "nowhere").open()


@pytest.mark.skipif(not DATASET.is_dir(), reason=f"shared dataset {DATASET} is not present")
def test_dataset_faces_are_composited_into_the_frame():
    with sim(scene_dir=DATASET, lores_size=(320, 240)) as cam:
        assert {"covered", "uncovered"} <= set(cam.scenes)
        empty = cam.read_lores(timeout_s=1.0).rgb.astype(int)
        cam.set_scene("covered")
        masked = cam.read_lores(timeout_s=1.0).rgb.astype(int)
        cam.set_scene("uncovered")
        face = cam.read_lores(timeout_s=1.0).rgb.astype(int)
    h, w = empty.shape[:2]
    middle = (slice(h // 3, 2 * h // 3), slice(w // 3, 2 * w // 3))
    assert np.abs(masked[middle] - empty[middle]).mean() > 15
    assert np.abs(face[middle] - masked[middle]).mean() > 15
    # The edges of the frame still show the wall.
    assert np.abs(masked[:, :10] - empty[:, :10]).mean() < 6


def test_set_scene_before_open_chooses_the_starting_scene():
    cam = sim()
    cam.add_scene("red", [solid((255, 0, 0))])
    cam.set_scene("red")
    with cam:
        assert cam.scene == "red"
        assert centre(cam.read_lores(timeout_s=1.0).rgb)[0] > 230
