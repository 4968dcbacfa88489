"""`atmguard demo` (`make demo`): the scenario library against the real daemon, in one command.

Every scenario of ``atmguard/harness/scenarios/`` runs on simulated hardware with the harness's
embedded configuration: a throwaway MariaDB as the bank's central server when one can be started
(otherwise journal only, and the scenarios that need the bank are reported as skipped), camera
scenes from ``../shared/datasets`` (``$ATMGUARD_DATASETS``) or, without it, a public-domain
portrait with a mask drawn on. It prints the timeline and a summary table, and writes an HTML
report in which the sealed evidence snapshots are opened with the run's throwaway bank key.
"""

from __future__ import annotations

from pathlib import Path

from atmguard.cli.common import EX_OK

EX_FAILED = 1


def run_demo(*, out_dir: str = "out/demo") -> int:
    from atmguard.cli.simulate_cmd import run_scenarios
    from atmguard.harness.scenario import library, load_scenario

    print("atmguard demo: the scenario library against `atmguard run` on simulated hardware\n", flush=True)
    scenarios = [(path, load_scenario(path)) for path in library()]
    report = Path(out_dir) / "report.html"
    results = run_scenarios(scenarios, work_dir=None, central=True, report=report, title="atmguard demo")
    print(f"open {report.resolve()} to see what the ATM saw")
    return EX_OK if all(result.status != "failed" for result in results) else EX_FAILED
