"""Throwaway MariaDB servers for tests: the server itself, test certificates, shared servers.

The server class lives in ``atmguard.store.throwaway_mariadb`` (so the sync bench and the demo
can start one) and is re-exported here; this module adds what only tests need: ``TestCA``
(a self-signed CA and certificates made with the ``openssl`` CLI, for the TLS server), the
process-wide shared servers the session fixtures hand out, and ``CentralTestDB`` (a migrated
central database that hands out ATM logins).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql

from atmguard.store.throwaway_mariadb import (
    INSTALL_HINT,
    MariaDBUnavailable,
    ServerTls,
    ThrowawayMariaDB,
    find_binaries,
    free_port,
)

__all__ = [
    "INSTALL_HINT",
    "TEST_PAN_KEY",
    "TEST_PIN_PEPPER",
    "AtmLogin",
    "CentralTestDB",
    "CertPair",
    "MariaDBUnavailable",
    "ServerTls",
    "TestCA",
    "ThrowawayMariaDB",
    "TlsServer",
    "find_binaries",
    "free_port",
    "shared_server",
    "shared_tls_server",
    "throwaway_database",
]

logger = logging.getLogger(__name__)

# --- test certificates -----------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise MariaDBUnavailable(
            "the openssl command is needed to make test certificates (apt-get install openssl)"
        )
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


@dataclass(frozen=True)
class CertPair:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class TestCA:
    """A self-signed CA (EC P-256) that issues short-lived server and client certificates."""

    __test__ = False  # not a test class, whatever its name says

    directory: Path
    name: str
    cert_file: Path = field(init=False)
    key_file: Path = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cert_file", self.directory / f"{self.name}-ca.pem")
        object.__setattr__(self, "key_file", self.directory / f"{self.name}-ca.key")

    @classmethod
    def create(cls, directory: str | os.PathLike[str], *, name: str = "test") -> TestCA:
        ca = cls(Path(directory), name)
        ca.directory.mkdir(parents=True, exist_ok=True)
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(ca.key_file), "-out", str(ca.cert_file), "-days", "2",
            "-subj", f"/CN=atmguard {name} test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "subjectKeyIdentifier=hash",
            cwd=ca.directory,
        )  # fmt: skip
        return ca

    def issue(
        self,
        name: str,
        *,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        client: bool = False,
    ) -> CertPair:
        """A certificate for ``name`` with these subjectAltNames (server, or client when asked)."""
        pair = CertPair(self.directory / f"{name}.pem", self.directory / f"{name}.key")
        csr = self.directory / f"{name}.csr"
        ext = self.directory / f"{name}.ext"
        sans = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips]
        lines = [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}",
            "subjectKeyIdentifier=hash",
            "authorityKeyIdentifier=keyid",
        ]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(pair.key_file), "-out", str(csr), "-subj", f"/CN={name}",
            cwd=self.directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert_file), "-CAkey", str(self.key_file),
            "-CAcreateserial", "-out", str(pair.cert_file), "-days", "2", "-extfile", str(ext),
            cwd=self.directory,
        )  # fmt: skip
        os.chmod(pair.key_file, 0o600)
        return pair


# --- process-wide shared servers (what the session fixtures hand out) ------------------------

_shared_lock = threading.Lock()
_shared: dict[str, Any] = {}


def shared_server() -> ThrowawayMariaDB:
    """The plain (no TLS) server of this process, started on first use, stopped at exit."""
    with _shared_lock:
        server = _shared.get("plain")
        if server is None or not server.running:
            server = ThrowawayMariaDB().start()
            _shared["plain"] = server
        return server


@dataclass(frozen=True)
class TlsServer:
    """A TLS server and the PKI around it: its CA, and a second CA that did not sign it."""

    server: ThrowawayMariaDB
    ca: TestCA
    other_ca: TestCA
    client: CertPair
    directory: Path


def shared_tls_server() -> TlsServer:
    """The TLS server of this process (cert for IP 127.0.0.1 only, plaintext TCP refused)."""
    with _shared_lock:
        tls = _shared.get("tls")
        if tls is None or not tls.server.running:
            directory = Path(tempfile.mkdtemp(prefix="mdbpki-", dir="/tmp"))
            atexit.register(shutil.rmtree, directory, True)
            ca = TestCA.create(directory, name="bank")
            other_ca = TestCA.create(directory, name="rogue")
            # Only the IP: connecting by the name "localhost" must fail the host-name check.
            server_pair = ca.issue("server", ips=("127.0.0.1",))
            client_pair = ca.issue("atm-client", client=True)
            server = ThrowawayMariaDB(
                tls=ServerTls(
                    ca_file=ca.cert_file, cert_file=server_pair.cert_file, key_file=server_pair.key_file
                )
            ).start()
            tls = TlsServer(server=server, ca=ca, other_ca=other_ca, client=client_pair, directory=directory)
            _shared["tls"] = tls
        return tls


@contextlib.contextmanager
def throwaway_database(server: ThrowawayMariaDB, name: str) -> Iterator[str]:
    """A fresh, empty database ``name`` on ``server``, dropped afterwards."""
    server.execute(f"DROP DATABASE IF EXISTS `{name}`")
    server.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    try:
        yield name
    finally:
        with contextlib.suppress(pymysql.err.MySQLError):
            server.execute(f"DROP DATABASE IF EXISTS `{name}`")


# --- a migrated central database with ATM logins (for store, sync and demo) -----------------

TEST_PAN_KEY = b"test-bank-pan-hmac-key-0123456789abcdef"
TEST_PIN_PEPPER = b"test-fleet-pin-pepper-0123456789abcdef"


@dataclass(frozen=True)
class AtmLogin:
    atm_id: str
    user: str
    password: str
    host: str = "127.0.0.1"


class CentralTestDB:
    """A database on a throwaway server with every migration applied; hands out ATM logins."""

    def __init__(self, server: ThrowawayMariaDB, database: str) -> None:
        self.server = server
        self.database = database
        self._counter = 0
        self._lock = threading.Lock()

    @classmethod
    def create(cls, server: ThrowawayMariaDB, database: str = "atmguard") -> CentralTestDB:
        from atmguard.store.migrate import migrate

        server.execute(f"DROP DATABASE IF EXISTS `{database}`")
        conn = server.admin_connect()
        try:
            migrate(conn, database=database)
        finally:
            conn.close()
        return cls(server, database)

    def admin(self) -> pymysql.connections.Connection:
        """root, with the central database as default (bank side)."""
        return self.server.admin_connect(database=self.database)

    def add_atm(self, atm_id: str | None = None, *, require_tls: bool = False) -> AtmLogin:
        """A new ATM (unique id unless given) with its own MySQL account, granted as in production."""
        from atmguard.store.migrate import register_atm

        with self._lock:
            self._counter += 1
            number = self._counter
        tag = f"{os.getpid() % 10000}_{number}"
        login = AtmLogin(atm_id=atm_id or f"ATM-T{tag}", user=f"atm_t{tag}", password=f"pw-{tag}-secret")
        conn = self.server.admin_connect()
        try:
            register_atm(
                conn,
                database=self.database,
                atm_id=login.atm_id,
                atm_user=login.user,
                atm_host=login.host,
                password=login.password,
                require_tls=require_tls,
            )
        finally:
            conn.close()
        return login

    def atm_connect(self, login: AtmLogin, **kwargs: Any) -> pymysql.connections.Connection:
        """A plain PyMySQL connection as the ATM (for proving what it may and may not do)."""
        return pymysql.connect(
            host=self.server.host,
            port=self.server.port,
            user=login.user,
            password=login.password,
            database=self.database,
            autocommit=True,
            ssl_disabled=True,
            connect_timeout=5,
            read_timeout=30,
            write_timeout=30,
            **kwargs,
        )

    def settings_mapping(self, login: AtmLogin, password_file: Path, **central: Any) -> dict[str, Any]:
        """A config mapping for this ATM (password written to ``password_file``, mode 0600)."""
        password_file.write_text(login.password + "\n")
        os.chmod(password_file, 0o600)
        return {
            "atm": {"id": login.atm_id},
            "central": {
                "host": self.server.host,
                "port": self.server.port,
                "database": self.database,
                "user": login.user,
                "password_file": str(password_file),
                "connect_timeout_s": 3.0,
                "read_timeout_s": 10.0,
                "write_timeout_s": 10.0,
                **central,
            },
        }

    def store(self, login: AtmLogin) -> Any:
        """A CentralStore logged in as this ATM (opened lazily)."""
        from atmguard.store.central import CentralStore

        return CentralStore(
            lambda: self.atm_connect(login),
            atm_id=login.atm_id,
            where=f"{self.server.host}:{self.server.port}",
        )

    def bank_store(self) -> Any:
        """A CentralStore on the admin connection, for bank-side calls (verify_chain)."""
        from atmguard.store.central import CentralStore

        return CentralStore(self.admin, atm_id="<bank>", where="bank")
