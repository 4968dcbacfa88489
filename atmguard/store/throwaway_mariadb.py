"""Throwaway MariaDB servers for tests, benches and demos: own data dir, free port, short socket.

``ThrowawayMariaDB(tls=...).start()`` bootstraps a data directory with ``mariadb-install-db``,
runs ``mariadbd`` on 127.0.0.1 and a free port, waits until it answers and, on ``stop()``,
shuts it down and deletes everything. Nothing depends on a server someone started by hand, and
the system server on :3306 is never touched. ``stop(keep_data=True)`` followed by ``start()``
restarts the same server (same data, same port): an outage as an ATM would see it.

The first bootstrap in a process is kept as a template and copied for later servers (a copy
takes ~50 ms, a bootstrap ~1.5 s). The server is tied to its parent with PR_SET_PDEATHSIG, so a
killed run does not leave a mariadbd behind. ``root`` can only log in through the socket (in a
0700 directory): the TCP root accounts the bootstrap creates are dropped, since any local user
could otherwise use them while the server runs.

Lives in the package (not in tests/) so ``measure_sync`` and the demo can start one; importing
this module starts nothing and imports no database driver.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import getpass
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    import pymysql.connections

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "mariadb-server is not installed (need mariadb-install-db and mariadbd); install it with:\n"
    "  sudo sh -c 'apt-get update && apt-get install -y --no-install-recommends mariadb-server'\n"
    "(or run deploy/install-system-deps.sh)"
)

# Small InnoDB files and buffers: a test server holds a few MB, and the machine is shared.
_SERVER_OPTIONS = (
    "--innodb-buffer-pool-size=64M",
    "--innodb-log-file-size=48M",
    "--innodb-data-file-path=ibdata1:12M:autoextend",
    "--performance-schema=OFF",
    "--skip-name-resolve",
    "--max-connections=60",
    "--character-set-server=utf8mb4",
    "--collation-server=utf8mb4_unicode_ci",
    "--max-allowed-packet=64M",
)
# Bootstrap-time options that must match at run time (InnoDB file sizes).
_BOOTSTRAP_OPTIONS = _SERVER_OPTIONS[:3]

_DROP_TCP_ROOT = (
    "DELETE FROM mysql.global_priv WHERE User = 'root' AND Host <> 'localhost';\n"
    "DELETE FROM mysql.proxies_priv WHERE User = 'root' AND Host <> 'localhost';\n"
)
_PORT_ATTEMPTS = 3
_RESTART_PORT_WAIT_S = 5.0


class MariaDBUnavailable(RuntimeError):
    """mariadb-server is missing, or the throwaway server would not start."""


def find_binaries() -> tuple[str, str]:
    """Paths of mariadb-install-db and mariadbd; MariaDBUnavailable with the apt command if missing."""
    install_db = shutil.which("mariadb-install-db")
    mariadbd = shutil.which("mariadbd") or next(
        (p for p in ("/usr/sbin/mariadbd", "/usr/libexec/mariadbd") if os.access(p, os.X_OK)), None
    )
    if install_db is None or mariadbd is None:
        raise MariaDBUnavailable(INSTALL_HINT)
    return install_db, mariadbd


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _user_args() -> list[str]:
    # mariadbd refuses to run as root unless told to; as anybody else it runs as that user.
    return ["--user=root"] if os.geteuid() == 0 else [f"--user={getpass.getuser()}"]


# --- bootstrap template, shared by every server in this process ------------------------------

_template_lock = threading.Lock()
_template_dir: Path | None = None


def _template_datadir() -> Path:
    global _template_dir
    with _template_lock:
        if _template_dir is not None and _template_dir.is_dir():
            return _template_dir
        install_db, _ = find_binaries()
        base = Path(tempfile.mkdtemp(prefix="mdbtpl-", dir="/tmp"))
        atexit.register(shutil.rmtree, base, True)
        extra = base / "bootstrap.sql"
        extra.write_text(_DROP_TCP_ROOT)
        datadir = base / "data"
        command = [
            install_db,
            "--no-defaults",
            "--auth-root-authentication-method=normal",
            f"--datadir={datadir}",
            *_user_args(),
            "--skip-test-db",
            "--skip-name-resolve",
            f"--extra-file={extra}",
            *_BOOTSTRAP_OPTIONS,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise MariaDBUnavailable(
                f"mariadb-install-db failed (exit {result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        _template_dir = datadir
        return datadir


@dataclass(frozen=True)
class ServerTls:
    """What a TLS server is started with: the CA it trusts for client certs, its cert and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_secure_transport: bool = True
    """Refuse plaintext TCP logins, so a TLS test cannot pass over an unencrypted connection."""


# --- the server ------------------------------------------------------------------------------


