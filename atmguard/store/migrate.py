"""Applies sql/migrations/NNNN_name.sql in order, records them, and grants ATM accounts.

Each migration runs once and is recorded in ``schema_migrations`` with the sha256 of its file.
A migration already applied whose file has changed (or vanished) stops the run before anything
is applied: the schema on the server would no longer be what the files say. Migrations are
written to be idempotent anyway, because MySQL commits DDL statement by statement: a run cut
short is finished by running again.

The ATM grants (sql/grants/atm.sql) are re-applied for every registered ATM after any migration
ran, since re-creating a procedure drops the EXECUTE grants on it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atmguard.errors import AtmguardError

if TYPE_CHECKING:
    import pymysql.connections

    Connection = pymysql.connections.Connection

logger = logging.getLogger(__name__)

DEFAULT_SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
"""sql/ of the source checkout (it is not installed with the package: pass --sql-dir otherwise)."""
MIGRATIONS_SUBDIR = "migrations"
ATM_GRANTS_FILE = Path("grants") / "atm.sql"

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9][a-z0-9_]*)\.sql$")
_DATABASE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_ATM_USER = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")
_ATM_HOST = re.compile(r"^[A-Za-z0-9_.%:-]{1,255}$")
_ATM_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_LOCK_TIMEOUT_S = 30

# Procedures keep the sql_mode they were created under: strict, so a too-long value or a bad
# date in an insert is an error (a rejected record), never a silent truncation.
_SQL_MODE = (
    "STRICT_ALL_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,"
    "NO_ENGINE_SUBSTITUTION,ONLY_FULL_GROUP_BY"
)

SCHEMA_MIGRATIONS_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version INT UNSIGNED NOT NULL PRIMARY KEY,"
    " name VARCHAR(200) NOT NULL,"
    " checksum CHAR(64) NOT NULL,"
    " applied_at DATETIME(6) NOT NULL"
    ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
)


class MigrationError(AtmguardError, RuntimeError):
    """The migration files or the server's record of them are inconsistent, or one failed."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    path: Path
    checksum: str
    """sha256 (hex) of the file's bytes."""
    text: str

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


class MigrationState(StrEnum):
    APPLIED = "applied"
    PENDING = "pending"
    CHANGED = "changed"
    """Applied, but the file differs from what was applied."""
    MISSING = "missing"
    """Applied, but no longer among the files."""


@dataclass(frozen=True, slots=True)
class MigrationStatus:
    version: int
    name: str
    state: MigrationState
    applied_at: datetime | None


def discover(sql_dir: Path = DEFAULT_SQL_DIR) -> list[Migration]:
    """The migrations in ``sql_dir/migrations``, by version; any other file there is an error."""
    directory = Path(sql_dir) / MIGRATIONS_SUBDIR
    if not directory.is_dir():
        raise MigrationError(f"{directory}: no migrations directory")
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        match = _MIGRATION_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path}: not a migration name (expected NNNN_lower_case_name.sql)")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"{path}: version {version:04d} also used by {found[version].path.name}")
        raw = path.read_bytes()
        found[version] = Migration(
            version=version,
            name=match.group(2),
            path=path,
            checksum=hashlib.sha256(raw).hexdigest(),
            text=raw.decode("utf-8"),
        )
    return [found[v] for v in sorted(found)]


def split_statements(text: str) -> list[str]:
    """Split SQL like the mysql client does: ``;`` ends a statement unless inside quotes or
    comments, and a ``DELIMITER xx`` line changes the terminator (for procedure bodies).

    Statements made only of comments are dropped.
    """
    statements: list[str] = []
    delimiter = ";"
    current: list[str] = []
    has_code = False
    i = 0
    n = len(text)
    at_line_start = True
    while i < n:
        if at_line_start:
            line_end = text.find("\n", i)
            line = text[i : n if line_end < 0 else line_end]
            stripped = line.strip()
            if not has_code and stripped.upper().startswith("DELIMITER "):
                delimiter = stripped.split(None, 1)[1].strip()
                if not delimiter:
                    raise MigrationError("DELIMITER without a delimiter")
                i = n if line_end < 0 else line_end + 1
                continue
        at_line_start = False
        ch = text[i]
        if text.startswith(delimiter, i):
            if has_code:
                statements.append("".join(current).strip())
            current, has_code = [], False
            i += len(delimiter)
            continue
        if ch in "'\"`":
            end = _end_of_quoted(text, i)
            current.append(text[i:end])
            has_code = True
            i = end
            continue
        if (text.startswith("--", i) and (i + 2 >= n or text[i + 2] in " \t\r\n")) or ch == "#":
            end = text.find("\n", i)
            end = n if end < 0 else end
            current.append(text[i:end])
            i = end
            continue
        if text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise MigrationError("unterminated /* comment")
            current.append(text[i : end + 2])
            has_code = has_code or text.startswith("/*!", i)
            i = end + 2
            continue
        current.append(ch)
        if ch == "\n":
            at_line_start = True
        elif not ch.isspace():
            has_code = True
        i += 1
    if has_code:
        statements.append("".join(current).strip())
    return statements


