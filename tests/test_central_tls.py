"""TLS to the central server: verified against the configured CA and host name, never plaintext."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from mariadb_server import AtmLogin, CentralTestDB, TlsServer

from atmguard.config import Settings, settings_from_mapping
from atmguard.errors import ConfigError
from atmguard.store.central import (
    CentralAccessDeniedError,
    CentralStore,
    CentralTlsError,
    connect,
    tls_context,
)


@pytest.fixture(scope="module")
def tls_db(mariadb_tls: TlsServer) -> tuple[TlsServer, CentralTestDB, AtmLogin]:
    central = CentralTestDB.create(mariadb_tls.server, "atmguard")
    return mariadb_tls, central, central.add_atm(require_tls=True)


def _settings(central: CentralTestDB, login: AtmLogin, tmp_path: Path, **tls: str) -> Settings:
    return settings_from_mapping(central.settings_mapping(login, tmp_path / "pw", **tls))


def _ssl_version(conn) -> str:
    with conn.cursor() as cursor:
        cursor.execute("SHOW SESSION STATUS LIKE 'Ssl_version'")
        return cursor.fetchone()[1]


def test_store_talks_to_the_server_over_verified_tls(tls_db, tmp_path: Path):
    tls, central, login = tls_db
    settings = _settings(central, login, tmp_path, tls_ca_file=str(tls.ca.cert_file))
    conn = connect(settings)
    try:
        assert _ssl_version(conn).startswith("TLSv1.")
    finally:
        conn.close()
    with CentralStore.from_settings(settings) as store:
        assert store.chain_head() == (0, "0" * 64)


def test_a_server_certificate_from_another_ca_is_refused(tls_db, tmp_path: Path):
    tls, central, login = tls_db
    settings = _settings(central, login, tmp_path, tls_ca_file=str(tls.other_ca.cert_file))
    with pytest.raises(CentralTlsError, match="certificate verify failed"):
        connect(settings)


def test_a_certificate_for_another_host_name_is_refused(tls_db, tmp_path: Path):
    # The server's certificate names IP 127.0.0.1 only; "localhost" reaches the same server.
    tls, central, login = tls_db
    settings = _settings(central, login, tmp_path, tls_ca_file=str(tls.ca.cert_file), host="localhost")
    with pytest.raises(CentralTlsError, match=r"[Hh]ostname mismatch|doesn't match"):
        connect(settings)


def test_no_plaintext_fallback_when_the_server_offers_no_tls(
    central_db: CentralTestDB, mariadb_tls, tmp_path
):
    login = central_db.add_atm()  # on the plain server, which has no certificate at all
    settings = _settings(central_db, login, tmp_path, tls_ca_file=str(mariadb_tls.ca.cert_file))
    with pytest.raises(CentralTlsError, match="not connecting in plaintext"):
        connect(settings)


def test_an_account_that_requires_tls_is_refused_without_it(tls_db, tmp_path: Path):
    _tls, central, login = tls_db
    with pytest.raises(CentralAccessDeniedError):
        connect(_settings(central, login, tmp_path))


def test_client_certificate_for_mutual_tls(tls_db, tmp_path: Path):
    tls, central, _login = tls_db
    central.server.create_user("mtls_atm", "mtls-pw")
    central.server.execute("ALTER USER 'mtls_atm'@'127.0.0.1' REQUIRE X509")
    login = AtmLogin(atm_id="ATM-MTLS", user="mtls_atm", password="mtls-pw")
    with_cert = _settings(
        central,
        login,
        tmp_path,
        tls_ca_file=str(tls.ca.cert_file),
        tls_cert_file=str(tls.client.cert_file),
        tls_key_file=str(tls.client.key_file),
    )
    conn = connect(with_cert, database="")
    try:
        assert _ssl_version(conn).startswith("TLSv1.")
    finally:
        conn.close()
    without_cert = _settings(central, login, tmp_path, tls_ca_file=str(tls.ca.cert_file))
    with pytest.raises(CentralAccessDeniedError):
        connect(without_cert, database="")


def test_tls_context_requires_certificate_and_host_name(tls_db, tmp_path: Path):
    tls, central, login = tls_db
    context = tls_context(_settings(central, login, tmp_path, tls_ca_file=str(tls.ca.cert_file)))
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert tls_context(_settings(central, login, tmp_path)) is None


def test_an_unreadable_ca_file_is_a_config_error_naming_the_key(tls_db, tmp_path: Path):
    _tls, central, login = tls_db
    settings = _settings(central, login, tmp_path, tls_ca_file=str(tmp_path / "missing-ca.pem"))
    with pytest.raises(ConfigError, match=r"central\.tls_ca_file"):
        connect(settings)
