"""`atmguard journal verify`, `atmguard snapshot keygen` and `atmguard snapshot open`.

``journal verify`` runs on the ATM (read-only, safe while the daemon runs). ``snapshot keygen``
and ``snapshot open`` are bank-side: the private key they use must never be copied to an ATM.
Nothing heavy (PyNaCl, SQLite, config) is imported until a handler runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from atmguard.cli.common import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_IOERR,
    EX_NOINPUT,
    EX_OK,
    EX_USAGE,
    CommandFailed,
    command_settings,
    report_failures,
)

if TYPE_CHECKING:
    from atmguard.store.journal import Journal
    from atmguard.store.records import SnapshotRecord

Handler = Callable[[argparse.Namespace], int]


_PROGRESS_MIN_EVENTS = 10_000


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``journal`` and ``snapshot`` to the top-level sub-commands."""
    journal = commands.add_parser("journal", help="check the local evidence journal")
    journal_commands = journal.add_subparsers(dest="journal_command", metavar="SUBCOMMAND")
    journal.set_defaults(handler=_usage(journal))
    verify = journal_commands.add_parser(
        "verify",
        help="verify the journal's hash chain and snapshot digests; exit 65 if broken",
        description=(
            "Walks the event hash chain in seq order (from the purge checkpoint, if any), checks "
            "that no record is missing or altered and that every snapshot matches its chain entry. "
            "Read-only: safe while the daemon runs. Exit 0: intact; 65: broken; 66: no journal."
        ),
    )
    _add_state_dir(verify)
    verify.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    verify.set_defaults(handler=_journal_verify)

    snapshot = commands.add_parser("snapshot", help="bank side: snapshot keys and opening sealed snapshots")
    snapshot_commands = snapshot.add_subparsers(dest="snapshot_command", metavar="SUBCOMMAND")
    snapshot.set_defaults(handler=_usage(snapshot))
    keygen = snapshot_commands.add_parser(
        "keygen",
        help="create the bank's snapshot key pair (refuses to overwrite)",
        description=(
            "Writes bank_snapshot_private.key (0600, keep it at the bank, offline) and "
            "bank_snapshot_public.key (0644, install on each ATM at journal.bank_public_key_file). "
            "Each holds the 32-byte X25519 key as one line of base64."
        ),
    )
    keygen.add_argument("--out-dir", required=True, metavar="DIR", help="directory for the two key files")
    keygen.set_defaults(handler=_snapshot_keygen)

    opener = snapshot_commands.add_parser(
        "open",
        help="decrypt sealed snapshots to JPEG files with the bank's private key",
        description=(
            "Reads snapshots from a journal (read-only), checks their sha256, decrypts them and "
            "writes UUID.jpg (and UUID-crop.jpg) into --out, never overwriting a file."
        ),
    )
    opener.add_argument("--private-key", required=True, metavar="FILE", help="bank_snapshot_private.key")
    _add_state_dir(opener)
    which = opener.add_mutually_exclusive_group(required=True)
    which.add_argument("--uuid", help="one snapshot, by its uuid")
    which.add_argument("--session", metavar="SESSION_ID", help="every snapshot of one session")
    opener.add_argument("--out", required=True, metavar="DIR", help="output directory (created 0700)")
    opener.set_defaults(handler=_snapshot_open)


def _usage(parser: argparse.ArgumentParser) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return EX_USAGE

    return handler


def _add_state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="directory holding journal.sqlite3 (default: paths.state_dir from the configuration)",
    )


def _run(args: argparse.Namespace, body: Handler) -> int:
    from atmguard.errors import ConfigError

    return report_failures("atmguard", lambda: body(args), [(ConfigError, EX_CONFIG, "")])


def _journal_path(args: argparse.Namespace) -> Path:
    from atmguard.config import relative_to_config
    from atmguard.store.journal import JOURNAL_FILENAME

    if args.state_dir:
        return Path(args.state_dir) / JOURNAL_FILENAME
    settings = command_settings(args)
    return relative_to_config(settings, settings.paths.state_dir) / JOURNAL_FILENAME


def _open_reader(path: Path) -> Journal:
    from atmguard.store.journal import Journal, JournalError

    if not path.is_file():
        raise CommandFailed(EX_NOINPUT, f"{path}: no journal here (use --state-dir)")
    reader = Journal(path, atm_id=None, read_only=True)
    try:
        reader.open()
    except JournalError as exc:
        raise CommandFailed(EX_IOERR, str(exc)) from None
    return reader


def _journal_verify(args: argparse.Namespace) -> int:
    return _run(args, _do_journal_verify)


