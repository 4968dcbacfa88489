"""Covered-face classifier: is the customer's nose and mouth hidden (mask, scarf, hand, visor ...)?

A small int8 CNN trained in-house (recipe and figures: ``firmware_models/training/`` and
``firmware_models/MODEL_CARD_covering.md``). It sees a square crop around a detected face, rotated
so the eye line is level, with a margin so a hood, helmet or scarf is in view. ``face_crop`` is the
one definition of that crop: the training recipe calls it too, so the model is trained on exactly
what the daemon feeds it. The model takes raw uint8 RGB pixels and returns P(covered).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any, Self

import numpy as np
from PIL import Image

from atmguard.config import Settings
from atmguard.vision.detector import KEYPOINT_NAMES, Face
from atmguard.vision.imageops import as_rgb_uint8
from atmguard.vision.models import TfliteModel
from atmguard.vision.runtime import ModelError, load_interpreter

logger = logging.getLogger(__name__)

ROLE = "covering_classifier"
CROP_SIZE = 96
CROP_SCALE = 1.6
"""Crop side / the face box's longer side. BlazeFace's box runs from the brows to the chin; 1.6
keeps the forehead, hair line and chin in view (hoods, helmets and scarves start there)."""
MAX_ROLL_DEG = 40.0
"""Eye-line rotation is trusted up to this roll; beyond it the keypoints are more likely wrong
(covered faces have noisier keypoints) than the customer's head is tilted that far."""
DEFAULT_COVERED_THRESHOLD = 0.3
"""P(covered) at or above which a face counts as covered (chosen on validation data; see the model card)."""

_RIGHT_EYE = KEYPOINT_NAMES.index("right_eye")
_LEFT_EYE = KEYPOINT_NAMES.index("left_eye")


def crop_matrix(
    face: Face,
    *,
    size: int = CROP_SIZE,
    scale: float = CROP_SCALE,
    shift_xy: tuple[float, float] = (0.0, 0.0),
    extra_roll_deg: float = 0.0,
) -> np.ndarray:
    """The 2x3 affine map from continuous crop coordinates (u, v, 1) to frame coordinates for ``face``.

    ``shift_xy`` (fractions of the crop side) and ``extra_roll_deg`` exist for training-time
    jitter; the daemon uses the defaults.
    """
    x0, y0, x1, y1 = face.box
    side = max(x1 - x0, y1 - y0, 1.0) * scale
    eyes = np.asarray(face.keypoints, dtype=np.float64)
    dx, dy = eyes[_LEFT_EYE] - eyes[_RIGHT_EYE]
    # The person's left eye is on the image's right: a level face has dx > 0 and roll 0.
    roll = math.degrees(math.atan2(dy, dx)) if dx > 0 and math.hypot(dx, dy) > 1e-3 else 0.0
    roll = max(-MAX_ROLL_DEG, min(MAX_ROLL_DEG, roll)) + extra_roll_deg
    theta = math.radians(roll)
    step = side / size  # frame pixels per crop pixel
    cos_s, sin_s = math.cos(theta) * step, math.sin(theta) * step
    cx = (x0 + x1) / 2 + shift_xy[0] * side
    cy = (y0 + y1) / 2 + shift_xy[1] * side
    half = size / 2
    # Continuous coordinates in both images (pixel i spans [i, i + 1)): crop centre -> (cx, cy).
    return np.array(
        [
            [cos_s, -sin_s, cx - cos_s * half + sin_s * half],
            [sin_s, cos_s, cy - sin_s * half - cos_s * half],
        ]
    )


