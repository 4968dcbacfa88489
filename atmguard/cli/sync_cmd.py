"""`atmguard sync [--once | --bench]` and `atmguard outbox [--json] [--requeue UUID]`: the technician's view of the outbox.

``sync --once`` drains the journal to the central server and exits: 0 drained, 1 drained but
dead letters are waiting for a technician, 69 the server is unavailable (nothing lost: run it
again later), 74 the journal cannot be read or written, 77 the central password cannot be
read, 78 invalid config. Without ``--once``
it keeps syncing (with backoff) until SIGINT/SIGTERM, like the daemon's worker. ``outbox``
only reads the journal, so it is safe while the daemon runs. Nothing heavy (SQLite, PyMySQL,
config) is imported until a handler runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from atmguard.cli.common import (
    EX_CONFIG,
    EX_IOERR,
    EX_NOINPUT,
    EX_NOPERM,
    EX_OK,
    EX_SOFTWARE,
    EX_UNAVAILABLE,
    CommandFailed,
    command_settings,
    report_failures,
)

if TYPE_CHECKING:
    from atmguard.config import Settings
    from atmguard.store.journal import Journal
    from atmguard.store.sync import SyncReport

Handler = Callable[[argparse.Namespace], int]

EX_DEAD_LETTERS = 1  # drained, but records were parked for a technician (see `atmguard outbox`)

PROGRESS_MIN_RECORDS = 1000
"""Backlogs at least this big get progress lines on stderr."""
PROGRESS_PERIOD_S = 1.0
"""On a terminal, the progress line is redrawn at most this often (elsewhere: only the final line)."""
_DEAD_LETTERS_SHOWN = 50


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``sync`` and ``outbox`` to the top-level sub-commands."""
    sync = commands.add_parser(
        "sync",
        help="send the journal's pending events and snapshots to the central server",
        description=(
            "Drains the local journal to the central server ([central] of the config), in order, "
            "in batches, marking records synced only after the server committed them. "
            "--once: exit 0 drained, 1 dead letters waiting (see `atmguard outbox`), 69 server "
            "unavailable, 74 journal error, 77 password unreadable, 78 invalid config. Without "
            "--once: keep syncing with "
            "backoff until interrupted."
        ),
    )
    mode = sync.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="drain once and exit (exit code says how it went)")
    mode.add_argument(
        "--bench",
        action="store_true",
        help="measure: drain a 10,000-event + 1,000-snapshot backlog into a throwaway MariaDB",
    )
    _add_state_dir(sync)
    sync.add_argument("--json", action="store_true", help="print the result as one JSON object")
    sync.set_defaults(handler=_handler(_sync))

    outbox = commands.add_parser(
        "outbox",
        help="pending counts, oldest unsynced age, dead letters with reasons, journal size",
        description=(
            "Reads the journal (read-only, safe while the daemon runs). Exit 0, 66 if there is "
            "no journal. --requeue UUID puts a dead letter back in the outbox once the cause is fixed."
        ),
    )
    _add_state_dir(outbox)
    outbox.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    outbox.add_argument(
        "--requeue", metavar="UUID", help="put this dead-lettered event or snapshot back in the outbox"
    )
    outbox.set_defaults(handler=_handler(_outbox))


def _add_state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="directory holding journal.sqlite3 (default: paths.state_dir from the configuration)",
    )


def _handler(body: Handler) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        from atmguard.errors import ConfigError
        from atmguard.store.credentials import CredentialError
        from atmguard.store.journal import JournalError

        return report_failures(
            f"atmguard {args.command}",
            lambda: body(args),
            [(ConfigError, EX_CONFIG, ""), (CredentialError, EX_NOPERM, ""), (JournalError, EX_IOERR, "")],
        )

    return handler


def _journal_path(args: argparse.Namespace, settings: Settings) -> Path:
    from atmguard.config import relative_to_config
    from atmguard.store.journal import JOURNAL_FILENAME

    # The same place Journal.from_settings (the daemon) uses.
    state_dir = (
        Path(args.state_dir) if args.state_dir else relative_to_config(settings, settings.paths.state_dir)
    )
    return state_dir / JOURNAL_FILENAME


# --- sync ----------------------------------------------------------------------------------------


