"""``atmguard diag keypad``: key presses shown live, to test every key and the wiring.

Test mode only: the command holds the hardware lock, so the daemon is not running and no customer
session (and no PIN) can be in progress; that is the only reason a key may be printed at all.
Ends after ``duration_s`` or when every key of the layout has been pressed, whichever comes first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass
class KeypadReport:
    layout: str
    pressed: list[str] = field(default_factory=list)
    """Keys in the order they were pressed (repeats included)."""
    held_ms: dict[str, float] = field(default_factory=dict)
    """Last hold time of each key, key-down to key-up, in milliseconds."""
    missing: list[str] = field(default_factory=list)
    """Keys of the layout never pressed."""


def run_keypad_test(keypad: Any, *, duration_s: float, out: TextIO) -> KeypadReport:
    """Open ``keypad`` (no handler: its own queue), print each press and release, close it."""
    keypad.open()
    report = KeypadReport(layout=keypad.layout)
    down_at: dict[str, float] = {}
    try:
        out.write(f"{keypad.layout} keypad: press each key (up to {duration_s:g} s, Ctrl-C to stop)\n")
        out.flush()
        deadline = time.monotonic() + duration_s
        while (left := deadline - time.monotonic()) > 0:
            event = keypad.read_event(min(left, 0.2))
            if event is None:
                failure = getattr(keypad, "failure", None)
                if failure is not None:
                    out.write(f"keypad failed: {failure}\n")
                    break
                continue
            if event.pressed:
                down_at[event.key] = event.t_monotonic_s
                report.pressed.append(event.key)
                out.write(f"key {event.key} down\n")
            else:
                held = (event.t_monotonic_s - down_at.pop(event.key, event.t_monotonic_s)) * 1e3
                report.held_ms[event.key] = held
                out.write(f"key {event.key} up ({held:.0f} ms)\n")
            out.flush()
            if set(keypad.keys) <= set(report.held_ms):
                break
    finally:
        keypad.close()
    report.missing = [key for key in keypad.keys if key not in report.held_ms]
    if report.missing:
        out.write(f"not pressed: {' '.join(report.missing)}\n")
    else:
        out.write("every key works\n")
    out.flush()
    return report
