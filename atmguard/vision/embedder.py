"""Face embeddings, enrolment templates and the MATCH / MISMATCH / UNSURE verdict.

The model (manifest role ``face_embedder``) is SFace converted to TFLite at ``make models`` time
(``firmware_models/sface_tflite.py``; model card ``firmware_models/MODEL_CARD_face_embedder.md``).
It maps a 112x112 RGB crop from :func:`atmguard.vision.align.align_face` to 128 numbers; we keep
them L2-normalised, so the cosine similarity of two faces is a dot product in [-1, 1].

How the parts fit (the lead's session code uses exactly these):

* ``FaceEmbedder.embed(aligned)`` -> unit float32 vector (128,);
* ``FaceTemplate.from_embeddings(vectors, model_sha256=...)`` -> the enrolment template (mean of the
  unit vectors, renormalised), ``to_bytes()`` / ``from_bytes()`` for the central database;
* ``compare(template, embedding, model_sha256=...)`` -> cosine score; it refuses (raises
  :class:`TemplateMismatchError`) a template made by another model file or alignment version,
  because scores across models mean nothing and a silent comparison could retain a genuine card;
* ``decide(score)`` -> :class:`Verdict`, with the two thresholds below. Several frames of one
  customer are combined with :func:`mean_embedding` before comparing (steadier than one frame).
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Any, Self

import numpy as np

from atmguard.config import Settings
from atmguard.errors import AtmguardError
from atmguard.vision.align import ALIGNMENT_VERSION, CROP_SIZE, AlignedFace
from atmguard.vision.models import TfliteModel, sha256_file
from atmguard.vision.runtime import ModelError

logger = logging.getLogger(__name__)

ROLE = "face_embedder"
EMBEDDING_SIZE = 128

DEFAULT_MATCH_THRESHOLD = 0.54
"""Cosine score at or above which the live face MATCHes the account's template: the calibration
persons' impostor 99.9% quantile (FAR 0.1%) with a margin for unseen persons, the stricter of
image pairs and template-vs-image (``atmguard model eval-identity DIR --calibrate``, seed 20261124;
the model card has the figures)."""
DEFAULT_MISMATCH_THRESHOLD = -0.10
"""Cosine score below which the live face is a MISMATCH (retain the card, alert): the hardest
source's genuine 0.1% tail on the calibration persons, minus a 0.10 margin for unseen persons.
Retaining a genuine customer's card is the failure to avoid, so MISMATCH needs strong evidence:
most impostors score between the thresholds and are UNSURE (denied, card returned)."""


class TemplateMismatchError(AtmguardError, ValueError):
    """A template was made by another model or alignment version (or is corrupt): not comparable."""


class Verdict(StrEnum):
    MATCH = "match"
    MISMATCH = "mismatch"
    UNSURE = "unsure"


def decide(
    score: float,
    *,
    match_threshold: float = DEFAULT_MATCH_THRESHOLD,
    mismatch_threshold: float = DEFAULT_MISMATCH_THRESHOLD,
) -> Verdict:
    """MATCH at/above ``match_threshold``, MISMATCH below ``mismatch_threshold``, else UNSURE.

    A NaN score is UNSURE: never a match (fail closed), never grounds to retain a card.
    """
    if not mismatch_threshold < match_threshold:
        raise ValueError(
            f"mismatch_threshold ({mismatch_threshold}) must be below match_threshold ({match_threshold})"
        )
    if math.isnan(score):
        return Verdict.UNSURE
    if score >= match_threshold:
        return Verdict.MATCH
    if score < mismatch_threshold:
        return Verdict.MISMATCH
    return Verdict.UNSURE


def _unit(vector: np.ndarray) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    if v.shape != (EMBEDDING_SIZE,):
        raise ValueError(f"expected an embedding of {EMBEDDING_SIZE} values, got shape {np.shape(vector)}")
    norm = float(np.linalg.norm(v))
    if not math.isfinite(norm) or norm < 1e-6:
        raise ValueError("embedding is zero or not finite")
    return (v / norm).astype(np.float32)


def mean_embedding(embeddings: Iterable[np.ndarray]) -> np.ndarray:
    """The renormalised mean of unit embeddings (several frames or enrolment images of one face)."""
    vectors = [_unit(e) for e in embeddings]
    if not vectors:
        raise ValueError("need at least one embedding")
    return _unit(np.mean(vectors, axis=0))


_MAGIC = b"AGFT"
_FORMAT = 1
_HEADER = struct.Struct("<4sBHH32s")  # magic, format, alignment version, image count, model sha256
TEMPLATE_BYTES = _HEADER.size + 4 * EMBEDDING_SIZE


@dataclass(frozen=True, eq=False)
class FaceTemplate:
    """An enrolled face: the unit mean embedding, and which model and alignment produced it."""

    vector: np.ndarray
    model_sha256: str
    alignment_version: int
    image_count: int

    def __post_init__(self) -> None:
        vector = _unit(self.vector)
        vector.flags.writeable = False
        object.__setattr__(self, "vector", vector)
        if len(self.model_sha256) != 64 or any(c not in "0123456789abcdef" for c in self.model_sha256):
            raise ValueError(f"model_sha256 must be 64 lowercase hex digits, got {self.model_sha256!r}")
        if not 0 < self.alignment_version < 1 << 16 or not 0 < self.image_count < 1 << 16:
            raise ValueError("alignment_version and image_count must be in 1..65535")

    @classmethod
    def from_embeddings(
        cls,
        embeddings: Iterable[np.ndarray],
        *,
        model_sha256: str,
        alignment_version: int = ALIGNMENT_VERSION,
    ) -> Self:
        vectors = list(embeddings)
        return cls(
            vector=mean_embedding(vectors),
            model_sha256=model_sha256,
            alignment_version=alignment_version,
            image_count=len(vectors),
        )

    def to_bytes(self) -> bytes:
        """A fixed-size little-endian record (``TEMPLATE_BYTES`` long) for the central database."""
        header = _HEADER.pack(
            _MAGIC, _FORMAT, self.alignment_version, self.image_count, bytes.fromhex(self.model_sha256)
        )
        return header + self.vector.astype("<f4").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Parse :meth:`to_bytes` output; TemplateMismatchError when it is not a valid template record."""
        if len(data) != TEMPLATE_BYTES:
            raise TemplateMismatchError(f"face template must be {TEMPLATE_BYTES} bytes, got {len(data)}")
        magic, fmt, alignment_version, count, sha = _HEADER.unpack_from(data)
        if magic != _MAGIC or fmt != _FORMAT:
            raise TemplateMismatchError(f"not a face template record (magic {magic!r}, format {fmt})")
        vector = np.frombuffer(data, dtype="<f4", offset=_HEADER.size).astype(np.float32)
        if not np.isfinite(vector).all() or abs(float(np.linalg.norm(vector)) - 1.0) > 1e-3:
            raise TemplateMismatchError("face template vector is corrupt (not a finite unit vector)")
        try:
            return cls(
                vector=vector, model_sha256=sha.hex(), alignment_version=alignment_version, image_count=count
            )
        except ValueError as exc:
            raise TemplateMismatchError(f"face template is corrupt: {exc}") from None


