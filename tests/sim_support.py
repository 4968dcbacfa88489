"""Shared by the tests that write an atmguard config for simulated hardware (diag and its tools)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from atmguard.harness.rig import toml_text
from atmguard.harness.scenes import SceneError, build_scene_dir


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    path.write_text(toml_text(sections))
    return path


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scene photos for the sim camera, built once per test module."""
    directory = tmp_path_factory.mktemp("scenes")
    try:
        build_scene_dir(directory)
    except SceneError as exc:
        # `make test` installs the fallback portrait (matplotlib, dev extra): this is a broken setup.
        pytest.fail(f"no face image for the sim camera: {exc}", pytrace=False)
    return directory
