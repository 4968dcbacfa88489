"""Step 1 of the covering recipe: detector crops, duplicate clusters and the source-grouped split.

Reads ``faces-covered`` in place (the images are never copied into the repository), runs the
project's FaceDetector on every image the way the daemon would, and caches under ``out/covering/``:

- ``faces.json``: one record per image (label, source, detection or why none, group, split);
- ``context.npy``: a 192x192 "context" crop per detected face (twice the classifier's crop,
  same centre and rotation), from which training draws jittered crops and synthetic coverings;
- ``context_kps.npy``: the face's box corners and keypoints in context pixels.

Run it with the training venv or the project venv (numpy, Pillow, ai-edge-litert are enough).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from atmguard.vision.covering import CROP_SCALE, CROP_SIZE, crop_matrix, face_crop, warp_crop
from atmguard.vision.detector import Face, FaceDetector
from atmguard.vision.imageops import load_rgb, resize_rgb

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATASET = REPO_ROOT.parent / "shared" / "datasets" / "faces-covered"
DEFAULT_OUT = REPO_ROOT / "out" / "covering"
DETECTOR_MODEL = REPO_ROOT / "firmware_models" / "third_party" / "face_detection_short_range.tflite"

CONTEXT_SIZE = 2 * CROP_SIZE
CONTEXT_SCALE = 2 * CROP_SCALE
"""The context crop has the classifier crop's pixel size and centre but twice its field of view, so
a training crop can zoom out, shift and rotate without running off the cached pixels."""
DETECT_THRESHOLD = 0.4
"""Lower than the daemon's 0.6: masked faces score lower, and every image here holds a face."""
PAD_FRACTIONS = (0.0, 0.25, 0.5)
"""Tight web crops cut at the chin need a margin for BlazeFace (the daemon sees whole frames)."""
HASH_MAX_DISTANCE = 4
"""Whole-image pHash Hamming distance (of 64) up to which two images are one cluster (the dataset's
own dedup threshold). Looked at: at 6 most pairs are different people with similar framing."""
CROP_MIN_CORRELATION = 0.955
"""Normalised correlation of two 24x24 grey face crops (either mirrored) from which they are one
cluster: this catches re-crops and rescales of one photo that whole-image pHash misses. Looked at:
pairs above 0.96 were the same photo; 0.93-0.96 were mostly different people (99th percentile of
the nearest-neighbour correlation is 0.947)."""
VAL_FRACTION = 0.2
SPLIT_SEED = 20261124

SOURCES = ("fmd_covered", "k12_covered", "fmd_uncovered_rmfd", "k12_uncovered_celeba")
"""fmd = chandrikadeb7/Face-Mask-Detection, k12 = Karimashraf01 (Kaggle Face Mask 12K)."""


@dataclass
class Record:
    index: int
    file: str
    label: int  # 1 covered, 0 uncovered
    source: str
    family: str  # finer origin: RMFD person, or the file-name pattern of a web-scraped batch
    how: str  # raw / pad25 / pad50, or "none" when no face was found
    score: float
    box: list[float] | None
    keypoints: list[list[float]] | None
    group: int = -1
    split: str = ""


def source_of(row: dict[str, str]) -> tuple[str, str]:
    """(source, family) of one MANIFEST.csv row."""
    repo = "fmd" if row["source_repo"].startswith("chandrikadeb7") else "k12"
    name = row["source_path"].rsplit("/", 1)[-1]
    if row["label"] == "covered":
        return f"{repo}_covered", re.sub(r"\d+", "N", name.rsplit(".", 1)[0])[:24]
    if repo == "fmd":
        person = re.match(r"\[?\d+\]?_\d+_([A-Za-z]+)_", name)
        return "fmd_uncovered_rmfd", f"rmfd:{person.group(1) if person else name}"
    return "k12_uncovered_celeba", "celeba"


def _pad_edge(rgb: np.ndarray, fraction: float) -> tuple[np.ndarray, int, int]:
    dy, dx = int(rgb.shape[0] * fraction), int(rgb.shape[1] * fraction)
    return np.pad(rgb, ((dy, dy), (dx, dx), (0, 0)), mode="edge"), dx, dy


