"""The vision pipeline with the real models (BlazeFace + the shipped covering classifier) on real
photos read in place from the shared datasets, placed in camera-like frames; and the pipeline
feeding the tracker, as the daemon's vision loop does."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from atmguard.config import settings_from_mapping
from atmguard.datasets import shared_datasets_dir
from atmguard.hardware.camera.base import Frame
from atmguard.vision.detector import Face, FaceDetector
from atmguard.vision.evaluate import camera_frame
from atmguard.vision.imageops import load_rgb, resize_rgb
from atmguard.vision.pipeline import DEFAULT_MIN_FACE_PX, FaceObservation, JudgedFace, VisionPipeline
from atmguard.vision.runtime import ModelError
from atmguard.vision.tracker import DEFAULT_COVER_FRAMES, DEFAULT_COVERED_THRESHOLD, FaceState, FaceTracker

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "firmware_models"
DATASETS = shared_datasets_dir()
IDENTITY_DIR = DATASETS / "faces-identity"
COVERED_DIR = DATASETS / "faces-covered"
LORES = (640, 360)
FPS = 15.0

pytestmark = pytest.mark.skipif(not IDENTITY_DIR.is_dir(), reason=f"{DATASETS} not available")


def settings_for(models_dir: Path):
    return settings_from_mapping({"paths": {"models_dir": str(models_dir)}})


@pytest.fixture(scope="module")
def pipeline() -> Iterator[VisionPipeline]:
    with VisionPipeline.from_settings(settings_for(MODELS_DIR)) as vision:
        yield vision


def wall(size: tuple[int, int] = LORES, seed: int = 0) -> np.ndarray:
    """A plain, slightly noisy background, like the wall behind a customer."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(80, 160, size[0], dtype=np.float32)[None, :, None]
    return np.clip(ramp + rng.normal(0, 4, (size[1], size[0], 3)), 0, 255).astype(np.uint8)


def place(frame: np.ndarray, photo: np.ndarray, *, height_px: int, centre_xy: tuple[int, int]) -> np.ndarray:
    """Paste ``photo`` (with a 25% border margin, as the detector needs) scaled to ``height_px`` tall."""
    padded = camera_frame(photo, max_size=(10_000, 10_000))
    width_px = round(padded.shape[1] * height_px / padded.shape[0])
    x0, y0 = centre_xy[0] - width_px // 2, centre_xy[1] - height_px // 2
    out = frame.copy()
    out[y0 : y0 + height_px, x0 : x0 + width_px] = resize_rgb(padded, width_px, height_px)
    return out


