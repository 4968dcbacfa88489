"""The keypad role: key events, layouts and the ``Keypad`` interface.

A ``KeyEvent`` carries the key that was pressed, so it is secret while a PIN is being typed:
its ``repr``/``str`` never show a digit (the daemon logs and journals events by repr).
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from atmguard.errors import KeypadError
from atmguard.hardware.device import Device

logger = logging.getLogger(__name__)

# Rows top to bottom, as printed on the keypad. Keys are single characters.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "4x3": ("123", "456", "789", "*0#"),
    "4x4": ("123A", "456B", "789C", "*0#D"),
}

DIGITS = frozenset("0123456789")

EventHandler = Callable[["KeyEvent"], None]


def layout_rows(layout: str) -> tuple[str, ...]:
    """The rows of a named layout; ValueError for an unknown name."""
    try:
        return LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"unknown keypad layout {layout!r} (known: {', '.join(LAYOUTS)})") from None


def _masked_key(key: str) -> str:
    # Function keys (*, #, A-D) are not secret and help debugging; digits are.
    return "<digit>" if key in DIGITS else repr(key)


@dataclass(frozen=True, slots=True, repr=False)
class KeyEvent:
    """A debounced key-down (``pressed=True``) or key-up, timed when the new state was first seen."""

    key: str
    pressed: bool
    t_monotonic_s: float

    def __repr__(self) -> str:
        return (
            f"KeyEvent(key={_masked_key(self.key)}, pressed={self.pressed},"
            f" t_monotonic_s={self.t_monotonic_s:.3f})"
        )

    __str__ = __repr__

    @property
    def is_digit(self) -> bool:
        return self.key in DIGITS


class Keypad(Device):
    """A PIN keypad. Events arrive on the scan thread: handlers must be cheap (e.g. ``queue.put``).

    Without a handler, events go to an internal bounded queue read with :meth:`read_event`
    (handy for the technician's key test and for ``with keypad:`` use).
    """

    QUEUE_SIZE = 64

    def __init__(self, *, layout: str = "4x3", on_event: EventHandler | None = None) -> None:
        self._rows = layout_rows(layout)
        self._layout = layout
        self._on_event = on_event
        self._handler: EventHandler | None = None
        self._queue: queue.Queue[KeyEvent] = queue.Queue(maxsize=self.QUEUE_SIZE)
        self._handler_failures = 0
        self._lifecycle_lock = threading.Lock()

    @property
    def layout(self) -> str:
        return self._layout

    @property
    def keys(self) -> str:
        """Every key of the layout, row by row (e.g. ``"123456789*0#"``)."""
        return "".join(self._rows)

    @property
    def rows(self) -> tuple[str, ...]:
        return self._rows

    @abstractmethod
    def open(self, on_event: EventHandler | None = None) -> None:
        """Acquire the hardware and start scanning; ``on_event`` overrides the constructor's handler."""

    @abstractmethod
    def close(self) -> None:
        """Stop scanning and release the hardware; safe to call twice."""

    @property
    @abstractmethod
    def is_open(self) -> bool: ...

    def read_event(self, timeout_s: float) -> KeyEvent | None:
        """Next queued event (only used when no handler was given), or None after ``timeout_s``."""
        try:
            return self._queue.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None

    def _choose_handler(self, on_event: EventHandler | None) -> None:
        self._handler = on_event if on_event is not None else self._on_event

    def _dispatch(self, event: KeyEvent) -> None:
        handler = self._handler
        if handler is None:
            try:
                self._queue.put_nowait(event)
            except queue.Full:
                logger.warning("keypad event queue full (%d): event dropped", self.QUEUE_SIZE)
            return
        try:
            handler(event)
        except Exception as exc:
            # Only the exception type: its message or traceback could quote the key.
            self._handler_failures += 1
            logger.error("keypad event handler raised %s; event dropped", type(exc).__name__)


class KeypadClosedError(KeypadError):
    """The keypad is not open (or was closed)."""
