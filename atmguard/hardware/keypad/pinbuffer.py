"""``PinBuffer``: the only place a clear PIN lives, and ``PinEntry``: key events -> buffer ops.

The digits sit in one fixed-size ``bytearray`` (ASCII ``b"0"``-``b"9"``), allocated once so that
no resize leaves a stale copy in freed memory, overwritten on clear/wipe/garbage collection.
They leave it only through :meth:`PinBuffer.reveal`: a read-only ``memoryview`` that is released
and wiped when the ``with`` block ends — never a ``str`` or ``bytes``. ``repr``/``str`` show the
length only; pickling and copying raise ``TypeError``.

Limits of what Python allows: the key characters themselves are interned one-character strings
(``KeyEvent.key``), so this protects against the PIN being *assembled* somewhere (logs,
exceptions, journals, core dumps of long-lived strings), not against reading process memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import NoReturn, Self

from atmguard.config import Settings
from atmguard.errors import AtmguardError
from atmguard.hardware.keypad.base import DIGITS, KeyEvent


class PinBufferError(AtmguardError, ValueError):
    """A PinBuffer operation was refused (full, not a digit, revealed while out of range)."""


class PinBuffer:
    """Holds the digits of one PIN entry; see the module docstring for the guarantees."""

    __slots__ = (
        "_digits",
        "_inter_key_timeout_s",
        "_last_activity_s",
        "_length",
        "_max",
        "_min",
        "_revealed",
    )

    def __init__(
        self, *, min_digits: int = 4, max_digits: int = 6, inter_key_timeout_s: float = 10.0
    ) -> None:
        if not 1 <= min_digits <= max_digits:
            raise ValueError("need 1 <= min_digits <= max_digits")
        if inter_key_timeout_s <= 0:
            raise ValueError("inter_key_timeout_s must be > 0")
        self._digits = bytearray(max_digits)
        self._length = 0
        self._min = min_digits
        self._max = max_digits
        self._inter_key_timeout_s = inter_key_timeout_s
        self._last_activity_s: float | None = None
        self._revealed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        k = settings.keypad
        return cls(
            min_digits=k.pin_min_digits,
            max_digits=k.pin_max_digits,
            inter_key_timeout_s=k.inter_key_timeout_s,
        )

    # --- state -------------------------------------------------------------------------

    @property
    def min_digits(self) -> int:
        return self._min

    @property
    def max_digits(self) -> int:
        return self._max

    @property
    def inter_key_timeout_s(self) -> float:
        return self._inter_key_timeout_s

    @property
    def is_full(self) -> bool:
        return self._length >= self._max

    @property
    def is_complete(self) -> bool:
        """Long enough to submit."""
        return self._min <= self._length <= self._max

    def __len__(self) -> int:
        return self._length

    def masked(self) -> str:
        return "*" * self._length

    def __repr__(self) -> str:
        return f"<PinBuffer {self._length} digit(s), {self._min}-{self._max} allowed>"

    __str__ = __repr__

    # --- timing ------------------------------------------------------------------------

    def touch(self, now_s: float | None = None) -> None:
        """Record key activity (any key, or the start of entry) for the inter-key timeout."""
        self._last_activity_s = time.monotonic() if now_s is None else now_s

    def expired(self, now_s: float | None = None) -> bool:
        """True when entry started and no key came for ``inter_key_timeout_s``."""
        if self._last_activity_s is None:
            return False
        now_s = time.monotonic() if now_s is None else now_s
        return now_s - self._last_activity_s >= self._inter_key_timeout_s

    # --- edits -------------------------------------------------------------------------

    def append(self, digit: str, *, now_s: float | None = None) -> int:
        """Add one digit; return the new length. PinBufferError if full or not a digit."""
        if not isinstance(digit, str) or digit not in DIGITS:
            raise PinBufferError("only the digits 0-9 can be added to a PIN")
        if self._length >= self._max:
            raise PinBufferError(f"PIN already has the maximum of {self._max} digits")
        self._digits[self._length] = ord(digit)
        self._length += 1
        self.touch(now_s)
        return self._length

    def backspace(self) -> int:
        """Remove the last digit (overwriting it); return the new length."""
        if self._length:
            self._length -= 1
            self._digits[self._length] = 0
        return self._length

    def _overwrite(self) -> None:
        # In place, never rebinding: a memoryview handed out by reveal() sees zeros afterwards.
        for i in range(len(self._digits)):
            self._digits[i] = 0
        self._length = 0

    def clear(self) -> None:
        """Forget the digits typed so far (overwritten); entry can go on."""
        self._overwrite()

    def wipe(self) -> None:
        """Overwrite and empty the buffer and forget the entry's timing: it is finished."""
        self._overwrite()
        self._last_activity_s = None

    def __del__(self) -> None:
        with suppress(Exception):
            self._overwrite()

    # --- handing the PIN to a verifier -------------------------------------------------

    @contextmanager
    def reveal(self, *, wipe_after: bool = True) -> Iterator[memoryview]:
        """Yield the digits as a read-only memoryview of ASCII bytes; released (and the buffer
        wiped, unless ``wipe_after=False``) when the block ends, even on error."""
        if not self.is_complete:
            raise PinBufferError(f"PIN has {self._length} digit(s); {self._min}-{self._max} needed")
        if self._revealed:
            raise PinBufferError("PIN is already being revealed")
        self._revealed = True
        view = memoryview(self._digits)[: self._length].toreadonly()
        try:
            yield view
        finally:
            view.release()
            self._revealed = False
            if wipe_after:
                self.wipe()

    # --- refusing to be copied ---------------------------------------------------------

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("a PinBuffer cannot be pickled")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a PinBuffer cannot be pickled")

    def __copy__(self) -> NoReturn:
        raise TypeError("a PinBuffer cannot be copied")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("a PinBuffer cannot be copied")

    def __getstate__(self) -> NoReturn:
        raise TypeError("a PinBuffer cannot be serialised")


