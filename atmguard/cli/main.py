"""Argument parsing and dispatch.

Each command's implementation is imported only when that command runs, so ``atmguard --help``
stays fast and touches no hardware on any machine.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from atmguard import __version__
from atmguard.cli.common import EX_CONFIG, EX_OK, EX_USAGE

Handler = Callable[[argparse.Namespace], int]

# Each module adds its commands with register(subparsers) and imports its heavy dependencies only
# inside the handlers, so building the parser stays cheap and touches no hardware.
COMMAND_MODULES: tuple[str, ...] = (
    "atmguard.cli.journal_cmd",
    "atmguard.cli.db_cmd",
    "atmguard.cli.sync_cmd",
    "atmguard.cli.model_cmd",
    "atmguard.cli.bench_cmd",
    "atmguard.cli.run_cmd",
    "atmguard.cli.simulate_cmd",
    "atmguard.cli.diag_cmd",
    "atmguard.cli.enroll_cmd",
)


def _check_config(args: argparse.Namespace) -> int:
    from atmguard.config import load_settings, resolve_config_path
    from atmguard.errors import ConfigError

    path = resolve_config_path(args.path or args.config)
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"{path}: INVALID ({len(exc.issues)} error(s))", file=sys.stderr)
        return EX_CONFIG
    roles = ", ".join(
        f"{role}={getattr(settings, role).backend}"
        for role in ("card_reader", "keypad", "actuator", "camera", "display")
    )
    print(f"{path}: OK (atm {settings.atm.id}; {roles})")
    return EX_OK


def _demo(args: argparse.Namespace) -> int:
    from atmguard.cli.demo import run_demo

    return run_demo(out_dir=args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atmguard",
        description="Face-aware security daemon for Raspberry Pi based ATMs.",
    )
    parser.add_argument("--version", action="version", version=f"atmguard {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="configuration file (default: $ATMGUARD_CONFIG, else /etc/atmguard/atmguard.toml)",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="console log level",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = commands.add_parser(
        "check-config", help="validate a configuration file; exit 0, or 78 with every error and its key path"
    )
    check.add_argument(
        "path", nargs="?", help="file to check (default: --config / $ATMGUARD_CONFIG / default path)"
    )
    check.set_defaults(handler=_check_config)

    demo = commands.add_parser(
        "demo", help="run the scenario library against the daemon on simulated hardware, with a report"
    )
    demo.add_argument("--out", default="out/demo", help="directory for report.html (default: out/demo)")
    demo.set_defaults(handler=_demo)

    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EX_USAGE
    return handler(args)
