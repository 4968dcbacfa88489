"""One camera frame -> faces -> covering probability per face -> a :class:`FaceObservation`.

The pipeline owns the face detector and the covering classifier, runs them on the inference
(lores) frame and reports every face, so the session can react to a second person (shoulder
surfing) as well as to a covered primary face. It decides nothing: the temporal tracker
(:mod:`atmguard.vision.tracker`) turns observations into a state, the session into actions.

A primary face smaller than ``min_face_px`` is reported as present but not judged (its
probability is None, which the tracker counts as "no face"): the classifier's 96 px crop spans
1.6x the face box, so below 40 px it would be enlarged more than 1.5x and a mask edge would be a
couple of pixels wide. On a 640-px-wide lores frame from a Pi camera (62-66 degree field of view)
40 px is a face ~2 m away, far behind a customer at the keypad (>= 80 px under 1 m). In practice
the short-range detector already finds nothing under ~80 px on such a frame (a face must be ~16 px
of its 128 px input), so the rule bites on smaller frames: eval images, a smaller ``lores_size``,
or a longer-range detector.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Self

import numpy as np

from atmguard.lifecycle import Managed
from atmguard.vision.detector import Face
from atmguard.vision.imageops import as_rgb_uint8

if TYPE_CHECKING:
    from atmguard.config import Settings
    from atmguard.hardware.camera.base import Frame

logger = logging.getLogger(__name__)

DEFAULT_MIN_FACE_PX = 40
"""Shorter side of the primary face's box, in frame pixels, below which it is not judged."""
DEFAULT_MAX_FACES_JUDGED = 3
"""Faces (largest first) whose covering is classified; the rest are only counted (bounds the time)."""
DEFAULT_EVIDENCE_MARGIN = 0.25
"""Evidence crop: the primary face's box grown by this fraction of its size on every side."""


class FaceDetecting(Protocol):
    """What the pipeline needs from :class:`~atmguard.vision.detector.FaceDetector`."""

    def open(self) -> None: ...

    def close(self) -> None: ...

    def detect(self, rgb: np.ndarray) -> list[Face]: ...


class CoveringModel(Protocol):
    """What the pipeline needs from ``atmguard.vision.covering.CoveringClassifier``."""

    def open(self) -> None: ...

    def close(self) -> None: ...

    def covered_probability(self, rgb: np.ndarray, face: Face) -> float: ...


@dataclass(frozen=True, eq=False)
class JudgedFace:
    """A detected face and, when it was classified, the probability that it is covered (0..1)."""

    face: Face
    covered_probability: float | None


@dataclass(frozen=True, eq=False)
class FaceObservation:
    """Everything one frame says about the faces in front of the ATM."""

    t_monotonic_s: float
    seq: int
    frame_size: tuple[int, int]
    """(width, height) of the analysed frame; face boxes are in its pixels."""
    faces: tuple[JudgedFace, ...]
    """Every detected face, largest first."""
    primary: JudgedFace | None
    """The largest face, if it is large enough to judge (otherwise None, with faces still listed)."""
    evidence_crop: np.ndarray | None
    """A read-only copy of the frame around the primary face, for the sealed snapshot."""
    detector_ms: float
    covering_ms: float
    total_ms: float

    @property
    def face_count(self) -> int:
        """All detected faces, small ones included: a distant onlooker still counts."""
        return len(self.faces)

    @property
    def covered_probability(self) -> float | None:
        """The primary face's covering probability; None when there is no face to judge."""
        return None if self.primary is None else self.primary.covered_probability