def _sync(args: argparse.Namespace) -> int:
    if args.bench:
        return _bench(args)
    from atmguard.store.sync import SyncWorker

    settings = command_settings(args)
    if not settings.central.enabled:
        raise CommandFailed(EX_CONFIG, f"{settings.source}: central.enabled is false: this ATM does not sync")
    path = _journal_path(args, settings)
    if not path.is_file():
        raise CommandFailed(EX_NOINPUT, f"{path}: no journal here (use --state-dir)")
    journal = _open_journal(settings, path)
    try:
        worker = SyncWorker.from_settings(settings, journal=journal)
        with worker:
            if not args.once:
                return _sync_forever(worker)
            before = journal.outbox_stats()
            pending = before.pending_events + before.pending_snapshots
            progress = _progress(pending)
            try:
                report = worker.run_once(progress=None if progress is None else progress.update)
            finally:
                if progress is not None:
                    progress.finish()
            after = journal.outbox_stats()
    finally:
        journal.close()
    _print_report(args, report, after)
    if report.error is not None:
        code = {"credentials": EX_NOPERM, "journal": EX_IOERR}.get(report.error_kind or "", EX_UNAVAILABLE)
        print(f"atmguard sync: {report.error}", file=sys.stderr)
        return code
    if after.dead_events or after.dead_snapshots:
        print(
            f"atmguard sync: {after.dead_events + after.dead_snapshots} dead letter(s) need a technician "
            "(see `atmguard outbox`)",
            file=sys.stderr,
        )
        return EX_DEAD_LETTERS
    return EX_OK


def _open_journal(settings: Settings, path: Path) -> Journal:
    from atmguard.store.journal import Journal

    # As the daemon opens it (same options), at the --state-dir the technician may have given.
    journal = Journal(
        path,
        atm_id=settings.atm.id,
        synced_retention_days=settings.journal.synced_retention_days,
        disk_high_watermark_percent=settings.journal.disk_high_watermark_percent,
        reserve_bytes=int(settings.journal.emergency_reserve_mib * 1024 * 1024),
    )
    journal.open()
    return journal


class _SyncProgress:
    """Progress of one drain: records sent (events, snapshots, dead letters) of the backlog."""

    def __init__(self, pending: int) -> None:
        from atmguard.cli.progress import Progress

        self._pending = pending
        self._progress = Progress("sync", unit="records", period_s=PROGRESS_PERIOD_S)
        self._progress.update(0, pending)

    def update(self, report: SyncReport) -> None:
        done = report.events_synced + report.snapshots_synced + len(report.dead_letters)
        detail = (
            f"{report.events_synced} events, {report.snapshots_synced} snapshots,"
            f" {len(report.dead_letters)} dead-lettered"
        )
        # Records journaled while the drain runs are sent too: the total grows with them.
        self._progress.update(done, max(self._pending, done), detail=detail)

    def finish(self) -> None:
        self._progress.finish()


def _progress(pending: int) -> _SyncProgress | None:
    """A progress line for backlogs worth one (at least PROGRESS_MIN_RECORDS records)."""
    return _SyncProgress(pending) if pending >= PROGRESS_MIN_RECORDS else None


def _print_report(args: argparse.Namespace, report: SyncReport, after: Any) -> None:
    if args.json:
        data = report.as_dict()
        data["dead_letters"] = [
            {"kind": d.kind, "uuid": d.uuid, "reason": d.reason} for d in report.dead_letters
        ]
        data["outbox"] = _stats_dict(after)
        print(json.dumps(data))
        return
    for letter in report.dead_letters:
        print(f"dead letter: {letter.kind} {letter.uuid}: {letter.reason}")
    print(f"sync: {report.summary()}")
    print(
        f"outbox: {after.pending_events} events and {after.pending_snapshots} snapshots pending, "
        f"{after.dead_events + after.dead_snapshots} dead letter(s)"
    )


def _sync_forever(worker: Any) -> int:
    import signal
    import threading

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    print("sync: running until interrupted (Ctrl-C)", file=sys.stderr)
    try:
        thread = worker.start(stop)
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        worker.stop()
        signal.signal(signal.SIGTERM, previous)
    return EX_OK


