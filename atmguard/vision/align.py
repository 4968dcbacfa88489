"""Face alignment for the embedder, and the quality gates that decide whether a face is worth embedding.

The embedder (SFace) was trained on 112x112 crops warped so that five landmarks land on the
standard ArcFace template. BlazeFace gives eyes, nose tip and a mouth *centre* (no corners), so the
mouth centre is mapped to the midpoint of the template's mouth corners, and a similarity transform
(rotation, uniform scale, shift; no shear, which would distort the face) is fitted to the eyes,
nose and mouth by weighted least squares (Umeyama's closed form, in complex numbers for 2-D).
The eyes weigh most: they are BlazeFace's most precise keypoints and fix roll and scale.

A face is refused, with a reason a person can act on, when it is:

* ``low_score``: the detector is not sure it is a face;
* ``too_small``: the eyes are closer than ``min_eye_distance_px`` frame pixels, so the crop would be
  an enlargement with no identity detail left;
* ``turned_away``: the head is turned (yaw) or tilted (pitch) so far that the frontal template
  no longer fits (measured from the keypoint geometry);
* ``blurred``: the aligned crop's sharpness (variance of the Laplacian of its centre) is too low
  (motion blur, out of focus).

The thresholds and how they were chosen are in ``firmware_models/MODEL_CARD_face_embedder.md``.
Pure numpy + Pillow; nothing is loaded at import time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from atmguard.vision.covering import warp_crop
from atmguard.vision.detector import KEYPOINT_NAMES, Face
from atmguard.vision.imageops import as_rgb_uint8

ALIGNMENT_VERSION = 1
"""Bumped whenever the crop changes (template, keypoint mapping, weights, warp): embeddings of
different versions are not comparable, and templates carry it (see embedder.FaceTemplate)."""
CROP_SIZE = 112

ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],  # person's right eye (image left)
        [73.5318, 51.5014],  # person's left eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # mouth, person's right corner
        [70.7299, 92.2041],  # mouth, person's left corner
    ]
)
"""InsightFace's 5-point template for 112x112 crops, in OpenCV pixel-centre coordinates."""

_KP = {name: KEYPOINT_NAMES.index(name) for name in KEYPOINT_NAMES}
_SOURCE_POINTS = (_KP["right_eye"], _KP["left_eye"], _KP["nose_tip"], _KP["mouth"])
# Continuous coordinates (pixel i spans [i, i + 1)), as the detector reports them: +0.5.
TARGET_POINTS = np.vstack([ARCFACE_TEMPLATE_112[:3], ARCFACE_TEMPLATE_112[3:].mean(axis=0)]) + 0.5
POINT_WEIGHTS = np.array([2.0, 2.0, 1.0, 1.0])
"""Eyes, nose, mouth. See the module docstring and the model card (variants compared there)."""

DEFAULT_MIN_SCORE = 0.7
DEFAULT_MIN_EYE_DISTANCE_PX = 20.0
DEFAULT_MAX_YAW = 0.7
DEFAULT_MAX_PITCH = 0.7
DEFAULT_MIN_SHARPNESS = 30.0


class Rejection(StrEnum):
    """Why a face was not embedded; the value is stable (it is stored and reported)."""

    LOW_SCORE = "low_score"
    TOO_SMALL = "too_small"
    TURNED_AWAY = "turned_away"
    BLURRED = "blurred"


