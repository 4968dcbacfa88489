"""``atmguard diag``: which checks run, in which order, and who answers the hardware rows.

The hardware rows come from one of three places, decided once at the start:

1. the daemon answers its status socket: it owns the devices, so the rows are its view of them
   (nothing is opened; ``--fire`` is refused, it needs the devices);
2. nobody holds the hardware lock: this command takes it, opens each device itself, and keeps the
   lock until the table is done (a daemon started meanwhile waits for it, via systemd's restart);
3. someone else holds the lock and does not answer (another technician command, or a daemon whose
   status socket is disabled): the rows say who, and the command exits 75 (EX_TEMPFAIL) unless
   something FAILed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from atmguard.config import Settings
from atmguard.diag import daemon_checks, hardware_checks, system_checks
from atmguard.diag.model import Check, CheckResult, Status, any_failed, run_checks
from atmguard.hardware.ownership import (
    EX_TEMPFAIL,
    HardwareBusyError,
    HardwareLock,
    HardwareLockError,
    Holder,
    is_held,
    lock_path,
)
from atmguard.service.statuslink import StatusUnavailable, query_status, status_socket_path

logger = logging.getLogger(__name__)

EX_FAIL = 1
HARDWARE_ROWS: list[tuple[str, str]] = [
    ("camera frames", "camera"),
    ("camera face", "camera"),
    ("card reader", "card reader"),
    ("keypad", "keypad"),
    ("display", "display"),
    ("bin sensor", "actuator"),
    ("actuator", "actuator"),
]
MODELS_TIMEOUT_S = 120.0
"""Hashing and loading both models on a Pi takes seconds; this only catches a wedged runtime."""
JOURNAL_TIMEOUT_S = 600.0
"""Verifying a large journal on an SD card takes minutes (progress is shown meanwhile)."""
CAMERA_START_S = 30.0
"""libcamera's start-up plus loading the models for the face row."""


@dataclass
class DiagReport:
    results: list[CheckResult] = field(default_factory=list)
    hardware_busy: HardwareBusyError | None = None
    """Set when the hardware rows could not be checked because another process holds the devices."""
    hardware_source: str = ""
    """``daemon``, ``direct`` or ``busy``: who answered the hardware rows."""

    @property
    def exit_code(self) -> int:
        if any_failed(self.results):
            return EX_FAIL
        return EX_TEMPFAIL if self.hardware_busy is not None else 0


def _central_timeout_s(settings: Settings) -> float:
    central = settings.central
    return central.connect_timeout_s + 2 * central.read_timeout_s + 2.0


def _card_timeout_s(settings: Settings) -> float:
    reader = settings.card_reader
    # open (initialise: a motion, entry disable, status), one status, close: each exchange may be
    # retried, and each attempt waits for the ACK and then for the answer.
    per_exchange_s = (reader.retries + 1) * 2 * reader.response_timeout_s
    return reader.motion_timeout_s + 4 * per_exchange_s + 5.0


def system_check_list(settings: Settings, *, progress: Callable[[int, int], None] | None) -> list[Check]:
    return [
        Check(
            "journal",
            "journal",
            lambda: system_checks.check_journal(settings, progress=progress),
            JOURNAL_TIMEOUT_S,
        ),
        Check("outbox", "journal", lambda: system_checks.check_outbox(settings), 15.0),
        Check("disk", "disk", lambda: system_checks.check_disk(settings), 10.0),
        Check(
            "central",
            "central",
            lambda: system_checks.check_central(settings),
            _central_timeout_s(settings),
            "the server accepted the connection but stopped answering: check it and the network",
        ),
        Check("clock", "clock", system_checks.check_clock, system_checks.CLOCK_COMMAND_TIMEOUT_S + 5.0),
    ]


