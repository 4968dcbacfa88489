"""`atmguard db migrate|status|add-atm`: the central schema, from the bank's side.

The server, TLS and database come from ``[central]`` of the config; the admin account is given
with ``--admin-user`` and its password is read from a file (mode 0600) or a systemd credential,
never from the command line. Nothing heavy is imported until a handler runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from atmguard.cli.common import (
    EX_CONFIG,
    EX_DATAERR,
    EX_NOPERM,
    EX_OK,
    EX_UNAVAILABLE,
    EX_USAGE,
    CommandFailed,
    command_settings,
    report_failures,
)

if TYPE_CHECKING:
    import pymysql.connections

    from atmguard.config import Settings

Handler = Callable[[argparse.Namespace], int]

EX_PENDING = 1  # db status: migrations are waiting to be applied

DEFAULT_ADMIN_CREDENTIAL = "central-admin-password"


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``db`` (with ``migrate``, ``status``, ``add-atm``) to the top-level sub-commands."""
    db = commands.add_parser("db", help="central database: apply migrations, show their state, add an ATM")
    db_commands = db.add_subparsers(dest="db_command", metavar="SUBCOMMAND")

    def _usage(args: argparse.Namespace) -> int:
        db.print_help()
        return EX_USAGE

    db.set_defaults(handler=_usage)

    # allow_abbrev=False: a mistyped --admin-password must not be taken as a prefix of an option.
    migrate = db_commands.add_parser(
        "migrate",
        allow_abbrev=False,
        help="create the database if needed and apply pending migrations in order",
        description="Applies sql/migrations/NNNN_*.sql not yet recorded in schema_migrations, then "
        "re-grants every registered ATM. Refuses (exit 65) when an applied migration's file changed.",
    )
    _admin_options(migrate)
    migrate.set_defaults(handler=_run(_migrate))

    status = db_commands.add_parser(
        "status",
        allow_abbrev=False,
        help="list migrations as applied / pending / changed / missing",
        description="Exit 0 when up to date, 1 when migrations are pending, 65 when an applied "
        "migration's file changed or vanished.",
    )
    _admin_options(status)
    status.set_defaults(handler=_run(_status))

    add_atm = db_commands.add_parser(
        "add-atm",
        allow_abbrev=False,
        help="create or update an ATM's MySQL account, map it to its ATM id and grant it",
    )
    _admin_options(add_atm)
    add_atm.add_argument("--atm-id", required=True, help="the ATM's [atm].id")
    add_atm.add_argument("--atm-user", required=True, help="its MySQL user name")
    add_atm.add_argument("--atm-host", default="%", help="host part of the account (default: %%)")
    add_atm.add_argument(
        "--atm-password-file", required=True, metavar="PATH", help="file (mode 0600) with its password"
    )
    add_atm.add_argument("--location", default="", help="where the ATM stands (free text)")
    add_atm.add_argument(
        "--require-tls", action="store_true", help="refuse this account over plaintext connections"
    )
    add_atm.set_defaults(handler=_run(_add_atm))


def _admin_options(parser: argparse.ArgumentParser) -> None:
    add_admin_options(parser, user_help="MySQL account allowed to create tables and users")
    parser.add_argument(
        "--sql-dir",
        metavar="DIR",
        help="directory with migrations/ and grants/ (default: the checkout's sql/)",
    )


def add_admin_options(parser: argparse.ArgumentParser, *, user_help: str) -> None:
    """``--admin-user`` and where its password comes from (a 0600 file or a systemd credential)."""
    parser.add_argument("--admin-user", required=True, help=user_help)
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--admin-password-file", metavar="PATH", help="file (mode 0600) holding the admin password"
    )
    source.add_argument(
        "--admin-password-credential",
        metavar="NAME",
        default=DEFAULT_ADMIN_CREDENTIAL,
        help=f"systemd credential in $CREDENTIALS_DIRECTORY (default: {DEFAULT_ADMIN_CREDENTIAL})",
    )


def _run(body: Handler) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        import pymysql

        from atmguard.errors import ConfigError
        from atmguard.store.central import CentralAccessDeniedError, CentralError, classify_error
        from atmguard.store.credentials import CredentialError
        from atmguard.store.migrate import MigrationError

        def call() -> int:
            try:
                return body(args)
            except pymysql.err.MySQLError as exc:
                raise classify_error(exc, where="server") from None

        return report_failures(
            f"atmguard db {args.db_command}",
            call,
            [
                (ConfigError, EX_CONFIG, ""),
                ((CredentialError, CentralAccessDeniedError), EX_NOPERM, ""),
                (MigrationError, EX_DATAERR, ""),
                (CentralError, EX_UNAVAILABLE, ""),
            ],
        )

    return handler


def _sql_dir(args: argparse.Namespace) -> Path:
    from atmguard.store.migrate import DEFAULT_SQL_DIR

    return Path(args.sql_dir) if args.sql_dir else DEFAULT_SQL_DIR


def admin_connection(args: argparse.Namespace, settings: Settings) -> pymysql.connections.Connection:
    from atmguard.store.central import connect
    from atmguard.store.credentials import read_secret

    secret = read_secret(
        path=args.admin_password_file or "",
        credential=args.admin_password_credential,
        what="central admin password (--admin-password-file / --admin-password-credential)",
    )
    try:
        password = secret.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandFailed(EX_CONFIG, "the admin password is not valid UTF-8") from None
    # database="": no default database, so `migrate` can create it.
    return connect(settings, user=args.admin_user, password=password, database="")


def _migrate(args: argparse.Namespace) -> int:
    from atmguard.store.migrate import migrate

    settings = command_settings(args)
    conn = admin_connection(args, settings)
    try:
        applied = migrate(conn, database=settings.central.database, sql_dir=_sql_dir(args))
    finally:
        conn.close()
    where = f"{settings.central.host}:{settings.central.port}/{settings.central.database}"
    if not applied:
        print(f"{where}: up to date, nothing applied")
    for migration in applied:
        print(f"{where}: applied {migration.label}")
    return EX_OK


def _status(args: argparse.Namespace) -> int:
    from atmguard.store.migrate import MigrationState, migration_status

    settings = command_settings(args)
    conn = admin_connection(args, settings)
    try:
        statuses = migration_status(conn, database=settings.central.database, sql_dir=_sql_dir(args))
    finally:
        conn.close()
    for status in statuses:
        when = f"  {status.applied_at:%Y-%m-%d %H:%M:%S} UTC" if status.applied_at else ""
        print(f"{status.version:04d}_{status.name:<32} {status.state.value}{when}")
    states = {s.state for s in statuses}
    if states & {MigrationState.CHANGED, MigrationState.MISSING}:
        return EX_DATAERR
    if MigrationState.PENDING in states:
        return EX_PENDING
    return EX_OK


def _add_atm(args: argparse.Namespace) -> int:
    from atmguard.store.credentials import read_secret_file
    from atmguard.store.migrate import register_atm

    settings = command_settings(args)
    atm_password = read_secret_file(args.atm_password_file, what="ATM password (--atm-password-file)")
    conn = admin_connection(args, settings)
    try:
        register_atm(
            conn,
            database=settings.central.database,
            atm_id=args.atm_id,
            atm_user=args.atm_user,
            password=atm_password.decode("utf-8"),
            atm_host=args.atm_host,
            location=args.location,
            require_tls=args.require_tls,
            sql_dir=_sql_dir(args),
        )
    finally:
        conn.close()
    print(f"ATM {args.atm_id}: MySQL account {args.atm_user}@{args.atm_host} granted")
    return EX_OK
