"""pytest fixtures for the throwaway MariaDB servers (machinery in tests/mariadb_server.py).

Enabled for every test module by ``pytest_plugins`` in tests/conftest.py.
A missing mariadb-server fails the tests with the apt command, never skips them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mariadb_server import (
    CentralTestDB,
    MariaDBUnavailable,
    ThrowawayMariaDB,
    TlsServer,
    shared_server,
    shared_tls_server,
)


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[ThrowawayMariaDB]:
    """A private MariaDB (no TLS) for the whole session; root via ``admin_connect()``."""
    try:
        server = shared_server()
    except MariaDBUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mariadb_tls() -> Iterator[TlsServer]:
    """A private MariaDB that requires TLS, its CA, a rogue CA and a client certificate."""
    try:
        tls = shared_tls_server()
    except MariaDBUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield tls
    tls.server.stop()


@pytest.fixture(scope="session")
def central_db(mariadb_server: ThrowawayMariaDB) -> CentralTestDB:
    """The ``atmguard`` database, fully migrated, shared by the session: use fresh ATMs
    (``central_db.add_atm()``) and fresh cards so tests do not see each other's rows."""
    return CentralTestDB.create(mariadb_server, "atmguard")
