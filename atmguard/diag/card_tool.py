"""``atmguard diag card``: wait for one card and show what the reader read.

Shown: the masked PAN (first 6 / last 4 at most), which tracks were read, the expiry and whether it
has passed, the Luhn verdict and the service code. Never the full PAN, the name or any track data:
the card read object is wiped as soon as the lines are written. A motorized reader gets the card
back to the gate afterwards and the tool waits (briefly) for it to be taken.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any, TextIO

from atmguard.hardware.card.base import CardInserted, CardTaken, ReaderFault

POLL_S = 0.2
TAKE_TIMEOUT_S = 30.0
"""After ejecting, how long to wait for the technician to take the card."""
_REASONS = {
    "luhn": "the PAN fails the Luhn check",
    "expired": "the card has expired",
    "bad_pan": "the PAN is not 12-19 digits",
    "bad_format": "the track format is wrong",
    "bad_expiry": "the expiry date is not a date",
    "bad_service_code": "the service code is not 3 digits",
    "track_mismatch": "track 1 and track 2 disagree",
    "no_track": "no track 1 or track 2 data",
    "bad_parity": "a track has parity errors (dirty head or damaged stripe)",
    "bad_sentinel": "a track has no start/end sentinel (misread swipe)",
}


@dataclass(frozen=True)
class CardReport:
    """What one read showed (no secret in here: masked PAN only)."""

    usable: bool
    masked_pan: str = ""
    tracks: tuple[int, ...] = ()
    expiry: str = ""
    expired: bool | None = None
    luhn_ok: bool | None = None
    service_code: str = ""
    reason: str = ""


def describe(event: CardInserted, *, today: date) -> CardReport:
    """Turn a reader's CardInserted into a report; wipes the card read."""
    card = event.card
    if card is None:
        reason = event.error_reason or "unreadable"
        return CardReport(
            usable=False,
            expired=True if reason == "expired" else None,
            luhn_ok=False if reason == "luhn" else None,
            reason=reason,
        )
    try:
        # A CardRead only exists once the PAN passed the Luhn check and the expiry was parsed.
        return CardReport(
            usable=True,
            masked_pan=card.masked_pan,
            tracks=tuple(sorted(card.tracks)),
            expiry=f"{card.expiry_year:04d}-{card.expiry_month:02d}",
            expired=card.is_expired(today),
            luhn_ok=True,
            service_code=card.service_code,
        )
    finally:
        card.wipe()


def report_lines(report: CardReport) -> list[str]:
    if not report.usable:
        why = _REASONS.get(report.reason, report.reason)
        return [f"card read, NOT usable: {report.reason} ({why})"]
    chip = " (chip card: a swipe is only a fallback)" if report.service_code[:1] in ("2", "6") else ""
    return [
        f"card:         {report.masked_pan}",
        f"tracks:       {'+'.join(str(t) for t in report.tracks)}",
        f"expiry:       {report.expiry} ({'EXPIRED' if report.expired else 'valid'})",
        "luhn:         ok",
        f"service code: {report.service_code}{chip}",
    ]


def wait_for_card(
    reader: Any,
    *,
    timeout_s: float,
    out: TextIO,
    today: Callable[[], date] = date.today,
    take_timeout_s: float = TAKE_TIMEOUT_S,
) -> CardReport | None:
    """Open ``reader``, let one card in, report it, give it back; None when no card came in time."""
    reader.open()
    try:
        reader.set_entry_enabled(True)
        action = "insert" if reader.holds_card else "swipe"
        out.write(f"{action} a card within {timeout_s:g} s (Ctrl-C to stop)\n")
        out.flush()
        deadline = time.monotonic() + timeout_s
        report: CardReport | None = None
        while report is None and time.monotonic() < deadline:
            event = reader.poll(timeout_s=min(POLL_S, max(0.0, deadline - time.monotonic())))
            if isinstance(event, CardInserted):
                report = describe(event, today=today())
            elif isinstance(event, ReaderFault):
                out.write(f"reader fault: {event.reason} {event.detail}\n")
        if report is None:
            return None
        reader.set_entry_enabled(False)
        for line in report_lines(report):
            out.write(line + "\n")
        out.flush()
        if reader.holds_card:
            reader.eject()
            out.write("please take the card\n")
            out.flush()
            _wait_taken(reader, take_timeout_s)
        return report
    finally:
        reader.close()


def _wait_taken(reader: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if isinstance(reader.poll(timeout_s=POLL_S), CardTaken):
            return True
    return False
