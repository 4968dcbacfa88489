from __future__ import annotations

from pathlib import Path

import pytest

from atmguard.datasets import shared_datasets_dir

# Throwaway MariaDB servers (plain and TLS) and a migrated central database, and the sim camera's
# scene photos, for any test module.
pytest_plugins = ["conftest_mariadb", "sim_support"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = shared_datasets_dir()


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT
