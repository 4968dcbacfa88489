"""The model manifest: which file plays which role, and proof that it is the file we tested.

``manifest.json`` (in ``paths.models_dir``) pins each model's sha256 and size; a model is only
handed to a runtime after its bytes match, because a runtime happily loads a damaged model
whose weights were altered and then silently finds no faces (fail closed instead).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from atmguard.config import Settings, relative_to_config
from atmguard.lifecycle import Managed
from atmguard.vision.runtime import ModelError, load_interpreter

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SUPPORTED_SCHEMA = 1


@dataclass(frozen=True)
class ModelSpec:
    """One manifest entry; ``path`` is absolute (``file`` resolved against the models directory)."""

    role: str
    name: str
    path: Path
    sha256: str
    size_bytes: int
    input_shape: tuple[int, ...]
    input_dtype: str
    quantization: str
    license: str
    source: Mapping[str, Any] = field(default_factory=dict)


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(models_dir: str | os.PathLike[str]) -> dict[str, ModelSpec]:
    """Read ``<models_dir>/manifest.json``; return the specs by role."""
    root = Path(models_dir)
    path = root / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"model manifest not found: {path} (is paths.models_dir right?)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable model manifest: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SUPPORTED_SCHEMA:
        raise ModelError(
            f"{path}: unsupported manifest schema {data.get('schema') if isinstance(data, dict) else None!r}"
        )
    specs: dict[str, ModelSpec] = {}
    for i, entry in enumerate(data.get("models", [])):
        try:
            spec = ModelSpec(
                role=str(entry["role"]),
                name=str(entry.get("name", entry["role"])),
                path=(root / entry["file"]).resolve(),
                sha256=str(entry["sha256"]).lower(),
                size_bytes=int(entry["bytes"]),
                input_shape=tuple(int(d) for d in entry["input"]["shape"]),
                input_dtype=str(entry["input"]["dtype"]),
                quantization=str(entry.get("quantization", "")),
                license=str(entry["license"]),
                source=dict(entry.get("source", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{path}: models[{i}]: malformed entry ({exc!r})") from None
        if spec.role in specs:
            raise ModelError(f"{path}: models[{i}]: role {spec.role!r} listed twice")
        specs[spec.role] = spec
    return specs


def verify_file(role: str, path: Path, expected_sha256: str) -> Path:
    """Refuse a missing model file, or one whose sha256 is not the one the manifest pins."""
    if not path.is_file():
        raise ModelError(f"{role}: model file not found: {path} (run `make models`)")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ModelError(
            f"{role}: {path} sha256 mismatch: expected {expected_sha256}, actual {actual} "
            f"({path.stat().st_size} bytes); refusing to load it"
        )
    return path


def verify_model(spec: ModelSpec) -> Path:
    """Check the file's sha256 against the manifest; return its path."""
    return verify_file(spec.role, spec.path, spec.sha256)


def resolve_model(models_dir: str | os.PathLike[str], role: str, *, verify: bool = True) -> ModelSpec:
    """The manifest entry for ``role``, its file verified unless ``verify`` is False."""
    specs = load_manifest(models_dir)
    try:
        spec = specs[role]
    except KeyError:
        known = ", ".join(sorted(specs)) or "none"
        raise ModelError(
            f"no model for role {role!r} in {Path(models_dir) / MANIFEST_NAME} (roles: {known})"
        ) from None
    if verify:
        verify_model(spec)
        logger.debug("%s: %s verified (sha256 %s)", role, spec.path, spec.sha256[:12])
    return spec


def models_dir_from_settings(settings: Settings) -> Path:
    """``paths.models_dir``, relative paths resolved against the config file's directory."""
    return relative_to_config(settings, settings.paths.models_dir)


class TfliteModel(Managed):
    """One model file, verified against its pinned sha256 and loaded into one interpreter that the
    object owns for its whole life (never one per frame).

    The constructor reads nothing; ``open()`` verifies and loads and is idempotent; a closed model
    cannot be reopened. A lock makes concurrent calls safe, though one vision loop is the intended user.
    Subclasses name their manifest ``ROLE`` and check the interpreter's tensors in ``_bind_tensors``.
    """

    ROLE: ClassVar[str]

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        expected_sha256: str | None = None,
        num_threads: int = 1,
        interpreter_factory: Callable[..., Any] = load_interpreter,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")
        self.model_path = Path(model_path)
        self.expected_sha256 = expected_sha256.lower() if expected_sha256 else None
        self.num_threads = num_threads
        self._interpreter_factory = interpreter_factory
        self._clock = clock
        self._lock = threading.Lock()
        self._interpreter: Any = None
        self._closed = False

    @classmethod
    def _from_manifest(cls, settings: Settings, options: dict[str, Any], overrides: dict[str, Any]) -> Self:
        """The manifest's ``ROLE`` model in ``paths.models_dir`` (sha256 checked at open)."""
        spec = resolve_model(models_dir_from_settings(settings), cls.ROLE, verify=False)
        return cls(spec.path, expected_sha256=spec.sha256, **{**options, **overrides})

    def open(self) -> None:
        """Verify and load the model; idempotent. Raises ModelError."""
        with self._lock:
            self._open_locked()

    def _open_locked(self) -> None:
        if self._closed:
            raise ModelError(f"{type(self).__name__} is closed")
        if self._interpreter is not None:
            return
        if self.expected_sha256 is not None:
            verify_file(self.ROLE, self.model_path, self.expected_sha256)
        interpreter = self._interpreter_factory(self.model_path, num_threads=self.num_threads)
        self._bind_tensors(interpreter)
        self._interpreter = interpreter
        logger.info("%s ready: %s (%s)", self.ROLE, self.model_path.name, self._describe())

    def close(self) -> None:
        """Release the interpreter; idempotent."""
        with self._lock:
            self._interpreter = None
            self._closed = True

    def _describe(self) -> str:
        """Settings worth a line in the log when the model is loaded."""
        return f"{self.num_threads} thread(s)"

    @abstractmethod
    def _bind_tensors(self, interpreter: Any) -> None:
        """Check the interpreter's inputs and outputs are the expected model's; remember their indices."""