def hardware_check_list(settings: Settings, *, fire: bool) -> list[Check]:
    camera_timeout_s = (
        2 * settings.session.camera_timeout_s + hardware_checks.CAMERA_MEASURE_S + CAMERA_START_S
    )
    actuator = settings.actuator
    return [
        Check(
            "camera",
            "camera",
            lambda: hardware_checks.check_camera(settings),
            camera_timeout_s,
            "the camera driver hangs: power-cycle the ATM",
        ),
        Check(
            "card reader",
            "card reader",
            lambda: hardware_checks.check_card_reader(settings),
            _card_timeout_s(settings),
            "the reader stopped answering: check its power and cable",
        ),
        Check("keypad", "keypad", lambda: hardware_checks.check_keypad(settings), 10.0),
        Check(
            "display",
            "display",
            lambda: hardware_checks.check_display(settings),
            10.0,
            "the display device does not take the text: check the screen and its cable",
        ),
        Check(
            "actuator",
            "actuator",
            lambda: hardware_checks.check_actuator(settings, fire=fire),
            actuator.max_on_s + actuator.confirm_timeout_s + actuator.cooldown_s + 10.0,
        ),
    ]


def _ask_daemon(settings: Settings) -> tuple[dict[str, Any] | None, StatusUnavailable | None]:
    try:
        return query_status(status_socket_path(settings)), None
    except StatusUnavailable as exc:
        return None, exc


def run_diag(
    settings: Settings,
    config_row: CheckResult,
    *,
    fire: bool = False,
    on_result: Callable[[CheckResult], None] | None = None,
    verify_progress: Callable[[int, int], None] | None = None,
) -> DiagReport:
    """Every check, in table order. Raises HardwareBusyError only for ``fire`` (the devices are needed)."""
    report = DiagReport()

    def emit(row: CheckResult) -> None:
        report.results.append(row)
        if on_result is not None:
            on_result(row)

    lock = HardwareLock.for_settings(settings, purpose="atmguard diag")
    if fire:
        lock.acquire()  # HardwareBusyError / HardwareLockError: the caller refuses with the message
    answer: dict[str, Any] | None = None
    unavailable: StatusUnavailable | None = None
    holder: Holder | None = None
    hardware_rows: list[CheckResult] | None = None
    try:
        if not lock.held:
            answer, unavailable = _ask_daemon(settings)
        if answer is not None:
            report.hardware_source = "daemon"
        elif not lock.held:
            try:
                lock.acquire()
            except HardwareBusyError as exc:
                report.hardware_busy, holder = exc, exc.holder
                report.hardware_source = "busy"
                hardware_rows = daemon_checks.hardware_rows_not_checked(
                    HARDWARE_ROWS, f"not checked: in use by {exc.holder.describe()}", Status.WARN, str(exc)
                )
            except HardwareLockError as exc:
                report.hardware_source = "busy"
                hardware_rows = daemon_checks.hardware_rows_not_checked(
                    HARDWARE_ROWS, f"not checked: {exc}", Status.FAIL, "run as root or as the atmguard user"
                )
        if lock.held:
            report.hardware_source = "direct"
            if unavailable is None:
                unavailable = StatusUnavailable("absent", "this command holds the hardware lock")

        emit(config_row)
        for row in run_checks(
            [Check("models", "models", lambda: system_checks.check_models(settings), MODELS_TIMEOUT_S)]
        ):
            emit(row)
        if answer is not None:
            for row in daemon_checks.hardware_rows_from_daemon(answer):
                emit(row)
        elif hardware_rows is not None:
            for row in hardware_rows:
                emit(row)
        else:
            run_checks(hardware_check_list(settings, fire=fire), on_result=emit)
        lock.release()  # the devices are closed: a daemon may start while the rest runs
        run_checks(system_check_list(settings, progress=verify_progress), on_result=emit)
        if answer is None and holder is None and report.hardware_source != "direct":
            holder = _holder(settings)
        emit(daemon_checks.daemon_row(answer, unavailable, holder))
    finally:
        lock.release()
    return report


def _holder(settings: Settings) -> Holder | None:
    try:
        return is_held(lock_path(settings))
    except HardwareLockError:
        return None
