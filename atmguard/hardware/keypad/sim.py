"""``SimKeypad``: the real ``GpioKeypad`` scanner on a simulated key matrix, plus a harness API.

Nothing is short-cut: the harness makes and breaks contacts in a :class:`KeyMatrix`, the mock
pins recompute their levels, and the unchanged scanner/debouncer reads them. Timing is human:
``press`` holds a key for ``hold_s``, ``type_keys`` spaces key-downs ``interval_s`` apart, and
each make and break chatters for up to ``bounce_ms`` (seeded) like a real contact.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, Self

from atmguard.config import Settings
from atmguard.hardware.keypad.base import DIGITS, EventHandler, layout_rows
from atmguard.hardware.keypad.gpio import GpioKeypad
from atmguard.hardware.keypad.matrix_mock import KeyMatrix, MatrixMockFactory

DEFAULT_ROW_PINS = (5, 6, 13, 19)
DEFAULT_COLUMN_PINS = (12, 16, 20, 21)
DEFAULT_BOUNCE_MS = 3.0
# Chatter pulses of tactile keypad contacts: tens of µs to about a millisecond each.
_CHATTER_MIN_S = 0.0001
_CHATTER_MAX_S = 0.0012


class SimKeypad(GpioKeypad):
    """A keypad a test or the harness can type on."""

    def __init__(
        self,
        row_pins: Sequence[int] = DEFAULT_ROW_PINS,
        *,
        column_pins: Sequence[int] | None = None,
        layout: str = "4x3",
        drive: Literal["rows", "columns"] = "rows",
        scan_hz: float = 100.0,
        debounce_ms: float = 30.0,
        bounce_ms: float = DEFAULT_BOUNCE_MS,
        seed: int | None = 0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        on_event: EventHandler | None = None,
    ) -> None:
        if column_pins is None:
            column_pins = DEFAULT_COLUMN_PINS[: len(layout_rows(layout)[0])]
        if bounce_ms < 0:
            raise ValueError("bounce_ms must be >= 0")
        self._factory = MatrixMockFactory(row_pins, column_pins)
        super().__init__(
            row_pins,
            column_pins=column_pins,
            layout=layout,
            drive=drive,
            scan_hz=scan_hz,
            debounce_ms=debounce_ms,
            pin_factory=self._factory,
            clock=clock,
            on_event=on_event,
        )
        self._bounce_s = bounce_ms / 1000.0
        self._rng = random.Random(seed)
        self._sleep = sleep
        self._harness_lock = threading.Lock()
        self._positions = {key: (r, c) for r, row in enumerate(self.rows) for c, key in enumerate(row)}

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(settings.keypad.row_pins, **cls._matrix_options(settings))

    @property
    def matrix(self) -> KeyMatrix:
        return self._factory.matrix

    @property
    def pin_factory(self) -> MatrixMockFactory:
        return self._factory

    def _position(self, key: str) -> tuple[int, int]:
        try:
            return self._positions[key]
        except KeyError:
            shown = "a digit" if key in DIGITS else repr(key)
            raise ValueError(f"{shown} is not a key of the {self.layout} layout") from None

    def _move_contact(self, key: str, closed: bool) -> None:
        row, col = self._position(key)
        with self._harness_lock:
            if self._bounce_s > 0:
                # Chatter: alternate make/break with random short gaps, ending in the new state.
                deadline = time.monotonic() + self._bounce_s * self._rng.uniform(0.5, 1.0)
                state = closed
                while time.monotonic() < deadline:
                    self.matrix.set_contact(row, col, state)
                    self._sleep(self._rng.uniform(_CHATTER_MIN_S, _CHATTER_MAX_S))
                    state = not state
            self.matrix.set_contact(row, col, closed)

    def key_down(self, key: str) -> None:
        """Press and keep holding ``key`` (returns after the contact has settled)."""
        self._move_contact(key, True)

    def key_up(self, key: str) -> None:
        """Let go of ``key``."""
        self._move_contact(key, False)

    def release_all(self) -> None:
        self.matrix.release_all()

    def press(self, key: str, *, hold_s: float = 0.08) -> None:
        """Press ``key``, hold it for ``hold_s``, release it; blocks for about ``hold_s``."""
        if hold_s < 0:
            raise ValueError("hold_s must be >= 0")
        self.key_down(key)
        self._sleep(hold_s)
        self.key_up(key)

    def type_keys(self, keys: Iterable[str], *, interval_s: float = 0.25, hold_s: float = 0.08) -> None:
        """Type ``keys`` one after another, key-downs ``interval_s`` apart; blocks until done."""
        if interval_s < hold_s:
            raise ValueError("interval_s must be >= hold_s (one finger, one key at a time)")
        first = True
        next_down_s = time.monotonic()
        for key in keys:
            if not first:
                delay_s = next_down_s - time.monotonic()
                if delay_s > 0:
                    self._sleep(delay_s)
            first = False
            next_down_s = time.monotonic() + interval_s
            self.press(key, hold_s=hold_s)
