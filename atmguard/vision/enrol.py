"""Build a customer's face template from a folder of photos taken at the bank (issue 7).

Each file goes through what the ATM does with a camera frame (``identity_eval`` does the same, so
the thresholds calibrated there apply): decode, edge-pad to a camera-like frame, detect, align and
quality-gate, embed. A photo is used only when it shows exactly one face that passes every gate;
every other photo is reported with the reason, so the operator knows which to retake. No file
makes this crash: an unreadable one is a rejected photo like any other.

Two checks go beyond the ATM's per-frame gates, because a template is used for years:

* **consistency**: each accepted photo must MATCH (``match_threshold``) the mean of the *other*
  accepted photos (the worst one is dropped and the rest judged again, until all agree). A photo
  of someone else slipped into the folder would otherwise be averaged into the template; and a
  photo that would not MATCH its own template is not worth keeping. Measured with the shipped
  model on faces-identity's ORL and Yale persons, folders of 5 photos: a person's own photos score
  0.60 or more (66 folders, none rejected as inconsistent); one photo of another person added to
  5 of a person scores 0.34 at most and is rejected in 33 of 33 folders. RMFD's low-resolution
  web crops (with mislabelled photos) lose about a quarter of their photos to this check: a bank's
  enrolment photos must be better than those.
* **enough photos**: at least ``MIN_ACCEPTED_IMAGES`` must remain, or there is no template.

Only the template leaves this module; the photos and their embeddings are not kept.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

from atmguard.errors import AtmguardError
from atmguard.vision.align import DEFAULT_THRESHOLDS, QualityThresholds, align_face
from atmguard.vision.detector import FaceDetector
from atmguard.vision.embedder import DEFAULT_MATCH_THRESHOLD, FaceEmbedder, FaceTemplate, mean_embedding
from atmguard.vision.evaluate import DEFAULT_PAD_FRACTION, camera_frame
from atmguard.vision.imageops import load_rgb

logger = logging.getLogger(__name__)

MIN_ACCEPTED_IMAGES = 3
"""The template is the mean of the accepted embeddings. With fewer than three, one photo's light,
expression or pose dominates it, and the consistency check (each photo against the mean of the
others) compares a photo with a single other photo. Three is also what the model card's
template-vs-probe figures were measured with (identity_eval.DEFAULT_TEMPLATE_IMAGES)."""
MAX_IMAGES = 64
"""More files than this is not one customer's enrolment folder (it may be a whole photo archive,
i.e. other people): refused before any photo is read."""
MAX_IMAGE_BYTES = 32 * 1024 * 1024
"""A larger file is rejected unread; Pillow's own limit guards against decompression bombs."""


class EnrolmentInputError(AtmguardError, FileNotFoundError):
    """The images folder is missing, not a folder, or holds too many files."""


class ImageStatus(StrEnum):
    """The outcome of one photo; the values are stable (``--json`` prints them)."""

    ACCEPTED = "accepted"
    UNREADABLE = "unreadable"
    NO_FACE = "no_face"
    SEVERAL_FACES = "several_faces"
    LOW_SCORE = "low_score"
    TOO_SMALL = "too_small"
    TURNED_AWAY = "turned_away"
    BLURRED = "blurred"
    INCONSISTENT = "inconsistent"


@dataclass(frozen=True)
class ImageReport:
    """One photo: accepted, or rejected with a reason a person can act on."""

    name: str
    status: ImageStatus
    reason: str
    consistency: float | None = None
    """Cosine score against the mean of the other accepted photos (None if it never got that far)."""

    @property
    def accepted(self) -> bool:
        return self.status is ImageStatus.ACCEPTED


@dataclass(frozen=True, eq=False)
class Enrolment:
    """The per-photo report and, when enough photos were accepted, the template."""

    images: list[ImageReport]
    template: FaceTemplate | None
    min_images: int

    @property
    def accepted_count(self) -> int:
        return sum(1 for image in self.images if image.accepted)

    @property
    def ok(self) -> bool:
        return self.template is not None


def list_image_files(images_dir: str | os.PathLike[str], *, max_images: int = MAX_IMAGES) -> list[Path]:
    """The non-hidden regular files directly in ``images_dir``, sorted by name (sub-folders ignored)."""
    folder = Path(images_dir)
    if not folder.exists():
        raise EnrolmentInputError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise EnrolmentInputError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if len(files) > max_images:
        raise EnrolmentInputError(
            f"{folder}: {len(files)} files; an enrolment folder holds one customer's photos "
            f"(at most {max_images})"
        )
    return files


