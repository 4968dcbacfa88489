from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "atmguard.example.toml"


def _atmguard(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "atmguard", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_check_config_accepts_the_example():
    result = _atmguard("check-config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "ATM-0001" in result.stdout


def test_check_config_lists_every_error_and_exits_78(tmp_path: Path):
    bad = tmp_path / "atm.toml"
    bad.write_text('[atm]\nid = "x y"\n[card_reader]\nretries = 99\ncolour = 1\n')
    result = _atmguard("check-config", str(bad))
    assert result.returncode == 78
    lines = result.stderr.splitlines()
    assert f"{bad}: atm.id: String should match pattern '^[A-Za-z0-9._-]+$'" in lines
    assert any(line.startswith(f"{bad}: card_reader.retries:") for line in lines)
    assert f"{bad}: card_reader.colour: Extra inputs are not permitted" in lines
    assert lines[-1] == f"{bad}: INVALID (3 error(s))"


def test_check_config_takes_the_path_from_the_environment(tmp_path: Path):
    broken = tmp_path / "broken.toml"
    broken.write_text("not toml at all [")
    result = _atmguard("check-config", env={"ATMGUARD_CONFIG": str(broken)})
    assert result.returncode == 78
    assert "invalid TOML" in result.stderr
    assert (
        _atmguard("--config", str(EXAMPLE), "check-config", env={"ATMGUARD_CONFIG": str(broken)}).returncode
        == 0
    )


def test_no_command_prints_usage():
    result = _atmguard()
    assert result.returncode == 64
    assert "check-config" in result.stdout


def test_report_failures_turns_listed_errors_into_one_stderr_line_and_their_exit_code(capsys):
    from atmguard.cli.common import CommandFailed, report_failures
    from atmguard.errors import HardwareError, KeypadError

    def raising(exc: BaseException):
        def call() -> int:
            raise exc

        return call

    errors = [
        (KeypadError, 75, ""),
        (HardwareError, 77, "hardware: "),
        (KeyboardInterrupt, 130, "interrupted"),
    ]
    assert report_failures("atmguard x", lambda: 0, errors) == 0
    assert report_failures("atmguard x", raising(CommandFailed(66, "no such dir")), errors) == 66
    assert report_failures("atmguard x", raising(KeypadError("scan stopped")), errors) == 75  # first match
    assert report_failures("atmguard x", raising(HardwareError("gone")), errors) == 77
    assert report_failures("atmguard x", raising(KeyboardInterrupt()), errors) == 130
    assert capsys.readouterr().err.splitlines() == [
        "atmguard x: no such dir",
        "atmguard x: scan stopped",
        "atmguard x: hardware: gone",
        "atmguard x: interrupted",
    ]
    with pytest.raises(ValueError, match="not listed"):
        report_failures("atmguard x", raising(ValueError("not listed")), errors)