def identity_photos(per_source: int) -> list[np.ndarray]:
    photos = []
    for prefix in ("orl", "yale", "rmfd"):
        paths = sorted(IDENTITY_DIR.glob(f"{prefix}_*/*.jpg"))
        photos += [load_rgb(p) for p in paths[:: max(1, len(paths) // per_source)][:per_source]]
    return photos


def covered_photos(count: int) -> list[np.ndarray]:
    # file names are content hashes: the first N in name order are a fixed, arbitrary sample
    return [load_rgb(p) for p in sorted((COVERED_DIR / "covered").glob("*.jpg"))[:count]]


def customer(photo: np.ndarray) -> np.ndarray:
    """A customer at the keypad: face about 200 px tall in the 640x360 lores frame."""
    return place(wall(), photo, height_px=300, centre_xy=(320, 180))


# --- one frame ------------------------------------------------------------------------------------


# Measured with the shipped model on every faces-identity photo as a customer frame: ORL 100%, Yale
# 89% (its side-lit variants darken half the face), RMFD 98% judged uncovered; all found.
def test_uncovered_customers_are_judged_uncovered(pipeline):
    observations = [pipeline.process(customer(photo)) for photo in identity_photos(per_source=20)]
    judged = [o for o in observations if o.primary is not None]
    uncovered = [o for o in judged if o.covered_probability < DEFAULT_COVERED_THRESHOLD]
    print(f"\nuncovered: {len(judged)}/{len(observations)} judged, {len(uncovered)} classified uncovered")
    assert len(judged) == len(observations)  # every face found and large enough
    assert all(o.face_count == 1 for o in observations)
    assert len(uncovered) >= 0.9 * len(judged)


def test_covered_customers_are_judged_covered(pipeline):
    observations = [pipeline.process(customer(photo)) for photo in covered_photos(40)]
    judged = [o for o in observations if o.primary is not None]
    covered = [o for o in judged if o.covered_probability >= DEFAULT_COVERED_THRESHOLD]
    print(f"\ncovered: {len(judged)}/{len(observations)} judged, {len(covered)} classified covered")
    assert len(judged) >= 0.6 * len(observations)  # masked faces score lower in the detector
    assert len(covered) >= 0.85 * len(judged)


def test_observation_reports_primary_face_crop_and_timing(pipeline):
    frame = customer(identity_photos(per_source=1)[0])
    observation = pipeline.process(frame, t_monotonic_s=12.5, seq=7)
    assert (observation.t_monotonic_s, observation.seq, observation.frame_size) == (12.5, 7, LORES)
    primary = observation.primary
    assert primary is not None and primary is observation.faces[0]
    x0, y0, x1, y1 = primary.face.box
    assert 250 < (x0 + x1) / 2 < 390 and 110 < (y0 + y1) / 2 < 250  # where the face was placed
    crop = observation.evidence_crop
    assert crop is not None and not crop.flags.writeable
    # the box plus 25% on each side, clipped to the frame
    assert crop.shape[1] == pytest.approx(min(LORES[0], 1.5 * primary.face.width), abs=3)
    cx0, cy0 = (
        max(0, int(np.floor(x0 - 0.25 * primary.face.width))),
        max(0, int(np.floor(y0 - 0.25 * primary.face.height))),
    )
    assert np.array_equal(crop[:10, :10], frame[cy0 : cy0 + 10, cx0 : cx0 + 10])
    assert observation.detector_ms > 0 and observation.covering_ms > 0
    assert observation.total_ms >= observation.detector_ms + observation.covering_ms


def test_camera_frame_keeps_time_and_sequence(pipeline):
    rgb = customer(identity_photos(per_source=1)[0])
    observation = pipeline.process_frame(Frame(rgb=rgb, t_monotonic_s=3.25, seq=41, stream="lores"))
    assert (observation.t_monotonic_s, observation.seq) == (3.25, 41)
    assert observation.face_count == 1


def test_empty_scene_has_no_face(pipeline):
    observation = pipeline.process(wall(seed=3))
    assert observation.face_count == 0 and observation.faces == ()
    assert observation.primary is None and observation.covered_probability is None
    assert observation.evidence_crop is None


def test_a_second_person_is_reported_and_judged(pipeline):
    orl, yale = identity_photos(per_source=1)[:2]
    frame = place(wall(), orl, height_px=280, centre_xy=(190, 180))
    frame = place(frame, yale, height_px=220, centre_xy=(480, 140))  # someone behind, smaller
    observation = pipeline.process(frame)
    assert observation.face_count == 2
    big, small = observation.faces
    assert big.face.area > small.face.area and observation.primary is big
    assert big.face.center[0] < 320 < small.face.center[0]
    assert big.covered_probability is not None and small.covered_probability is not None


def test_only_max_faces_judged_are_classified(pipeline):
    frame = wall()
    for photo, x in zip(identity_photos(per_source=3)[:3], (110, 320, 530), strict=True):  # three ORL faces
        frame = place(frame, photo, height_px=230, centre_xy=(x, 180))
    limited = VisionPipeline(pipeline.detector, pipeline.classifier, max_faces_judged=2)
    observation = limited.process(frame)
    assert observation.face_count == 3
    assert [f.covered_probability is not None for f in observation.faces] == [True, True, False]


def test_a_face_too_small_to_judge_is_counted_but_not_judged(pipeline):
    # On a 640-px-wide frame the short-range detector finds no face under ~80 px at all, so the
    # rule matters for small frames (and small eval images): the customer scene shrunk to 128x72.
    frame = resize_rgb(customer(identity_photos(per_source=1)[0]), 128, 72)
    observation = pipeline.process(frame)
    assert observation.face_count == 1
    assert min(observation.faces[0].face.width, observation.faces[0].face.height) < DEFAULT_MIN_FACE_PX
    assert observation.primary is None and observation.covered_probability is None
    assert observation.faces[0].covered_probability is None and observation.evidence_crop is None
    lenient = VisionPipeline(pipeline.detector, pipeline.classifier, min_face_px=0)
    assert lenient.process(frame).covered_probability is not None


# --- pipeline + tracker, as the vision loop runs them ---------------------------------------------


def test_tracker_admits_an_uncovered_customer_and_refuses_when_a_mask_goes_on(pipeline):
    uncovered = customer(identity_photos(per_source=1)[0])
    covered_frames = [customer(photo) for photo in covered_photos(12)]
    masked = [
        f for f in covered_frames if (o := pipeline.process(f)).primary and o.covered_probability >= 0.5
    ][:3]
    assert len(masked) == 3
    tracker = FaceTracker()
    t = 0.0
    seen: list[FaceState] = []
    for rgb in [wall()] * 3 + [uncovered] * 10 + masked * 2 + [wall()] * 6:
        t += 1 / FPS
        seen.append(tracker.update(pipeline.process(rgb, t_monotonic_s=t)).state)
    assert seen[:3] == [FaceState.NO_FACE] * 3
    assert seen[3 + 5] is FaceState.NO_FACE and seen[3 + 6] is FaceState.UNCOVERED  # 7th uncovered frame
    assert seen[12 + DEFAULT_COVER_FRAMES - 1] is FaceState.UNCOVERED
    assert seen[12 + DEFAULT_COVER_FRAMES] is FaceState.COVERED  # refused on the cover_frames-th masked frame
    assert seen[-1] is FaceState.NO_FACE


# --- failing closed -------------------------------------------------------------------------------


def test_missing_covering_model_fails_closed(tmp_path):
    manifest = json.loads((MODELS_DIR / "manifest.json").read_text())
    manifest["models"] = [m for m in manifest["models"] if m["role"] == "face_detector"]
    shutil.copytree(MODELS_DIR / "third_party", tmp_path / "third_party")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="covering_classifier"):
        VisionPipeline.from_settings(settings_for(tmp_path))


def test_corrupt_classifier_model_fails_closed_and_releases_the_detector(tmp_path):
    from atmguard.vision.covering import CoveringClassifier

    broken = tmp_path / "covering.tflite"
    broken.write_bytes(b"TFL3" + bytes(range(256)) * 8)
    detector = FaceDetector(MODELS_DIR / "third_party" / "face_detection_short_range.tflite")
    vision = VisionPipeline(detector, CoveringClassifier(broken))
    with pytest.raises(ModelError):
        vision.open()
    with pytest.raises(ModelError, match="closed"):
        detector.detect(wall())
    vision.close()
    vision.close()  # idempotent


def test_defaults_agree_with_the_classifier():
    from atmguard.vision import covering

    assert DEFAULT_COVERED_THRESHOLD == covering.DEFAULT_COVERED_THRESHOLD
    # the smallest judged face fills its crop after at most 1.5x enlargement
    assert covering.CROP_SIZE / (DEFAULT_MIN_FACE_PX * covering.CROP_SCALE) <= 1.5


@pytest.mark.parametrize(
    "kwargs",
    [{"min_face_px": -1}, {"min_face_px": float("nan")}, {"max_faces_judged": 0}, {"evidence_margin": 5}],
)
def test_rejects_bad_arguments(kwargs):
    from atmguard.vision.covering import CoveringClassifier

    # constructing the models reads nothing, so this needs no model file
    with pytest.raises(ValueError):
        VisionPipeline(FaceDetector("detector.tflite"), CoveringClassifier("covering.tflite"), **kwargs)


def test_observation_is_what_the_tracker_reads():
    face = Face(box=(0.0, 0.0, 50.0, 50.0), keypoints=np.zeros((6, 2), np.float32), score=0.9)
    judged = JudgedFace(face=face, covered_probability=0.2)
    observation = FaceObservation(
        t_monotonic_s=1.0,
        seq=0,
        frame_size=LORES,
        faces=(judged,),
        primary=judged,
        evidence_crop=None,
        detector_ms=1.0,
        covering_ms=0.5,
        total_ms=1.6,
    )
    assert FaceTracker().update(observation).covered_probability == pytest.approx(0.2)