class VisionPipeline(Managed):
    """Detector + covering classifier on one frame at a time.

    Owns both models: ``open()`` loads them (ModelError when either is missing or fails its
    checksum, so vision fails closed), ``close()`` releases them and is idempotent.
    """

    def __init__(
        self,
        detector: FaceDetecting,
        classifier: CoveringModel,
        *,
        min_face_px: float = DEFAULT_MIN_FACE_PX,
        max_faces_judged: int = DEFAULT_MAX_FACES_JUDGED,
        evidence_margin: float = DEFAULT_EVIDENCE_MARGIN,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not (isinstance(min_face_px, int | float) and math.isfinite(min_face_px) and min_face_px >= 0):
            raise ValueError(f"min_face_px must be a number >= 0, got {min_face_px!r}")
        if (
            isinstance(max_faces_judged, bool)
            or not isinstance(max_faces_judged, int)
            or max_faces_judged < 1
        ):
            raise ValueError(f"max_faces_judged must be an int >= 1, got {max_faces_judged!r}")
        if not (isinstance(evidence_margin, int | float) and 0.0 <= evidence_margin <= 2.0):
            raise ValueError(f"evidence_margin must be in [0, 2], got {evidence_margin!r}")
        self.detector = detector
        self.classifier = classifier
        self.min_face_px = float(min_face_px)
        self.max_faces_judged = max_faces_judged
        self.evidence_margin = float(evidence_margin)
        self._clock = clock
        self._opened = False

    @classmethod
    def from_settings(cls, settings: Settings, *, num_threads: int | None = None, **overrides: Any) -> Self:
        """Both models from the manifest in ``paths.models_dir``; ``num_threads`` overrides [vision]."""
        from atmguard.vision.detector import FaceDetector
        from atmguard.vision.runtime import ModelError

        try:
            from atmguard.vision.covering import CoveringClassifier
        except ImportError as exc:  # a build without the classifier must fail closed, like a missing model
            raise ModelError(f"covering classifier unavailable: {exc}") from exc

        model_overrides: dict[str, Any] = {} if num_threads is None else {"num_threads": num_threads}
        detector = FaceDetector.from_settings(settings, **model_overrides)
        classifier = CoveringClassifier.from_settings(settings, **model_overrides)
        vision = settings.vision
        options: dict[str, Any] = {
            "min_face_px": vision.min_face_px,
            "max_faces_judged": vision.max_faces_judged,
            "evidence_margin": vision.evidence_margin,
        }
        return cls(detector, classifier, **{**options, **overrides})

    def open(self) -> None:
        """Load both models; idempotent. Raises ModelError (the detector is closed again if the classifier fails)."""
        if self._opened:
            return
        self.detector.open()
        try:
            self.classifier.open()
        except BaseException:
            self.detector.close()
            raise
        self._opened = True

    def close(self) -> None:
        """Release both models; idempotent."""
        self._opened = False
        try:
            self.classifier.close()
        finally:
            self.detector.close()

    def process_frame(self, frame: Frame) -> FaceObservation:
        """:meth:`process` on a camera frame, with its timestamp and sequence number."""
        return self.process(frame.rgb, t_monotonic_s=frame.t_monotonic_s, seq=frame.seq)

    def process(self, rgb: np.ndarray, *, t_monotonic_s: float = 0.0, seq: int = -1) -> FaceObservation:
        """Detect and judge the faces in one HxWx3 uint8 RGB frame. Raises ModelError if a model fails."""
        frame = as_rgb_uint8(rgb)
        t0 = self._clock()
        faces = self.detector.detect(frame)
        t1 = self._clock()
        judged: list[JudgedFace] = []
        for i, face in enumerate(faces):
            probability: float | None = None
            if i < self.max_faces_judged and self.judgeable(face):
                probability = float(self.classifier.covered_probability(frame, face))
            judged.append(JudgedFace(face=face, covered_probability=probability))
        t2 = self._clock()
        # faces come largest first, so a too-small first face means every face is too small.
        primary = judged[0] if judged and judged[0].covered_probability is not None else None
        crop = None if primary is None else self.evidence_crop(frame, primary.face)
        t3 = self._clock()
        return FaceObservation(
            t_monotonic_s=float(t_monotonic_s),
            seq=int(seq),
            frame_size=(int(frame.shape[1]), int(frame.shape[0])),
            faces=tuple(judged),
            primary=primary,
            evidence_crop=crop,
            detector_ms=(t1 - t0) * 1e3,
            covering_ms=(t2 - t1) * 1e3,
            total_ms=(t3 - t0) * 1e3,
        )

    def judgeable(self, face: Face) -> bool:
        """Whether the face is large enough for the classifier's verdict to mean something."""
        return min(face.width, face.height) >= self.min_face_px

    def evidence_crop(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """A read-only copy of the frame around ``face`` (box plus margin, clipped to the frame)."""
        x0, y0, x1, y1 = face.box
        dx, dy = face.width * self.evidence_margin, face.height * self.evidence_margin
        grown = Face(box=(x0 - dx, y0 - dy, x1 + dx, y1 + dy), keypoints=face.keypoints, score=face.score)
        cx0, cy0, cx1, cy1 = grown.clipped_box(rgb.shape[1], rgb.shape[0])
        crop = np.array(rgb[cy0:cy1, cx0:cx1], copy=True)
        crop.flags.writeable = False
        return crop
