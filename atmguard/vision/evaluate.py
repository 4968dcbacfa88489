"""Evaluate the vision pipeline on a folder of labelled images, as the daemon would see them.

``DIR/covered/`` and ``DIR/uncovered/`` hold the images (sub-folders are included, hidden files
skipped). Every file is one camera frame:

* **Framing.** Most labelled face images are tight crops, while the detector expects a face with
  some surroundings, as in a camera frame (on tight crops it misses ~12% of low-resolution faces,
  with a 25% margin ~2%). So every image, crop or scene alike, is padded by ``pad_fraction`` of its
  width/height on each side by replicating its border pixels (no foreign colour, no hard edge),
  then shrunk, if needed, to fit the 640x480 a lores stream delivers at most. Images are never
  enlarged: a small web crop stays a small face, and may fall under the pipeline's
  ``min_face_px`` as a distant face would.
* **Decision** (single frame, at ``covered_threshold``): a covered image is *denied* when no face
  can be judged (none found, or the primary face too small) or the primary face's probability is
  at/above the threshold; an uncovered image is *allowed* only when a face is judged and its
  probability is below the threshold. In the daemon the tracker adds temporal smoothing on top
  (several frames must agree), so these are per-frame figures, not per-customer ones.
* **Classifier alone** (``face_balanced_accuracy``): the same threshold, on the images where a
  face was judged.
* **Time** per image is the pipeline's own (detector + classifier + evidence crop), without file
  decoding and padding, which a camera does not need.

Unreadable files are counted and listed, never fatal.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from atmguard.errors import AtmguardError
from atmguard.vision.imageops import load_rgb, resize_rgb
from atmguard.vision.pipeline import VisionPipeline

logger = logging.getLogger(__name__)

CLASSES: tuple[str, str] = ("covered", "uncovered")
DEFAULT_PAD_FRACTION = 0.25
"""Margin added around each image: the fraction the detector tests measured (98% of RMFD crops found)."""
MAX_FRAME_SIZE = (640, 480)
"""(width, height): larger padded images are shrunk to fit, as the lores stream is at most this big."""


class DatasetError(AtmguardError, FileNotFoundError):
    """The evaluation folder is missing or lacks the covered/ and uncovered/ sub-folders."""


def camera_frame(
    rgb: np.ndarray, *, pad_fraction: float = DEFAULT_PAD_FRACTION, max_size: tuple[int, int] = MAX_FRAME_SIZE
) -> np.ndarray:
    """The image as a camera-like frame: border-replicated margin, shrunk to fit ``max_size``."""
    if not 0.0 <= pad_fraction <= 2.0:
        raise ValueError(f"pad_fraction must be in [0, 2], got {pad_fraction!r}")
    dy, dx = round(rgb.shape[0] * pad_fraction), round(rgb.shape[1] * pad_fraction)
    frame = np.pad(rgb, ((dy, dy), (dx, dx), (0, 0)), mode="edge") if dx or dy else rgb
    height, width = frame.shape[:2]
    scale = min(max_size[0] / width, max_size[1] / height)
    if scale < 1.0:
        frame = resize_rgb(frame, max(1, round(width * scale)), max(1, round(height * scale)))
    return np.ascontiguousarray(frame)


def list_images(root: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """Every non-hidden file under ``root/covered`` and ``root/uncovered``, sorted."""
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"{base}: not a directory")
    missing = [name for name in CLASSES if not (base / name).is_dir()]
    if missing:
        raise DatasetError(
            f"{base}: missing sub-folder(s) {', '.join(m + '/' for m in missing)} (need covered/, uncovered/)"
        )
    found: dict[str, list[Path]] = {}
    for label in CLASSES:
        folder = base / label
        found[label] = sorted(
            path
            for path in folder.rglob("*")
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        )
    return found


@dataclass(frozen=True)
class ImageResult:
    """One image's outcome; ``covered_probability`` is None when no face could be judged."""

    path: Path
    label: str
    face_count: int
    small_face: bool
    """Faces were found, but the primary one is under min_face_px (counted as no face)."""
    covered_probability: float | None
    ms: float

    @property
    def judged(self) -> bool:
        return self.covered_probability is not None

    def classified_covered(self, threshold: float) -> bool | None:
        """The classifier's verdict; None without a judged face. NaN counts as covered (fail closed)."""
        p = self.covered_probability
        if p is None:
            return None
        return math.isnan(p) or p >= threshold

    def correct(self, threshold: float) -> bool:
        """Decision level: covered must be denied, uncovered allowed (see the module docstring)."""
        verdict = self.classified_covered(threshold)
        if self.label == "covered":
            return verdict is None or verdict
        return verdict is False


@dataclass(frozen=True)
class Unreadable:
    path: Path
    reason: str


