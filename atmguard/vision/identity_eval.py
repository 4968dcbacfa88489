"""Face verification on a folder of identities: error rates, the shipped thresholds, calibration.

``DIR/<person>/`` holds several images of one person (hidden files skipped). A person's *source*
is the folder name up to the first ``_`` (``orl_s01`` -> ``orl``), so figures are also given per
source; impostor pairs of a source are pairs of two of its persons.

Each image goes through what the ATM does with a camera frame: edge-padded by 25% (as
``model eval``), the detector, the primary (largest) face, alignment and the quality gates, then
the embedding. Images without a face, or whose face fails a gate, are counted (with the reason)
and left out of the pairs, as the ATM would retry such a frame.

Two protocols:

* **pairs**: every two accepted images; same person = genuine, different = impostor;
* **template vs probe** (how the ATM uses it): each person's first ``template_images`` accepted
  images (sorted by name) make the template (mean embedding), the rest are probes, compared with
  their own template (genuine) and every other person's (impostor).

Calibration (``calibrate``): persons are split per source with a fixed seed into a calibration half
and a validation half. Thresholds come from the calibration persons only, with margins for
persons never seen, computed on 200 random 80% subsets of those persons:

* MATCH: the 99.9% quantile of same-source impostor scores (FAR 0.1%), in both protocols; the
  95th percentile over the subsets, the stricter protocol winning;
* MISMATCH (genuine pairs called MISMATCH <= 0.1%): per source, the genuine pairs' 0.1% tail, the
  lower of the empirical quantile and a normal fit to the bulk (mean - 3.09 sd, steadier than a
  handful of tail pairs); the 5th percentile over the subsets; the hardest source; minus
  GENERALISATION_MARGIN. Pairs, not templates: single images are the harsher case.

The figures reported for a calibration are the validation persons'.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from atmguard.errors import AtmguardError
from atmguard.vision.align import DEFAULT_THRESHOLDS, QualityThresholds, align_face
from atmguard.vision.detector import FaceDetector
from atmguard.vision.embedder import (
    DEFAULT_MATCH_THRESHOLD,
    DEFAULT_MISMATCH_THRESHOLD,
    FaceEmbedder,
    mean_embedding,
)
from atmguard.vision.evaluate import DEFAULT_PAD_FRACTION, camera_frame
from atmguard.vision.imageops import load_rgb

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE_IMAGES = 3
DEFAULT_SPLIT_SEED = 20261124
CALIBRATION_FRACTION = 0.5
BOOTSTRAP_ROUNDS = 200
BOOTSTRAP_SUBSET = 0.8
TARGET_FAR = 1e-3
TARGET_GENUINE_MISMATCH = 1e-3
NORMAL_Q001 = 3.09
"""Standard deviations below the mean of a normal distribution's 0.1% point."""
GENERALISATION_MARGIN = 0.10
"""Subtracted from the MISMATCH tail estimate for persons never seen: twice how far the estimate
moved between random person splits of faces-identity (seeds 1-5: -0.04 .. +0.01), because the
thresholds also meet sources harder than any here, and a wrongly retained card is the worst error."""
SPLITS = ("all", "calibration", "validation")


class IdentityDatasetError(AtmguardError, FileNotFoundError):
    """The folder is missing or has fewer than two person folders with images."""