def _end_of_quoted(text: str, start: int) -> int:
    quote = text[start]
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and quote != "`":
            i += 2
            continue
        if ch == quote:
            if i + 1 < len(text) and text[i + 1] == quote:  # doubled quote
                i += 2
                continue
            return i + 1
        i += 1
    raise MigrationError(f"unterminated {quote} string")


# --- running ---------------------------------------------------------------------------------


def _execute(conn: Connection, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
    with conn.cursor() as cursor:
        cursor.execute(sql, args)
        rows = list(cursor.fetchall())
        while cursor.nextset():
            pass
    return rows


def _use_database(conn: Connection, database: str, *, create: bool) -> None:
    if not _DATABASE.match(database):
        raise MigrationError(f"database name {database!r} must match {_DATABASE.pattern}")
    _execute(conn, f"SET SESSION sql_mode = '{_SQL_MODE}'")
    if create:
        _execute(
            conn, f"CREATE DATABASE IF NOT EXISTS `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        )
    _execute(conn, f"USE `{database}`")


def _applied(conn: Connection) -> dict[int, tuple[str, str, datetime]]:
    _execute(conn, SCHEMA_MIGRATIONS_DDL)
    rows = _execute(
        conn, "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
    )
    return {int(v): (str(name), str(checksum), applied_at) for v, name, checksum, applied_at in rows}


def _statuses(
    migrations: list[Migration], applied: dict[int, tuple[str, str, datetime]]
) -> list[MigrationStatus]:
    by_version = {m.version: m for m in migrations}
    statuses: list[MigrationStatus] = []
    for version in sorted(set(by_version) | set(applied)):
        migration = by_version.get(version)
        record = applied.get(version)
        if record is None:
            assert migration is not None
            statuses.append(MigrationStatus(version, migration.name, MigrationState.PENDING, None))
        elif migration is None:
            statuses.append(MigrationStatus(version, record[0], MigrationState.MISSING, record[2]))
        elif migration.checksum != record[1]:
            statuses.append(MigrationStatus(version, migration.name, MigrationState.CHANGED, record[2]))
        else:
            statuses.append(MigrationStatus(version, migration.name, MigrationState.APPLIED, record[2]))
    return statuses


def migration_status(
    conn: Connection, *, database: str, sql_dir: Path = DEFAULT_SQL_DIR
) -> list[MigrationStatus]:
    """Every migration known to the files or the server, with its state (nothing is changed,
    except that an empty ``schema_migrations`` is created in an existing database)."""
    migrations = discover(sql_dir)
    exists = _execute(conn, "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (database,))
    if not exists:
        return [MigrationStatus(m.version, m.name, MigrationState.PENDING, None) for m in migrations]
    _use_database(conn, database, create=False)
    return _statuses(migrations, _applied(conn))


def _refuse_inconsistent(statuses: list[MigrationStatus]) -> None:
    bad = [s for s in statuses if s.state in (MigrationState.CHANGED, MigrationState.MISSING)]
    if bad:
        details = "; ".join(
            f"{s.version:04d}_{s.name}: "
            + (
                "file changed since it was applied (add a new migration instead)"
                if s.state is MigrationState.CHANGED
                else "applied on the server but its file is gone"
            )
            for s in bad
        )
        raise MigrationError(f"refusing to migrate: {details}")


def migrate(conn: Connection, *, database: str, sql_dir: Path = DEFAULT_SQL_DIR) -> list[Migration]:
    """Create ``database`` if needed and apply the pending migrations in order; returns them.

    Serialised by a named server lock, so two runs cannot interleave. ``conn`` is an admin
    connection in autocommit mode (DDL commits implicitly anyway).
    """
    migrations = discover(sql_dir)
    _use_database(conn, database, create=True)
    lock_name = f"atmguard.migrate.{database}"
    got = _execute(conn, "SELECT GET_LOCK(%s, %s)", (lock_name, _LOCK_TIMEOUT_S))
    if not got or got[0][0] != 1:
        raise MigrationError(f"another migration of {database} is running (lock {lock_name} busy)")
    try:
        statuses = _statuses(migrations, _applied(conn))
        _refuse_inconsistent(statuses)
        pending = {s.version for s in statuses if s.state is MigrationState.PENDING}
        applied_now: list[Migration] = []
        for migration in migrations:
            if migration.version not in pending:
                continue
            _apply(conn, migration)
            applied_now.append(migration)
        if applied_now:
            count = regrant_all_atms(conn, database=database, sql_dir=sql_dir)
            logger.info("applied %d migration(s); re-granted %d ATM account(s)", len(applied_now), count)
        return applied_now
    finally:
        _execute(conn, "SELECT RELEASE_LOCK(%s)", (lock_name,))


def _apply(conn: Connection, migration: Migration) -> None:
    import pymysql

    statements = split_statements(migration.text)
    logger.info("applying migration %s (%d statement(s))", migration.label, len(statements))
    for number, statement in enumerate(statements, start=1):
        try:
            _execute(conn, statement)
        except pymysql.err.MySQLError as exc:
            first_line = statement.splitlines()[0][:80] if statement else ""
            raise MigrationError(
                f"{migration.path.name}: statement {number} ({first_line!r}) failed: {exc.args[-1]}"
            ) from None
    _execute(
        conn,
        "INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES (%s, %s, %s, UTC_TIMESTAMP(6))",
        (migration.version, migration.name, migration.checksum),
    )


# --- ATM accounts ----------------------------------------------------------------------------


def render_atm_grants(
    *, database: str, atm_user: str, atm_host: str, sql_dir: Path = DEFAULT_SQL_DIR
) -> list[str]:
    """sql/grants/atm.sql with its placeholders filled in (values checked first), as statements."""
    for value, pattern, what in (
        (database, _DATABASE, "database"),
        (atm_user, _ATM_USER, "ATM user"),
        (atm_host, _ATM_HOST, "ATM host"),
    ):
        if not pattern.match(value):
            raise MigrationError(f"{what} {value!r} must match {pattern.pattern}")
    template = (Path(sql_dir) / ATM_GRANTS_FILE).read_text(encoding="utf-8")
    text = (
        template.replace("{{database}}", database)
        .replace("{{atm_user}}", atm_user)
        .replace("{{atm_host}}", atm_host)
    )
    if "{{" in text:
        raise MigrationError(f"{ATM_GRANTS_FILE}: unknown placeholder left after rendering")
    return split_statements(text)


def grant_atm(
    conn: Connection, *, database: str, atm_user: str, atm_host: str, sql_dir: Path = DEFAULT_SQL_DIR
) -> None:
    """Reset one ATM account's privileges to exactly those of sql/grants/atm.sql."""
    for statement in render_atm_grants(
        database=database, atm_user=atm_user, atm_host=atm_host, sql_dir=sql_dir
    ):
        _execute(conn, statement)


def regrant_all_atms(conn: Connection, *, database: str, sql_dir: Path = DEFAULT_SQL_DIR) -> int:
    """Re-apply the grants of every ATM in ``atms`` whose account exists; returns how many."""
    rows = _execute(conn, f"SELECT db_user, db_host FROM `{database}`.atms ORDER BY atm_id")
    count = 0
    for user, host in rows:
        exists = _execute(conn, "SELECT 1 FROM mysql.user WHERE User = %s AND Host = %s", (user, host))
        if not exists:
            logger.warning("ATM account %s@%s is registered but does not exist; not granted", user, host)
            continue
        grant_atm(conn, database=database, atm_user=user, atm_host=host, sql_dir=sql_dir)
        count += 1
    return count


def register_atm(
    conn: Connection,
    *,
    database: str,
    atm_id: str,
    atm_user: str,
    password: str,
    atm_host: str = "%",
    location: str = "",
    require_tls: bool = False,
    sql_dir: Path = DEFAULT_SQL_DIR,
) -> None:
    """Create (or update) an ATM's MySQL account, map it to ``atm_id`` and grant it.

    Running it again changes the password and resets the grants. ``require_tls`` makes the
    server refuse the account over plaintext TCP (REQUIRE SSL).
    """
    if not _ATM_ID.match(atm_id):
        raise MigrationError(f"ATM id {atm_id!r} must match {_ATM_ID.pattern}")
    render_atm_grants(database=database, atm_user=atm_user, atm_host=atm_host, sql_dir=sql_dir)  # validates
    if not password:
        raise MigrationError("the ATM account needs a non-empty password")
    mapped = _execute(conn, f"SELECT atm_id FROM `{database}`.atms WHERE db_user = %s", (atm_user,))
    if mapped and mapped[0][0] != atm_id:
        raise MigrationError(f"MySQL user {atm_user!r} is already the account of ATM {mapped[0][0]!r}")
    _execute(conn, "CREATE USER IF NOT EXISTS %s@%s IDENTIFIED BY %s", (atm_user, atm_host, password))
    _execute(conn, "ALTER USER %s@%s IDENTIFIED BY %s", (atm_user, atm_host, password))
    _execute(conn, f"ALTER USER %s@%s REQUIRE {'SSL' if require_tls else 'NONE'}", (atm_user, atm_host))
    _execute(
        conn,
        f"INSERT INTO `{database}`.atms (atm_id, db_user, db_host, location) VALUES (%s, %s, %s, %s)"
        " ON DUPLICATE KEY UPDATE db_user = VALUES(db_user), db_host = VALUES(db_host), location = VALUES(location)",
        (atm_id, atm_user, atm_host, location),
    )
    grant_atm(conn, database=database, atm_user=atm_user, atm_host=atm_host, sql_dir=sql_dir)
    logger.info(
        "ATM %s is MySQL account %s@%s%s",
        atm_id,
        atm_user,
        atm_host,
        " (TLS required)" if require_tls else "",
    )