class ThrowawayMariaDB:
    """One private mariadbd: ``start()`` it, use ``host``/``port``/``socket_path``, ``stop()`` it."""

    def __init__(
        self,
        *,
        tls: ServerTls | None = None,
        startup_timeout_s: float = 30.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.tls = tls
        self.host = "127.0.0.1"
        self.port = 0
        self._startup_timeout_s = startup_timeout_s
        self._extra_args = extra_args
        self._base: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._atexit_registered = False
        self._log_offset = 0

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def socket_path(self) -> str:
        if self._base is None:
            raise RuntimeError("server not started")
        return str(self._base / "sock")

    @property
    def base_dir(self) -> Path:
        if self._base is None:
            raise RuntimeError("server not started")
        return self._base

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        """Start the server; after ``stop(keep_data=True)`` it comes back with its data and port."""
        if self._process is not None:
            return self
        _, mariadbd = find_binaries()
        restart = self._base is not None
        if not restart:
            template = _template_datadir()
            # Short path: a unix socket path must fit in 108 bytes.
            self._base = Path(tempfile.mkdtemp(prefix="mdb-", dir="/tmp"))
            os.chmod(self._base, 0o700)
            shutil.copytree(template, self._base / "data", symlinks=True)
        last_error = ""
        deadline = time.monotonic() + _RESTART_PORT_WAIT_S
        attempt = 0
        while True:
            attempt += 1
            # A restart keeps its port (clients are configured with it); a new server takes a
            # free one, which can be taken between probing and binding: then try another.
            if not restart:
                self.port = free_port()
            self._process = self._spawn(mariadbd)
            try:
                self._wait_ready()
                if not self._atexit_registered:
                    atexit.register(self.stop)
                    self._atexit_registered = True
                logger.info("throwaway MariaDB on %s:%d (socket %s)", self.host, self.port, self.socket_path)
                return self
            except MariaDBUnavailable as exc:
                last_error = str(exc)
                self._kill()
                if "Address already in use" not in last_error:
                    break
                if restart and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                if not restart and attempt < _PORT_ATTEMPTS:
                    continue
                break
        if not restart:
            self._remove_dir()
        raise MariaDBUnavailable(last_error)

    def _spawn(self, mariadbd: str) -> subprocess.Popen[bytes]:
        assert self._base is not None
        args = [
            mariadbd,
            "--no-defaults",
            *_user_args(),
            f"--datadir={self._base / 'data'}",
            f"--socket={self.socket_path}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--pid-file={self._base / 'mariadbd.pid'}",
            f"--log-error={self._base / 'error.log'}",
            f"--tmpdir={self._base}",
            *_SERVER_OPTIONS,
        ]
        if self.tls is not None:
            args += [
                f"--ssl-ca={self.tls.ca_file}",
                f"--ssl-cert={self.tls.cert_file}",
                f"--ssl-key={self.tls.key_file}",
            ]
            if self.tls.require_secure_transport:
                args.append("--require-secure-transport=ON")
        args += list(self._extra_args)
        # The error log is appended to across restarts: start from its end for this run.
        self._log_offset = self._error_log_size()
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )

    def _error_log_size(self) -> int:
        with contextlib.suppress(OSError, RuntimeError):
            return (self.base_dir / "error.log").stat().st_size
        return 0

    def _error_log_tail(self) -> str:
        with contextlib.suppress(OSError, RuntimeError):
            text = (self.base_dir / "error.log").read_bytes()[self._log_offset :]
            return text.decode(errors="replace")[-3000:]
        return ""

    def _wait_ready(self) -> None:
        import pymysql

        assert self._process is not None
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise MariaDBUnavailable(
                    f"mariadbd exited with {self._process.returncode}:\n{self._error_log_tail()}"
                )
            try:
                self.admin_connect(connect_timeout_s=1.0).close()
                return
            except pymysql.err.OperationalError:
                time.sleep(0.05)
        raise MariaDBUnavailable(
            f"mariadbd not ready after {self._startup_timeout_s} s:\n{self._error_log_tail()}"
        )

    def stop(self, *, timeout_s: float = 20.0, keep_data: bool = False) -> None:
        """Shut the server down (SHUTDOWN, then SIGTERM, then SIGKILL) and delete its files.

        ``keep_data``: keep the data directory (and port), so ``start()`` brings the same
        server back, as after an outage.
        """
        if self._process is not None:
            if self._process.poll() is None:
                import pymysql

                with contextlib.suppress(pymysql.err.MySQLError, OSError):
                    conn = self.admin_connect(connect_timeout_s=2.0)
                    with conn.cursor() as cursor:
                        cursor.execute("SHUTDOWN")
                    conn.close()
                try:
                    self._process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self._kill()
            self._process = None
        if not keep_data:
            self._remove_dir()

    def _kill(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self._process = None

    def _remove_dir(self) -> None:
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- connections -------------------------------------------------------------------------

    def admin_connect(
        self, *, database: str | None = None, connect_timeout_s: float = 5.0, **kwargs: Any
    ) -> pymysql.connections.Connection:
        """root over the unix socket (no password: root has no TCP account on this server)."""
        import pymysql

        return pymysql.connect(
            unix_socket=self.socket_path,
            user="root",
            password="",
            database=database,
            connect_timeout=connect_timeout_s,
            read_timeout=30,
            write_timeout=30,
            autocommit=True,
            charset="utf8mb4",
            **kwargs,
        )

    def admin_factory(self, *, database: str | None = None) -> Callable[[], pymysql.connections.Connection]:
        return lambda: self.admin_connect(database=database)

    def execute(self, sql: str, args: Any = None, *, database: str | None = None) -> list[tuple[Any, ...]]:
        """Run one statement as root and return its rows."""
        conn = self.admin_connect(database=database)
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql, args)
                return list(cursor.fetchall())
        finally:
            conn.close()

    def create_user(self, user: str, password: str, *, host: str = "127.0.0.1", admin: bool = False) -> None:
        """A TCP account; ``admin=True`` gives it every privilege WITH GRANT OPTION (for migrations)."""
        self.execute("CREATE USER IF NOT EXISTS %s@%s IDENTIFIED BY %s", (user, host, password))
        if admin:
            self.execute("GRANT ALL PRIVILEGES ON *.* TO %s@%s WITH GRANT OPTION", (user, host))