def warp_crop(rgb: np.ndarray, matrix: np.ndarray, *, size: int) -> np.ndarray:
    """Sample a ``size`` x ``size`` crop through ``matrix`` (from crop_matrix), edge-padded.

    Only the region the crop covers is touched. It is box-reduced first when the crop shrinks it by
    2x or more, because a bilinear warp alone would alias (a 300 px face into 96 px).
    """
    frame = as_rgb_uint8(rgb)
    height, width = frame.shape[:2]
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64)
    src = corners @ matrix.T
    bx0, by0 = np.floor(src.min(axis=0)).astype(int) - 1
    bx1, by1 = np.ceil(src.max(axis=0)).astype(int) + 1
    ix0, iy0 = max(bx0, 0), max(by0, 0)
    ix1, iy1 = min(bx1, width), min(by1, height)
    if ix0 >= ix1 or iy0 >= iy1:
        # Entirely outside the frame (cannot happen for a detected face): nearest edge pixels.
        ix0, iy0 = min(max(bx0, 0), width - 1), min(max(by0, 0), height - 1)
        ix1, iy1 = ix0 + 1, iy0 + 1
    region = frame[iy0:iy1, ix0:ix1]
    pads = ((iy0 - by0, by1 - iy1), (ix0 - bx0, bx1 - ix1), (0, 0))
    if any(p for pair in pads[:2] for p in pair):
        # Edge replication: a face at the frame border keeps plausible colours instead of black bars.
        region = np.pad(region, pads, mode="edge")
    step = math.hypot(matrix[0, 0], matrix[1, 0])
    factor = max(1, int(step / 1.5))
    image = Image.fromarray(np.ascontiguousarray(region), mode="RGB")
    local = matrix.copy()
    local[:, 2] -= (bx0, by0)
    if factor > 1:
        image = image.reduce(factor)
        local /= factor
    # Pillow maps output pixel centres (u + 0.5, v + 0.5) through the coefficients into continuous
    # source coordinates, the same convention as crop_matrix: the matrix goes in as it is.
    coeffs = tuple(float(c) for c in local.ravel())
    out = image.transform((size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    return np.asarray(out)


def face_crop(rgb: np.ndarray, face: Face, *, size: int = CROP_SIZE) -> np.ndarray:
    """uint8 ``size`` x ``size`` x 3 crop of ``face`` as the classifier sees it.

    Square, ``CROP_SCALE`` times the face box, centred on the box, rotated so the eye line is level,
    edge-padded where it leaves the frame. Used by both the training recipe and the daemon.
    """
    return warp_crop(rgb, crop_matrix(face, size=size), size=size)


class CoveringClassifier(TfliteModel):
    """The int8 covered-face model; predictions open it on first use."""

    ROLE = ROLE

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        expected_sha256: str | None = None,
        num_threads: int = 1,
        interpreter_factory: Callable[..., Any] = load_interpreter,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__(
            model_path,
            expected_sha256=expected_sha256,
            num_threads=num_threads,
            interpreter_factory=interpreter_factory,
            clock=clock,
        )
        self.crop_size = CROP_SIZE
        self.last_ms = 0.0
        """Wall time of the last covered_probability() (crop included) or predict_crops() call."""
        self._input_index = -1
        self._output_index = -1
        self._input_dtype: np.dtype[Any] = np.dtype(np.uint8)
        self._input_quant = (1.0, 0)
        self._output_quant = (1.0, 0)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> Self:
        """The manifest's ``covering_classifier`` model in ``paths.models_dir`` (sha256 checked at open)."""
        return cls._from_manifest(settings, {"num_threads": settings.vision.num_threads}, overrides)

    def _bind_tensors(self, interpreter: Any) -> None:
        inputs = interpreter.get_input_details()
        outputs = interpreter.get_output_details()
        expected = (1, self.crop_size, self.crop_size, 3)
        if len(inputs) != 1 or tuple(int(d) for d in inputs[0]["shape"]) != expected:
            found = [tuple(int(d) for d in i["shape"]) for i in inputs]
            raise ModelError(f"{self.model_path}: not a covering classifier: inputs {found}, want {expected}")
        if len(outputs) != 1 or int(np.prod(outputs[0]["shape"])) != 1:
            found = [tuple(int(d) for d in o["shape"]) for o in outputs]
            raise ModelError(f"{self.model_path}: not a covering classifier: outputs {found}")
        self._input_index = inputs[0]["index"]
        self._output_index = outputs[0]["index"]
        self._input_dtype = np.dtype(inputs[0]["dtype"])
        self._input_quant = _quant(inputs[0])
        self._output_quant = _quant(outputs[0])

    def covered_probability(self, rgb: np.ndarray, face: Face) -> float:
        """P(covered) in [0, 1] for ``face`` in the HxWx3 uint8 RGB frame ``rgb``."""
        t0 = self._clock()
        crop = face_crop(rgb, face, size=self.crop_size)
        probability = float(self._predict(crop[None])[0])
        self.last_ms = (self._clock() - t0) * 1e3
        return probability

    def predict_crops(self, crops: np.ndarray) -> np.ndarray:
        """P(covered) for N x size x size x 3 uint8 crops (from face_crop), as a float32 array of N."""
        t0 = self._clock()
        probabilities = self._predict(crops)
        self.last_ms = (self._clock() - t0) * 1e3
        return probabilities

    def _predict(self, crops: np.ndarray) -> np.ndarray:
        batch = np.asarray(crops)
        if batch.ndim == 3:
            batch = batch[None]
        expected = (self.crop_size, self.crop_size, 3)
        if batch.ndim != 4 or batch.shape[1:] != expected or batch.dtype != np.uint8:
            raise ValueError(
                f"expected N x {self.crop_size} x {self.crop_size} x 3 uint8 crops, got {batch.shape} {batch.dtype}"
            )
        out = np.empty(len(batch), dtype=np.float32)
        with self._lock:
            self._open_locked()
            for i, crop in enumerate(batch):
                try:
                    self._interpreter.set_tensor(self._input_index, self._to_input(crop))
                    self._interpreter.invoke()
                    raw = self._interpreter.get_tensor(self._output_index)
                except (RuntimeError, ValueError) as exc:
                    raise ModelError(f"{ROLE}: inference failed: {exc}") from exc
                scale, zero = self._output_quant
                value = (float(raw.reshape(-1)[0]) - zero) * scale if scale else float(raw.reshape(-1)[0])
                out[i] = min(1.0, max(0.0, value))
        return out

    def _to_input(self, crop: np.ndarray) -> np.ndarray:
        if self._input_dtype == np.uint8 and self._input_quant in ((1.0, 0), (0.0, 0)):
            return crop[None]  # raw pixels go straight in (the shipped model's input: scale 1, zero point 0)
        scale, zero = self._input_quant
        if self._input_dtype.kind == "f":
            return crop[None].astype(self._input_dtype)
        info = np.iinfo(self._input_dtype)
        quantised = np.round(crop.astype(np.float32) / scale + zero)
        return np.clip(quantised, info.min, info.max).astype(self._input_dtype)[None]


def _quant(detail: dict[str, Any]) -> tuple[float, int]:
    scale, zero = detail.get("quantization", (0.0, 0))
    return float(scale), int(zero)