def _do_journal_verify(args: argparse.Namespace) -> int:
    from atmguard.store.journal import JournalError, verify_journal

    path = _journal_path(args)
    if not path.is_file():
        raise CommandFailed(EX_NOINPUT, f"{path}: no journal here (use --state-dir)")
    from atmguard.cli.progress import Progress

    shown: list[Progress] = []  # created once the total is known to be worth a progress line

    def progress(done: int, total: int) -> None:
        if total < _PROGRESS_MIN_EVENTS:
            return
        if not shown:
            shown.append(Progress("verify", unit="events"))
        shown[0].update(done, total)

    try:
        report = verify_journal(path, progress=progress)
    except JournalError as exc:
        raise CommandFailed(EX_IOERR, str(exc)) from None
    finally:
        if shown:
            shown[0].finish()
    if args.json:
        print(
            json.dumps(
                {
                    "journal": str(path),
                    "ok": report.ok,
                    "events_checked": report.events_checked,
                    "snapshots_checked": report.snapshots_checked,
                    "first_seq": report.first_seq,
                    "last_seq": report.last_seq,
                    "checkpoint_seq": report.checkpoint_seq,
                    "problem_count": report.problem_count,
                    "problems": report.problems,
                }
            )
        )
    else:
        for problem in report.problems:
            print(problem)
        if report.problem_count > len(report.problems):
            print(f"... and {report.problem_count - len(report.problems)} more")
        print(f"{path}: {report.summary()}")
    return EX_OK if report.ok else EX_DATAERR


def _snapshot_keygen(args: argparse.Namespace) -> int:
    return _run(args, _do_snapshot_keygen)


def _do_snapshot_keygen(args: argparse.Namespace) -> int:
    from atmguard.store.keys import KeyFileExistsError, generate_keypair

    try:
        pair = generate_keypair(args.out_dir)
    except KeyFileExistsError as exc:
        raise CommandFailed(EX_CANTCREAT, str(exc)) from None
    except OSError as exc:
        raise CommandFailed(EX_CANTCREAT, f"{args.out_dir}: {exc.strerror or exc}") from None
    print(f"private key: {pair.private_key_file} (keep at the bank; never copy it to an ATM)")
    print(f"public key:  {pair.public_key_file} (install on each ATM as journal.bank_public_key_file)")
    print(f"key id:      {pair.key_id}")
    return EX_OK


def _snapshot_open(args: argparse.Namespace) -> int:
    return _run(args, _do_snapshot_open)


def _write_exclusive(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CommandFailed(EX_CANTCREAT, f"{path}: already exists; not overwritten") from None
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _do_snapshot_open(args: argparse.Namespace) -> int:
    from atmguard.store.keys import load_private_key
    from atmguard.store.records import snapshot_digest
    from atmguard.store.snapshots import JPEG_SOI, SnapshotOpenError, open_sealed

    private_key = load_private_key(args.private_key)
    path = _journal_path(args)
    reader = _open_reader(path)
    try:
        if args.uuid:
            found = reader.get_snapshot(args.uuid)
            records: list[SnapshotRecord] = [] if found is None else [found]
        else:
            records = reader.snapshots_for_session(args.session)
    finally:
        reader.close()
    if not records:
        which = f"uuid {args.uuid}" if args.uuid else f"session {args.session}"
        raise CommandFailed(EX_NOINPUT, f"{path}: no snapshot with {which}")

    out_dir = Path(args.out)
    if not out_dir.exists():
        out_dir.mkdir(mode=0o700, parents=True)
        out_dir.chmod(0o700)
    failures = 0
    for record in records:
        if snapshot_digest(record.sealed_frame, record.sealed_crop) != record.sha256:
            print(
                f"snapshot {record.uuid}: sealed blobs do not match their sha256 (altered)", file=sys.stderr
            )
            failures += 1
            continue
        try:
            parts = [("", open_sealed(private_key, record.sealed_frame))]
            if record.sealed_crop is not None:
                parts.append(("-crop", open_sealed(private_key, record.sealed_crop)))
        except SnapshotOpenError as exc:
            print(f"snapshot {record.uuid}: {exc}", file=sys.stderr)
            failures += 1
            continue
        for suffix, jpeg in parts:
            if not jpeg.startswith(JPEG_SOI):
                print(f"snapshot {record.uuid}{suffix}: decrypted data is not a JPEG", file=sys.stderr)
                failures += 1
                continue
            target = out_dir / f"{record.uuid}{suffix}.jpg"
            _write_exclusive(target, jpeg)
            print(f"{target} ({record.reason}, {record.t_wall}, {len(jpeg)} bytes)")
    return EX_DATAERR if failures else EX_OK