def detect_best(detector: FaceDetector, rgb: np.ndarray) -> tuple[Face | None, str]:
    """The highest-scoring face over the image as is and edge-padded (coordinates of ``rgb``)."""
    best: tuple[Face | None, str] = (None, "none")
    for fraction in PAD_FRACTIONS:
        image, dx, dy = _pad_edge(rgb, fraction) if fraction else (rgb, 0, 0)
        for face in detector.detect(image):
            if best[0] is None or face.score > best[0].score:
                shifted = Face(
                    box=(face.box[0] - dx, face.box[1] - dy, face.box[2] - dx, face.box[3] - dy),
                    keypoints=face.keypoints - np.array([dx, dy], np.float32),
                    score=face.score,
                )
                best = (shifted, "raw" if not fraction else f"pad{round(fraction * 100)}")
        if best[0] is not None and fraction >= 0.25:
            break  # the larger pad only as a last resort: it shrinks the face in the 128 px input
    return best


def context_of(rgb: np.ndarray, face: Face) -> tuple[np.ndarray, np.ndarray]:
    """The 192x192 context crop of ``face`` and its box corners + keypoints (8x2) in context pixels."""
    matrix = crop_matrix(face, size=CONTEXT_SIZE, scale=CONTEXT_SCALE)
    context = warp_crop(rgb, matrix, size=CONTEXT_SIZE)
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    pts = np.vstack([np.reshape(face.box, (2, 2)), face.keypoints]).astype(np.float64)
    return context, (np.hstack([pts, np.ones((8, 1))]) @ inverse.T).astype(np.float32)


def face_of(record: Record) -> Face:
    assert record.box is not None and record.keypoints is not None
    return Face(
        box=tuple(record.box),  # type: ignore[arg-type]
        keypoints=np.array(record.keypoints, np.float32),
        score=record.score,
    )


_DCT = np.cos(np.pi / 32 * (np.arange(32)[None, :] + 0.5) * np.arange(8)[:, None])


def phash(rgb: np.ndarray) -> tuple[int, int]:
    """64-bit DCT pHash of the image and of its mirror image."""
    gray = resize_rgb(rgb, 32, 32).astype(np.float64).mean(axis=2)
    out = []
    for image in (gray, gray[:, ::-1]):
        low = _DCT @ image @ _DCT.T
        bits = (low.ravel() > np.median(low.ravel()[1:])).astype(np.uint8)
        out.append(int(np.packbits(bits).view(">u8")[0]))
    return out[0], out[1]


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_duplicate_pairs(hashes: np.ndarray, mirrored: np.ndarray, max_distance: int) -> np.ndarray:
    """(i, j) pairs, i < j, whose hashes (either one mirrored) differ in at most ``max_distance`` bits."""
    pairs = []
    for i in range(len(hashes)):
        d = np.minimum(
            np.bitwise_count(hashes[i] ^ hashes[i + 1 :]), np.bitwise_count(hashes[i] ^ mirrored[i + 1 :])
        )
        for j in np.flatnonzero(d <= max_distance):
            pairs.append((i, i + 1 + int(j)))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def crop_signature(crop: np.ndarray) -> np.ndarray:
    """(2, 576) zero-mean unit-norm 24x24 grey vectors of a face crop and of its mirror image."""
    gray = resize_rgb(crop, 24, 24).astype(np.float64).mean(axis=2)
    out = []
    for image in (gray, gray[:, ::-1]):
        v = (image - image.mean()).ravel()
        out.append(v / (np.linalg.norm(v) + 1e-6))
    return np.array(out, np.float32)


