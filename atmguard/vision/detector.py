"""Face detection with MediaPipe BlazeFace short-range (128x128, faces within ~2 m).

Pipeline: letterbox the RGB frame to 128x128 (no distortion), scale to [-1, 1], run the model,
decode the 896 anchor-relative regressors (box + 6 keypoints) and score logits, keep scores above
the threshold, merge overlapping detections with MediaPipe's weighted NMS, and map everything back
to frame pixels. Decoding follows MediaPipe's SsdAnchorsCalculator and
TensorsToDetectionsCalculator (face_detection_short_range_common.pbtxt); the code is our own.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
from PIL import Image, ImageDraw

from atmguard.config import Settings
from atmguard.vision.imageops import Letterbox, as_rgb_uint8, letterbox
from atmguard.vision.models import TfliteModel
from atmguard.vision.runtime import ModelError, load_interpreter

logger = logging.getLogger(__name__)

ROLE = "face_detector"
INPUT_SIZE = 128
NUM_ANCHORS = 896
NUM_KEYPOINTS = 6
KEYPOINT_NAMES: tuple[str, ...] = ("right_eye", "left_eye", "nose_tip", "mouth", "right_ear", "left_ear")
"""The person's right/left (MediaPipe's order): in an unmirrored camera image the right eye is the
one on the image's left. Checked on the ORL/Yale frontal faces (see tests/test_vision_detector.py)."""

DEFAULT_SCORE_THRESHOLD = 0.6
"""Above MediaPipe's 0.5 on purpose. A fixed ATM camera sees the same background in every frame, so
a background blob that scores just over the threshold is a *persistent* false face ("one person
only" for every customer, or a stand-in for a hidden face), while a missed face fails closed
("please face the camera"). Measured on the shared datasets: non-face images (background corner
crops, gratings, noise, gradients) score up to ~0.5-0.7, with 1% of corner crops over 0.5 but
0.04% over 0.6; uncovered faces in a camera-like frame score 0.8-0.95 (ORL/Yale 100% found at 0.6,
low-resolution RMFD web crops 98%); masked faces score lower (75% found at 0.6 vs 82-88% at 0.5)."""
DEFAULT_NMS_IOU = 0.3
"""MediaPipe's min_suppression_threshold for this model."""
_LOGIT_CLIP = 100.0  # MediaPipe's score_clipping_thresh; keeps exp() finite


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face in frame pixel coordinates.

    ``box`` is (x0, y0, x1, y1), not clipped to the frame (a face at the edge extends past it);
    ``keypoints`` is a read-only 6x2 array of (x, y) in KEYPOINT_NAMES order.
    """

    box: tuple[float, float, float, float]
    keypoints: np.ndarray
    score: float

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    def keypoint(self, name: str) -> tuple[float, float]:
        x, y = self.keypoints[KEYPOINT_NAMES.index(name)]
        return float(x), float(y)

    def clipped_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The box as integer pixel bounds inside a ``width`` x ``height`` frame (for cropping)."""
        x0, y0, x1, y1 = self.box
        return (
            min(max(math.floor(x0), 0), width),
            min(max(math.floor(y0), 0), height),
            min(max(math.ceil(x1), 0), width),
            min(max(math.ceil(y1), 0), height),
        )


@dataclass(frozen=True)
class DetectionTiming:
    """Where the time of the last detect() went, in milliseconds."""

    preprocess_ms: float
    invoke_ms: float
    postprocess_ms: float

    @property
    def total_ms(self) -> float:
        return self.preprocess_ms + self.invoke_ms + self.postprocess_ms


