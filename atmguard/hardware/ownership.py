"""Who owns the ATM's hardware: an exclusive ``flock`` on ``<paths.state_dir>/hardware.lock``.

The daemon takes the lock before it opens anything and holds it for its whole life; technician
commands that open hardware themselves (``diag camera``, ``diag card``, ``diag keypad``, the
hardware checks of ``diag``, ``diag --fire``) take it without waiting and refuse when it is held,
so a technician can never fight the running daemon for the card reader's serial port or fire the
solenoid under a customer's card. Read-only commands (``status``, ``outbox``, ``journal verify``)
never take it.

Why the state directory and not the runtime directory (/run/atmguard): systemd removes the runtime
directory when the service stops, so a technician command would have to create it (with the wrong
owner) exactly when the daemon is not running; the state directory always exists, is configured in
the same file both sides read (so they agree on the path without another setting) and only root
and the atmguard user can reach it, the accounts that may open the hardware anyway. A flock is
released by the kernel when its holder dies, so a crash never leaves a stale lock behind.

The holder writes one JSON line into the file (pid, what it is, systemd unit, since when) so a
refused command can say who holds the lock; when the file is not writable (created by another
account) the lock still works and the pid is looked up in /proc/locks instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from atmguard.errors import AtmguardError

if TYPE_CHECKING:
    from atmguard.config import Settings

logger = logging.getLogger(__name__)

LOCK_FILENAME = "hardware.lock"
EX_TEMPFAIL = 75
"""sysexits.h: the hardware is busy now; try again later (after stopping the daemon)."""
DAEMON_PURPOSE = "atmguard run"
_LOCK_FILE_MODE = 0o644  # readable by the other side (root / atmguard), whoever created it
_MAX_HOLDER_BYTES = 4096


class HardwareLockError(AtmguardError, OSError):
    """The hardware lock file cannot be opened or locked (permissions, missing directory)."""


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds the lock, as far as can be told."""

    pid: int | None
    purpose: str = ""
    unit: str = ""
    since: str = ""

    @property
    def is_daemon(self) -> bool:
        return self.purpose == DAEMON_PURPOSE

    def describe(self) -> str:
        who = self.purpose or "another process"
        parts = [f"pid {self.pid}" if self.pid is not None else "pid unknown"]
        if self.unit:
            parts.append(f"unit {self.unit}")
        if self.since:
            parts.append(f"since {self.since}")
        return f"{who} ({', '.join(parts)})"


class HardwareBusyError(HardwareLockError, BlockingIOError):
    """Another process owns the hardware; ``holder`` says who, the message what to do."""

    exit_code = EX_TEMPFAIL

    def __init__(self, path: Path, holder: Holder, what: str) -> None:
        self.path = path
        self.holder = holder
        if holder.is_daemon:
            unit = holder.unit or "atmguard.service"
            advice = (
                f"the daemon owns the hardware: stop it first (sudo systemctl stop {unit.removesuffix('.service')})"
                " and start it again when done; `atmguard status` and `atmguard diag` ask the running"
                " daemon instead"
            )
        else:
            advice = "wait for it to finish, then try again"
        self.what = what
        super().__init__(f"the hardware is in use by {holder.describe()}: {advice} (lock {path})")


def lock_path(settings: Settings) -> Path:
    """``<paths.state_dir>/hardware.lock``, relative state dirs resolved against the config file."""
    from atmguard.config import relative_to_config

    return relative_to_config(settings, settings.paths.state_dir) / LOCK_FILENAME


def _own_unit() -> str:
    """The systemd unit this process runs in (from its cgroup), or ""."""
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        name = line.rsplit("/", 1)[-1]
        if name.endswith(".service") and "@" not in name and not name.startswith("user"):
            return name
    return ""


