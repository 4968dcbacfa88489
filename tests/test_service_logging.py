"""configure_logging: compact stderr lines, journald fields, PAN redaction, idempotence."""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from atmguard.config import AtmSettings, LoggingSettings, Settings
from atmguard.service.logsetup import configure_logging, mask_digit_runs, under_systemd

PAN = "4761731000000001"
MASKED = "476173******0001"


def _systemd_journal_importable() -> bool:
    try:
        return importlib.util.find_spec("systemd.journal") is not None
    except ImportError:
        return False


HAS_SYSTEMD_PYTHON = _systemd_journal_importable()


def settings(level: str = "INFO") -> Settings:
    return Settings(atm=AtmSettings(id="ATM-T1"), logging=LoggingSettings(level=level))  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture
def no_systemd_python(monkeypatch) -> None:
    """As on a machine without systemd-python: importing it fails."""
    monkeypatch.setitem(sys.modules, "systemd", None)
    monkeypatch.setitem(sys.modules, "systemd.journal", None)


def test_stderr_line_outside_systemd_has_time_level_logger_message_and_fields() -> None:
    out = io.StringIO()
    configure_logging(settings(), environ={}, stream=out)
    logging.getLogger("atmguard.session.controller").info(
        "decision %s (%s)",
        "deny",
        "face_covered",
        extra={"session_id": "S-42", "event_type": "decision", "masked_pan": MASKED},
    )
    line = out.getvalue().rstrip("\n")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO atmguard\.session\.controller: decision deny \(face_covered\)"
        rf" session_id=S-42 event_type=decision masked_pan={re.escape(MASKED)}",
        line,
    ), line


def test_fields_are_omitted_when_absent() -> None:
    out = io.StringIO()
    configure_logging(settings(), environ={}, stream=out)
    logging.getLogger("atmguard.x").warning("plain")
    assert out.getvalue().endswith("WARNING atmguard.x: plain\n")


def test_under_systemd_without_journald_module_no_timestamp_but_priority_prefix(no_systemd_python) -> None:
    out = io.StringIO()
    configure_logging(settings(), environ={"INVOCATION_ID": "0123abcd"}, stream=out)
    log = logging.getLogger("atmguard.daemon")
    log.info("in service", extra={"session_id": "S-1"})
    log.error("camera lost")
    assert out.getvalue().splitlines() == [
        "<6>INFO atmguard.daemon: in service session_id=S-1",
        "<3>ERROR atmguard.daemon: camera lost",
    ]


def test_pan_in_message_argument_is_masked() -> None:
    out = io.StringIO()
    configure_logging(settings(), environ={}, stream=out)
    logging.getLogger("atmguard.t").info("track read: %s=2512101", PAN)
    text = out.getvalue()
    assert PAN not in text
    assert f"track read: {MASKED}=2512101" in text


def test_pan_in_extra_field_and_exception_is_masked() -> None:
    out = io.StringIO()
    configure_logging(settings(), environ={}, stream=out)
    try:
        raise ValueError(f"bad card %B{PAN}^DOE/JOHN^2512")
    except ValueError:
        logging.getLogger("atmguard.t").exception("card failed", extra={"masked_pan": PAN})
    text = out.getvalue()
    assert PAN not in text
    assert f"masked_pan={MASKED}" in text
    assert f"ValueError: bad card %B{MASKED}^DOE/JOHN^2512" in text  # the traceback is still there


def test_redaction_reaches_other_handlers_through_the_record(caplog) -> None:
    # The record is rewritten before any later handler (here pytest's) sees its arguments.
    configure_logging(settings(), environ={}, stream=io.StringIO())
    logging.getLogger("atmguard.t").warning("pan %s", PAN)
    record = caplog.records[-1]
    assert record.getMessage() == f"pan {MASKED}"
    assert not record.args


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4761731000000001", "476173******0001"),  # 16 digits
        ("4761731000001", "476******0001"),  # 13 digits: at least 6 stay hidden
        ("4761731000000000017", "476173*********0017"),  # 19
        ("476173100000", "476173100000"),  # 12 digits: not a PAN
        ("session 1234 took 250 ms", "session 1234 took 250 ms"),
        ("476173******0001", "476173******0001"),  # already masked
        ("a=4761731000000001,b=4761731000000019", "a=476173******0001,b=476173******0019"),
    ],
)
def test_mask_digit_runs(text: str, expected: str) -> None:
    assert mask_digit_runs(text) == expected


def test_level_comes_from_settings() -> None:
    out = io.StringIO()
    configure_logging(settings("WARNING"), environ={}, stream=out)
    log = logging.getLogger("atmguard.t")
    log.info("quiet")
    log.warning("loud")
    assert "quiet" not in out.getvalue()
    assert "loud" in out.getvalue()


def test_calling_twice_does_not_duplicate_lines_and_replaces_the_cli_default() -> None:
    root = logging.getLogger()
    default_console = logging.StreamHandler(sys.stderr)  # what the CLI's basicConfig installs
    root.addHandler(default_console)
    first, second = io.StringIO(), io.StringIO()
    configure_logging(settings(), environ={}, stream=first)
    configure_logging(settings(), environ={}, stream=second)
    assert default_console not in root.handlers
    logging.getLogger("atmguard.t").warning("once")
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 1


def test_journal_stream_is_trusted_only_when_it_is_our_stderr() -> None:
    info = os.fstat(2)
    assert under_systemd({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}) == (True, True)
    assert under_systemd({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino + 1}"}) == (False, False)
    assert under_systemd({"JOURNAL_STREAM": "garbage"}) == (False, False)
    assert under_systemd({"INVOCATION_ID": "abc"}) == (True, False)
    assert under_systemd({}) == (False, False)


@pytest.mark.skipif(
    not HAS_SYSTEMD_PYTHON,
    reason="systemd-python is not importable here (install libsystemd-dev and pip install systemd-python, "
    "or on a Pi apt install python3-systemd)",
)
def test_journald_entries_carry_structured_fields() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []

    def sender(message: str, **fields: Any) -> None:
        sent.append((message, fields))

    info = os.fstat(2)
    configure_logging(
        settings(), environ={"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}, journal_sender=sender
    )
    from systemd.journal import JournalHandler

    assert any(isinstance(h, JournalHandler) for h in logging.getLogger().handlers)
    logging.getLogger("atmguard.session.controller").warning(
        "decision for %s",
        PAN,
        extra={"session_id": "S-7", "event_type": "decision", "masked_pan": MASKED},
    )
    message, fields = sent[-1]
    assert message == f"decision for {MASKED}"
    assert fields["SESSION_ID"] == "S-7"
    assert fields["EVENT_TYPE"] == "decision"
    assert fields["MASKED_PAN"] == MASKED
    assert fields["ATM_ID"] == "ATM-T1"
    assert fields["SYSLOG_IDENTIFIER"] == "atmguard"
    assert fields["PRIORITY"] == "4"
    assert fields["LOGGER"] == "atmguard.session.controller"
    # Only journal-valid field names, and nothing carries the raw number.
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", name) for name in fields)
    assert all(PAN not in str(value) for value in fields.values())

    logging.getLogger("atmguard.t").info("no session")
    _, fields = sent[-1]
    assert "SESSION_ID" not in fields
