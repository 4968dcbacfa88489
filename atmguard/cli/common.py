"""What every command shares: sysexits.h exit codes and how a command finds its settings."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from atmguard.config import Settings

# sysexits.h, so scripts and fleet tooling can tell failures apart.
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_IOERR = 74
EX_NOPERM = 77
EX_CONFIG = 78


class CommandFailed(Exception):
    """A handler gives up: ``message`` goes to stderr and ``exit_code`` is returned."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


ErrorExit = tuple[type[BaseException] | tuple[type[BaseException], ...], int, str]
"""An exception kind, the exit code it becomes, and text put before its message."""


def report_failures(prefix: str, call: Callable[[], int], errors: Sequence[ErrorExit] = ()) -> int:
    """``call()``'s exit code. A :class:`CommandFailed`, or an exception of a kind in ``errors``
    (the first that matches, as in ``except`` clauses), becomes one ``prefix: message`` line on
    stderr and its exit code; anything else propagates."""
    try:
        return call()
    except CommandFailed as exc:
        message, code = str(exc), exc.exit_code
    except BaseException as exc:
        match = next(((code, lead) for kinds, code, lead in errors if isinstance(exc, kinds)), None)
        if match is None:
            raise
        code, lead = match
        message = lead + str(exc)
    print(f"{prefix}: {message}", file=sys.stderr)
    return code


def config_is_explicit(args: argparse.Namespace) -> bool:
    """Whether the user named a config file (--config or $ATMGUARD_CONFIG)."""
    from atmguard.config import CONFIG_ENV_VAR

    return bool(getattr(args, "config", None) or os.environ.get(CONFIG_ENV_VAR))


def command_settings(args: argparse.Namespace) -> Settings:
    """The settings a technician command runs with.

    An explicitly named config must load (ConfigError otherwise); without one, the default file
    is used if it exists, else the built-in defaults - so a bank workstation or a fresh clone
    with no ATM config can still run the command.
    """
    from atmguard.config import Settings, load_settings, resolve_config_path

    path = resolve_config_path(getattr(args, "config", None))
    if config_is_explicit(args) or path.exists():
        return load_settings(path)
    return Settings()