def _pid_from_proc_locks(path: Path) -> int | None:
    """The pid /proc/locks gives for a FLOCK on ``path``'s inode (when the file says nothing)."""
    try:
        info = path.stat()
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:02:131 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK":
            try:
                _major, _minor, inode = fields[5].split(":")
                if int(inode) == info.st_ino and int(fields[4]) > 0:
                    return int(fields[4])
            except ValueError:
                continue
    return None


def read_holder(path: Path) -> Holder:
    """Who holds the lock at ``path`` (call it only when the lock is known to be held)."""
    data: Any = None
    with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
        with path.open("rb") as fh:
            raw = fh.read(_MAX_HOLDER_BYTES)
        data = json.loads(raw.decode("utf-8")) if raw.strip() else None
    if isinstance(data, dict) and isinstance(data.get("pid"), int):
        return Holder(
            pid=data["pid"],
            purpose=str(data.get("purpose", "")),
            unit=str(data.get("unit", "")),
            since=str(data.get("since", "")),
        )
    return Holder(pid=_pid_from_proc_locks(path))


def is_held(path: Path) -> Holder | None:
    """The holder if some process holds the lock now, else None; never takes it for long."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HardwareLockError(f"cannot read the hardware lock {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_holder(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class HardwareLock:
    """The exclusive hardware lock; ``acquire()`` never waits. A context manager."""

    def __init__(self, path: Path, *, purpose: str, create_dir: bool = False) -> None:
        """``purpose`` names the holder in refusals (``atmguard run``, ``atmguard diag camera``).
        ``create_dir``: make the state directory (0700) if missing - the daemon's privilege; a
        technician command refuses instead, rather than create it with the wrong owner."""
        self.path = path
        self.purpose = purpose
        self._create_dir = create_dir
        self._fd: int | None = None

    @classmethod
    def for_settings(cls, settings: Settings, *, purpose: str, create_dir: bool = False) -> Self:
        return cls(lock_path(settings), purpose=purpose, create_dir=create_dir)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise HardwareBusyError (held by someone) / HardwareLockError."""
        if self._fd is not None:
            return
        directory = self.path.parent
        if not directory.is_dir():
            if not self._create_dir:
                raise HardwareLockError(
                    f"{self.purpose}: state directory {directory} does not exist (paths.state_dir;"
                    " the daemon creates it at its first start)",
                )
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, writable = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HardwareBusyError(self.path, read_holder(self.path), self.purpose) from None
        except OSError as exc:
            os.close(fd)
            raise HardwareLockError(f"cannot lock {self.path}: {exc.strerror}") from None
        self._fd = fd
        if writable:
            self._write_holder(fd)
        logger.debug("hardware lock %s taken by %s", self.path, self.purpose)

    def _open(self) -> tuple[int, bool]:
        flags = os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(self.path, os.O_RDWR | flags, _LOCK_FILE_MODE)
        except PermissionError:
            # Created by the other account: a read-only descriptor can hold a flock just as well.
            try:
                return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW), False
            except OSError as exc:
                raise self._cannot_open(exc) from None
        except OSError as exc:
            raise self._cannot_open(exc) from None
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(
                    fd, _LOCK_FILE_MODE
                )  # the umask (0077 in the unit) must not lock the other side out
        return fd, True

    def _cannot_open(self, exc: OSError) -> HardwareLockError:
        hint = " (run as root or as the atmguard user)" if exc.errno in (errno.EACCES, errno.EPERM) else ""
        return HardwareLockError(f"cannot open the hardware lock {self.path}: {exc.strerror}{hint}")

    def _write_holder(self, fd: int) -> None:
        record = {
            "pid": os.getpid(),
            "purpose": self.purpose,
            "unit": _own_unit(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        data = json.dumps(record, sort_keys=True).encode() + b"\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError as exc:  # the lock itself is what matters; the note only helps a refusal
            logger.warning("hardware lock %s: cannot record the holder: %s", self.path, exc.strerror)

    def release(self) -> None:
        """Give the lock back; idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no stale holder note for the next reader
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        logger.debug("hardware lock %s released by %s", self.path, self.purpose)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
