"""`make demo` is the newcomer's first contact: it must run to the end on simulated hardware."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from atmguard.cli.demo import DATASETS, run_demo


def test_demo_runs_every_role_and_passes_its_checks(tmp_path: Path, capsys):
    assert run_demo(out_dir=str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "checks passed" in out and "FAILED" not in out
    # The PAN is shown masked only, and the PIN never appears.
    assert "476173******" in out
    assert "4321" not in out
    assert DATASETS.exists(), "the demo's camera scenes come from ../shared/datasets"
    assert "tracker UNCOVERED" in out and "tracker COVERED" in out and "tracker NO_FACE" in out
    assert Image.open(tmp_path / "camera_uncovered.png").size == (640, 360)