def generate_anchors(
    *, input_size: int = INPUT_SIZE, strides: Sequence[int] = (8, 16, 16, 16), anchors_per_layer: int = 2
) -> np.ndarray:
    """Anchor centres (N, 2) in [0, 1], in the order the model's outputs use.

    As MediaPipe's SsdAnchorsCalculator does, consecutive layers with the same stride share one
    grid, so strides 8/16/16/16 give 16x16 cells x 2 + 8x8 cells x 6 = 896 anchors. Anchor sizes
    are fixed at 1 (fixed_anchor_size), so only the centres matter.
    """
    centres: list[np.ndarray] = []
    layer = 0
    while layer < len(strides):
        same = layer
        while same < len(strides) and strides[same] == strides[layer]:
            same += 1
        per_cell = anchors_per_layer * (same - layer)
        cells = math.ceil(input_size / strides[layer])
        grid = (np.arange(cells, dtype=np.float32) + 0.5) / cells
        ys, xs = np.meshgrid(grid, grid, indexing="ij")
        cell_centres = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(cell_centres, per_cell, axis=0))
        layer = same
    return np.concatenate(centres).astype(np.float32)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (4,) box with (N, 4) boxes, all (x0, y0, x1, y1)."""
    ix0 = np.maximum(box[0], boxes[:, 0])
    iy0 = np.maximum(box[1], boxes[:, 1])
    ix1 = np.minimum(box[2], boxes[:, 2])
    iy1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def weighted_nms(
    boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, *, iou_threshold: float
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """MediaPipe's weighted NMS: each cluster is replaced by the score-weighted mean of its members.

    Highest score first; every remaining detection overlapping it by more than ``iou_threshold``
    joins its cluster (itself included), the cluster's boxes and keypoints are averaged with the
    scores as weights, and the cluster keeps its best score. Averaging the many anchors that fire
    on one face gives a steadier box than keeping the single best one.
    """
    order = np.argsort(-scores, kind="stable")
    out: list[tuple[np.ndarray, np.ndarray, float]] = []
    while order.size:
        top = order[0]
        members = order[_iou(boxes[top], boxes[order]) > iou_threshold]
        if members.size == 0:  # a degenerate (zero-area) top box overlaps nothing, not even itself
            members = order[:1]
        weights = scores[members][:, None]
        total = float(weights.sum())
        box = (boxes[members] * weights).sum(axis=0) / total
        kps = (keypoints[members] * weights[:, :, None]).sum(axis=0) / total
        out.append((box, kps, float(scores[top])))
        order = order[~np.isin(order, members)]
    return out


class FaceDetector(TfliteModel):
    """BlazeFace short-range over a TFLite interpreter owned by this object for its whole life.

    The constructor reads nothing; ``open()`` verifies the model's sha256 (when given) and loads
    it, and ``detect()`` opens on first use. Not meant to be shared between threads (one
    interpreter, one vision loop), but a lock makes concurrent calls safe rather than corrupt.
    """

    ROLE = ROLE

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        expected_sha256: str | None = None,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        nms_iou: float = DEFAULT_NMS_IOU,
        num_threads: int = 1,
        interpreter_factory: Callable[..., Any] = load_interpreter,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not 0.0 < score_threshold < 1.0:
            raise ValueError(f"score_threshold must be in (0, 1), got {score_threshold!r}")
        if not 0.0 < nms_iou < 1.0:
            raise ValueError(f"nms_iou must be in (0, 1), got {nms_iou!r}")
        super().__init__(
            model_path,
            expected_sha256=expected_sha256,
            num_threads=num_threads,
            interpreter_factory=interpreter_factory,
            clock=clock,
        )
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.last_timing: DetectionTiming | None = None
        self._logit_threshold = math.log(score_threshold / (1.0 - score_threshold))
        self._anchors = generate_anchors()
        self._input_index = -1
        self._regressors_index = -1
        self._scores_index = -1
        self._input = np.empty((1, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.float32)
        self._letterboxed = np.empty((INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> Self:
        """The manifest's ``face_detector`` model in ``paths.models_dir`` (sha256 checked at open)."""
        vision = settings.vision
        options: dict[str, Any] = {
            "score_threshold": vision.face_score_threshold,
            "nms_iou": vision.face_nms_iou,
            "num_threads": vision.num_threads,
        }
        return cls._from_manifest(settings, options, overrides)

    def _describe(self) -> str:
        return (
            f"threshold {self.score_threshold:.2f}, NMS IoU {self.nms_iou:.2f}, {self.num_threads} thread(s)"
        )

    def _bind_tensors(self, interpreter: Any) -> None:
        # Outputs are told apart by shape, not by position: their order differs between conversions.
        inputs = interpreter.get_input_details()
        outputs = interpreter.get_output_details()
        shapes = [tuple(int(d) for d in o["shape"]) for o in outputs]
        if (
            len(inputs) != 1
            or tuple(int(d) for d in inputs[0]["shape"]) != (1, INPUT_SIZE, INPUT_SIZE, 3)
            or np.dtype(inputs[0]["dtype"]) != np.float32
        ):
            found = [(tuple(i["shape"]), np.dtype(i["dtype"]).name) for i in inputs]
            raise ModelError(f"{self.model_path}: not BlazeFace short-range: inputs {found}")
        try:
            self._regressors_index = outputs[shapes.index((1, NUM_ANCHORS, 4 + 2 * NUM_KEYPOINTS))]["index"]
            self._scores_index = outputs[shapes.index((1, NUM_ANCHORS, 1))]["index"]
        except ValueError:
            raise ModelError(f"{self.model_path}: not BlazeFace short-range: outputs {shapes}") from None
        self._input_index = inputs[0]["index"]

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Faces in an HxWx3 uint8 RGB frame of any size, largest box first."""
        frame = as_rgb_uint8(rgb)
        with self._lock:
            self._open_locked()
            t0 = self._clock()
            _, box = letterbox(frame, width=INPUT_SIZE, height=INPUT_SIZE, out=self._letterboxed)
            # [-1, 1] as the model was trained; the black padding becomes -1 like MediaPipe's zero border.
            np.multiply(self._letterboxed, 1.0 / 127.5, out=self._input[0], casting="unsafe")
            self._input -= 1.0
            t1 = self._clock()
            try:
                self._interpreter.set_tensor(self._input_index, self._input)
                self._interpreter.invoke()
                regressors = self._interpreter.get_tensor(self._regressors_index)[0]
                logits = self._interpreter.get_tensor(self._scores_index)[0, :, 0]
            except (RuntimeError, ValueError) as exc:
                raise ModelError(f"{ROLE}: inference failed: {exc}") from exc
            t2 = self._clock()
            faces = self._decode(regressors, logits, box)
            t3 = self._clock()
        self.last_timing = DetectionTiming(
            preprocess_ms=(t1 - t0) * 1e3, invoke_ms=(t2 - t1) * 1e3, postprocess_ms=(t3 - t2) * 1e3
        )
        return faces

    def _decode(self, regressors: np.ndarray, logits: np.ndarray, box: Letterbox) -> list[Face]:
        keep = np.flatnonzero(logits > self._logit_threshold)
        if keep.size == 0:
            return []
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits[keep].astype(np.float64), -_LOGIT_CLIP, _LOGIT_CLIP)))
        raw = regressors[keep].astype(np.float64)
        # Offsets are in input pixels relative to the anchor centre; work in input pixels throughout.
        anchors = self._anchors[keep].astype(np.float64) * INPUT_SIZE
        centre = raw[:, 0:2] + anchors
        half = raw[:, 2:4] / 2.0
        boxes = np.concatenate([centre - half, centre + half], axis=1)
        keypoints = raw[:, 4:].reshape(-1, NUM_KEYPOINTS, 2) + anchors[:, None, :]
        valid = (half > 0).all(axis=1)
        faces = []
        for merged_box, merged_kps, score in weighted_nms(
            boxes[valid], keypoints[valid], scores[valid], iou_threshold=self.nms_iou
        ):
            corners = merged_box.reshape(2, 2)
            if not box.contains(corners.mean(axis=0)):
                continue  # centred on the padding: nothing of the frame is there
            x0, y0, x1, y1 = box.to_source(corners).ravel()
            kps = box.to_source(merged_kps).astype(np.float32)
            kps.flags.writeable = False
            faces.append(Face(box=(float(x0), float(y0), float(x1), float(y1)), keypoints=kps, score=score))
        faces.sort(key=lambda face: face.area, reverse=True)
        return faces


_KEYPOINT_COLOURS = (
    (255, 64, 64),
    (64, 128, 255),
    (255, 255, 0),
    (255, 0, 255),
    (255, 160, 0),
    (0, 255, 255),
)


def draw_faces(
    rgb: np.ndarray, faces: Sequence[Face], *, line_px: int = 2, labels: Sequence[str] | None = None
) -> Image.Image:
    """A copy of the frame with each face's box, keypoints and score drawn on it (for technicians).

    ``labels`` (one per face) replace the default label, the detector score.

    Keypoint colours follow KEYPOINT_NAMES: right eye red, left eye blue, nose yellow, mouth
    magenta, right ear orange, left ear cyan.
    """
    image = Image.fromarray(as_rgb_uint8(rgb)).copy()
    draw = ImageDraw.Draw(image)
    radius = max(2, line_px + 1)
    for index, face in enumerate(faces):
        x0, y0, x1, y1 = face.box
        draw.rectangle((x0, y0, x1, y1), outline=(0, 255, 0), width=line_px)
        for (x, y), colour in zip(face.keypoints, _KEYPOINT_COLOURS, strict=True):
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
        label = labels[index] if labels is not None else f"{face.score:.2f}"
        text_y = y0 - 12 if y0 >= 12 else y1 + 2
        draw.text((x0 + 2, text_y), label, fill=(0, 255, 0))
    return image
