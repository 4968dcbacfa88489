"""Customer display: the prompts the customer sees, and two backends.

Prompts are a closed set so every message the ATM can show is reviewed here once, and so tests
and the harness assert on *what* was shown, not on strings. The PIN is only ever shown as a count
of asterisks: the display API takes the number of digits, never the digits.
"""

from __future__ import annotations

import enum
import logging
import os
import sys
import threading
import time
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Self

from atmguard.config import Settings
from atmguard.errors import DisplayError
from atmguard.hardware.device import Device

logger = logging.getLogger(__name__)


class Prompt(enum.Enum):
    """Every message the customer can see. The value is the text shown."""

    INSERT_CARD = "Insert card"
    READING_CARD = "Reading card, please wait"
    ENTER_PIN = "Enter PIN"
    REMOVE_COVERING = "Please remove your face covering"
    FACE_CAMERA = "Please face the camera"
    LOOK_AT_CAMERA = "Please look at the camera"
    ONE_PERSON_ONLY = "For your security, only one person at the screen please"
    PLEASE_WAIT = "Please wait"
    APPROVED = "Approved"
    DENIED = "Transaction declined"
    CARD_UNREADABLE = "Card cannot be read - please take your card"
    CARD_EXPIRED = "Card expired - please take your card"
    TAKE_CARD = "Please take your card"
    CARD_RETAINED = "Card retained - contact your bank"
    SERVICE_UNAVAILABLE = "Temporarily out of service"
    OUT_OF_SERVICE = "Out of service"


@dataclass(frozen=True)
class Shown:
    """One prompt as it appeared on the display."""

    prompt: Prompt
    text: str
    t_monotonic_s: float


def render(prompt: Prompt, *, pin_digits: int = 0, detail: str = "") -> str:
    """The exact text for a prompt; ``detail`` is a short reason line (never secret data)."""
    if pin_digits < 0:
        raise ValueError("pin_digits must be >= 0")
    text = prompt.value
    if prompt is Prompt.ENTER_PIN:
        text = f"{text}: {'*' * pin_digits}"
    if detail:
        text = f"{text}\n{detail}"
    return text


class Display(Device):
    """The customer-facing screen."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._opened = False
        self._closed = False

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Settings) -> Self: ...

    def open(self) -> None:
        with self._lock:
            if self._closed:
                raise DisplayError("display is closed")
            if not self._opened:
                self._open()
                self._opened = True

    def close(self) -> None:
        with self._lock:
            if self._opened and not self._closed:
                self._close()
            self._closed = True

    @property
    def is_open(self) -> bool:
        return self._opened and not self._closed

    def reopen(self) -> None:
        """Release the output and acquire it again: after a failed write (a screen unplugged and
        plugged back, a device node re-created by udev)."""
        with self._lock:
            if self._closed:
                raise DisplayError("display is closed")
            if self._opened:
                self._opened = False
                self._close()
            self._open()
            self._opened = True

    def show(self, prompt: Prompt, *, pin_digits: int = 0, detail: str = "") -> Shown:
        """Replace what is on screen with ``prompt``; returns what was shown."""
        shown = Shown(prompt, render(prompt, pin_digits=pin_digits, detail=detail), self._clock())
        with self._lock:
            if not self._opened or self._closed:
                raise DisplayError("display is not open")
            self._write(shown)
        return shown

    def _open(self) -> None:
        """Acquire the output; called once, under the lock."""

    def _close(self) -> None:
        """Release the output; called once, under the lock."""

    @abstractmethod
    def _write(self, shown: Shown) -> None:
        """Put ``shown`` on the screen; called under the lock."""


class TerminalDisplay(Display):
    """Writes each prompt to a text terminal: a TTY device on the ATM, or standard output."""

    def __init__(self, *, device: str = "-", clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock=clock)
        self._device = device
        self._stream: IO[str] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(device=settings.display.device)

    def _open(self) -> None:
        if self._device == "-":
            self._stream = sys.stdout
            return
        # O_NOCTTY: the daemon leads its own session under systemd, and a TTY it opened could become
        # its controlling terminal (a hang-up there would signal it); Linux no longer does that for
        # a write-only open, so this is only the customary guard. O_NONBLOCK: a screen that stops
        # reading (flow control, a stuck USB adapter) fails the write instead of hanging the session.
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self._device, flags)
        except OSError as exc:
            raise DisplayError(f"cannot open display device {self._device}: {exc.strerror or exc}") from exc
        self._stream = os.fdopen(fd, "w", encoding="utf-8")

    def _close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None and stream is not sys.stdout:
            try:
                stream.close()
            except OSError as exc:  # the unflushed text of a dead screen: nothing left to save
                logger.warning("display: closing %s: %s", self._device, exc.strerror or exc)

    def _write(self, shown: Shown) -> None:
        assert self._stream is not None
        # A real TTY gets a clear-screen so one prompt is visible at a time; a pipe gets plain lines.
        clear = "\x1b[2J\x1b[H" if self._is_tty() else ""
        try:
            self._stream.write(f"{clear}[ATM] {shown.text}\n")
            self._stream.flush()
        except OSError as exc:
            raise DisplayError(f"cannot write to display {self._device}: {exc.strerror or exc}") from exc

    def _is_tty(self) -> bool:
        try:
            return self._stream is not None and os.isatty(self._stream.fileno())
        except (OSError, ValueError):
            return False


class RecordingDisplay(Display):
    """Keeps every prompt in memory, for tests and the harness to assert on."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock=clock)
        self._history: list[Shown] = []

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls()

    def _write(self, shown: Shown) -> None:
        self._history.append(shown)
        logger.debug("display: %s", shown.prompt.name)

    @property
    def history(self) -> list[Shown]:
        with self._lock:
            return list(self._history)

    @property
    def current(self) -> Shown | None:
        with self._lock:
            return self._history[-1] if self._history else None

    def prompts(self) -> list[Prompt]:
        return [shown.prompt for shown in self.history]