@dataclass(frozen=True)
class QualityThresholds:
    """The quality gates; the defaults are the model card's."""

    min_score: float = DEFAULT_MIN_SCORE
    """Detector score below which the keypoints are not trusted."""
    min_eye_distance_px: float = DEFAULT_MIN_EYE_DISTANCE_PX
    """Frame pixels between the eye centres (the template has 35.2 px at 112x112)."""
    max_yaw: float = DEFAULT_MAX_YAW
    """|yaw| measure (see :func:`pose_measures`): 0 frontal, about 1 in full profile."""
    max_pitch: float = DEFAULT_MAX_PITCH
    """|pitch| measure: 0 when the nose sits where the frontal template has it."""
    min_sharpness: float = DEFAULT_MIN_SHARPNESS
    """Variance of the Laplacian over the aligned crop's centre, in (8-bit grey levels)^2."""

    def __post_init__(self) -> None:
        for name in ("min_score", "min_eye_distance_px", "max_yaw", "max_pitch", "min_sharpness"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


DEFAULT_THRESHOLDS = QualityThresholds()


@dataclass(frozen=True, eq=False)
class AlignedFace:
    """One face warped to the embedder's template, with its quality measures and verdict.

    ``crop`` is a read-only 112x112x3 uint8 RGB array; ``rejection`` is None when the face passed
    every gate, else the first gate it failed, and ``reason`` says why in words.
    """

    crop: np.ndarray
    matrix: np.ndarray
    """2x3 map from continuous crop coordinates to frame coordinates."""
    score: float
    eye_distance_px: float
    yaw: float
    pitch: float
    sharpness: float
    rejection: Rejection | None
    reason: str

    @property
    def ok(self) -> bool:
        return self.rejection is None


def similarity_matrix(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """The 2x3 similarity transform (no reflection) best mapping ``src`` (N, 2) points onto ``dst``.

    Weighted least squares, Umeyama's solution: with points as complex numbers, ``dst ~ a * src + t``
    where ``a`` holds scale and rotation.
    """
    p = np.asarray(src, dtype=np.float64)
    q = np.asarray(dst, dtype=np.float64)
    w = np.ones(len(p)) if weights is None else np.asarray(weights, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 2 or p.shape[1] != 2 or len(p) < 2 or w.shape != (len(p),):
        raise ValueError(
            f"need matching (N>=2, 2) point arrays and N weights, got {p.shape}, {q.shape}, {w.shape}"
        )
    zp = p[:, 0] + 1j * p[:, 1]
    zq = q[:, 0] + 1j * q[:, 1]
    total = w.sum()
    mp, mq = (w * zp).sum() / total, (w * zq).sum() / total
    cp, cq = zp - mp, zq - mq
    denominator = (w * np.abs(cp) ** 2).sum()
    if denominator < 1e-12:
        raise ValueError("degenerate points (all in one place)")
    a = (w * cq * np.conj(cp)).sum() / denominator
    t = mq - a * mp
    return np.array([[a.real, -a.imag, t.real], [a.imag, a.real, t.imag]])


def alignment_matrix(keypoints: np.ndarray) -> np.ndarray:
    """2x3 map from continuous crop coordinates to frame coordinates for BlazeFace ``keypoints`` (6, 2)."""
    source = np.asarray(keypoints, dtype=np.float64)[list(_SOURCE_POINTS)]
    return similarity_matrix(TARGET_POINTS, source, POINT_WEIGHTS)


def pose_measures(keypoints: np.ndarray) -> tuple[float, float]:
    """(yaw, pitch) from the keypoint geometry, each ~0 for a frontal face.

    yaw: the nose tip's offset from the eyes' midpoint along the eye line, in eye distances, times
    2, combined with the ear asymmetry (nose-to-ear distances); the larger magnitude is kept, so
    either cue alone can flag a turned head. Profile: ~1. pitch: the nose's offset perpendicular to
    the eye line, relative to where the frontal template puts it (0.57 eye distances below the
    eyes), in eye distances / 0.57: looking up or down shortens it.
    """
    k = np.asarray(keypoints, dtype=np.float64)
    right_eye, left_eye, nose = k[_KP["right_eye"]], k[_KP["left_eye"]], k[_KP["nose_tip"]]
    eye_vector = left_eye - right_eye
    eye_distance = float(np.hypot(*eye_vector))
    if eye_distance < 1e-6:
        return 1.0, 1.0
    along = eye_vector / eye_distance
    across = np.array([-along[1], along[0]])  # points down the face for an upright face
    offset = nose - (right_eye + left_eye) / 2
    nose_yaw = 2.0 * float(offset @ along) / eye_distance
    to_right_ear = float(np.hypot(*(nose - k[_KP["right_ear"]])))
    to_left_ear = float(np.hypot(*(nose - k[_KP["left_ear"]])))
    ear_yaw = (to_right_ear - to_left_ear) / max(to_right_ear + to_left_ear, 1e-6)
    yaw = nose_yaw if abs(nose_yaw) >= abs(ear_yaw) else ear_yaw
    template_drop = (TARGET_POINTS[2, 1] - TARGET_POINTS[:2, 1].mean()) / (
        TARGET_POINTS[1, 0] - TARGET_POINTS[0, 0]
    )
    pitch = (float(offset @ across) / eye_distance - template_drop) / template_drop
    return yaw, pitch


def sharpness(crop: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the crop's central 64x64 (eyes, nose, mouth).

    Measured on the aligned crop, so it is comparable between faces of any size in the frame; the
    centre keeps the background (often plain, or sharp and busy) out of the measure.
    """
    grey = np.asarray(crop, dtype=np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    h, w = grey.shape
    y0, x0 = (h - 64) // 2 + 4, (w - 64) // 2
    g = grey[y0 - 1 : y0 + 65, x0 - 1 : x0 + 65]
    laplacian = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]
    return float(laplacian.var())


def align_face(
    rgb: np.ndarray, face: Face, *, thresholds: QualityThresholds = DEFAULT_THRESHOLDS
) -> AlignedFace:
    """Warp ``face`` from the HxWx3 uint8 RGB frame to the 112x112 template and judge its quality."""
    frame = as_rgb_uint8(rgb)
    keypoints = np.asarray(face.keypoints, dtype=np.float64)
    matrix = alignment_matrix(keypoints)
    crop = warp_crop(frame, matrix, size=CROP_SIZE)
    crop.flags.writeable = False
    eye_distance = float(np.hypot(*(keypoints[_KP["left_eye"]] - keypoints[_KP["right_eye"]])))
    yaw, pitch = pose_measures(keypoints)
    sharp = sharpness(crop)
    t = thresholds
    rejection: Rejection | None = None
    reason = "ok"
    if face.score < t.min_score:
        rejection = Rejection.LOW_SCORE
        reason = f"detector score {face.score:.2f} < {t.min_score:.2f}: not clearly a face"
    elif eye_distance < t.min_eye_distance_px:
        rejection = Rejection.TOO_SMALL
        reason = f"face too small: eyes {eye_distance:.1f} px apart < {t.min_eye_distance_px:g} px"
    elif abs(yaw) > t.max_yaw:
        rejection = Rejection.TURNED_AWAY
        reason = f"head turned sideways: yaw {yaw:+.2f} beyond +/-{t.max_yaw:.2f}"
    elif abs(pitch) > t.max_pitch:
        rejection = Rejection.TURNED_AWAY
        reason = f"head tilted up or down: pitch {pitch:+.2f} beyond +/-{t.max_pitch:.2f}"
    elif sharp < t.min_sharpness:
        rejection = Rejection.BLURRED
        reason = f"image blurred: sharpness {sharp:.0f} < {t.min_sharpness:g}"
    return AlignedFace(
        crop=crop,
        matrix=matrix,
        score=float(face.score),
        eye_distance_px=eye_distance,
        yaw=yaw,
        pitch=pitch,
        sharpness=sharp,
        rejection=rejection,
        reason=reason,
    )