def _bench(args: argparse.Namespace) -> int:
    import tempfile

    from atmguard.store.sync import measure_sync
    from atmguard.store.throwaway_mariadb import MariaDBUnavailable

    with tempfile.TemporaryDirectory(prefix="atmguard-sync-bench-") as tmp:
        try:
            result = measure_sync(tmp)
        except MariaDBUnavailable as exc:
            raise CommandFailed(EX_UNAVAILABLE, str(exc)) from None
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"sync bench: {result['events']} events + {result['snapshots']} snapshots of "
            f"{result['snapshot_bytes']} B drained in {result['seconds']:.1f} s "
            f"(target <= {result['target_s']:g} s: {'met' if result['meets_target'] else 'MISSED'})"
        )
        print(
            f"  {result['events_per_s']:.0f} events/s, {result['snapshots_per_s']:.0f} snapshots/s "
            f"(blended over the whole drain), {result['batches']} batches"
        )
        print(
            f"  memory: peak +{result['rss_peak_delta_mib']:.1f} MiB over {result['rss_before_mib']:.0f} MiB; "
            f"growth within the event phase {result['rss_growth_events_mib']:.1f} MiB, "
            f"within the snapshot phase {result['rss_growth_snapshots_mib']:.1f} MiB"
        )
    return EX_OK if result["meets_target"] else EX_SOFTWARE


# --- outbox --------------------------------------------------------------------------------------


def _stats_dict(stats: Any) -> dict[str, Any]:
    return {
        "pending_events": stats.pending_events,
        "pending_snapshots": stats.pending_snapshots,
        "dead_events": stats.dead_events,
        "dead_snapshots": stats.dead_snapshots,
        "oldest_pending_age_s": stats.oldest_pending_age_s,
        "db_bytes": stats.db_bytes,
    }


def _outbox(args: argparse.Namespace) -> int:
    from atmguard.store.journal import Journal

    settings = command_settings(args)
    path = _journal_path(args, settings)
    if not path.is_file():
        raise CommandFailed(EX_NOINPUT, f"{path}: no journal here (use --state-dir)")
    if args.requeue:
        return _requeue(args, path)
    reader = Journal(path, atm_id=None, read_only=True)
    reader.open()
    try:
        stats = reader.outbox_stats()
        letters = reader.dead_letters(limit=_DEAD_LETTERS_SHOWN)
    finally:
        reader.close()
    if args.json:
        data = {"journal": str(path), **_stats_dict(stats)}
        data["dead_letters"] = [
            {
                "kind": letter.kind,
                "uuid": letter.uuid,
                "seq": letter.seq,
                "reason": letter.reason,
                "marked_at": _iso(letter.marked_at),
            }
            for letter in letters
        ]
        print(json.dumps(data))
        return EX_OK
    age = "-" if stats.oldest_pending_age_s is None else _duration(stats.oldest_pending_age_s)
    print(f"journal: {path} ({stats.db_bytes / 1e6:.1f} MB)")
    print(f"pending: {stats.pending_events} events, {stats.pending_snapshots} snapshots; oldest {age}")
    dead = stats.dead_events + stats.dead_snapshots
    print(f"dead letters: {stats.dead_events} events, {stats.dead_snapshots} snapshots")
    for letter in letters:
        print(f"  {letter.kind} {letter.uuid} (seq {letter.seq}, {_iso(letter.marked_at)}): {letter.reason}")
    if dead > len(letters):
        print(f"  ... and {dead - len(letters)} more (--json lists the first {_DEAD_LETTERS_SHOWN} too)")
    return EX_OK


def _requeue(args: argparse.Namespace, path: Path) -> int:
    from atmguard.store.journal import Journal

    with Journal(path, atm_id=None, read_only=True) as reader:
        atm_id = reader.atm_id  # the journal's own: requeueing must not depend on the config's id
    with Journal(path, atm_id=atm_id, reserve_bytes=0) as journal:
        kinds: tuple[Literal["event", "snapshot"], ...] = ("event", "snapshot")
        for kind in kinds:
            if journal.requeue_dead(kind, args.requeue):
                print(f"{kind} {args.requeue} is pending again; it is sent at the next sync")
                return EX_OK
    raise CommandFailed(EX_NOINPUT, f"no dead letter with uuid {args.requeue}")


def _iso(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if unix_s else "-"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86_400:.1f} days ago"
