"""Check results and the runner that bounds every check in time.

A check is a function returning one or more :class:`CheckResult` rows. The runner gives each its
own thread and waits at most the check's ``timeout_s`` (derived from the timeouts the part already
has in the config): a hung card reader or an unreachable database yields a FAIL row saying so, and
``atmguard diag`` still prints the rest of its table. An exception is a FAIL row, never a traceback.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


class Status(enum.StrEnum):
    PASS = "PASS"
    WARN = "WARN"
    """Works, but a technician should look (no face in view, clock not synchronised...)."""
    FAIL = "FAIL"
    """Broken: the ATM cannot serve safely until it is fixed."""
    SKIP = "SKIP"
    """Does not apply here (central disabled, no bin sensor, actuator not fired without --fire)."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One row of the table: what was checked, the verdict, what was measured, how to fix it."""

    name: str
    status: Status
    measured: str
    fix: str = ""
    area: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "area": self.area,
            "status": self.status.value,
            "measured": self.measured,
            "fix": self.fix,
            "seconds": round(self.seconds, 3),
        }


CheckFn = Callable[[], "CheckResult | Sequence[CheckResult]"]


@dataclass(frozen=True, slots=True)
class Check:
    """A check to run: ``run`` returns its row(s); ``timeout_s`` bounds it."""

    name: str
    area: str
    run: CheckFn
    timeout_s: float
    fix_on_timeout: str = ""


@dataclass
class _Outcome:
    rows: list[CheckResult] = field(default_factory=list)
    error: BaseException | None = None


def _call(check: Check, outcome: _Outcome) -> None:
    try:
        result = check.run()
        outcome.rows = [result] if isinstance(result, CheckResult) else list(result)
    except BaseException as exc:  # reported as a FAIL row; a check must never end the command
        outcome.error = exc


def run_check(check: Check) -> list[CheckResult]:
    """Run one check on its own thread, at most ``timeout_s``; always returns at least one row."""
    outcome = _Outcome()
    started = time.monotonic()
    thread = threading.Thread(target=_call, args=(check, outcome), name=f"diag-{check.area}", daemon=True)
    thread.start()
    thread.join(check.timeout_s)
    seconds = time.monotonic() - started
    if thread.is_alive():
        # The thread is left behind (daemon): a wedged driver call cannot be interrupted, but the
        # table goes on and the process exits when the command ends.
        logger.warning("diag check %s still running after %.1f s", check.name, check.timeout_s)
        return [
            CheckResult(
                check.name,
                Status.FAIL,
                f"no result within {check.timeout_s:.1f} s (hung)",
                check.fix_on_timeout,
                check.area,
                seconds,
            )
        ]
    if outcome.error is not None:
        exc = outcome.error
        logger.debug("diag check %s raised", check.name, exc_info=exc)
        return [
            CheckResult(
                check.name,
                Status.FAIL,
                f"{type(exc).__name__}: {exc}",
                check.fix_on_timeout,
                check.area,
                seconds,
            )
        ]
    rows = outcome.rows or [
        CheckResult(check.name, Status.FAIL, "the check returned nothing", "", check.area)
    ]
    return [
        CheckResult(row.name, row.status, row.measured, row.fix, row.area or check.area, seconds)
        for row in rows
    ]


def run_checks(
    checks: Iterable[Check], *, on_result: Callable[[CheckResult], None] | None = None
) -> list[CheckResult]:
    """Run checks one after the other (they share devices and the two cores); rows in order."""
    results: list[CheckResult] = []
    for check in checks:
        for row in run_check(check):
            results.append(row)
            if on_result is not None:
                on_result(row)
    return results


def counts(results: Iterable[CheckResult]) -> dict[str, int]:
    tally = {status.value: 0 for status in Status}
    for row in results:
        tally[row.status.value] += 1
    return tally


def any_failed(results: Iterable[CheckResult]) -> bool:
    return any(row.status is Status.FAIL for row in results)
