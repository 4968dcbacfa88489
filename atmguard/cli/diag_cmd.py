"""`atmguard diag [--json] [--fire]`, `diag camera --save FILE.png`, `diag card`, `diag keypad`
and `atmguard status [--json]`: the technician's view of an ATM.

``diag`` runs every check and prints a table (or one JSON object): exit 0 when nothing FAILed,
1 on any FAIL, 75 when the hardware rows could not be checked because another process holds the
devices, 78 when the config is invalid. While the daemon runs it answers the hardware rows itself
(status socket); ``--fire`` and the camera/card/keypad tools need the devices and refuse with exit
75 (EX_TEMPFAIL) while anyone else holds them. ``status`` only asks the running daemon: exit 0 in
service, 1 out of service, 69 not running, 77 not allowed to ask. Nothing heavy is imported until
a handler runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from atmguard.cli.common import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_NOPERM,
    EX_OK,
    EX_UNAVAILABLE,
    CommandFailed,
    config_is_explicit,
    report_failures,
)

if TYPE_CHECKING:
    from atmguard.config import Settings
    from atmguard.errors import ConfigError

Handler = Callable[[argparse.Namespace], int]

EX_FAIL = 1
EX_TEMPFAIL = 75
DEFAULT_CARD_TIMEOUT_S = 60.0
DEFAULT_KEYPAD_DURATION_S = 60.0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``diag`` (with camera/card/keypad) and ``status`` to the top-level sub-commands."""
    diag = commands.add_parser(
        "diag",
        help="run every check (config, models, hardware, journal, disk, central, clock, daemon) as a table",
        description=(
            "Runs every check and prints PASS / WARN / FAIL / SKIP with what was measured and how to fix it. "
            "Safe while the daemon runs: it then reports the hardware as the daemon sees it. "
            "Exit 0: no FAIL; 1: a FAIL; 75: the hardware is held by another process; 78: invalid config."
        ),
    )
    diag.add_argument("--json", action="store_true", help="print one JSON object (for fleet tooling)")
    diag.add_argument(
        "--fire",
        action="store_true",
        help="also pulse the retention solenoid once (needs the daemon stopped; keep hands off the card path)",
    )
    diag.set_defaults(handler=_handler(_diag))
    tools = diag.add_subparsers(dest="diag_command", metavar="TOOL")

    camera = tools.add_parser(
        "camera",
        help="save one frame with face boxes, keypoints, covering and tracker state drawn on",
        description="Needs the daemon stopped (exit 75 otherwise). Writes a PNG to aim and focus the camera by.",
    )
    camera.add_argument("--save", required=True, metavar="FILE.png", help="where to write the picture")
    camera.set_defaults(handler=_handler(_diag_camera))

    card = tools.add_parser(
        "card",
        help="wait for a card and show what was read (masked PAN, tracks, expiry, Luhn)",
        description="Needs the daemon stopped (exit 75 otherwise). Exit 0: a card was read; 1: none in time.",
    )
    card.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_CARD_TIMEOUT_S,
        metavar="S",
        help="how long to wait (default 60)",
    )
    card.set_defaults(handler=_handler(_diag_card))

    keypad = tools.add_parser(
        "keypad",
        help="show key presses live (test mode: the daemon must be stopped)",
        description="Ends when every key was pressed, after --duration, or on Ctrl-C. Exit 0; 75 while the daemon runs.",
    )
    keypad.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_KEYPAD_DURATION_S,
        metavar="S",
        help="how long to listen (default 60)",
    )
    keypad.set_defaults(handler=_handler(_diag_keypad))

    status = commands.add_parser(
        "status",
        help="the running daemon's state, hardware health, last events and outbox",
        description=(
            "Asks the running daemon (daemon.status_socket_path); opens no device. "
            "Exit 0: in service; 1: out of service; 69: not running; 77: not allowed to ask."
        ),
    )
    status.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    status.set_defaults(handler=_handler(_status))


def _handler(body: Handler) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        from atmguard.errors import ConfigError
        from atmguard.hardware.ownership import HardwareBusyError, HardwareLockError

        return report_failures(
            f"atmguard {args.command}",
            lambda: body(args),
            [
                (HardwareBusyError, EX_TEMPFAIL, ""),
                (HardwareLockError, EX_NOPERM, ""),
                (ConfigError, EX_CONFIG, ""),
                (KeyboardInterrupt, 130, "interrupted"),
            ],
        )

    return handler


def _load(args: argparse.Namespace) -> tuple[Path, Settings | None, ConfigError | None]:
    from atmguard.config import Settings, load_settings, resolve_config_path
    from atmguard.errors import ConfigError

    path = resolve_config_path(getattr(args, "config", None))
    if not config_is_explicit(args) and not path.exists():
        return path, Settings(), None
    try:
        return path, load_settings(path), None
    except ConfigError as exc:
        return path, None, exc


def _settings(args: argparse.Namespace) -> Settings:
    _path, settings, error = _load(args)
    if error is not None:
        raise error
    assert settings is not None
    return settings


# --- diag ------------------------------------------------------------------------------------------