def list_persons(root: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """Person folder name -> its image files (sorted); persons without files are left out."""
    base = Path(root)
    if not base.is_dir():
        raise IdentityDatasetError(f"{base}: not a directory")
    persons: dict[str, list[Path]] = {}
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        if files:
            persons[folder.name] = files
    if len(persons) < 2:
        raise IdentityDatasetError(
            f"{base}: need at least two person folders with images, found {len(persons)}"
        )
    return persons


def source_of(person: str) -> str:
    return person.split("_", 1)[0] if "_" in person else "all"


def split_persons(persons: Sequence[str], *, seed: int = DEFAULT_SPLIT_SEED) -> dict[str, str]:
    """person -> "calibration" or "validation": half of each source's persons each, fixed seed."""
    rng = np.random.default_rng(seed)
    by_source: dict[str, list[str]] = {}
    for person in sorted(persons):
        by_source.setdefault(source_of(person), []).append(person)
    split: dict[str, str] = {}
    for source in sorted(by_source):
        members = by_source[source]
        order = rng.permutation(len(members))
        cut = int(np.ceil(len(members) * CALIBRATION_FRACTION))
        for rank, index in enumerate(order):
            split[members[index]] = "calibration" if rank < cut else "validation"
    return split


@dataclass(frozen=True, eq=False)
class ImageRecord:
    person: str
    path: Path
    status: str
    """"ok", "no_face", "unreadable" or a quality Rejection value."""
    reason: str = ""
    embedding: np.ndarray | None = None
    embed_ms: float | None = None
    align_ms: float | None = None


@dataclass
class Embedded:
    """Every image's outcome; the input of the figures and of the calibration."""

    root: Path
    records: list[ImageRecord] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def subset(self, persons: set[str]) -> Embedded:
        return Embedded(self.root, [r for r in self.records if r.person in persons], self.settings)


def embed_dir(
    detector: FaceDetector,
    embedder: FaceEmbedder,
    root: str | os.PathLike[str],
    *,
    persons: set[str] | None = None,
    limit_per_person: int | None = None,
    thresholds: QualityThresholds = DEFAULT_THRESHOLDS,
    pad_fraction: float = DEFAULT_PAD_FRACTION,
    progress: Callable[[int, int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Embedded:
    """Detect, align, gate and embed every image of ``root`` (or of ``persons`` only)."""
    listing = list_persons(root)
    jobs = [
        (person, path)
        for person, files in listing.items()
        if persons is None or person in persons
        for path in files[:limit_per_person]
    ]
    result = Embedded(Path(root), settings={"pad_fraction": pad_fraction, "quality": vars(thresholds).copy()})
    for done, (person, path) in enumerate(jobs, start=1):
        result.records.append(_embed_one(detector, embedder, person, path, thresholds, pad_fraction, clock))
        if progress is not None:
            progress(done, len(jobs))
    return result


def _embed_one(
    detector: FaceDetector,
    embedder: FaceEmbedder,
    person: str,
    path: Path,
    thresholds: QualityThresholds,
    pad_fraction: float,
    clock: Callable[[], float],
) -> ImageRecord:
    try:
        rgb = load_rgb(path)
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError or its own errors
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        logger.warning("unreadable image %s: %s", path, reason)
        return ImageRecord(person, path, "unreadable", reason)
    frame = camera_frame(rgb, pad_fraction=pad_fraction)
    faces = detector.detect(frame)
    if not faces:
        return ImageRecord(person, path, "no_face", "no face found")
    t0 = clock()
    aligned = align_face(frame, faces[0], thresholds=thresholds)
    align_ms = (clock() - t0) * 1e3
    if not aligned.ok:
        assert aligned.rejection is not None
        return ImageRecord(person, path, aligned.rejection.value, aligned.reason, align_ms=align_ms)
    vector = embedder.embed(aligned)
    return ImageRecord(person, path, "ok", embedding=vector, embed_ms=embedder.last_ms, align_ms=align_ms)


# --- scores -------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Genuine and impostor cosine scores, with the person of each genuine score (for resampling)."""

    genuine: np.ndarray
    genuine_person: np.ndarray
    impostor: np.ndarray
    impostor_persons: np.ndarray
    """(N, 2) indices into ``persons`` of each impostor score."""
    persons: list[str]


def _accepted(data: Embedded) -> tuple[np.ndarray, np.ndarray, list[str]]:
    ok = [r for r in data.records if r.status == "ok" and r.embedding is not None]
    persons = sorted({r.person for r in ok})
    index = {p: i for i, p in enumerate(persons)}
    if not ok:
        return np.zeros((0, 128), np.float32), np.zeros(0, int), persons
    return np.stack([r.embedding for r in ok]), np.array([index[r.person] for r in ok]), persons


def pair_scores(data: Embedded, *, same_source_impostors: bool = False) -> Scores:
    vectors, labels, persons = _accepted(data)
    iu = np.triu_indices(len(vectors), 1)
    scores = (vectors @ vectors.T)[iu]
    a, b = labels[iu[0]], labels[iu[1]]
    same = a == b
    impostor = ~same
    if same_source_impostors:
        sources = np.array([source_of(p) for p in persons])
        impostor &= sources[a] == sources[b]
    return Scores(
        scores[same], a[same], scores[impostor], np.stack([a[impostor], b[impostor]], axis=1), persons
    )


def template_scores(
    data: Embedded, *, template_images: int = DEFAULT_TEMPLATE_IMAGES, same_source_impostors: bool = False
) -> Scores:
    """Template (first ``template_images`` accepted images of a person) vs every remaining image."""
    vectors, labels, persons = _accepted(data)
    templates: dict[int, np.ndarray] = {}
    probes: list[tuple[int, np.ndarray]] = []
    for person in range(len(persons)):
        own = vectors[labels == person]
        if len(own) <= template_images:
            continue  # too few images to have both a template and a probe
        templates[person] = mean_embedding(own[:template_images])
        probes += [(person, v) for v in own[template_images:]]
    sources = [source_of(p) for p in persons]
    genuine, genuine_person, impostor, pairs = [], [], [], []
    for person, vector in probes:
        for owner, template in templates.items():
            score = float(template @ vector)
            if owner == person:
                genuine.append(score)
                genuine_person.append(person)
            elif not same_source_impostors or sources[owner] == sources[person]:
                impostor.append(score)
                pairs.append((person, owner))
    return Scores(
        np.array(genuine),
        np.array(genuine_person, dtype=int),
        np.array(impostor),
        np.array(pairs, dtype=int).reshape(-1, 2),
        persons,
    )


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), digits)


def eer(genuine: np.ndarray, impostor: np.ndarray) -> float | None:
    """Equal error rate: where the false reject and false accept rates cross (scores >= t accepted)."""
    if not len(genuine) or not len(impostor):
        return None
    thresholds = np.unique(np.concatenate([genuine, impostor]))
    g, i = np.sort(genuine), np.sort(impostor)
    frr = np.searchsorted(g, thresholds, side="left") / len(g)
    far = 1.0 - np.searchsorted(i, thresholds, side="left") / len(i)
    k = int(np.argmin(np.abs(frr - far)))
    return float((frr[k] + far[k]) / 2)


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float) -> float | None:
    """Genuine accept rate at the threshold where the impostor accept rate is ``far`` (None if too few impostors)."""
    if not len(genuine) or len(impostor) < 1.0 / far:
        return None
    threshold = float(np.quantile(impostor, 1.0 - far, method="higher"))
    return float(np.mean(genuine > threshold))


def figures(
    scores: Scores, *, match_threshold: float, mismatch_threshold: float, prefix: str = ""
) -> dict[str, Any]:
    g, i = scores.genuine, scores.impostor

    def rate(values: np.ndarray, mask: np.ndarray) -> float | None:
        return _round(float(mask.mean())) if len(values) else None

    return {
        f"{prefix}genuine_pairs": len(g),
        f"{prefix}impostor_pairs": len(i),
        f"{prefix}eer": _round(eer(g, i)),
        f"{prefix}tar_at_far_1e-2": _round(tar_at_far(g, i, 1e-2)),
        f"{prefix}tar_at_far_1e-3": _round(tar_at_far(g, i, 1e-3)),
        f"{prefix}tar_at_match_threshold": rate(g, g >= match_threshold),
        f"{prefix}far_at_match_threshold": rate(i, i >= match_threshold),
        f"{prefix}genuine_rejected_as_mismatch": rate(g, g < mismatch_threshold),
        f"{prefix}impostor_called_mismatch": rate(i, i < mismatch_threshold),
        f"{prefix}genuine_min": _round(float(g.min())) if len(g) else None,
        f"{prefix}impostor_max": _round(float(i.max())) if len(i) else None,
    }


def report(
    data: Embedded,
    *,
    match_threshold: float = DEFAULT_MATCH_THRESHOLD,
    mismatch_threshold: float = DEFAULT_MISMATCH_THRESHOLD,
    template_images: int = DEFAULT_TEMPLATE_IMAGES,
) -> dict[str, Any]:
    """The ``model eval-identity --json`` object: counts, pair and template figures, per source."""
    records = data.records
    statuses = [r.status for r in records]
    embed_ms = [r.embed_ms for r in records if r.embed_ms is not None]
    align_ms = [r.align_ms for r in records if r.align_ms is not None]
    thresholds = {"match_threshold": match_threshold, "mismatch_threshold": mismatch_threshold}
    result: dict[str, Any] = {
        "dir": str(data.root),
        "persons": len({r.person for r in records}),
        "images": len(records),
        "accepted": statuses.count("ok"),
        "no_face": statuses.count("no_face"),
        "unreadable": statuses.count("unreadable"),
        "rejected_quality": {
            status: statuses.count(status)
            for status in sorted(set(statuses) - {"ok", "no_face", "unreadable"})
        },
        **figures(pair_scores(data), **thresholds),
        **thresholds,
        "template_images": template_images,
        **figures(template_scores(data, template_images=template_images), prefix="template_", **thresholds),
        "ms_per_embedding_p50": _round(float(np.percentile(embed_ms, 50)), 3) if embed_ms else None,
        "ms_per_embedding_p95": _round(float(np.percentile(embed_ms, 95)), 3) if embed_ms else None,
        "ms_per_alignment_p50": _round(float(np.percentile(align_ms, 50)), 3) if align_ms else None,
        **data.settings,
    }
    sources = sorted({source_of(r.person) for r in records})
    if len(sources) > 1:
        per_source = {}
        for source in sources:
            part = data.subset({r.person for r in records if source_of(r.person) == source})
            sub_statuses = [r.status for r in part.records]
            per_source[source] = {
                "persons": len({r.person for r in part.records}),
                "images": len(part.records),
                "accepted": sub_statuses.count("ok"),
                "no_face": sub_statuses.count("no_face"),
                **figures(pair_scores(part), **thresholds),
                **figures(
                    template_scores(part, template_images=template_images), prefix="template_", **thresholds
                ),
            }
        result["per_source"] = per_source
    result["problems"] = [
        f"{r.path.relative_to(data.root)}: {r.status}: {r.reason}" for r in records if r.status != "ok"
    ]
    return result


# --- calibration --------------------------------------------------------------------------------------


def _subsets(scores: Scores, members: np.ndarray, rng: np.random.Generator, rounds: int) -> list[np.ndarray]:
    """``rounds`` masks over ``scores.persons`` choosing a random 80% of the persons in ``members``."""
    masks = []
    for _ in range(rounds):
        chosen = np.zeros(len(scores.persons), bool)
        size = max(2, round(len(members) * BOOTSTRAP_SUBSET))
        chosen[rng.choice(members, size=min(size, len(members)), replace=False)] = True
        masks.append(chosen)
    return masks


def _impostor_q999(scores: Scores, rng: np.random.Generator, rounds: int) -> float | None:
    """95th percentile over person subsets of the impostor 99.9% quantile."""
    values = []
    for chosen in _subsets(scores, np.arange(len(scores.persons)), rng, rounds):
        impostor = scores.impostor[chosen[scores.impostor_persons].all(axis=1)]
        if len(impostor):
            values.append(np.quantile(impostor, 1.0 - TARGET_FAR))
    return float(np.percentile(values, 95)) if values else None


def _genuine_tails(scores: Scores, rng: np.random.Generator, rounds: int) -> dict[str, float]:
    """5th percentile over person subsets of each source's genuine tail: mean - 3.09 sd (the 0.1%
    point of a normal fitted to the bulk) and the empirical 0.1% quantile, the lower of the two."""
    sources = np.array([source_of(p) for p in scores.persons])
    tails: dict[str, float] = {}
    for source in sorted(set(sources)):
        members = np.flatnonzero(sources == source)
        values = []
        for chosen in _subsets(scores, members, rng, rounds):
            genuine = scores.genuine[chosen[scores.genuine_person]]
            if len(genuine) >= 2:
                values.append(
                    min(
                        genuine.mean() - NORMAL_Q001 * genuine.std(),
                        np.quantile(genuine, TARGET_GENUINE_MISMATCH),
                    )
                )
        if values:
            tails[source] = float(np.percentile(values, 5))
    return tails


def calibrate(
    data: Embedded,
    *,
    seed: int = DEFAULT_SPLIT_SEED,
    template_images: int = DEFAULT_TEMPLATE_IMAGES,
    rounds: int = BOOTSTRAP_ROUNDS,
) -> dict[str, Any]:
    """Thresholds from the calibration persons (see the module docstring); figures on the validation persons."""
    split = split_persons(sorted({r.person for r in data.records}), seed=seed)
    calibration = data.subset({p for p, side in split.items() if side == "calibration"})
    validation = data.subset({p for p, side in split.items() if side == "validation"})
    rng = np.random.default_rng(seed)
    pairs = pair_scores(calibration, same_source_impostors=True)
    templates = template_scores(calibration, template_images=template_images, same_source_impostors=True)
    highs = [_impostor_q999(pairs, rng, rounds), _impostor_q999(templates, rng, rounds)]
    tails = _genuine_tails(pairs, rng, rounds)
    if None in highs or not tails:
        raise IdentityDatasetError("too few calibration persons/images to calibrate")
    # Rounded outwards to 0.01: the margins only ever grow.
    match_threshold = math.ceil(max(h for h in highs if h is not None) * 100) / 100
    mismatch_threshold = math.floor((min(tails.values()) - GENERALISATION_MARGIN) * 100) / 100
    if not mismatch_threshold < match_threshold:
        raise IdentityDatasetError(
            f"calibration gave mismatch_threshold {mismatch_threshold} >= match_threshold {match_threshold}"
        )
    return {
        "seed": seed,
        "calibration_persons": sorted(p for p, side in split.items() if side == "calibration"),
        "validation_persons": sorted(p for p, side in split.items() if side == "validation"),
        "match_threshold": match_threshold,
        "mismatch_threshold": mismatch_threshold,
        "calibration_quantiles": {
            "impostor_q999_pairs_p95": _round(highs[0]),
            "impostor_q999_template_p95": _round(highs[1]),
            "genuine_tail_by_source_p5": {source: _round(value) for source, value in tails.items()},
            "generalisation_margin": GENERALISATION_MARGIN,
        },
        "validation": {
            **report(
                validation,
                match_threshold=match_threshold,
                mismatch_threshold=mismatch_threshold,
                template_images=template_images,
            ),
            "split": "validation",
        },
    }