def check_compatible(
    template: FaceTemplate, *, model_sha256: str, alignment_version: int = ALIGNMENT_VERSION
) -> None:
    """Raise TemplateMismatchError unless ``template`` was made by this model file and alignment."""
    if template.model_sha256 != model_sha256.lower():
        raise TemplateMismatchError(
            f"face template was made by model {template.model_sha256[:12]}…, this is {model_sha256[:12]}…: "
            "re-enrol the customer with the current model"
        )
    if template.alignment_version != alignment_version:
        raise TemplateMismatchError(
            f"face template uses alignment version {template.alignment_version}, this is {alignment_version}: "
            "re-enrol the customer"
        )


def compare(
    template: FaceTemplate,
    embedding: np.ndarray,
    *,
    model_sha256: str,
    alignment_version: int = ALIGNMENT_VERSION,
) -> float:
    """Cosine score of a unit ``embedding`` (one frame, or :func:`mean_embedding` of several) against
    ``template``; refuses a template of another model or alignment version."""
    check_compatible(template, model_sha256=model_sha256, alignment_version=alignment_version)
    return float(np.clip(template.vector @ _unit(embedding), -1.0, 1.0))


class FaceEmbedder(TfliteModel):
    """SFace over a TFLite interpreter; ``embed()`` opens the model on first use."""

    ROLE = ROLE

    last_ms: float = 0.0
    """Wall time of the last embed() (input conversion, inference, normalisation)."""

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> Self:
        """The manifest's ``face_embedder`` model in ``paths.models_dir`` (sha256 checked at open)."""
        return cls._from_manifest(settings, {"num_threads": settings.vision.num_threads}, overrides)

    @cached_property
    def model_sha256(self) -> str:
        """The sha256 of the model file: the identity templates are tied to."""
        # Without a pinned digest (a model given by path): hash the file once, the same bytes we load.
        return self.expected_sha256 or sha256_file(self.model_path)

    def _bind_tensors(self, interpreter: Any) -> None:
        inputs = interpreter.get_input_details()
        outputs = interpreter.get_output_details()
        expected = (1, CROP_SIZE, CROP_SIZE, 3)
        if (
            len(inputs) != 1
            or tuple(int(d) for d in inputs[0]["shape"]) != expected
            or np.dtype(inputs[0]["dtype"]) != np.float32
        ):
            found = [(tuple(int(d) for d in i["shape"]), np.dtype(i["dtype"]).name) for i in inputs]
            raise ModelError(
                f"{self.model_path}: not a face embedder: inputs {found}, want {expected} float32"
            )
        if len(outputs) != 1 or tuple(int(d) for d in outputs[0]["shape"]) != (1, EMBEDDING_SIZE):
            found = [tuple(int(d) for d in o["shape"]) for o in outputs]
            raise ModelError(f"{self.model_path}: not a face embedder: outputs {found}")
        self._input_index = inputs[0]["index"]
        self._output_index = outputs[0]["index"]
        self._input = np.empty(expected, dtype=np.float32)

    def embed(self, aligned: AlignedFace | np.ndarray) -> np.ndarray:
        """The unit float32 embedding (128,) of a 112x112x3 uint8 RGB aligned crop (or AlignedFace).

        Embedding a face the quality gates rejected is allowed (enrolment reports use it), but the
        caller decides; ModelError if inference fails or returns nothing usable.
        """
        crop = aligned.crop if isinstance(aligned, AlignedFace) else np.asarray(aligned)
        if crop.shape != (CROP_SIZE, CROP_SIZE, 3) or crop.dtype != np.uint8:
            raise ValueError(
                f"expected a {CROP_SIZE}x{CROP_SIZE}x3 uint8 aligned crop, got {crop.shape} {crop.dtype}"
            )
        with self._lock:
            self._open_locked()
            t0 = self._clock()
            self._input[0] = crop  # raw 0..255 RGB: the model normalises (see the model card)
            try:
                self._interpreter.set_tensor(self._input_index, self._input)
                self._interpreter.invoke()
                raw = self._interpreter.get_tensor(self._output_index)[0]
                vector = _unit(raw)
            except (RuntimeError, ValueError) as exc:
                raise ModelError(f"{ROLE}: inference failed: {exc}") from exc
            self.last_ms = (self._clock() - t0) * 1e3
        return vector

    def compare(self, template: FaceTemplate, embedding: np.ndarray) -> float:
        """:func:`compare` with this model's sha256."""
        return compare(template, embedding, model_sha256=self.model_sha256)

    def template(self, embeddings: Iterable[np.ndarray]) -> FaceTemplate:
        """A :class:`FaceTemplate` of this model from unit embeddings of accepted images."""
        return FaceTemplate.from_embeddings(embeddings, model_sha256=self.model_sha256)
