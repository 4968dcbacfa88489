"""How diagnostics are shown: the ``diag`` table (streamed row by row), its JSON, and ``status``."""

from __future__ import annotations

import json
import shutil
import textwrap
import time
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from atmguard import __version__
from atmguard.diag.model import CheckResult, counts

NAME_WIDTH = 26
STATUS_WIDTH = 6
_MIN_TEXT_WIDTH = 40


def _text_width(stream: TextIO) -> int:
    columns = shutil.get_terminal_size((120, 24)).columns if stream.isatty() else 120
    return max(_MIN_TEXT_WIDTH, columns - NAME_WIDTH - STATUS_WIDTH - 2)


class TableWriter:
    """Writes the header, each row as it is finished, and the summary line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._width = _text_width(stream)
        self._indent = " " * (NAME_WIDTH + STATUS_WIDTH + 2)
        self._header: tuple[str, str] | None = None

    def header(self, *, atm_id: str, config: str) -> None:
        """Remembered, and written with the first row (a refused command prints no table)."""
        self._header = (atm_id, config)

    def _write_header(self) -> None:
        if self._header is None:
            return
        atm_id, config = self._header
        self._header = None
        self._stream.write(
            f"atmguard {__version__} diag: ATM {atm_id}, config {config}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
        )
        self._stream.write(f"{'CHECK':<{NAME_WIDTH}} {'STATUS':<{STATUS_WIDTH}} MEASURED / FIX\n")
        self._stream.flush()

    def row(self, row: CheckResult) -> None:
        self._write_header()
        lines = textwrap.wrap(row.measured, self._width) or [""]
        self._stream.write(f"{row.name:<{NAME_WIDTH}} {row.status.value:<{STATUS_WIDTH}} {lines[0]}\n")
        for line in lines[1:]:
            self._stream.write(f"{self._indent}{line}\n")
        if row.fix and row.status.value != "PASS":
            for i, line in enumerate(textwrap.wrap(f"fix: {row.fix}", self._width)):
                self._stream.write(f"{self._indent}{'' if i == 0 else '     '}{line}\n")
        self._stream.flush()

    def summary(self, results: Sequence[CheckResult], *, note: str = "") -> None:
        tally = counts(results)
        text = ", ".join(f"{n} {status}" for status, n in tally.items() if n)
        self._stream.write(f"{text}{f'; {note}' if note else ''}\n")
        self._stream.flush()


def diag_json(
    results: Iterable[CheckResult], *, atm_id: str, config: str, exit_code: int, hardware_source: str
) -> str:
    """One JSON object for fleet tooling."""
    rows = list(results)
    return json.dumps(
        {
            "version": __version__,
            "atm_id": atm_id,
            "config": config,
            "t": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "ok": exit_code == 0,
            "exit_code": exit_code,
            "hardware_source": hardware_source,
            "summary": counts(rows),
            "checks": [row.as_dict() for row in rows],
        },
        sort_keys=True,
    )


# --- atmguard status ---------------------------------------------------------------------------------


def _age(seconds: Any) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} days"


def _role_line(name: str, role: dict[str, Any]) -> str:
    ok = role.get("ok")
    verdict = "ok" if ok else "n/a" if ok is None else "FAULT"
    return f"  {name:<12} {verdict:<6} {role.get('backend', '')}: {role.get('detail', '')}"


def status_text(answer: dict[str, Any]) -> str:
    """``atmguard status`` for a person: service, session, hardware, watchdog, outbox, last events."""
    lines = [
        f"atmguard {answer.get('version')} on ATM {answer.get('atm_id')} (pid {answer.get('pid')},"
        f" up {_age(answer.get('uptime_s'))})"
    ]
    faults = answer.get("faults") or {}
    if answer.get("in_service"):
        lines.append(f"service: IN SERVICE ({answer.get('phase')})")
    else:
        why = "; ".join(f"{k}: {v}" for k, v in sorted(faults.items())) or str(answer.get("phase"))
        lines.append(f"service: OUT OF SERVICE ({why})")
    face = answer.get("face") or {}
    lines.append(f"face: {face.get('state')} ({face.get('count', 0)} face(s))")
    session = answer.get("session")
    if session:
        lines.append(
            f"session: {session.get('session_id')} card {session.get('masked_pan') or '-'}"
            f" ({session.get('phase')}, {_age(session.get('age_s'))})"
        )
    else:
        lines.append("session: none")
    lines.append("hardware:")
    for name, role in (answer.get("hardware") or {}).items():
        lines.append(_role_line(name, role))
    vision = answer.get("vision") or {}
    analysed = vision.get("analysed_fps")
    lines.append(
        f"vision: heartbeat {_age(vision.get('heartbeat_age_s'))} ago,"
        f" {'-' if analysed is None else f'{analysed:.1f}'} frames/s analysed"
    )
    watchdog = answer.get("watchdog") or {}
    if watchdog.get("enabled"):
        lines.append(
            f"watchdog: controller pinged {_age(watchdog.get('last_ping_age_s'))} ago (interval {watchdog.get('interval_s'):g} s)"
        )
    else:
        lines.append(
            f"watchdog: off (no WatchdogSec); controller pinged {_age(watchdog.get('last_ping_age_s'))} ago"
        )
    outbox = answer.get("outbox") or {}
    if "error" in outbox:
        lines.append(f"outbox: unreadable: {outbox['error']}")
    else:
        dead = (outbox.get("dead_events") or 0) + (outbox.get("dead_snapshots") or 0)
        lines.append(
            f"outbox: {outbox.get('pending_events')} events and {outbox.get('pending_snapshots')} snapshots pending"
            f" (oldest {_age(outbox.get('oldest_pending_age_s'))}), {dead} dead letter(s),"
            f" journal {(outbox.get('db_bytes') or 0) / 1e6:.1f} MB"
        )
    sync = answer.get("sync") or {}
    if not sync.get("enabled"):
        lines.append("sync: off (central.enabled = false)")
    else:
        error = sync.get("last_error")
        lines.append(
            f"sync: last success {sync.get('last_success_t') or 'never'}"
            + (f"; failing ({sync.get('consecutive_failures')} in a row): {error}" if error else "")
        )
    events = answer.get("events") or []
    lines.append(f"last events ({len(events)}):")
    for event in events:
        if event.get("type") == "decision":
            lines.append(
                f"  {event.get('t')} decision {event.get('outcome')} ({event.get('reason')})"
                f" card {event.get('masked_pan') or '-'} session {event.get('session_id')}"
            )
        else:
            detail = f" ({event.get('detail')})" if event.get("detail") else ""
            lines.append(f"  {event.get('t')} status {event.get('state')}{detail}")
    return "\n".join(lines) + "\n"
