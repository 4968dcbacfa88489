"""Logging for `atmguard run`: journald with structured fields under systemd, compact stderr otherwise.

A log call may carry ``extra={"session_id": ..., "event_type": ..., "masked_pan": ...}``. In the
journal these become the fields SESSION_ID=, EVENT_TYPE= and MASKED_PAN= (with ATM_ID= and
SYSLOG_IDENTIFIER=atmguard on every entry), so a technician can run
``journalctl -u atmguard SESSION_ID=...``. On stderr they are appended as ``key=value``.

Every handler installed here carries a :class:`RedactingFilter` as defence in depth: a run of 13
or more digits (a PAN that slipped into a message, an exception text or one of those fields) is
masked before any handler formats it. It cannot see a PIN, and does not try to: PIN digits never
reach logging at all (the keypad layer only reports how many digits were typed), and a 4-6 digit
PIN would be indistinguishable from any other small number.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from atmguard.config import Settings

# The record attributes that become journal fields / key=value pairs, in display order.
STRUCTURED_FIELDS: tuple[str, ...] = ("session_id", "event_type", "masked_pan")
SYSLOG_IDENTIFIER = "atmguard"
JOURNALD_SOCKET = "/run/systemd/journal/socket"

# PANs are 13-19 digits. Longer runs are masked too: a PAN glued to other digits is still a PAN,
# and over-masking a long number in a log line costs nothing.
_DIGIT_RUN = re.compile(r"\d{13,}")
# Marks the handlers configure_logging() installed, so a second call replaces rather than adds.
_OURS = "_atmguard_handler"

# journald understands a "<N>" syslog priority prefix on each stderr line (sd-daemon(3)).
_SYSLOG_PRIORITY = ((logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3))


def mask_digit_runs(text: str) -> str:
    """``text`` with every run of 13+ digits masked like a PAN (first 6 and last 4 at most).

    As for card PANs elsewhere in atmguard, fewer leading digits are kept on short runs so that at
    least 6 digits always stay hidden.
    """

    def mask(match: re.Match[str]) -> str:
        digits = match.group()
        n = len(digits)
        lead = max(0, min(6, n - 10))
        return digits[:lead] + "*" * (n - lead - 4) + digits[n - 4 :]

    return _DIGIT_RUN.sub(mask, text)


class RedactingFilter(logging.Filter):
    """Masks PAN-like digit runs in a record's final message, exception text and structured fields.

    The record is rewritten in place (message pre-formatted, ``args`` cleared), so no handler can
    reach the unmasked arguments afterwards (journald's handler would otherwise send them as
    CODE_ARGS). Never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            # A bad format string: logging's own error report would print the raw arguments.
            message = f"unformattable log call: {record.msg!s} (with {len(record.args or ())} argument(s))"
        record.msg = mask_digit_runs(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_digit_runs(record.exc_text)
            # The exception object's own repr could still hold the number; the text is enough.
            record.exc_info = None
        if record.stack_info:
            record.stack_info = mask_digit_runs(record.stack_info)
        for name in STRUCTURED_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                setattr(record, name, mask_digit_runs(str(value)))
        return True


def _structured(record: logging.LogRecord) -> dict[str, str]:
    fields: dict[str, str] = {}
    for name in STRUCTURED_FIELDS:
        value = record.__dict__.get(name)
        if value is not None and value != "":
            fields[name] = str(value)
    return fields


class CompactFormatter(logging.Formatter):
    """``[time ]LEVEL logger: message key=value...``; with ``syslog_prefix`` a ``<N>`` priority
    first and no time (journald stamps stderr lines itself)."""

    def __init__(self, *, timestamps: bool, syslog_prefix: bool = False) -> None:
        super().__init__(
            fmt="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
            if timestamps
            else "%(levelname)s %(name)s: %(message)s",
            datefmt="%Y-%m-%d %H:%M:%S",
        )
        self._syslog_prefix = syslog_prefix

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        pairs = " ".join(f"{key}={value}" for key, value in _structured(record).items())
        if pairs:
            # After the first line only, so a traceback stays readable and the pairs stay greppable.
            first, sep, rest = text.partition("\n")
            text = f"{first} {pairs}{sep}{rest}"
        if self._syslog_prefix:
            priority = next((p for level, p in _SYSLOG_PRIORITY if record.levelno <= level), 2)
            text = "\n".join(f"<{priority}>{line}" for line in text.split("\n"))
        return text


def journal_fields(record: logging.LogRecord, *, atm_id: str) -> dict[str, str]:
    """The journal fields (besides MESSAGE) atmguard sends for ``record``."""
    priority = next((p for level, p in _SYSLOG_PRIORITY if record.levelno <= level), 2)
    fields = {
        "PRIORITY": str(priority),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        "ATM_ID": atm_id,
        "LOGGER": record.name,
        "THREAD_NAME": record.threadName or "",
        "CODE_FILE": record.pathname,
        "CODE_LINE": str(record.lineno),
        "CODE_FUNC": record.funcName,
    }
    for name, value in _structured(record).items():
        fields[name.upper()] = value
    return fields


def _journal_handler(atm_id: str, sender: Callable[..., Any] | None = None) -> logging.Handler:
    """A ``systemd.journal.JournalHandler`` that sends exactly :func:`journal_fields`.

    JournalHandler's own emit() differs between systemd-python releases (234 drops record
    attributes, 235 forwards the whole record dictionary, arguments included); ours is the same on
    every release. Raises ImportError without systemd-python.
    """
    from systemd import journal

    if not hasattr(journal, "JournalHandler"):  # PyPI's unrelated "systemd" package
        raise ImportError("systemd.journal has no JournalHandler (not systemd-python)")

    class AtmguardJournalHandler(journal.JournalHandler):
        def __init__(self) -> None:
            super().__init__(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER, ATM_ID=atm_id)
            self._atmguard_send = sender or journal.send

        def emit(self, record: logging.LogRecord) -> None:
            try:
                message = self.format(record)
                self._atmguard_send(message, **journal_fields(record, atm_id=atm_id))
            except Exception:
                self.handleError(record)

    return AtmguardJournalHandler()


def under_systemd(environ: Mapping[str, str] = os.environ) -> tuple[bool, bool]:
    """(started by systemd, our stderr is journald's stream).

    JOURNAL_STREAM is only trusted when it names the file stderr really is: a child of a service
    inherits the variable even when its stderr is redirected elsewhere.
    """
    stderr_is_journal = False
    stream = environ.get("JOURNAL_STREAM", "")
    if stream:
        try:
            device, inode = (int(part) for part in stream.split(":", 1))
            stat = os.fstat(2)
            stderr_is_journal = (stat.st_dev, stat.st_ino) == (device, inode)
        except (ValueError, OSError):
            stderr_is_journal = False
    return stderr_is_journal or bool(environ.get("INVOCATION_ID")), stderr_is_journal


def configure_logging(
    settings: Settings,
    *,
    environ: Mapping[str, str] = os.environ,
    stream: TextIO | None = None,
    journal_sender: Callable[..., Any] | None = None,
) -> None:
    """Route the root logger for the service; calling it again replaces what it installed.

    ``stream`` (default: sys.stderr) and ``journal_sender`` (default: systemd.journal.send) exist
    for tests.
    """
    root = logging.getLogger()
    systemd_run, _ = under_systemd(environ)
    handler: logging.Handler | None = None
    # journald's socket can be missing under systemd (a container without journald): stderr then.
    journald_up = journal_sender is not None or os.path.exists(JOURNALD_SOCKET)
    if systemd_run and journald_up:
        try:
            handler = _journal_handler(settings.atm.id, journal_sender)
        except ImportError:
            handler = None
    destination = "journald"
    if handler is None:
        destination = "stderr"
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
        handler.setFormatter(CompactFormatter(timestamps=not systemd_run, syslog_prefix=systemd_run))
    handler.addFilter(RedactingFilter())
    setattr(handler, _OURS, True)

    for old in list(root.handlers):
        if getattr(old, _OURS, False) or _is_default_console_handler(old):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(settings.logging.level)
    logging.getLogger(__name__).debug("logging to %s at %s", destination, settings.logging.level)


def _is_default_console_handler(handler: logging.Handler) -> bool:
    """What logging.basicConfig() (the CLI's default) installs: it would print every line twice."""
    return type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (
        sys.stderr,
        sys.stdout,
        sys.__stderr__,
        sys.__stdout__,
    )
