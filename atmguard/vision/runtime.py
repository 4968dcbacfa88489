"""The one place that creates TFLite interpreters.

Three runtimes can run our models; which ones work depends on the Pi OS release (see
``../shared/MODELS.md``): ``ai_edge_litert`` (preferred: numpy 1 and 2, XNNPACK for int8),
``tflite_runtime`` (the only one on 32-bit Pi OS, but built against numpy 1.x: with numpy 2 it
imports and then fails when an interpreter is created, so it is skipped up front) and
``tensorflow.lite`` (a developer machine with TensorFlow). ``$ATMGUARD_TFLITE_RUNTIME`` names the
runtime(s) to use instead, comma-separated in order of preference; an explicit choice that cannot
be loaded is an error rather than a silent fallback, so a technician testing one runtime gets it.

Nothing is imported until an interpreter (or the runtime's name) is first asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atmguard.errors import AtmguardError

logger = logging.getLogger(__name__)

ENV_VAR = "ATMGUARD_TFLITE_RUNTIME"
DEFAULT_ORDER: tuple[str, ...] = ("ai_edge_litert", "tflite_runtime", "tensorflow")


class ModelError(AtmguardError, RuntimeError):
    """A model is missing, corrupt, fails verification or cannot be run: vision must fail closed."""


class RuntimeUnavailableError(ModelError):
    """No usable TFLite runtime (or not the one ``$ATMGUARD_TFLITE_RUNTIME`` asks for)."""


@dataclass(frozen=True)
class RuntimeInfo:
    """The chosen runtime: ``name`` is one of DEFAULT_ORDER, ``version`` its package version."""

    name: str
    version: str
    interpreter_class: Callable[..., Any]

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


def _numpy_major() -> int:
    import numpy

    return int(numpy.__version__.split(".", 1)[0])


def _load_ai_edge_litert() -> RuntimeInfo:
    from importlib.metadata import version

    from ai_edge_litert.interpreter import Interpreter

    return RuntimeInfo("ai_edge_litert", version("ai-edge-litert"), Interpreter)


def _load_tflite_runtime() -> RuntimeInfo:
    if importlib.util.find_spec("tflite_runtime") is None:
        raise ImportError("not installed")
    numpy_major = _numpy_major()
    if numpy_major >= 2:
        # Checked before importing: the import succeeds, the first Interpreter() dies with _ARRAY_API.
        import numpy

        raise ImportError(f"built for numpy 1.x, but numpy {numpy.__version__} is installed")
    from importlib.metadata import version

    from tflite_runtime.interpreter import Interpreter

    return RuntimeInfo("tflite_runtime", version("tflite-runtime"), Interpreter)


def _load_tensorflow() -> RuntimeInfo:
    if importlib.util.find_spec("tensorflow") is None:
        raise ImportError("not installed")
    import tensorflow

    return RuntimeInfo("tensorflow", str(tensorflow.__version__), tensorflow.lite.Interpreter)


_LOADERS: dict[str, Callable[[], RuntimeInfo]] = {
    "ai_edge_litert": _load_ai_edge_litert,
    "tflite_runtime": _load_tflite_runtime,
    "tensorflow": _load_tensorflow,
}
_cache: dict[tuple[str, ...], RuntimeInfo] = {}
_cache_lock = threading.Lock()


def requested_order(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The runtimes to try, in order: ``$ATMGUARD_TFLITE_RUNTIME`` if set, else DEFAULT_ORDER."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_VAR, "").strip()
    if not raw:
        return DEFAULT_ORDER
    names = tuple(name.strip().lower().replace("-", "_") for name in raw.split(",") if name.strip())
    unknown = [name for name in names if name not in _LOADERS]
    if unknown or not names:
        raise RuntimeUnavailableError(
            f"${ENV_VAR}={raw!r}: unknown runtime {', '.join(unknown) or raw!r} "
            f"(known: {', '.join(DEFAULT_ORDER)})"
        )
    return names


def runtime_info(*, environ: Mapping[str, str] | None = None) -> RuntimeInfo:
    """Choose (once per process and order) and return the TFLite runtime; log the choice once."""
    order = requested_order(environ)
    with _cache_lock:
        if order in _cache:
            return _cache[order]
        reasons = []
        for name in order:
            try:
                info = _LOADERS[name]()
            except Exception as exc:  # an ImportError, or a broken install raising anything at import
                reasons.append(f"{name}: {exc}")
                continue
            _cache[order] = info
            logger.info("TFLite runtime: %s %s", info.name, info.version)
            for reason in reasons:
                logger.info("TFLite runtime skipped: %s", reason)
            return info
    source = f"${ENV_VAR}" if order != DEFAULT_ORDER else "default order"
    raise RuntimeUnavailableError(
        f"no usable TFLite runtime ({source}: {', '.join(order)}): {'; '.join(reasons)}. "
        "Install ai-edge-litert (or tflite-runtime with numpy<2 on 32-bit Pi OS)."
    )


def load_interpreter(
    path: str | os.PathLike[str], *, num_threads: int = 1, environ: Mapping[str, str] | None = None
) -> Any:
    """A TFLite interpreter for ``path`` with tensors allocated.

    Raises ModelError when the file is missing or the runtime rejects it, RuntimeUnavailableError when
    no runtime can be loaded. The returned object has the tf.lite.Interpreter API.
    """
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")
    model = Path(path)
    if not model.is_file():
        raise ModelError(f"model file not found: {model} (run `make models`)")
    if model.stat().st_size == 0:
        raise ModelError(f"model file is empty: {model}")
    info = runtime_info(environ=environ)
    try:
        interpreter = info.interpreter_class(model_path=os.fspath(model), num_threads=num_threads)
        interpreter.allocate_tensors()
    except Exception as exc:  # the runtimes raise ValueError or RuntimeError, with C++ text
        raise ModelError(f"{model}: cannot be loaded by {info}: {exc}") from exc
    logger.debug("loaded %s with %s (%d thread(s))", model, info, num_threads)
    return interpreter
