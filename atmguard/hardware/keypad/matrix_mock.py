"""A gpiozero MockFactory whose pins behave like a diode-less key matrix.

Plain mock inputs ignore mock outputs, so a scanner would never see a key. Here each row and
column wire is a :class:`MatrixPin`; every held key connects its row wire to its column wire.
Whenever an output changes (or a pin changes function/pull, or a key is made or broken) the
wires are grouped into nets through the held keys and every *input* pin takes its net's level:

- low if any output in the net drives low (a low output sinks the pull-ups: also what makes
  ghost keys appear, exactly as on a real diode-less matrix, and the conservative model of two
  push-pull outputs fighting through two keys on one read line);
- else high if any output drives high;
- else its pull resistor (up / down), or unchanged when everything in the net floats.

Levels are set with ``drive_high``/``drive_low``, so edge callbacks fire and the pin history
(``states``, ``assert_states_and_times``) records what the hardware would have seen.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from gpiozero.exc import PinFixedPull, PinInvalidPull
from gpiozero.pins.mock import MockFactory, MockPin, PinState


class MatrixPin(MockPin):
    """A mock pin wired into a :class:`KeyMatrix` (if its factory has one and it is a matrix wire)."""

    # A scanning keypad toggles each driven pin twice per scan (800 changes/s at 100 Hz): keep
    # only the recent history so a long harness run does not grow without bound.
    history_limit = 4096

    def __init__(self, factory: Any, info: Any) -> None:
        self._matrix: KeyMatrix | None = None
        super().__init__(factory, info)
        matrix = getattr(factory, "matrix", None)
        # info.number is the header position; the BCM number is in the name ("GPIO5").
        bcm = int(info.name[4:]) if info.name.startswith("GPIO") else None
        if isinstance(matrix, KeyMatrix) and bcm is not None and matrix.attach(bcm, self):
            self._matrix = matrix

    def clear_states(self) -> None:
        self._last_change = time.monotonic()
        self.states = deque([PinState(0.0, self._state)], maxlen=self.history_limit)

    def _change_state(self, value: bool) -> bool:
        changed = super()._change_state(value)
        if changed and self._matrix is not None and self._function == "output":
            self._matrix.output_changed()
        return changed

    def _set_function(self, value: str) -> None:
        super()._set_function(value)
        if self._matrix is not None:
            self._matrix.recompute()

    def _set_pull(self, value: str) -> None:
        if self._matrix is None:
            super()._set_pull(value)
            return
        # Same rules as MockPin, but the level comes from the matrix (a held key may already
        # connect this wire to a low output): no spurious high glitch in the history.
        if self._function != "input":
            raise PinFixedPull(f"cannot set pull on non-input pin {self!r}")
        if self.info.pull and value != self.info.pull:
            raise PinFixedPull(f"{self!r} has a fixed pull resistor")
        if value not in ("floating", "up", "down"):
            raise PinInvalidPull("pull must be floating, up, or down")
        self._pull = value
        self._matrix.recompute()

    def _settle(self, level: bool | None) -> None:
        if level is None or level == self._state or self._function != "input":
            return
        if level:
            self.drive_high()
        else:
            self.drive_low()


class KeyMatrix:
    """The physical matrix: which keys are held, and the levels that follow from that."""

    def __init__(self, row_pins: Sequence[int], column_pins: Sequence[int]) -> None:
        self.row_pins = tuple(row_pins)
        self.column_pins = tuple(column_pins)
        self._wire_of_pin: dict[int, int] = {}
        for i, pin in enumerate(self.row_pins):
            self._wire_of_pin[pin] = i
        for j, pin in enumerate(self.column_pins):
            self._wire_of_pin[pin] = len(self.row_pins) + j
        if len(self._wire_of_pin) != len(self.row_pins) + len(self.column_pins):
            raise ValueError("row and column pins must all be different")
        self._pins: dict[int, MatrixPin] = {}  # wire index -> pin
        self._held: set[tuple[int, int]] = set()
        self._lock = threading.RLock()
        self.contact_changes = 0
        """Every make or break of a contact, bounce included (for tests of the bounce model)."""

    def __repr__(self) -> str:
        # Which keys are held is secret (a PIN being typed): only the count.
        return f"<KeyMatrix {len(self.row_pins)}x{len(self.column_pins)} held={len(self._held)}>"

    @property
    def held_count(self) -> int:
        return len(self._held)

    def attach(self, number: int, pin: MatrixPin) -> bool:
        wire = self._wire_of_pin.get(number)
        if wire is None:
            return False
        with self._lock:
            self._pins[wire] = pin
        return True

    def set_contact(self, row: int, column: int, closed: bool) -> None:
        """Make (``closed=True``) or break the contact of the key at ``row``, ``column``."""
        if not (0 <= row < len(self.row_pins) and 0 <= column < len(self.column_pins)):
            raise IndexError("key position outside the matrix")
        with self._lock:
            pos = (row, column)
            if (pos in self._held) == closed:
                return
            if closed:
                self._held.add(pos)
            else:
                self._held.discard(pos)
            self.contact_changes += 1
            self.recompute()

    def release_all(self) -> None:
        with self._lock:
            if self._held:
                self._held.clear()
                self.contact_changes += 1
                self.recompute()

    def output_changed(self) -> None:
        # With no key held every wire is its own net and already sits at its pull level.
        if self._held:
            self.recompute()

    def recompute(self) -> None:
        with self._lock:
            n_rows = len(self.row_pins)
            parent = list(range(n_rows + len(self.column_pins)))

            def find(w: int) -> int:
                while parent[w] != w:
                    parent[w] = parent[parent[w]]
                    w = parent[w]
                return w

            for r, c in self._held:
                parent[find(r)] = find(n_rows + c)
            nets: dict[int, list[MatrixPin]] = {}
            for wire, pin in self._pins.items():
                nets.setdefault(find(wire), []).append(pin)
            for pins in nets.values():
                outputs = [p._state for p in pins if p._function == "output"]
                if outputs:
                    level: bool | None = all(outputs)  # any low output wins
                else:
                    pulls = {p._pull for p in pins}
                    level = True if "up" in pulls else False if "down" in pulls else None
                for pin in pins:
                    pin._settle(level)


class MatrixMockFactory(MockFactory):
    """A MockFactory whose row/column pins form a :class:`KeyMatrix` (``self.matrix``)."""

    def __init__(
        self, row_pins: Sequence[int], column_pins: Sequence[int], *, revision: str | None = None
    ) -> None:
        self.matrix = KeyMatrix(row_pins, column_pins)
        super().__init__(revision=revision, pin_class=MatrixPin)
