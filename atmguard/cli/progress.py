"""Progress lines for long technician operations (journal verification, syncing a backlog, ...).

On a terminal the line is redrawn in place (``\\r``) at most every ``period_s``; when stderr is a
pipe or a file (fleet tooling, ``journalctl``, a CI log) only the final line is written, so logs
are not flooded with hundreds of intermediate states. stdout is never touched: it carries the
command's result (text or JSON) and must stay machine-readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

DEFAULT_PERIOD_S = 0.5


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """``update(done, total)`` as work goes on, ``finish()`` once at the end.

    ``label`` starts every line (``"verify"``); ``unit`` names what is counted (``"events"``).
    ``total`` may be None (unknown) or grow while the work goes on.
    """

    def __init__(
        self,
        label: str,
        *,
        unit: str = "",
        stream: TextIO | None = None,
        period_s: float = DEFAULT_PERIOD_S,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._label = label
        self._unit = unit
        self._stream = stream if stream is not None else sys.stderr
        self._period_s = period_s
        self._tty = _is_tty(self._stream) if tty is None else tty
        self._clock = clock
        self._started_s = clock()
        self._last_draw_s: float | None = None
        self._done = 0
        self._total: int | None = None
        self._detail = ""
        self._width = 0
        self._finished = False

    def update(self, done: int, total: int | None = None, *, detail: str = "") -> None:
        self._done = done
        if total is not None:
            self._total = total
        self._detail = detail
        if not self._tty:
            return
        now = self._clock()
        if self._last_draw_s is not None and now - self._last_draw_s < self._period_s:
            return
        self._last_draw_s = now
        self._draw(final=False)

    def finish(self, *, detail: str | None = None) -> None:
        """Write the final line (always, terminal or not); idempotent."""
        if self._finished:
            return
        self._finished = True
        if detail is not None:
            self._detail = detail
        self._draw(final=True)

    def line(self) -> str:
        """The current progress text, without terminal control characters."""
        total = self._total
        unit = f" {self._unit}" if self._unit else ""
        if total:
            count = f"{self._done}/{total}{unit} ({100.0 * min(self._done, total) / total:.0f}%)"
        else:
            count = f"{self._done}{unit}"
        elapsed = self._clock() - self._started_s
        detail = f", {self._detail}" if self._detail else ""
        return f"{self._label}: {count}{detail}, {elapsed:.1f} s"

    def _draw(self, *, final: bool) -> None:
        text = self.line()
        if self._tty:
            pad = " " * max(0, self._width - len(text))
            self._width = len(text)
            self._stream.write(f"\r{text}{pad}" + ("\n" if final else ""))
        else:
            self._stream.write(text + "\n")
        self._stream.flush()
