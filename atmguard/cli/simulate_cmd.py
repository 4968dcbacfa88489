"""`atmguard simulate`: run scenario files against the real daemon on simulated hardware."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from atmguard.cli.common import EX_DATAERR, EX_OK

if TYPE_CHECKING:
    from atmguard.harness.runner import ScenarioResult
    from atmguard.harness.scenario import Scenario

EX_FAILED = 1


def register(commands: argparse._SubParsersAction) -> None:
    simulate = commands.add_parser(
        "simulate",
        help="run scenario files against the daemon on simulated hardware; exit 1 if an expectation fails",
        description=(
            "Starts `atmguard run` on simulated hardware (card reader emulator on a pty, MockFactory keypad "
            "and actuator, a scene-switching camera) with a throwaway MariaDB as the bank, plays each "
            "scenario's timeline and checks its expectations. Without files it runs the shipped scenario "
            "library. The scenario format: atmguard/harness/scenarios/README.md."
        ),
    )
    simulate.add_argument("scenarios", nargs="*", type=Path, metavar="SCENARIO.toml")
    simulate.add_argument(
        "--report",
        type=Path,
        metavar="FILE.html",
        help="also write an HTML report with the evidence snapshots",
    )
    simulate.add_argument(
        "--no-central", action="store_true", help="run without a central server (journal only)"
    )
    simulate.add_argument(
        "--work-dir", type=Path, help="keep the daemons' files here (default: a temporary directory)"
    )
    simulate.set_defaults(handler=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    from atmguard.harness.scenario import ScenarioError, library, load_scenario

    paths = args.scenarios or library()
    try:
        scenarios = [(path, load_scenario(path)) for path in paths]
    except ScenarioError as exc:
        print(f"{exc.path}: not a valid scenario:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EX_DATAERR
    results = run_scenarios(
        scenarios,
        work_dir=args.work_dir,
        central=not args.no_central,
        report=args.report,
        title="atmguard simulate",
    )
    return EX_OK if all(result.status != "failed" for result in results) else EX_FAILED


def run_scenarios(
    scenarios: Sequence[tuple[Path, Scenario]],
    *,
    work_dir: Path | None,
    central: bool,
    report: Path | None,
    title: str,
) -> list[ScenarioResult]:
    """Run, print the summary table, write the report; the results (shared with `atmguard demo`)."""
    from atmguard.harness.report import summary_table, write_html_report
    from atmguard.harness.runner import ScenarioRunner

    with (
        tempfile.TemporaryDirectory(prefix="atmguard-sim-") as scratch,
        ScenarioRunner(work_dir or Path(scratch)) as runner,
    ):
        print(runner.central_note, flush=True)
        results = runner.run_all(scenarios)
        print(f"\n{summary_table(results)} in {runner.elapsed_s():.0f} s")
        if report is not None:
            # Written while the throwaway bank's private key still exists: it opens the evidence.
            written = write_html_report(results, report, title=title, notes=[runner.central_note])
            print(f"report: {written}")
    return results
