"""Where the central password comes from: a 0600 file or the systemd credential, never the config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from atmguard.config import load_settings, settings_from_mapping
from atmguard.store.credentials import CredentialError, central_password, read_secret

SECRET = "s3cr3t-Pa55word"


def _file(path: Path, content: str, mode: int = 0o600) -> Path:
    path.write_text(content)
    os.chmod(path, mode)
    return path


def test_password_file_is_read_without_its_trailing_newline(tmp_path: Path):
    pw = _file(tmp_path / "pw", SECRET + "\n")
    settings = settings_from_mapping({"central": {"password_file": str(pw)}})
    assert central_password(settings, environ={}) == SECRET


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o620])
def test_group_or_world_accessible_password_file_is_refused(tmp_path: Path, mode: int):
    pw = _file(tmp_path / "pw", SECRET, mode)
    settings = settings_from_mapping({"central": {"password_file": str(pw)}})
    with pytest.raises(CredentialError) as info:
        central_password(settings, environ={})
    message = str(info.value)
    assert f"chmod 600 {pw}" in message
    assert SECRET not in message


def test_missing_and_empty_password_files_are_clear_errors(tmp_path: Path):
    missing = settings_from_mapping({"central": {"password_file": str(tmp_path / "nope")}})
    with pytest.raises(CredentialError, match="does not exist"):
        central_password(missing, environ={})
    empty = settings_from_mapping({"central": {"password_file": str(_file(tmp_path / "empty", "\n"))}})
    with pytest.raises(CredentialError, match="is empty"):
        central_password(empty, environ={})


def test_systemd_credential_is_used_when_no_file_is_configured(tmp_path: Path):
    creds = tmp_path / "creds"
    creds.mkdir()
    _file(creds / "central-password", SECRET, 0o400)
    settings = settings_from_mapping({})
    assert central_password(settings, environ={"CREDENTIALS_DIRECTORY": str(creds)}) == SECRET


def test_no_file_and_no_credentials_directory_explains_both_ways(tmp_path: Path):
    with pytest.raises(CredentialError) as info:
        central_password(settings_from_mapping({}), environ={})
    assert "LoadCredential=central-password" in str(info.value)
    assert "CREDENTIALS_DIRECTORY" in str(info.value)


def test_credential_name_cannot_escape_the_credentials_directory(tmp_path: Path):
    _file(tmp_path / "elsewhere", SECRET)
    with pytest.raises(CredentialError, match="plain file name"):
        read_secret(
            credential="../elsewhere", what="x", environ={"CREDENTIALS_DIRECTORY": str(tmp_path / "d")}
        )


def test_relative_password_file_is_resolved_next_to_the_config_file(tmp_path: Path):
    _file(tmp_path / "central.pw", SECRET)
    config = tmp_path / "atmguard.toml"
    config.write_text('[central]\npassword_file = "central.pw"\n')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        assert central_password(load_settings(config), environ={}) == SECRET
    finally:
        os.chdir(cwd)


def test_importing_the_central_modules_loads_no_database_driver():
    code = (
        "import sys, atmguard.store.central, atmguard.store.migrate, atmguard.store.credentials, "
        "atmguard.cli.db_cmd; print('pymysql' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"
