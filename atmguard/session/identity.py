"""Is the face at the ATM the account holder's? One ``VerifyFace`` request at a time, over frames.

The vision loop hands every frame it processes to :meth:`IdentityVerifier.observe`. While a
request runs, the primary face of frames the tracker calls UNCOVERED is aligned (frames failing
the quality gates are skipped, with their reason kept for the log), embedded, and once
``frames_needed`` embeddings are in, their mean is compared with the card's templates: the best
score decides MATCH / MISMATCH / UNSURE against the two thresholds. No good frame within
``timeout_s`` is UNSURE (the machine asks the customer to look at the camera and asks again).

The templates and embeddings never leave this object: the machine hears the verdict and the
score only, and the request is dropped when answered or cancelled.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from atmguard.session.events import FaceVerified, IdentityVerdict
from atmguard.store.enrolment import model_id_for
from atmguard.vision.align import align_face
from atmguard.vision.detector import Face
from atmguard.vision.embedder import (
    FaceEmbedder,
    FaceTemplate,
    TemplateMismatchError,
    check_compatible,
    decide,
    mean_embedding,
)

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    session_id: str
    templates: Sequence[FaceTemplate]
    deadline_s: float
    embeddings: list[np.ndarray] = field(default_factory=list)
    rejections: Counter[str] = field(default_factory=Counter)


class IdentityVerifier:
    """Owned by the vision loop's thread; ``request``/``cancel`` may come from the controller."""

    def __init__(
        self,
        embedder: FaceEmbedder,
        *,
        match_threshold: float,
        mismatch_threshold: float,
        frames_needed: int,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if frames_needed < 1 or timeout_s <= 0:
            raise ValueError("frames_needed must be >= 1 and timeout_s > 0")
        self.embedder = embedder
        self.match_threshold = match_threshold
        self.mismatch_threshold = mismatch_threshold
        self.frames_needed = frames_needed
        self.timeout_s = timeout_s
        self._clock = clock
        self._request: _Request | None = None

    @property
    def busy(self) -> bool:
        return self._request is not None

    @property
    def model_id(self) -> str:
        """The id enrolment stored the templates under (the bank finds them by it)."""
        return model_id_for(self.embedder)

    def usable(self, blobs: Sequence[bytes]) -> list[FaceTemplate] | None:
        """The templates this model can compare; None when there were some but none is usable
        (made by another model or alignment: the customer must be re-enrolled)."""
        usable: list[FaceTemplate] = []
        for blob in blobs:
            try:
                template = FaceTemplate.from_bytes(blob)
                check_compatible(template, model_sha256=self.embedder.model_sha256)
            except TemplateMismatchError as exc:
                logger.warning("face template not usable: %s", exc)
                continue
            usable.append(template)
        return usable if usable or not blobs else None

    def request(self, session_id: str, templates: Sequence[FaceTemplate]) -> None:
        """Start verifying ``session_id`` against ``templates`` (replaces any earlier request)."""
        if not templates:
            raise ValueError("a verification needs at least one template")
        self._request = _Request(session_id, list(templates), self._clock() + self.timeout_s)

    def cancel(self) -> None:
        self._request = None

    def abort(self) -> FaceVerified | None:
        """End the running request as UNSURE (the embedder failed): never a match, never a retention."""
        request, self._request = self._request, None
        return None if request is None else FaceVerified(request.session_id, IdentityVerdict.UNSURE, None)

    def observe(self, rgb: np.ndarray, face: Face | None, *, uncovered: bool) -> FaceVerified | None:
        """Feed one frame; the verdict once the request is decided, else None."""
        request = self._request
        if request is None:
            return None
        if uncovered and face is not None:
            aligned = align_face(rgb, face)
            if aligned.ok:
                request.embeddings.append(self.embedder.embed(aligned))
            else:
                request.rejections[aligned.rejection.value if aligned.rejection else "rejected"] += 1
        if len(request.embeddings) >= self.frames_needed:
            return self._answer(request)
        if self._clock() >= request.deadline_s:
            logger.info(
                "face verification: %d good frame(s) of %d needed in %.1f s (rejected: %s)",
                len(request.embeddings),
                self.frames_needed,
                self.timeout_s,
                dict(request.rejections) or "none",
            )
            self._request = None
            return FaceVerified(request.session_id, IdentityVerdict.UNSURE, None)
        return None

    def _answer(self, request: _Request) -> FaceVerified:
        self._request = None
        probe = mean_embedding(request.embeddings)
        score = max(self.embedder.compare(template, probe) for template in request.templates)
        verdict = decide(
            score, match_threshold=self.match_threshold, mismatch_threshold=self.mismatch_threshold
        )
        return FaceVerified(request.session_id, IdentityVerdict(verdict.value), round(score, 4))
