"""The face embedder on the real converted SFace model: identity separates, templates round-trip
and refuse another model or alignment version, verdicts follow the two thresholds."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from atmguard.datasets import shared_datasets_dir
from atmguard.vision.align import ALIGNMENT_VERSION, align_face
from atmguard.vision.detector import FaceDetector
from atmguard.vision.embedder import (
    DEFAULT_MATCH_THRESHOLD,
    DEFAULT_MISMATCH_THRESHOLD,
    EMBEDDING_SIZE,
    TEMPLATE_BYTES,
    FaceEmbedder,
    FaceTemplate,
    TemplateMismatchError,
    Verdict,
    compare,
    decide,
    mean_embedding,
)
from atmguard.vision.evaluate import camera_frame
from atmguard.vision.imageops import load_rgb
from atmguard.vision.models import resolve_model
from atmguard.vision.runtime import ModelError

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "firmware_models"
IDENTITY_DIR = shared_datasets_dir() / "faces-identity"
needs_identity = pytest.mark.skipif(not IDENTITY_DIR.is_dir(), reason=f"{IDENTITY_DIR} not available")


@pytest.fixture(scope="module")
def models():
    detector_spec = resolve_model(MODELS_DIR, "face_detector")
    embedder_spec = resolve_model(MODELS_DIR, "face_embedder")
    with (
        FaceDetector(detector_spec.path, expected_sha256=detector_spec.sha256) as detector,
        FaceEmbedder(embedder_spec.path, expected_sha256=embedder_spec.sha256) as embedder,
    ):
        yield detector, embedder


def _embeddings(models, person: str, count: int) -> list[np.ndarray]:
    detector, embedder = models
    vectors = []
    for path in sorted((IDENTITY_DIR / person).glob("*.jpg")):
        frame = camera_frame(load_rgb(path))
        faces = detector.detect(frame)
        if faces and (aligned := align_face(frame, faces[0])).ok:
            vectors.append(embedder.embed(aligned))
        if len(vectors) == count:
            break
    assert len(vectors) == count, f"{person}: fewer than {count} usable images"
    return vectors


def test_the_manifest_pins_the_converted_model_and_its_source():
    manifest = json.loads((MODELS_DIR / "manifest.json").read_text())
    entry = next(m for m in manifest["models"] if m["role"] == "face_embedder")
    assert entry["input"]["shape"] == [1, 112, 112, 3] and entry["outputs"][0]["shape"] == [1, EMBEDDING_SIZE]
    assert entry["source"]["convert"] == "sface_tflite" and len(entry["source"]["path_sha256"]) == 64
    assert (MODELS_DIR / entry["source"]["model_card"]).is_file()


def test_embedding_is_a_unit_float32_vector(models):
    _, embedder = models
    crop = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    vector = embedder.embed(crop)
    assert vector.shape == (EMBEDDING_SIZE,) and vector.dtype == np.float32
    assert math.isclose(float(np.linalg.norm(vector)), 1.0, rel_tol=1e-5)
    assert embedder.last_ms > 0
    with pytest.raises(ValueError, match="112x112x3 uint8"):
        embedder.embed(crop[:100])


def test_a_model_file_with_the_wrong_sha256_is_refused(tmp_path):
    spec = resolve_model(MODELS_DIR, "face_embedder")
    copy = tmp_path / spec.path.name
    shutil.copy(spec.path, copy)
    with copy.open("r+b") as fh:
        fh.seek(-100, 2)
        fh.write(b"\0" * 8)
    embedder = FaceEmbedder(copy, expected_sha256=spec.sha256)
    with pytest.raises(ModelError, match="sha256 mismatch"):
        embedder.embed(np.zeros((112, 112, 3), np.uint8))


@needs_identity
def test_same_person_scores_higher_than_different_persons(models):
    people = {p: _embeddings(models, p, 4) for p in ("orl_s01", "orl_s03", "yale_subject04", "rmfd_liudehua")}
    genuine, impostor = [], []
    names = list(people)
    for i, a in enumerate(names):
        va = people[a]
        genuine += [float(va[x] @ va[y]) for x in range(4) for y in range(x + 1, 4)]
        for b in names[i + 1 :]:
            impostor += [float(x @ y) for x in va for y in people[b]]
    assert min(genuine) > max(impostor)
    assert np.mean(genuine) - np.mean(impostor) > 0.3


@needs_identity
def test_template_matches_its_owner_and_not_someone_else(models):
    _, embedder = models
    owner = _embeddings(models, "orl_s07", 6)
    stranger = _embeddings(models, "orl_s08", 3)
    template = embedder.template(owner[:3])
    assert template.image_count == 3 and template.model_sha256 == embedder.model_sha256
    own_score = embedder.compare(template, mean_embedding(owner[3:]))
    other_score = embedder.compare(template, mean_embedding(stranger))
    assert decide(own_score) is Verdict.MATCH
    assert decide(other_score) is not Verdict.MATCH
    assert own_score > other_score + 0.3


def _template(sha: str = "ab" * 32, alignment_version: int = ALIGNMENT_VERSION) -> FaceTemplate:
    vector = np.random.default_rng(1).normal(size=EMBEDDING_SIZE)
    return FaceTemplate(vector=vector, model_sha256=sha, alignment_version=alignment_version, image_count=3)


def test_template_bytes_round_trip():
    template = _template()
    data = template.to_bytes()
    assert len(data) == TEMPLATE_BYTES
    back = FaceTemplate.from_bytes(data)
    assert back.model_sha256 == template.model_sha256 and back.image_count == 3
    assert back.alignment_version == ALIGNMENT_VERSION
    np.testing.assert_array_equal(back.vector, template.vector)


def test_corrupt_template_bytes_are_refused():
    data = bytearray(_template().to_bytes())
    with pytest.raises(TemplateMismatchError, match="bytes"):
        FaceTemplate.from_bytes(bytes(data[:-4]))
    data[0:4] = b"XXXX"
    with pytest.raises(TemplateMismatchError, match="not a face template"):
        FaceTemplate.from_bytes(bytes(data))
    data = bytearray(_template().to_bytes())
    data[-4:] = np.float32(np.nan).tobytes()
    with pytest.raises(TemplateMismatchError, match="corrupt"):
        FaceTemplate.from_bytes(bytes(data))


def test_a_template_of_another_model_or_alignment_is_refused_not_compared(models):
    _, embedder = models
    probe = embedder.embed(np.full((112, 112, 3), 128, np.uint8))
    with pytest.raises(TemplateMismatchError, match="re-enrol"):
        embedder.compare(_template(sha="cd" * 32), probe)
    current = _template(sha=embedder.model_sha256, alignment_version=ALIGNMENT_VERSION + 1)
    with pytest.raises(TemplateMismatchError, match="alignment version"):
        compare(current, probe, model_sha256=embedder.model_sha256)


def test_verdicts_follow_the_two_thresholds():
    assert DEFAULT_MISMATCH_THRESHOLD < DEFAULT_MATCH_THRESHOLD
    assert decide(DEFAULT_MATCH_THRESHOLD) is Verdict.MATCH
    assert decide(DEFAULT_MATCH_THRESHOLD - 0.01) is Verdict.UNSURE
    assert decide(DEFAULT_MISMATCH_THRESHOLD) is Verdict.UNSURE
    assert decide(DEFAULT_MISMATCH_THRESHOLD - 0.01) is Verdict.MISMATCH
    assert decide(float("nan")) is Verdict.UNSURE  # never a match, never grounds to retain
    with pytest.raises(ValueError, match="must be below"):
        decide(0.3, match_threshold=0.2, mismatch_threshold=0.4)