def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _mean(values: Sequence[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class EvalReport:
    """Counts and rates at one threshold; :meth:`to_dict` is the ``model eval --json`` object."""

    root: Path
    threshold: float
    results: list[ImageResult]
    unreadable: list[Unreadable] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    """How the figures were produced (min face size, padding, runtime...), echoed in the output."""

    def _of(self, label: str) -> list[ImageResult]:
        return [r for r in self.results if r.label == label]

    def to_dict(self) -> dict[str, Any]:
        t = self.threshold
        covered, uncovered = self._of("covered"), self._of("uncovered")
        covered_denied = sum(r.correct(t) for r in covered)
        uncovered_allowed = sum(r.correct(t) for r in uncovered)
        face_covered = [r for r in covered if r.judged]
        face_uncovered = [r for r in uncovered if r.judged]
        face_covered_ok = sum(bool(r.classified_covered(t)) for r in face_covered)
        face_uncovered_ok = sum(r.classified_covered(t) is False for r in face_uncovered)
        times = [r.ms for r in self.results]
        return {
            "dir": str(self.root),
            "images": len(self.results),
            "covered_n": len(covered),
            "covered_denied": covered_denied,
            "uncovered_n": len(uncovered),
            "uncovered_allowed": uncovered_allowed,
            "no_face_covered": sum(not r.judged for r in covered),
            "no_face_uncovered": sum(not r.judged for r in uncovered),
            "small_face_covered": sum(r.small_face for r in covered),
            "small_face_uncovered": sum(r.small_face for r in uncovered),
            "multi_face_covered": sum(r.face_count > 1 for r in covered),
            "multi_face_uncovered": sum(r.face_count > 1 for r in uncovered),
            "covered_denied_rate": _round(_rate(covered_denied, len(covered))),
            "uncovered_allowed_rate": _round(_rate(uncovered_allowed, len(uncovered))),
            "balanced_accuracy": _round(
                _mean([_rate(covered_denied, len(covered)), _rate(uncovered_allowed, len(uncovered))])
            ),
            "face_covered_n": len(face_covered),
            "face_covered_correct": face_covered_ok,
            "face_uncovered_n": len(face_uncovered),
            "face_uncovered_correct": face_uncovered_ok,
            "face_balanced_accuracy": _round(
                _mean(
                    [_rate(face_covered_ok, len(face_covered)), _rate(face_uncovered_ok, len(face_uncovered))]
                )
            ),
            "ms_per_image_p50": _round(float(np.percentile(times, 50)), 3) if times else None,
            "ms_per_image_p95": _round(float(np.percentile(times, 95)), 3) if times else None,
            "threshold": t,
            **self.settings,
            "unreadable_n": len(self.unreadable),
            "unreadable": [f"{u.path.relative_to(self.root)}: {u.reason}" for u in self.unreadable],
        }

    def write_details(self, path: str | os.PathLike[str]) -> None:
        """One CSV row per image (path, label, faces, small face, probability, ms) for threshold studies."""
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", "label", "face_count", "small_face", "covered_probability", "ms"])
            for r in self.results:
                p = "" if r.covered_probability is None else f"{r.covered_probability:.6f}"
                writer.writerow(
                    [
                        r.path.relative_to(self.root),
                        r.label,
                        r.face_count,
                        int(r.small_face),
                        p,
                        f"{r.ms:.3f}",
                    ]
                )


def evaluate_image(
    pipeline: VisionPipeline, rgb: np.ndarray, *, pad_fraction: float = DEFAULT_PAD_FRACTION
) -> tuple[int, bool, float | None, float]:
    """(face count, primary too small, covered probability or None, pipeline ms) for one image."""
    observation = pipeline.process(camera_frame(rgb, pad_fraction=pad_fraction))
    small = observation.face_count > 0 and observation.primary is None
    return observation.face_count, small, observation.covered_probability, observation.total_ms


def evaluate_dir(
    pipeline: VisionPipeline,
    root: str | os.PathLike[str],
    *,
    threshold: float,
    pad_fraction: float = DEFAULT_PAD_FRACTION,
    limit_per_class: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    settings: dict[str, Any] | None = None,
) -> EvalReport:
    """Run the (opened) pipeline on every image under ``root``; see the module docstring."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    base = Path(root)
    images = list_images(base)
    jobs: list[tuple[str, Path]] = [
        (label, path) for label in CLASSES for path in images[label][:limit_per_class]
    ]
    report = EvalReport(
        root=base,
        threshold=threshold,
        results=[],
        settings={"pad_fraction": pad_fraction, "min_face_px": pipeline.min_face_px, **(settings or {})},
    )
    for done, (label, path) in enumerate(jobs, start=1):
        try:
            rgb = load_rgb(path)
        except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError or its own bomb errors
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            logger.warning("unreadable image %s: %s", path, reason)
            report.unreadable.append(Unreadable(path=path, reason=reason))
        else:
            face_count, small, probability, ms = evaluate_image(pipeline, rgb, pad_fraction=pad_fraction)
            report.results.append(
                ImageResult(
                    path=path,
                    label=label,
                    face_count=face_count,
                    small_face=small,
                    covered_probability=probability,
                    ms=ms,
                )
            )
        if progress is not None:
            progress(done, len(jobs))
    return report
