"""`atmguard run`: the service itself (what the systemd unit starts)."""

from __future__ import annotations

import argparse

from atmguard.cli.common import EX_CONFIG


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``run`` to the top-level sub-commands."""
    run = commands.add_parser(
        "run",
        help="run the ATM service (card, PIN, face checks, retention, journal, sync)",
        description=(
            "Runs the service in the foreground until SIGTERM: builds the configured backends, checks the "
            "models and the config, announces READY=1 to systemd, pings the watchdog, and ends the current "
            "session safely on SIGTERM. SIGHUP reloads the session policy and the log level. Needs a config "
            "file (--config, $ATMGUARD_CONFIG or /etc/atmguard/atmguard.toml): the built-in defaults are "
            "never used to run an ATM."
        ),
    )
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import sys

    from atmguard.config import resolve_config_path
    from atmguard.daemon import run_daemon

    path = resolve_config_path(getattr(args, "config", None))
    if not path.is_file():
        print(f"{path}: no such config file; `atmguard run` will not run an ATM on defaults", file=sys.stderr)
        return EX_CONFIG
    return run_daemon(path)
