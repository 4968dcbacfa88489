"""Turns raw matrix scans into debounced key events: pure logic, no I/O, no threads.

Input per scan: one bitmask per keypad row (bit ``c`` set = the key at row ``r``, column ``c``
read closed) and the scan time. Output: ``KeyEvent``s.

Debounce is time based: a key's new reading must persist for ``debounce_s`` (from the first
scan that saw it to the current scan) before the press or release is reported; any reading
back to the old state restarts the wait, so contact chatter shorter than ``debounce_s`` is
never reported. The event is stamped with the time the new state was *first* seen.

Ghosting guard: a matrix without diodes connects row and column wires through every held key,
so three held keys on the corners of a rectangle make the fourth corner read closed too (and
any larger connected group reads as a full block). A ghost is therefore always part of a
closed rectangle, and inside such a rectangle a ghost cannot be told from a real key. So every
key that is a corner of a closed rectangle is *ambiguous*: it keeps the state last reported for
it (already-pressed keys stay pressed, nothing new is pressed or released) and its pending
change is dropped, until the rectangle breaks up. The fourth key is never invented; the price
is that the third real key of a rectangle is reported only once one of the others is released.
"""

from __future__ import annotations

from collections.abc import Sequence

from atmguard.hardware.keypad.base import KeyEvent


class MatrixDebouncer:
    """Per-key time-based debounce over row bitmasks, with the ghosting guard."""

    def __init__(self, rows: Sequence[str], *, debounce_s: float) -> None:
        if debounce_s < 0:
            raise ValueError("debounce_s must be >= 0")
        if not rows or len({len(r) for r in rows}) != 1:
            raise ValueError("rows must be non-empty strings of equal length")
        self._rows = tuple(rows)
        self._n_rows = len(self._rows)
        self._n_cols = len(self._rows[0])
        self._debounce_s = debounce_s
        self._stable = [0] * self._n_rows
        # (row, col) -> time the reading first differed from the reported state.
        self._pending: dict[tuple[int, int], float] = {}
        self.ambiguous_scans = 0
        """How many scans contained a closed rectangle (ghosting possible)."""

    def __repr__(self) -> str:
        # The pressed set is secret (it is the PIN digit being typed): only counts.
        return f"<MatrixDebouncer {self._n_rows}x{self._n_cols} pressed={self.pressed_count}>"

    @property
    def pressed_count(self) -> int:
        return sum(m.bit_count() for m in self._stable)

    def pressed_keys(self) -> frozenset[str]:
        """The keys currently reported as held (secret: do not log)."""
        return frozenset(
            self._rows[r][c]
            for r in range(self._n_rows)
            for c in range(self._n_cols)
            if self._stable[r] >> c & 1
        )

    def reset(self) -> None:
        self._stable = [0] * self._n_rows
        self._pending.clear()

    def ambiguous_masks(self, row_masks: Sequence[int]) -> list[int]:
        """Per row, the keys that are corners of a closed rectangle."""
        amb = [0] * self._n_rows
        busy = [r for r in range(self._n_rows) if row_masks[r] & (row_masks[r] - 1)]  # >= 2 keys in row
        for i, r1 in enumerate(busy):
            for r2 in busy[i + 1 :]:
                common = row_masks[r1] & row_masks[r2]
                if common & (common - 1):  # >= 2 shared columns: a rectangle
                    amb[r1] |= common
                    amb[r2] |= common
        return amb

    def update(self, row_masks: Sequence[int], now_s: float) -> list[KeyEvent]:
        """Feed one scan; return the events it completes (usually none)."""
        stable = self._stable
        if not self._pending and all(row_masks[r] == stable[r] for r in range(self._n_rows)):
            return []  # fast path: nothing held changed, nothing waiting
        amb = self.ambiguous_masks(row_masks)
        if any(amb):
            self.ambiguous_scans += 1
        diffs = [((row_masks[r] & ~amb[r]) | (stable[r] & amb[r])) ^ stable[r] for r in range(self._n_rows)]
        pending = self._pending
        for r, c in [pos for pos in pending if not diffs[pos[0]] >> pos[1] & 1]:
            del pending[r, c]  # the reading went back (chatter) or became ambiguous: restart
        events: list[KeyEvent] = []
        for r in range(self._n_rows):
            d = diffs[r]
            while d:
                bit = d & -d
                d ^= bit
                c = bit.bit_length() - 1
                since = pending.setdefault((r, c), now_s)
                if now_s - since >= self._debounce_s:
                    del pending[r, c]
                    stable[r] ^= bit
                    events.append(KeyEvent(self._rows[r][c], bool(stable[r] & bit), since))
        events.sort(key=lambda e: e.t_monotonic_s)
        return events
