"""Alignment of detected faces to the embedder's 112x112 template, and the quality gates with their
reasons, on real photos (read in place from ../shared/datasets) and the real detector."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from atmguard.datasets import shared_datasets_dir
from atmguard.vision.align import (
    CROP_SIZE,
    DEFAULT_THRESHOLDS,
    TARGET_POINTS,
    QualityThresholds,
    Rejection,
    align_face,
    pose_measures,
    similarity_matrix,
)
from atmguard.vision.detector import KEYPOINT_NAMES, Face, FaceDetector
from atmguard.vision.evaluate import camera_frame
from atmguard.vision.imageops import load_rgb, resize_rgb
from atmguard.vision.models import resolve_model

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "firmware_models"
IDENTITY_DIR = shared_datasets_dir() / "faces-identity"
needs_identity = pytest.mark.skipif(not IDENTITY_DIR.is_dir(), reason=f"{IDENTITY_DIR} not available")


@pytest.fixture(scope="module")
def detector():
    spec = resolve_model(MODELS_DIR, "face_detector")
    with FaceDetector(spec.path, expected_sha256=spec.sha256) as model:
        yield model


def _frame_and_face(detector: FaceDetector, person: str, index: int = 0) -> tuple[np.ndarray, Face]:
    path = sorted((IDENTITY_DIR / person).glob("*.jpg"))[index]
    frame = camera_frame(load_rgb(path))
    faces = detector.detect(frame)
    assert faces, f"no face found in {path}"
    return frame, faces[0]


def test_similarity_fit_recovers_a_known_rotation_scale_and_shift():
    angle, scale, shift = math.radians(17.0), 2.3, np.array([40.0, -12.0])
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    moved = TARGET_POINTS @ rotation.T + shift
    matrix = similarity_matrix(TARGET_POINTS, moved, np.array([2.0, 2.0, 1.0, 1.0]))
    np.testing.assert_allclose(matrix[:, :2], rotation, atol=1e-9)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-9)


def test_similarity_fit_refuses_degenerate_points():
    with pytest.raises(ValueError, match="degenerate"):
        similarity_matrix(np.zeros((4, 2)), np.ones((4, 2)))


def test_quality_thresholds_reject_nonsense():
    with pytest.raises(ValueError, match="max_yaw"):
        QualityThresholds(max_yaw=float("nan"))


@needs_identity
def test_a_frontal_face_is_aligned_onto_the_template_and_accepted(detector):
    frame, face = _frame_and_face(detector, "yale_subject02")
    aligned = align_face(frame, face)
    assert aligned.ok, aligned.reason
    assert aligned.crop.shape == (CROP_SIZE, CROP_SIZE, 3) and aligned.crop.dtype == np.uint8
    assert not aligned.crop.flags.writeable
    # The detected eyes, mapped into the crop, sit on the template's eyes (within 2 px of 112).
    inverse = np.linalg.inv(np.vstack([aligned.matrix, [0.0, 0.0, 1.0]]))
    for name, target in (("right_eye", TARGET_POINTS[0]), ("left_eye", TARGET_POINTS[1])):
        x, y = face.keypoint(name)
        u, v, _ = inverse @ np.array([x, y, 1.0])
        assert math.hypot(u - target[0], v - target[1]) < 2.0, name
    assert abs(aligned.yaw) < 0.3 and abs(aligned.pitch) < 0.3


@needs_identity
def test_a_tiny_copy_of_a_face_is_rejected_as_too_small(detector):
    frame, face = _frame_and_face(detector, "yale_subject03")
    eye_px = align_face(frame, face).eye_distance_px
    factor = 14.0 / eye_px  # eyes 14 px apart: a face far behind the customer
    small = resize_rgb(frame, round(frame.shape[1] * factor), round(frame.shape[0] * factor))
    faces = detector.detect(small)
    assert faces, "the detector should still find the small face"
    aligned = align_face(small, faces[0])
    assert aligned.rejection is Rejection.TOO_SMALL
    assert "too small" in aligned.reason and "px" in aligned.reason


@needs_identity
def test_a_blurred_copy_of_a_face_is_rejected_as_blurred(detector):
    frame, face = _frame_and_face(detector, "rmfd_caiguoqing")
    assert align_face(frame, face).ok
    # Gaussian blur of ~2 crop pixels: the embedding of such a crop has lost the identity detail.
    radius_px = 2.0 * align_face(frame, face).eye_distance_px / 35.2
    blurred = np.asarray(Image.fromarray(frame).filter(ImageFilter.GaussianBlur(radius_px)))
    faces = detector.detect(blurred)
    assert faces
    aligned = align_face(blurred, faces[0])
    assert aligned.rejection is Rejection.BLURRED
    assert "blurred" in aligned.reason and aligned.sharpness < DEFAULT_THRESHOLDS.min_sharpness


@needs_identity
def test_a_head_turned_sideways_is_rejected(detector):
    frame, face = _frame_and_face(detector, "orl_s05")
    keypoints = np.array(face.keypoints, dtype=np.float64)
    eyes = keypoints[:2]
    # In profile the nose tip sits beyond the outer eye: move it there (the geometry of a turned head).
    keypoints[KEYPOINT_NAMES.index("nose_tip"), 0] = eyes[:, 0].max() + 0.1 * np.ptp(eyes[:, 0])
    turned = Face(box=face.box, keypoints=keypoints, score=face.score)
    yaw, _ = pose_measures(keypoints)
    assert yaw > DEFAULT_THRESHOLDS.max_yaw
    aligned = align_face(frame, turned)
    assert aligned.rejection is Rejection.TURNED_AWAY and "turned sideways" in aligned.reason


@needs_identity
def test_a_low_detector_score_is_rejected_before_anything_else(detector):
    frame, face = _frame_and_face(detector, "orl_s05")
    aligned = align_face(frame, replace(face, score=0.5))
    assert aligned.rejection is Rejection.LOW_SCORE and "0.50" in aligned.reason
