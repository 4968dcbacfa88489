"""The ATM side of face verification: the real embedder on real photos, frame by frame."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atmguard.config import settings_from_mapping
from atmguard.datasets import REPO_ROOT, shared_datasets_dir
from atmguard.session.events import FaceVerified, IdentityVerdict
from atmguard.session.identity import IdentityVerifier
from atmguard.vision.detector import FaceDetector
from atmguard.vision.embedder import (
    DEFAULT_MATCH_THRESHOLD,
    DEFAULT_MISMATCH_THRESHOLD,
    FaceEmbedder,
    FaceTemplate,
)
from atmguard.vision.enrol import build_template

IDENTITY = shared_datasets_dir() / "faces-identity"
pytestmark = pytest.mark.skipif(not IDENTITY.is_dir(), reason=f"{IDENTITY} is absent")
SETTINGS = settings_from_mapping({"paths": {"models_dir": str(REPO_ROOT / "firmware_models")}})


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def models() -> Iterator[tuple[FaceDetector, FaceEmbedder]]:
    with FaceDetector.from_settings(SETTINGS) as detector, FaceEmbedder.from_settings(SETTINGS) as embedder:
        yield detector, embedder


def photos(person: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted((IDENTITY / person).glob("*.jpg"))]


def template_of(person: str, models: tuple[FaceDetector, FaceEmbedder], tmp_path: Path) -> FaceTemplate:
    folder = tmp_path / person
    folder.mkdir()
    for image in sorted((IDENTITY / person).glob("*.jpg"))[3:]:  # the first three are the "live" frames
        (folder / image.name).symlink_to(image)
    enrolment = build_template(folder, detector=models[0], embedder=models[1])
    assert enrolment.template is not None
    return enrolment.template


def verify(
    verifier: IdentityVerifier, detector: FaceDetector, frames: list[np.ndarray]
) -> FaceVerified | None:
    for rgb in frames:
        answer = verifier.observe(rgb, detector.detect(rgb)[0], uncovered=True)
        if answer is not None:
            return answer
    return None


def make(embedder: FaceEmbedder, clock: Clock | None = None) -> IdentityVerifier:
    return IdentityVerifier(
        embedder,
        match_threshold=DEFAULT_MATCH_THRESHOLD,
        mismatch_threshold=DEFAULT_MISMATCH_THRESHOLD,
        frames_needed=3,
        timeout_s=4.0,
        clock=clock or Clock(),
    )


def test_the_holder_matches_and_another_person_does_not(models, tmp_path: Path) -> None:
    detector, embedder = models
    verifier = make(embedder)
    holder = template_of("orl_s03", models, tmp_path)
    verifier.request("s-1", [holder])
    answer = verify(verifier, detector, photos("orl_s03")[:3])
    assert answer is not None and answer.verdict is IdentityVerdict.MATCH and answer.session_id == "s-1"
    assert not verifier.busy
    verifier.request("s-2", [template_of("orl_s11", models, tmp_path)])
    answer = verify(verifier, detector, photos("orl_s09")[:3])
    assert answer is not None and answer.verdict is IdentityVerdict.MISMATCH, answer
    assert answer.score is not None and answer.score < DEFAULT_MISMATCH_THRESHOLD


def test_no_uncovered_face_in_time_is_unsure_never_a_match(models, tmp_path: Path) -> None:
    detector, embedder = models
    clock = Clock()
    verifier = make(embedder, clock)
    verifier.request("s-1", [template_of("orl_s03", models, tmp_path)])
    frame = photos("orl_s03")[0]
    face = detector.detect(frame)[0]
    for _ in range(5):  # a covered face is never embedded, however many frames pass
        assert verifier.observe(frame, face, uncovered=False) is None
    clock.now = 4.0
    assert verifier.observe(frame, face, uncovered=False) == FaceVerified("s-1", IdentityVerdict.UNSURE, None)


def test_templates_of_another_model_are_not_usable(models, tmp_path: Path) -> None:
    _, embedder = models
    verifier = make(embedder)
    good = template_of("orl_s05", models, tmp_path)
    other_model = FaceTemplate(good.vector, model_sha256="0" * 64, alignment_version=1, image_count=3)
    assert verifier.usable([]) == []
    assert verifier.usable([other_model.to_bytes()]) is None  # some, none usable: re-enrol
    assert len(verifier.usable([other_model.to_bytes(), good.to_bytes(), b"garbage"]) or []) == 1


def test_abort_answers_unsure_for_the_running_request(models) -> None:
    verifier = make(models[1])
    assert verifier.abort() is None
    verifier.request("s-9", [FaceTemplate(np.ones(128, np.float32), models[1].model_sha256, 1, 3)])
    assert verifier.abort() == FaceVerified("s-9", IdentityVerdict.UNSURE, None) and not verifier.busy