def correlated_pairs(signatures: np.ndarray, valid: np.ndarray, min_correlation: float) -> np.ndarray:
    pairs = []
    idx = np.flatnonzero(valid)
    sig = signatures[idx]
    for start in range(0, len(idx), 1024):
        block = sig[start : start + 1024, 0]
        corr = np.maximum(block @ sig[:, 0].T, block @ sig[:, 1].T)
        for a, b in np.argwhere(corr >= min_correlation):
            if start + a < b:
                pairs.append((idx[start + a], idx[b]))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def assign_groups_and_split(
    records: list[Record], image_hashes: np.ndarray, signatures: np.ndarray, *, seed: int
) -> dict[str, Any]:
    """Group near-duplicates (whole image or face crop) and RMFD persons; split groups per source."""
    uf = _UnionFind(len(records))
    stats: dict[str, Any] = {}
    image_pairs = near_duplicate_pairs(image_hashes[:, 0], image_hashes[:, 1], HASH_MAX_DISTANCE)
    has_face = np.array([rec.box is not None for rec in records])
    crop_pairs = correlated_pairs(signatures, has_face, CROP_MIN_CORRELATION)
    for a, b in np.vstack([image_pairs, crop_pairs]):
        uf.union(int(a), int(b))
    stats["image_phash_pairs"] = len(image_pairs)
    stats["face_crop_correlated_pairs"] = len(crop_pairs)
    by_family: dict[str, int] = {}
    for rec in records:
        if rec.family.startswith("rmfd:"):
            first = by_family.setdefault(rec.family, rec.index)
            uf.union(first, rec.index)
    groups: dict[int, list[int]] = defaultdict(list)
    for rec in records:
        groups[uf.find(rec.index)].append(rec.index)
    # Each group goes to one side; groups are drawn per source (the source of the group's first
    # member) so every source has ~VAL_FRACTION of its groups in validation.
    rng = np.random.default_rng(seed)
    per_source: dict[str, list[int]] = defaultdict(list)
    for root in sorted(groups):
        per_source[records[groups[root][0]].source].append(root)
    for source in sorted(per_source):
        roots = per_source[source]
        order = rng.permutation(len(roots))
        n_val = round(VAL_FRACTION * len(roots))
        val_roots = {roots[k] for k in order[:n_val]}
        for root in roots:
            for i in groups[root]:
                records[i].group = root
                records[i].split = "val" if root in val_roots else "train"
    sizes = Counter(len(v) for v in groups.values())
    stats["groups"] = len(groups)
    stats["group_sizes"] = {str(k): v for k, v in sorted(sizes.items())}
    stats["mixed_source_groups"] = sum(len({records[i].source for i in v}) > 1 for v in groups.values())
    stats["mixed_label_groups"] = sum(len({records[i].label for i in v}) > 1 for v in groups.values())
    return stats


def prepare(dataset: Path, out: Path, *, seed: int = SPLIT_SEED) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    with (dataset / "MANIFEST.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    records: list[Record] = []
    contexts = np.zeros((len(rows), CONTEXT_SIZE, CONTEXT_SIZE, 3), np.uint8)
    context_kps = np.zeros((len(rows), 8, 2), np.float32)  # box corners (2) + 6 keypoints
    image_hashes = np.zeros((len(rows), 2), np.uint64)
    signatures = np.zeros((len(rows), 2, 576), np.float32)
    t0 = time.monotonic()
    with FaceDetector(DETECTOR_MODEL, score_threshold=DETECT_THRESHOLD) as detector:
        for i, row in enumerate(rows):
            rgb = load_rgb(dataset / row["file"])
            source, family = source_of(row)
            face, how = detect_best(detector, rgb)
            rec = Record(
                index=i,
                file=row["file"],
                label=1 if row["label"] == "covered" else 0,
                source=source,
                family=family,
                how=how,
                score=face.score if face else 0.0,
                box=list(face.box) if face else None,
                keypoints=face.keypoints.tolist() if face else None,
            )
            records.append(rec)
            image_hashes[i] = phash(rgb)
            if face is not None:
                signatures[i] = crop_signature(face_crop(rgb, face))
                contexts[i], context_kps[i] = context_of(rgb, face)
            if i % 1000 == 0:
                logger.info("%d/%d images (%.0f s)", i, len(rows), time.monotonic() - t0)
    stats = assign_groups_and_split(records, image_hashes, signatures, seed=seed)
    stats["detect_seconds"] = round(time.monotonic() - t0, 1)
    no_face: dict[str, dict[str, int]] = defaultdict(lambda: {"images": 0, "no_face": 0})
    how = Counter()
    for rec in records:
        no_face[rec.source]["images"] += 1
        no_face[rec.source]["no_face"] += rec.how == "none"
        how[rec.how] += 1
    stats["detection"] = {k: dict(v) for k, v in sorted(no_face.items())}
    stats["detected_how"] = dict(how)
    split_counts: dict[str, Counter[str]] = defaultdict(Counter)
    for rec in records:
        split_counts[rec.source][rec.split + ("" if rec.box else "_noface")] += 1
    stats["split"] = {k: dict(v) for k, v in sorted(split_counts.items())}
    np.save(out / "context.npy", contexts)
    np.save(out / "context_kps.npy", context_kps)
    (out / "faces.json").write_text(
        json.dumps({"dataset": str(dataset), "stats": stats, "records": [asdict(r) for r in records]}),
        encoding="utf-8",
    )
    return stats


def load_prepared(out: Path) -> tuple[list[Record], np.ndarray, np.ndarray, dict[str, Any]]:
    data = json.loads((out / "faces.json").read_text(encoding="utf-8"))
    records = [Record(**r) for r in data["records"]]
    return records, np.load(out / "context.npy"), np.load(out / "context_kps.npy"), data["stats"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    stats = prepare(args.dataset, args.out)
    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
