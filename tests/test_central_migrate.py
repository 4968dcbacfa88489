"""Migrations: applied in order once, recorded with checksums, idempotent, tamper-refusing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pymysql
import pytest
from mariadb_server import CentralTestDB, ThrowawayMariaDB, throwaway_database

from atmguard.store.migrate import (
    DEFAULT_SQL_DIR,
    MigrationError,
    MigrationState,
    discover,
    migrate,
    migration_status,
    split_statements,
)

EXPECTED = [
    "0001_core_schema",
    "0002_atm_procedures",
    "0003_reporting_indexes",
    "0004_face_template_per_model",
    "0005_schema_version_procedure",
]


def _copy_sql(tmp_path: Path) -> Path:
    target = tmp_path / "sql"
    shutil.copytree(DEFAULT_SQL_DIR, target)
    return target


def _schema(server: ThrowawayMariaDB, database: str) -> dict[str, str]:
    tables = [row[0] for row in server.execute("SHOW TABLES", database=database)]
    schema = {t: server.execute(f"SHOW CREATE TABLE `{t}`", database=database)[0][1] for t in tables}
    for (name,) in server.execute(
        "SELECT routine_name FROM information_schema.routines WHERE routine_schema = %s", (database,)
    ):
        schema[f"proc {name}"] = server.execute(f"SHOW CREATE PROCEDURE `{name}`", database=database)[0][2]
    return schema


# --- the files ---------------------------------------------------------------------------------


def test_repository_migrations_are_numbered_without_gaps():
    labels = [m.label for m in discover()]
    assert labels == EXPECTED
    assert [m.version for m in discover()] == list(range(1, len(EXPECTED) + 1))


def test_split_keeps_semicolons_inside_quotes_comments_and_procedure_bodies():
    sql = (
        "-- leading comment; not a statement\n"
        "INSERT INTO t VALUES ('a;b', \"c;d\", `e;f`, 'it''s; ok', 'x\\';y');\n"
        "/* block; comment */ SELECT 1;\n"
        "# hash comment;\n"
        "DELIMITER $$\n"
        "CREATE PROCEDURE p() BEGIN SELECT 1; SELECT 2; END$$\n"
        "DELIMITER ;\n"
        "SELECT 3"
    )
    statements = split_statements(sql)
    assert len(statements) == 4
    assert statements[0].endswith("INSERT INTO t VALUES ('a;b', \"c;d\", `e;f`, 'it''s; ok', 'x\\';y')")
    assert statements[1] == "/* block; comment */ SELECT 1"
    assert statements[2].endswith("CREATE PROCEDURE p() BEGIN SELECT 1; SELECT 2; END")
    assert statements[3].endswith("SELECT 3")


def test_split_refuses_an_unterminated_string():
    with pytest.raises(MigrationError, match="unterminated"):
        split_statements("SELECT 'oops;\n")


@pytest.mark.parametrize("bad_name", ["1_short.sql", "0004-dash.sql", "0004_Upper.sql", "notes.txt"])
def test_stray_files_in_migrations_are_refused_not_skipped(tmp_path: Path, bad_name: str):
    sql = _copy_sql(tmp_path)
    (sql / "migrations" / bad_name).write_text("SELECT 1;\n")
    with pytest.raises(MigrationError, match="not a migration name"):
        discover(sql)


def test_two_migrations_with_one_version_are_refused(tmp_path: Path):
    sql = _copy_sql(tmp_path)
    (sql / "migrations" / "0002_again.sql").write_text("SELECT 1;\n")
    with pytest.raises(MigrationError, match="version 0002 also used"):
        discover(sql)


# --- against the server --------------------------------------------------------------------------


def test_migrate_applies_everything_in_order_once_and_records_checksums(mariadb_server: ThrowawayMariaDB):
    with throwaway_database(mariadb_server, "mig_fresh") as db:
        conn = mariadb_server.admin_connect()
        try:
            assert [s.state for s in migration_status(conn, database=db)] == [MigrationState.PENDING] * len(
                EXPECTED
            )
            applied = migrate(conn, database=db)
            assert [m.label for m in applied] == EXPECTED
            assert migrate(conn, database=db) == []
            statuses = migration_status(conn, database=db)
        finally:
            conn.close()
        assert [(s.version, s.name, s.state) for s in statuses] == [
            (1, "core_schema", MigrationState.APPLIED),
            (2, "atm_procedures", MigrationState.APPLIED),
            (3, "reporting_indexes", MigrationState.APPLIED),
            (4, "face_template_per_model", MigrationState.APPLIED),
            (5, "schema_version_procedure", MigrationState.APPLIED),
        ]
        recorded = mariadb_server.execute(
            "SELECT version, checksum FROM schema_migrations ORDER BY version", database=db
        )
        assert recorded == [(m.version, m.checksum) for m in discover()]
        tables = {row[0] for row in mariadb_server.execute("SHOW TABLES", database=db)}
        assert tables == {"schema_migrations", "atms", "accounts", "face_templates", "events", "snapshots"}


def test_every_migration_file_can_run_again_without_changing_the_schema(mariadb_server: ThrowawayMariaDB):
    # DDL commits statement by statement, so a run cut short is finished by running it again.
    with throwaway_database(mariadb_server, "mig_again") as db:
        conn = mariadb_server.admin_connect()
        try:
            migrate(conn, database=db)
            before = _schema(mariadb_server, db)
            with conn.cursor() as cursor:
                cursor.execute(f"USE `{db}`")
                for migration in discover():
                    for statement in split_statements(migration.text):
                        cursor.execute(statement)
        finally:
            conn.close()
        assert _schema(mariadb_server, db) == before


def test_a_changed_applied_migration_stops_the_run_before_anything_is_applied(
    mariadb_server: ThrowawayMariaDB, tmp_path: Path
):
    sql = _copy_sql(tmp_path)
    with throwaway_database(mariadb_server, "mig_changed") as db:
        conn = mariadb_server.admin_connect()
        try:
            migrate(conn, database=db, sql_dir=sql)
            first = sql / "migrations" / "0001_core_schema.sql"
            first.write_text(first.read_text() + "\n-- edited after it was applied\n")
            (sql / "migrations" / "0006_new_table.sql").write_text("CREATE TABLE IF NOT EXISTS t4 (x INT);\n")
            with pytest.raises(MigrationError, match="0001_core_schema: file changed since it was applied"):
                migrate(conn, database=db, sql_dir=sql)
            states = {s.name: s.state for s in migration_status(conn, database=db, sql_dir=sql)}
        finally:
            conn.close()
        assert states["core_schema"] is MigrationState.CHANGED
        assert states["new_table"] is MigrationState.PENDING
        assert "t4" not in {row[0] for row in mariadb_server.execute("SHOW TABLES", database=db)}


def test_an_applied_migration_whose_file_is_gone_is_reported_and_refused(
    mariadb_server: ThrowawayMariaDB, tmp_path: Path
):
    sql = _copy_sql(tmp_path)
    with throwaway_database(mariadb_server, "mig_missing") as db:
        conn = mariadb_server.admin_connect()
        try:
            migrate(conn, database=db, sql_dir=sql)
            (sql / "migrations" / "0003_reporting_indexes.sql").unlink()
            with pytest.raises(
                MigrationError, match="0003_reporting_indexes: applied on the server but its file is gone"
            ):
                migrate(conn, database=db, sql_dir=sql)
            states = [s.state for s in migration_status(conn, database=db, sql_dir=sql)]
        finally:
            conn.close()
        assert (
            states == [MigrationState.APPLIED] * 2 + [MigrationState.MISSING] + [MigrationState.APPLIED] * 2
        )


def test_a_failing_migration_is_named_and_not_recorded(mariadb_server: ThrowawayMariaDB, tmp_path: Path):
    sql = _copy_sql(tmp_path)
    (sql / "migrations" / "0006_broken.sql").write_text(
        "CREATE TABLE IF NOT EXISTS ok4 (x INT);\nSELEC oops;\n"
    )
    with throwaway_database(mariadb_server, "mig_broken") as db:
        conn = mariadb_server.admin_connect()
        try:
            with pytest.raises(MigrationError, match=r"0006_broken.sql: statement 2 \('SELEC oops'\) failed"):
                migrate(conn, database=db, sql_dir=sql)
            states = {s.name: s.state for s in migration_status(conn, database=db, sql_dir=sql)}
        finally:
            conn.close()
        assert states["reporting_indexes"] is MigrationState.APPLIED
        assert states["broken"] is MigrationState.PENDING


def test_migrate_regrants_atms_after_procedures_are_recreated(
    mariadb_server: ThrowawayMariaDB, tmp_path: Path
):
    # Re-creating a procedure drops the EXECUTE grants on it; the runner must put them back.
    sql = _copy_sql(tmp_path)
    with throwaway_database(mariadb_server, "mig_regrant") as db:
        central = CentralTestDB.create(mariadb_server, db)
        login = central.add_atm()
        shutil.copy(
            sql / "migrations" / "0002_atm_procedures.sql", sql / "migrations" / "0006_procedures_again.sql"
        )
        conn = mariadb_server.admin_connect()
        try:
            assert [m.label for m in migrate(conn, database=db, sql_dir=sql)] == ["0006_procedures_again"]
        finally:
            conn.close()
        atm = central.atm_connect(login)
        try:
            with atm.cursor() as cursor:
                cursor.execute("CALL atm_chain_head()")
                assert cursor.fetchone()[0] == login.atm_id
        finally:
            atm.close()


def test_uuid_idempotency_keys_are_unique_in_the_schema(central_db: CentralTestDB):
    # Even the bank's own writes cannot store one uuid twice.
    login = central_db.add_atm()
    admin = central_db.admin()
    try:
        with admin.cursor() as cursor:
            row = (
                login.atm_id,
                "11111111-1111-4111-8111-111111111111",
                1,
                "k",
                "t",
                "{}",
                "0" * 64,
                "a" * 64,
            )
            sql = (
                "INSERT INTO events (atm_id, uuid, seq, kind, t_wall, payload, prev_hash, hash)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            )
            cursor.execute(sql, row)
            with pytest.raises(pymysql.err.IntegrityError) as info:
                cursor.execute(sql, (*row[:2], 2, *row[3:]))
            assert info.value.args[0] == 1062
            cursor.execute("DELETE FROM events WHERE atm_id = %s", (login.atm_id,))
    finally:
        admin.close()


def test_accounts_have_no_column_for_a_pan_or_a_pin(central_db: CentralTestDB):
    columns = {
        row[0]
        for row in central_db.server.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = 'accounts'",
            (central_db.database,),
        )
    }
    assert {
        "pan_hmac",
        "pin_salt",
        "pin_verifier",
        "status",
        "failed_pin_attempts",
        "max_pin_attempts",
    } <= columns
    assert not {"pan", "pin", "card_number", "track2"} & columns


def test_face_templates_become_one_per_account_and_model_keeping_the_newest(
    mariadb_server: ThrowawayMariaDB, tmp_path: Path
):
    sql = _copy_sql(tmp_path)
    upgrade = sql / "migrations" / "0004_face_template_per_model.sql"
    held_back = upgrade.read_bytes()
    upgrade.unlink()
    with throwaway_database(mariadb_server, "mig_templates") as db:
        conn = mariadb_server.admin_connect()
        try:
            migrate(conn, database=db, sql_dir=sql)  # a server from before 0004
            with conn.cursor() as cursor:
                cursor.execute(f"USE `{db}`")
                cursor.execute(
                    "INSERT INTO accounts (pan_hmac, pan_masked, pin_salt, pin_verifier, pin_kdf, status)"
                    " VALUES (%s, '400000******0002', %s, %s, 'test', 'active')",
                    (b"\x01" * 32, b"\x02" * 16, b"\x03" * 32),
                )
                account_id = cursor.lastrowid
                rows = [("sface@aaaa", b"old"), ("sface@aaaa", b"new"), ("sface@bbbb", b"other model")]
                cursor.executemany(
                    "INSERT INTO face_templates (account_id, model_id, template, consent)"
                    " VALUES (%s, %s, %s, TRUE)",
                    [(account_id, model, blob) for model, blob in rows],
                )
            conn.commit()
            upgrade.write_bytes(held_back)
            assert [m.label for m in migrate(conn, database=db, sql_dir=sql)] == [
                "0004_face_template_per_model"
            ]
            kept = mariadb_server.execute(
                "SELECT model_id, template FROM face_templates ORDER BY model_id", database=db
            )
            with conn.cursor() as cursor, pytest.raises(pymysql.err.IntegrityError, match="Duplicate"):
                cursor.execute(
                    "INSERT INTO face_templates (account_id, model_id, template, consent)"
                    " VALUES (%s, 'sface@aaaa', 'second', TRUE)",
                    (account_id,),
                )
        finally:
            conn.close()
    assert [(model, bytes(blob)) for model, blob in kept] == [
        ("sface@aaaa", b"new"),
        ("sface@bbbb", b"other model"),
    ]