def _diag(args: argparse.Namespace) -> int:
    from atmguard.diag import render, system_checks
    from atmguard.diag.full import run_diag

    path, settings, error = _load(args)
    config_row = system_checks.check_config(path, settings, error)
    table = None if args.json else render.TableWriter(sys.stdout)
    if settings is None:
        # Nothing else can be judged without a valid config: the row says how to see every error.
        if table is not None:
            table.header(atm_id="?", config=str(path))
            table.row(config_row)
            table.summary([config_row])
        else:
            print(
                render.diag_json(
                    [config_row], atm_id="", config=str(path), exit_code=EX_CONFIG, hardware_source=""
                )
            )
        return EX_CONFIG
    if table is not None:
        table.header(atm_id=settings.atm.id, config=settings.source)
    verify = _VerifyProgress()
    report = run_diag(
        settings,
        config_row,
        fire=args.fire,
        on_result=table.row if table is not None else None,
        verify_progress=verify.update,
    )
    verify.finish()
    if table is not None:
        note = ""
        if report.hardware_source == "daemon":
            note = "hardware as the running daemon reports it"
        elif report.hardware_busy is not None:
            note = f"hardware not checked: {report.hardware_busy}"
        table.summary(report.results, note=note)
    else:
        print(
            render.diag_json(
                report.results,
                atm_id=settings.atm.id,
                config=settings.source,
                exit_code=report.exit_code,
                hardware_source=report.hardware_source,
            )
        )
    return report.exit_code


class _VerifyProgress:
    """Progress of the journal check, for journals worth a progress line."""

    def __init__(self) -> None:
        from atmguard.cli.progress import Progress

        self._make = lambda: Progress("journal verify", unit="events")
        self._progress: Progress | None = None

    def update(self, done: int, total: int) -> None:
        from atmguard.diag.system_checks import VERIFY_PROGRESS_MIN_EVENTS

        if total < VERIFY_PROGRESS_MIN_EVENTS:
            return
        if self._progress is None:
            self._progress = self._make()
        self._progress.update(done, total)

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.finish()


# --- the tools -------------------------------------------------------------------------------------


def _diag_camera(args: argparse.Namespace) -> int:
    from atmguard.diag.camera_picture import take_picture
    from atmguard.errors import CameraError
    from atmguard.hardware.ownership import HardwareLock
    from atmguard.vision.runtime import ModelError

    settings = _settings(args)
    out = Path(args.save)
    if not out.parent.is_dir():
        raise CommandFailed(EX_CANTCREAT, f"{out.parent}: no such directory")
    with HardwareLock.for_settings(settings, purpose="atmguard diag camera"):
        try:
            picture = take_picture(settings, out)
        except (CameraError, ModelError) as exc:
            raise CommandFailed(EX_UNAVAILABLE, str(exc)) from None
        except OSError as exc:
            raise CommandFailed(EX_CANTCREAT, f"{out}: {exc.strerror or exc}") from None
    for line in picture.lines:
        print(line)
    print(f"saved {picture.path} ({picture.size[0]}x{picture.size[1]}, {picture.frames} frames analysed)")
    return EX_OK


def _diag_card(args: argparse.Namespace) -> int:
    from atmguard.diag.card_tool import wait_for_card
    from atmguard.errors import CardReaderError
    from atmguard.hardware.ownership import HardwareLock
    from atmguard.hardware.registry import build

    settings = _settings(args)
    with HardwareLock.for_settings(settings, purpose="atmguard diag card"):
        reader = build("card_reader", settings)
        try:
            report = wait_for_card(reader, timeout_s=args.timeout, out=sys.stdout)
        except CardReaderError as exc:
            raise CommandFailed(EX_UNAVAILABLE, str(exc)) from None
    if report is None:
        print(f"no card within {args.timeout:g} s", file=sys.stderr)
        return EX_FAIL
    return EX_OK


def _diag_keypad(args: argparse.Namespace) -> int:
    from atmguard.diag.keypad_tool import run_keypad_test
    from atmguard.errors import KeypadError
    from atmguard.hardware.ownership import HardwareLock
    from atmguard.hardware.registry import build

    settings = _settings(args)
    with HardwareLock.for_settings(settings, purpose="atmguard diag keypad"):
        keypad = build("keypad", settings)
        try:
            run_keypad_test(keypad, duration_s=args.duration, out=sys.stdout)
        except KeypadError as exc:
            raise CommandFailed(EX_UNAVAILABLE, str(exc)) from None
    return EX_OK


# --- status ----------------------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    from atmguard.diag.render import status_text
    from atmguard.service.statuslink import StatusUnavailable, query_status, status_socket_path

    settings = _settings(args)
    try:
        answer = query_status(status_socket_path(settings))
    except StatusUnavailable as exc:
        if args.json:
            print(json.dumps({"running": False, "reason": exc.reason, "error": str(exc)}, sort_keys=True))
        code = EX_NOPERM if exc.reason == "denied" else EX_UNAVAILABLE
        raise CommandFailed(code, str(exc)) from None
    if args.json:
        print(json.dumps(answer, sort_keys=True))
    else:
        sys.stdout.write(status_text(answer))
    return EX_OK if answer.get("in_service") else EX_FAIL
