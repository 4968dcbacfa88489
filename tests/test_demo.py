"""`make demo` is the newcomer's first contact: it runs scenarios on the daemon and writes a report."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from atmguard.cli import demo
from atmguard.harness import scenario


def test_demo_prints_the_summary_and_writes_a_report_with_evidence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two scenarios of the library (tests/test_scenarios.py runs all of it): the demo's wiring is tested here.
    chosen = [path for path in scenario.library() if path.stem in ("01_approved", "05_hot_listed")]
    monkeypatch.setattr(scenario, "library", lambda: chosen)
    assert demo.run_demo(out_dir=str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "central server: throwaway MariaDB" in out
    assert re.search(r"01_approved\s+PASSED\s+approve\s+approved\s+[\d.]+\s+[\d.]+", out), out
    assert re.search(r"05_hot_listed\s+PASSED\s+retain\s+hot_listed", out), out
    assert "2 passed, 0 failed, 0 skipped" in out
    report = (tmp_path / "report.html").read_text()
    assert report.count("data:image/jpeg;base64,") >= 2  # frames opened with the demo's bank key
    assert "476173******" in out and re.search(r"\d{13,19}", out) is None
