"""Every shipped model must load and agree in tflite-runtime 2.14, the fallback for 32-bit Pi OS.

A model converted by a recent TensorFlow may use operator versions tflite-runtime 2.14 cannot
load, and it needs numpy < 2, so it runs in its own venv (.venv-tflite, made by `make test`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from atmguard.vision.models import load_manifest
from atmguard.vision.runtime import load_interpreter

REPO = Path(__file__).resolve().parents[1]
FALLBACK_PYTHON = REPO / ".venv-tflite" / "bin" / "python"
MODELS_DIR = REPO / "firmware_models"

SCRIPT = """
import json, sys
import numpy as np
from tflite_runtime.interpreter import Interpreter
model_path, input_path = sys.argv[1], sys.argv[2]
interpreter = Interpreter(model_path=model_path, num_threads=1)
interpreter.allocate_tensors()
interpreter.set_tensor(interpreter.get_input_details()[0]["index"], np.load(input_path))
interpreter.invoke()
outputs = [interpreter.get_tensor(o["index"]).astype(float).ravel().tolist() for o in interpreter.get_output_details()]
print(json.dumps(outputs))
"""


def _random_input(detail: dict, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if detail["dtype"] == np.uint8:
        return rng.integers(0, 256, size=detail["shape"], dtype=np.uint8)
    return rng.uniform(-1, 1, size=detail["shape"]).astype(detail["dtype"])


def _fallback_outputs(model_path: Path, input_path: Path) -> list[np.ndarray]:
    result = subprocess.run(
        [str(FALLBACK_PYTHON), "-c", SCRIPT, str(model_path), str(input_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return [np.array(values) for values in json.loads(result.stdout.strip().splitlines()[-1])]


@pytest.mark.skipif(
    sys.version_info[:2] > (3, 11), reason="tflite-runtime 2.14 has no wheel for this Python (3.8-3.11 only)"
)
@pytest.mark.parametrize("role", ["face_detector", "covering_classifier", "face_embedder"])
def test_shipped_model_runs_the_same_in_tflite_runtime(role: str, tmp_path: Path):
    assert FALLBACK_PYTHON.exists(), (
        "run `make test`: it creates .venv-tflite with tflite-runtime and numpy<2"
    )
    spec = load_manifest(MODELS_DIR)[role]
    interpreter = load_interpreter(spec.path)
    detail = interpreter.get_input_details()[0]
    for seed in (0, 1):
        data = _random_input(detail, seed)
        np.save(tmp_path / "input.npy", data)
        fallback = _fallback_outputs(spec.path, tmp_path / "input.npy")
        interpreter.set_tensor(detail["index"], data)
        interpreter.invoke()
        primary = [
            interpreter.get_tensor(o["index"]).astype(float).ravel() for o in interpreter.get_output_details()
        ]
        assert len(fallback) == len(primary)
        for got, expected in zip(fallback, primary, strict=True):
            if role == "face_embedder":
                # Activations are quantised at run time by each runtime's own kernels: the embedding's
                # direction is what matching uses, so compare by cosine.
                cosine = float(got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected)))
                assert cosine >= 0.98, cosine
                continue
            # int8 outputs may differ by one quantisation step between kernels; floats by rounding.
            tolerance = (
                1.0 if role == "covering_classifier" else 1e-2 * max(1.0, float(np.abs(expected).max()))
            )
            assert np.abs(got - expected).max() <= tolerance
