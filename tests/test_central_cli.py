"""`atmguard db migrate|status|add-atm` against a throwaway server."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import pytest
from mariadb_server import AtmLogin, CentralTestDB, ThrowawayMariaDB, throwaway_database

from atmguard.cli import db_cmd
from atmguard.store.migrate import DEFAULT_SQL_DIR, discover

ADMIN_PASSWORD = "Adm1n-Secret-Pw"


def _parser() -> argparse.ArgumentParser:
    # The same shape as atmguard.cli.main: a global --config, then the sub-commands.
    parser = argparse.ArgumentParser(prog="atmguard")
    parser.add_argument("--config")
    db_cmd.register(parser.add_subparsers(dest="command"))
    return parser


def _run(*argv: str) -> int:
    args = _parser().parse_args(list(argv))
    return args.handler(args)


def _secret(path: Path, value: str) -> str:
    path.write_text(value + "\n")
    os.chmod(path, 0o600)
    return str(path)


@pytest.fixture(scope="module")
def admin_user(mariadb_server: ThrowawayMariaDB) -> str:
    mariadb_server.create_user("bank_admin", ADMIN_PASSWORD, admin=True)
    return "bank_admin"


def _config(tmp_path: Path, server: ThrowawayMariaDB, database: str, port: int | None = None) -> str:
    config = tmp_path / "atmguard.toml"
    config.write_text(
        f'[central]\nhost = "127.0.0.1"\nport = {port or server.port}\ndatabase = "{database}"\n'
        "connect_timeout_s = 2.0\n"
    )
    return str(config)


def test_status_migrate_and_add_atm(mariadb_server, admin_user, tmp_path: Path, capsys):
    with throwaway_database(mariadb_server, "cli_db") as db:
        mariadb_server.execute(f"DROP DATABASE `{db}`")  # migrate must create it
        config = _config(tmp_path, mariadb_server, db)
        admin = [
            "--admin-user",
            admin_user,
            "--admin-password-file",
            _secret(tmp_path / "admin.pw", ADMIN_PASSWORD),
        ]

        assert _run("--config", config, "db", "status", *admin) == db_cmd.EX_PENDING
        out = capsys.readouterr().out
        assert out.count("pending") == len(discover()) and "0001_core_schema" in out

        assert _run("--config", config, "db", "migrate", *admin) == 0
        out = capsys.readouterr().out
        assert "applied 0001_core_schema" in out and "applied 0004_face_template_per_model" in out

        assert _run("--config", config, "db", "migrate", *admin) == 0
        assert "up to date, nothing applied" in capsys.readouterr().out

        assert _run("--config", config, "db", "status", *admin) == 0
        assert capsys.readouterr().out.count(" applied ") == len(discover())

        atm_pw = _secret(tmp_path / "atm.pw", "atm-pw-1")
        code = _run(
            "--config", config, "db", "add-atm", *admin,
            "--atm-id", "ATM-CLI", "--atm-user", "atm_cli", "--atm-host", "127.0.0.1", "--atm-password-file", atm_pw,
        )  # fmt: skip
        assert code == 0
        central = CentralTestDB(mariadb_server, db)
        with central.store(AtmLogin("ATM-CLI", "atm_cli", "atm-pw-1")) as store:
            assert store.chain_head() == (0, "0" * 64)


def test_admin_password_from_the_systemd_credential(
    mariadb_server, admin_user, tmp_path, capsys, monkeypatch
):
    creds = tmp_path / "creds"
    creds.mkdir()
    _secret(creds / "central-admin-password", ADMIN_PASSWORD)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    with throwaway_database(mariadb_server, "cli_cred") as db:
        assert (
            _run(
                "--config", _config(tmp_path, mariadb_server, db), "db", "status", "--admin-user", admin_user
            )
            == 1
        )


def test_wrong_admin_password_exits_77_without_showing_it(mariadb_server, admin_user, tmp_path, capsys):
    pw = _secret(tmp_path / "admin.pw", "Not-The-Admin-Pw")
    config = _config(tmp_path, mariadb_server, "atmguard")
    assert (
        _run("--config", config, "db", "migrate", "--admin-user", admin_user, "--admin-password-file", pw)
        == 77
    )
    err = capsys.readouterr().err
    assert "Access denied" in err and "Not-The-Admin-Pw" not in err


def test_world_readable_admin_password_file_exits_77(mariadb_server, admin_user, tmp_path, capsys):
    pw = tmp_path / "admin.pw"
    pw.write_text(ADMIN_PASSWORD)
    os.chmod(pw, 0o644)
    config = _config(tmp_path, mariadb_server, "atmguard")
    assert (
        _run("--config", config, "db", "status", "--admin-user", admin_user, "--admin-password-file", str(pw))
        == 77
    )
    assert "chmod 600" in capsys.readouterr().err


def test_changed_migration_exits_65(mariadb_server, admin_user, tmp_path, capsys):
    sql = tmp_path / "sql"
    shutil.copytree(DEFAULT_SQL_DIR, sql)
    with throwaway_database(mariadb_server, "cli_changed") as db:
        config = _config(tmp_path, mariadb_server, db)
        admin = [
            "--admin-user",
            admin_user,
            "--admin-password-file",
            _secret(tmp_path / "a.pw", ADMIN_PASSWORD),
        ]
        assert _run("--config", config, "db", "migrate", *admin, "--sql-dir", str(sql)) == 0
        target = sql / "migrations" / "0003_reporting_indexes.sql"
        target.write_text(target.read_text().replace("reports", "reporting"))
        assert _run("--config", config, "db", "migrate", *admin, "--sql-dir", str(sql)) == 65
        assert "0003_reporting_indexes: file changed" in capsys.readouterr().err
        assert _run("--config", config, "db", "status", *admin, "--sql-dir", str(sql)) == 65
        assert "changed" in capsys.readouterr().out


def test_unreachable_server_exits_69(mariadb_server, tmp_path, capsys):
    config = _config(tmp_path, mariadb_server, "atmguard", port=1)
    pw = _secret(tmp_path / "a.pw", ADMIN_PASSWORD)
    assert _run("--config", config, "db", "status", "--admin-user", "x", "--admin-password-file", pw) == 69


def test_there_is_no_way_to_give_a_password_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["db", "migrate", "--admin-user", "root", "--admin-password", "pw"])
    assert "unrecognized arguments" in capsys.readouterr().err
