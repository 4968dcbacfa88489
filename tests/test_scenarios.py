"""The scenario harness, tested on itself: the shipped library passes against the real daemon, a
wrong expectation fails and says which, a broken file is refused, and the journal-only path runs.

The library run starts its own throwaway MariaDB (a scenario stops it, so it cannot be the shared
test server) and real ``atmguard run`` processes on simulated hardware.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atmguard.datasets import REPO_ROOT
from atmguard.harness.report import summary_table, write_html_report
from atmguard.harness.runner import ScenarioResult, ScenarioRunner
from atmguard.harness.scenario import ScenarioError, library, load_scenario
from atmguard.harness.scenes import build_scene_dir

LIBRARY = library()

WRONG_EXPECTATION = """
[scenario]
title = "A hot-listed card, wrongly expected to be approved"

[cards.stolen]
status = "hot_listed"

[[step]]
insert = "stolen"
[[step]]
wait_decision = true

[expect]
outcome = "approve"
prompts = ["Approved"]
"""


@dataclass
class LibraryRun:
    results: dict[str, ScenarioResult]
    report: Path
    output: str


@pytest.fixture(scope="module")
def library_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibraryRun]:
    work = tmp_path_factory.mktemp("scenarios")
    wrong = work / "wrong_expectation.toml"
    wrong.write_text(WRONG_EXPECTATION)
    scenarios = [(path, load_scenario(path)) for path in [*LIBRARY, wrong]]
    lines: list[str] = []
    with ScenarioRunner(work / "run", echo=lines.append) as runner:
        assert runner.has_central, runner.central_note
        results = runner.run_all(scenarios)
        report = write_html_report(results, work / "report.html", title="test", notes=[runner.central_note])
        yield LibraryRun({result.path.stem: result for result in results}, report, "\n".join(lines))


def test_the_library_covers_every_decision_reason_the_harness_can_cause() -> None:
    reasons = {load_scenario(path).expect.reason for path in LIBRARY}
    # evidence_failed (the journal refuses a snapshot), card_removed (pulled out mid-session),
    # not_enrolled (verification.require_template) and out_of_service at insertion are
    # machine-tested only (tests/test_session_machine.py).
    assert reasons >= {
        "approved",
        "card_unreadable",
        "card_invalid",
        "card_expired",
        "card_closed",
        "unknown_card",
        "hot_listed",
        "pin_attempts_exhausted",
        "pin_cancelled",
        "pin_timeout",
        "face_covered",
        "no_face",
        "bank_unavailable",
        "session_timeout",
        "out_of_service",
        "shutdown",
        "face_mismatch",
        "face_unverified",
    }


@pytest.mark.parametrize("path", LIBRARY, ids=[path.stem for path in LIBRARY])
def test_library_scenario_passes(library_run: LibraryRun, path: Path) -> None:
    result = library_run.results[path.stem]
    assert result.passed, "\n".join([*result.failures, *result.timeline])
    expect = load_scenario(path).expect
    assert (result.outcome, result.reason) == (expect.outcome, expect.reason)


def test_a_wrong_expectation_fails_and_says_which(library_run: LibraryRun) -> None:
    result = library_run.results["wrong_expectation"]
    assert result.status == "failed"
    assert "outcome: expected approve, got retain" in result.failures
    assert any(failure.startswith("prompt 'Approved' not shown") for failure in result.failures)
    assert "FAILED" in summary_table([result])


def test_the_report_shows_decisions_and_opened_evidence(library_run: LibraryRun) -> None:
    text = library_run.report.read_text()
    assert "01_approved" in text and "hot_listed" in text
    # The hot-listed card's fraud snapshot, decrypted with the run's bank key, is in the page.
    assert "data:image/jpeg;base64,/9j/" in text and "fraud evidence" in text
    assert "cannot open" not in text


def test_no_pin_and_no_full_pan_in_the_output(library_run: LibraryRun) -> None:
    assert "739184" not in library_run.output  # the library's PIN
    assert "476173******" in library_run.output
    assert re.search(r"\d{13,19}", library_run.output) is None, "a full PAN in the harness output"
    for result in library_run.results.values():
        assert "739184" not in "\n".join(result.timeline)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[scenario]\ntitle = 'x'\n[[step]]\nwait_s = 1\nshow = 'covered'\n", "exactly one action"),
        ("[scenario]\ntitle = 'x'\n[[step]]\n", "exactly one action"),
        ("[scenario]\ntitle = 'x'\n[[step]]\ninsert = 'bob'\n", "names card 'bob'"),
        ("[scenario]\ntitle = 'x'\n[[step]]\nshow = 'a'\n[expect]\noutcome = 'maybe'\n", "expect.outcome"),
        ("[scenario]\ntitle = 'x'\n[[step]]\nshwo = 'a'\n", "step 1: shwo"),
        ("[scenario]\ntitle = 'x'\n[cards.a]\npin = '12'\n[[step]]\nshow = 'a'\n", "cards.a.pin"),
        ("[scenario\n", "not valid TOML"),
    ],
)
def test_a_broken_scenario_file_is_refused_with_its_key_path(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    assert any(problem in issue for issue in caught.value.issues), caught.value.issues


def test_simulate_refuses_a_broken_file_before_starting_anything(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[scenario]\ntitle = 'x'\n[[step]]\ninsert = 'nobody_defined'\n")
    run = subprocess.run(
        [sys.executable, "-m", "atmguard", "simulate", str(path)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 65
    assert "not a valid scenario" in run.stderr and "names card 'nobody_defined'" in run.stderr


def test_without_a_central_server_bank_scenarios_are_skipped_and_the_rest_run(tmp_path: Path) -> None:
    chosen = [path for path in LIBRARY if path.stem in ("01_approved", "14_card_expired")]
    lines: list[str] = []
    with ScenarioRunner(tmp_path, central=False, echo=lines.append) as runner:
        results = runner.run_all([(path, load_scenario(path)) for path in chosen])
    assert "journal only" in runner.central_note
    by_name = {result.path.stem: result for result in results}
    assert by_name["01_approved"].status == "skipped"
    assert by_name["14_card_expired"].passed, by_name["14_card_expired"].failures


def test_fallback_scenes_without_datasets_are_seen_as_covered_and_uncovered(tmp_path: Path) -> None:
    from atmguard.config import settings_from_mapping
    from atmguard.vision.covering import CoveringClassifier
    from atmguard.vision.detector import FaceDetector

    source = build_scene_dir(tmp_path / "scenes", datasets=tmp_path / "no-datasets-here")
    assert source.name == "fallback portrait" and "public domain" in source.detail
    settings = settings_from_mapping(
        {"paths": {"models_dir": str(REPO_ROOT / "firmware_models")}}, source="test"
    )
    detector, covering = FaceDetector.from_settings(settings), CoveringClassifier.from_settings(settings)
    verdicts = {}
    for scene in ("uncovered", "covered", "two_faces"):
        (image,) = sorted((tmp_path / "scenes" / scene).iterdir())
        rgb = np.asarray(Image.open(image).convert("RGB"))
        faces = detector.detect(rgb)
        verdicts[scene] = [covering.covered_probability(rgb, face) for face in faces]
    detector.close()
    covering.close()
    threshold = settings.vision.covered_threshold
    assert len(verdicts["uncovered"]) == 1 and verdicts["uncovered"][0] < threshold
    assert len(verdicts["covered"]) == 1 and verdicts["covered"][0] > threshold
    assert len(verdicts["two_faces"]) == 2 and max(verdicts["two_faces"]) < threshold