def _decode(path: Path) -> np.ndarray | str:
    """The photo as RGB, or why it cannot be read."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"cannot read the file: {exc.strerror or exc}"
    if size > MAX_IMAGE_BYTES:
        return f"file is {size} bytes, more than {MAX_IMAGE_BYTES} for a photo"
    try:
        return load_rgb(path)
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError...
        # Pillow's messages repeat the full path; the table already names the file.
        detail = f"{type(exc).__name__}: {exc}".replace(f" '{path}'", "").replace(str(path), path.name)
        detail = detail.splitlines()[0][:200]
        return f"not a readable image ({detail})"


def _embed_one(
    path: Path,
    detector: FaceDetector,
    embedder: FaceEmbedder,
    thresholds: QualityThresholds,
    pad_fraction: float,
) -> tuple[ImageReport, np.ndarray | None]:
    decoded = _decode(path)
    if isinstance(decoded, str):
        logger.info("enrolment photo %s unreadable: %s", path.name, decoded)
        return ImageReport(path.name, ImageStatus.UNREADABLE, decoded), None
    frame = camera_frame(decoded, pad_fraction=pad_fraction)
    faces = detector.detect(frame)
    if not faces:
        return ImageReport(path.name, ImageStatus.NO_FACE, "no face found"), None
    if len(faces) > 1:
        # Which face is the customer's is not ours to guess: a template of the wrong person
        # would let that person through at the ATM.
        return ImageReport(
            path.name, ImageStatus.SEVERAL_FACES, f"{len(faces)} faces found; the photo must show one person"
        ), None
    aligned = align_face(frame, faces[0], thresholds=thresholds)
    if not aligned.ok:
        assert aligned.rejection is not None
        return ImageReport(path.name, ImageStatus(aligned.rejection.value), aligned.reason), None
    return ImageReport(path.name, ImageStatus.ACCEPTED, "ok"), embedder.embed(aligned)


def _leave_one_out_scores(vectors: list[np.ndarray]) -> list[float]:
    """Each unit vector's cosine with the renormalised mean of the others."""
    scores = []
    for i, vector in enumerate(vectors):
        others = mean_embedding(v for j, v in enumerate(vectors) if j != i)
        scores.append(float(np.clip(others @ vector, -1.0, 1.0)))
    return scores


def _drop_inconsistent(
    vectors: dict[int, np.ndarray], reports: list[ImageReport], *, match_threshold: float
) -> list[np.ndarray]:
    """Mark photos that do not match the others INCONSISTENT (in ``reports``); return the kept vectors.

    The worst photo goes first and the scores are computed again without it: a stray photo of
    someone else pulls the mean of the others towards it, so judging everything against a mean
    that still contains it would reject good photos too. The report shows every rejected photo;
    a folder that is mostly someone else is beyond what any check can tell and is the operator's
    to notice.
    """
    kept = list(vectors)
    while len(kept) >= 2:
        scores = _leave_one_out_scores([vectors[i] for i in kept])
        worst = int(np.argmin(scores))
        if scores[worst] >= match_threshold:
            for index, score in zip(kept, scores, strict=True):
                reports[index] = ImageReport(
                    reports[index].name, ImageStatus.ACCEPTED, "ok", consistency=score
                )
            break
        # With two photos left the score is symmetric: neither can be preferred, both go.
        for index in kept if len(kept) == 2 else [kept[worst]]:
            reports[index] = ImageReport(
                reports[index].name,
                ImageStatus.INCONSISTENT,
                f"does not match the other photos (score {scores[worst]:.2f} < {match_threshold:.2f}): "
                "another person, or a very different look",
                consistency=scores[worst],
            )
        kept = [] if len(kept) == 2 else kept[:worst] + kept[worst + 1 :]
    return [vectors[i] for i in kept]


def build_template(
    images_dir: str | os.PathLike[str],
    *,
    detector: FaceDetector,
    embedder: FaceEmbedder,
    min_images: int = MIN_ACCEPTED_IMAGES,
    match_threshold: float = DEFAULT_MATCH_THRESHOLD,
    thresholds: QualityThresholds = DEFAULT_THRESHOLDS,
    pad_fraction: float = DEFAULT_PAD_FRACTION,
    progress: Callable[[int, int], None] | None = None,
) -> Enrolment:
    """Judge every photo in ``images_dir`` and build the template from the accepted ones.

    Raises EnrolmentInputError for a missing folder (or one with too many files) and ModelError
    when a model cannot be loaded; a bad photo never raises. ``Enrolment.template`` is None when
    fewer than ``min_images`` photos were accepted.
    """
    if min_images < 2:
        raise ValueError(f"min_images must be >= 2 (the consistency check needs a pair), got {min_images}")
    files = list_image_files(images_dir)
    reports: list[ImageReport] = []
    vectors: dict[int, np.ndarray] = {}
    for done, path in enumerate(files, start=1):
        report, vector = _embed_one(path, detector, embedder, thresholds, pad_fraction)
        if vector is not None:
            vectors[len(reports)] = vector
        reports.append(report)
        if progress is not None:
            progress(done, len(files))

    kept = _drop_inconsistent(vectors, reports, match_threshold=match_threshold)
    template = embedder.template(kept) if len(kept) >= min_images else None
    logger.info(
        "enrolment from %s: %d of %d photo(s) accepted, %s",
        images_dir,
        len(kept),
        len(files),
        "template built" if template is not None else f"fewer than {min_images}: no template",
    )
    return Enrolment(images=reports, template=template, min_images=min_images)