# --- PinEntry outcomes: lengths only, never digits -------------------------------------


@dataclass(frozen=True, slots=True)
class PinOutcome:
    """Base of what a key did to the PIN entry."""

    length: int
    """Digits in the buffer after the key."""


@dataclass(frozen=True, slots=True)
class DigitAdded(PinOutcome):
    pass


@dataclass(frozen=True, slots=True)
class DigitIgnored(PinOutcome):
    """A digit arrived while the PIN already had ``max_digits``."""


@dataclass(frozen=True, slots=True)
class Cleared(PinOutcome):
    """``*`` with digits typed: they were erased; entry goes on."""


@dataclass(frozen=True, slots=True)
class Cancelled(PinOutcome):
    """``*`` on an empty PIN: the customer gave up. The entry is finished."""


@dataclass(frozen=True, slots=True)
class Submitted(PinOutcome):
    """``#`` with an acceptable length: the PIN waits in the buffer for ``reveal()``."""


@dataclass(frozen=True, slots=True)
class TooShort(PinOutcome):
    """``#`` with fewer than ``min_digits``: digits are kept, entry goes on."""

    min_digits: int


@dataclass(frozen=True, slots=True)
class TimedOut(PinOutcome):
    """No key for ``inter_key_timeout_s``: the buffer was wiped and the entry is finished.

    ``length`` is the number of digits that had been typed (and were wiped)."""


CLEAR_KEY = "*"
ENTER_KEY = "#"


class PinEntry:
    """One PIN entry: feed it key events, act on the outcomes. Not thread-safe: one owner."""

    def __init__(self, buffer: PinBuffer) -> None:
        self._buffer = buffer
        self._active = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(PinBuffer.from_settings(settings))

    def __repr__(self) -> str:
        state = "active" if self._active else "idle"
        return f"<PinEntry {state} {self._buffer!r}>"

    @property
    def buffer(self) -> PinBuffer:
        return self._buffer

    @property
    def active(self) -> bool:
        """Accepting keys (started, not yet submitted, cancelled or timed out)."""
        return self._active

    def start(self, now_s: float | None = None) -> None:
        """Begin a new entry: empty buffer, inter-key timer running from ``now_s``."""
        self._buffer.wipe()
        self._buffer.touch(now_s)
        self._active = True

    def check_timeout(self, now_s: float | None = None) -> TimedOut | None:
        """Call periodically: TimedOut (buffer wiped) once the inter-key timeout has passed."""
        if not self._active or not self._buffer.expired(now_s):
            return None
        length = len(self._buffer)
        self._finish()
        return TimedOut(length)

    def _finish(self) -> None:
        self._buffer.wipe()
        self._active = False

    def handle(self, event: KeyEvent) -> PinOutcome | None:
        """Apply one key event; None for releases, non-PIN keys, or when not active."""
        if not self._active or not event.pressed:
            return None
        buffer = self._buffer
        timed_out = self.check_timeout(event.t_monotonic_s)
        if timed_out is not None:
            return timed_out  # a key after the timeout does not revive the entry
        key = event.key
        if key in DIGITS:
            if buffer.is_full:
                buffer.touch(event.t_monotonic_s)
                return DigitIgnored(len(buffer))
            return DigitAdded(buffer.append(key, now_s=event.t_monotonic_s))
        if key == CLEAR_KEY:
            if len(buffer) == 0:
                self._finish()
                return Cancelled(0)
            buffer.clear()
            buffer.touch(event.t_monotonic_s)
            return Cleared(0)
        if key == ENTER_KEY:
            buffer.touch(event.t_monotonic_s)
            if len(buffer) < buffer.min_digits:
                return TooShort(len(buffer), buffer.min_digits)
            self._active = False  # the digits stay for reveal(); the verifier wipes them
            return Submitted(len(buffer))
        return None
