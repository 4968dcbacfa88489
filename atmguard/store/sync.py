"""The sync worker: drains the local journal to the central server, in order, exactly once.

Each batch is one server transaction of idempotent ``ingest_event`` / ``ingest_snapshot``
calls keyed on the records' UUIDs (:class:`~atmguard.store.central.CentralStore`). Records are
marked synced locally only after the server's COMMIT returned, so a crash in between makes the
next run send the batch again, which the server accepts without storing anything twice.

Order: events go in seq order, and a batch of snapshots is read *before* the events are
drained and sent *after*, so a snapshot never reaches the server before the
``snapshot_taken`` event that puts its sha256 in the chain (the central schema has no foreign
key between them; this keeps what the bank sees consistent anyway).

Errors:

- ``CentralUnavailableError`` (server down, timeout, access denied, TLS) and unexpected
  exceptions (a bug, logged with its type) end the run; :meth:`SyncWorker.run` retries with
  exponential backoff and full jitter, ``uniform(0, min(max, initial * 2**n))``, reset after a
  successful run. A bug therefore cannot spin the CPU, and nothing is lost while it waits.
- ``RecordRejectedError`` (permanent for one record: conflict, over-long value, hash or sha256
  that does not match the record, too big for ``max_allowed_packet``): that record is
  dead-lettered with the reason and the rest of the batch is sent again without it (the error
  names the record, so no bisection is needed). Records the journal cannot even read back
  (payload no longer JSON, snapshot without its blobs) are dead-lettered the same way.

Dead letters and the central chain: a dead-lettered event leaves a gap in the chain the bank
holds, and :meth:`CentralStore.verify_chain` reports it as a missing record there; nothing
papers over it. To make the gap explainable from the bank's side, the worker appends a
``sync_dead_letter`` event to the journal for each dead letter (record kind, uuid, seq or
event uuid, reason), which is chained and synced like any other event. Locally, ``atmguard
outbox`` lists every dead letter with its reason; ``Journal.requeue_dead`` puts one back once
the server side is fixed. A dead-lettered ``sync_dead_letter`` event gets no notice of its own
(that could go on forever).

Memory stays flat: only one batch of events and one batch of snapshots (bounded by
``snapshot_batch_bytes``) are held at a time, whatever the backlog.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

from atmguard.store.central import CentralUnavailableError, RecordRejectedError
from atmguard.store.credentials import CredentialError
from atmguard.store.journal import JournalError, PayloadError
from atmguard.store.records import EventRecord, SnapshotRecord

if TYPE_CHECKING:
    from atmguard.config import Settings
    from atmguard.store.central import CentralStore
    from atmguard.store.journal import Journal
    from atmguard.store.throwaway_mariadb import ThrowawayMariaDB

logger = logging.getLogger(__name__)

SYNC_DEAD_LETTER = "sync_dead_letter"
"""Event kind the worker appends for each dead letter, so the bank can explain a chain gap."""
DEFAULT_SNAPSHOT_BATCH_BYTES = 4 * 1024 * 1024
_INITIAL_SNAPSHOT_ESTIMATE_BYTES = 1024 * 1024  # until a batch shows the real size
_MAX_BACKOFF_EXPONENT = 62
_NOTICE_REASON_CHARS = 300
_UNREADABLE_EVENT = "payload is not valid JSON: the local journal was altered or damaged"
_ORPHAN_SNAPSHOT = "sealed blobs are missing from the local journal (altered or damaged)"

RecordKind = Literal["event", "snapshot"]
ErrorKind = Literal["unavailable", "credentials", "journal", "unexpected"]
WaitFn = Callable[[threading.Event, float], bool]
"""Wait up to ``timeout`` seconds for the event; True when it is set (stop)."""


def _event_wait(stop_event: threading.Event, timeout_s: float) -> bool:
    return stop_event.wait(timeout_s)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record dead-lettered during a run."""

    kind: RecordKind
    uuid: str
    reason: str


@dataclass(slots=True)
class SyncReport:
    """What one :meth:`SyncWorker.run_once` did."""

    events_synced: int = 0
    snapshots_synced: int = 0
    snapshot_bytes: int = 0
    """Sealed blob bytes sent (snapshots synced)."""
    batches: int = 0
    """Server transactions committed."""
    dead_letters: list[Rejected] = field(default_factory=list)
    drained: bool = False
    """The outbox was empty at the end (dead letters do not count as pending)."""
    error: str | None = None
    """Why the run stopped early; None when it drained (or was asked to stop)."""
    error_kind: ErrorKind | None = None
    """``unavailable``: server down, unreachable, refused (access, TLS); ``credentials``: the
    password cannot be read; ``journal``: the local journal failed; ``unexpected``: a bug.
    The loop retries all of them with backoff."""
    seconds: float = 0.0

    @property
    def unavailable(self) -> bool:
        """The server could not be used (or an unexpected error, treated alike): retry later."""
        return self.error_kind in ("unavailable", "unexpected")

    @property
    def events_dead(self) -> int:
        return sum(1 for letter in self.dead_letters if letter.kind == "event")

    @property
    def snapshots_dead(self) -> int:
        return sum(1 for letter in self.dead_letters if letter.kind == "snapshot")

    def summary(self) -> str:
        state = "drained" if self.drained else f"stopped: {self.error}" if self.error else "stopped"
        dead = f", {len(self.dead_letters)} dead-lettered" if self.dead_letters else ""
        return (
            f"{self.events_synced} events and {self.snapshots_synced} snapshots synced{dead} "
            f"in {self.seconds:.1f} s ({state})"
        )

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["unavailable"] = self.unavailable
        data["events_dead"] = self.events_dead
        data["snapshots_dead"] = self.snapshots_dead
        return data


class _Stopped(Exception):
    """Internal: the stop event was set between batches."""


class SyncWorker:
    """Drains one journal to the central server: :meth:`run_once`, or :meth:`run` on a thread."""

    def __init__(
        self,
        journal: Journal,
        central_factory: Callable[[], CentralStore],
        *,
        batch_size: int = 200,
        interval_s: float = 2.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 300.0,
        snapshot_batch_bytes: int = DEFAULT_SNAPSHOT_BATCH_BYTES,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        wait: WaitFn = _event_wait,
        dead_letter_notices: bool = True,
    ) -> None:
        """``central_factory`` makes the worker's own CentralStore (called once, lazily; the
        store reconnects by itself after a failure). ``wait`` and ``rng`` are injectable so
        tests can observe the backoff without sleeping."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if interval_s <= 0 or backoff_initial_s <= 0 or backoff_max_s <= 0:
            raise ValueError("interval_s, backoff_initial_s and backoff_max_s must be positive")
        self._journal = journal
        self._central_factory = central_factory
        self._batch_size = batch_size
        self._interval_s = interval_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._snapshot_batch_bytes = max(1, snapshot_batch_bytes)
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._wait = wait
        self._dead_letter_notices = dead_letter_notices
        self._store: CentralStore | None = None
        self._snapshot_estimate = _INITIAL_SNAPSHOT_ESTIMATE_BYTES
        self._run_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop_event: threading.Event | None = None
        self.consecutive_failures = 0
        """Failed runs in a row of the :meth:`run` loop (0 after a success)."""
        self.last_report: SyncReport | None = None
        """The latest :meth:`run_once` result (read by the daemon's status socket)."""
        self.last_success_wall_s: float | None = None
        """Wall-clock time (Unix seconds) when a run last ended without an error."""

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        journal: Journal,
        central_factory: Callable[[], CentralStore] | None = None,
        **overrides: Any,
    ) -> Self:
        """A worker for ``[sync]`` and ``[central]``; ``journal`` is the daemon's (shared) one."""
        if central_factory is None:
            from atmguard.store.central import CentralStore

            def central_factory() -> CentralStore:
                return CentralStore.from_settings(settings)

        sync = settings.sync
        options: dict[str, Any] = {
            "batch_size": sync.batch_size,
            "interval_s": sync.interval_s,
            "backoff_initial_s": sync.backoff_initial_s,
            "backoff_max_s": sync.backoff_max_s,
            "snapshot_batch_bytes": int(sync.snapshot_batch_mib * 1024 * 1024),
        }
        return cls(journal, central_factory, **{**options, **overrides})

    # --- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Build the central store; it connects at the first batch, so a server that is down
        when the daemon starts delays the sync, not the start."""
        if self._store is None:
            self._store = self._central_factory()

    def close(self) -> None:
        """Stop the thread (if started) and close the central connection. Idempotent."""
        self.stop()
        store, self._store = self._store, None
        if store is not None:
            try:
                store.close()
            except Exception:
                logger.debug("closing the central store failed", exc_info=True)

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self, stop_event: threading.Event | None = None) -> threading.Thread:
        """Run :meth:`run` on a daemon thread until ``stop_event`` is set or :meth:`stop`."""
        if self._thread is not None and self._thread.is_alive():
            return self._thread
        self.open()
        self._stop_event = stop_event if stop_event is not None else threading.Event()
        self._thread = threading.Thread(
            target=self.run, args=(self._stop_event,), name="atmguard-sync", daemon=True
        )
        self._thread.start()
        return self._thread

    def stop(self, *, timeout_s: float = 10.0) -> bool:
        """Ask the thread to stop and wait for it; False if it is still busy after ``timeout_s``
        (a batch in flight finishes within the central read/write timeouts)."""
        thread, event = self._thread, self._stop_event
        if thread is None or event is None:
            return True
        event.set()
        thread.join(timeout_s)
        if thread.is_alive():
            logger.warning("sync thread still busy %.1f s after stop", timeout_s)
            return False
        self._thread = None
        return True

    # --- the loop ----------------------------------------------------------------------------

    def backoff_delay(self, failures: int) -> float:
        """Full jitter: uniform(0, min(max, initial * 2**failures)) seconds."""
        exponent = min(max(failures, 0), _MAX_BACKOFF_EXPONENT)
        cap = min(self._backoff_max_s, self._backoff_initial_s * 2.0**exponent)
        return self._rng.uniform(0.0, cap)

    def run(self, stop_event: threading.Event) -> None:
        """Drain, wait ``interval_s`` (or a backoff after a failure), repeat until stopped."""
        self.consecutive_failures = 0
        while not stop_event.is_set():
            report = self.run_once(stop_event=stop_event)
            if stop_event.is_set():
                break
            if report.error is not None:
                delay = self.backoff_delay(self.consecutive_failures)
                self.consecutive_failures += 1
                # Loud on the first failure and then at powers of two, not on every retry.
                failures = self.consecutive_failures
                level = logging.WARNING if failures & (failures - 1) == 0 else logging.DEBUG
                logger.log(
                    level, "sync failed (%d in a row): %s; retrying in %.2f s", failures, report.error, delay
                )
            else:
                if self.consecutive_failures:
                    logger.warning(
                        "sync working again after %d failed attempt(s): %s",
                        self.consecutive_failures,
                        report.summary(),
                    )
                self.consecutive_failures = 0
                delay = self._interval_s
            if self._wait(stop_event, delay):
                break

    def run_once(
        self,
        *,
        stop_event: threading.Event | None = None,
        progress: Callable[[SyncReport], None] | None = None,
    ) -> SyncReport:
        """Send everything pending until the outbox is empty, an error, or ``stop_event``.

        Never raises for server, journal or unexpected errors: they are in the report
        (``error``, ``unavailable``) so the caller decides between backoff and exit code.
        """
        report = SyncReport()
        started = self._clock()
        with self._run_lock:
            try:
                self.open()
                self._drain(report, stop_event, progress)
                report.drained = True
            except _Stopped:
                pass
            except CentralUnavailableError as exc:
                report.error, report.error_kind = str(exc), "unavailable"
            except CredentialError as exc:
                report.error, report.error_kind = str(exc), "credentials"
                logger.error("sync: %s", exc)
            except JournalError as exc:
                report.error, report.error_kind = f"journal: {exc}", "journal"
                logger.error("sync: %s", report.error)
            except Exception as exc:
                # A bug must not end the thread: treat it as transient (the loop backs off).
                report.error = f"unexpected {type(exc).__name__}: {exc}"
                report.error_kind = "unexpected"
                logger.error("sync: unexpected %s", type(exc).__name__, exc_info=True)
        report.seconds = self._clock() - started
        if report.error is None:
            self.last_success_wall_s = time.time()
        self.last_report = report
        if report.events_synced or report.snapshots_synced or report.dead_letters:
            logger.info("sync: %s", report.summary())
        return report

    # --- draining ----------------------------------------------------------------------------

    def _drain(
        self,
        report: SyncReport,
        stop_event: threading.Event | None,
        progress: Callable[[SyncReport], None] | None,
    ) -> None:
        store = self._store
        assert store is not None
        while True:
            self._check_stop(stop_event)
            # Read before the events are drained, send after: each snapshot's own event was
            # committed before the snapshot, so it is on the server by then.
            snapshots = self._fetch_snapshots(report)
            self._drain_events(store, report, stop_event, progress)
            if not snapshots:
                return
            self._send("snapshot", store.insert_snapshots, snapshots, report)
            if progress is not None:
                progress(report)

    def _drain_events(
        self,
        store: CentralStore,
        report: SyncReport,
        stop_event: threading.Event | None,
        progress: Callable[[SyncReport], None] | None,
    ) -> None:
        while True:
            self._check_stop(stop_event)
            events = self._fetch_events(report)
            if not events:
                return
            dead_before = len(report.dead_letters)
            self._send("event", store.insert_events, events, report)
            if progress is not None:
                progress(report)
            # A short batch means the outbox was empty, unless a dead letter just journaled
            # its notice: send that in this run too.
            if len(events) < self._batch_size and len(report.dead_letters) == dead_before:
                return

    @staticmethod
    def _check_stop(stop_event: threading.Event | None) -> None:
        if stop_event is not None and stop_event.is_set():
            raise _Stopped

    def _fetch_events(self, report: SyncReport) -> list[EventRecord]:
        while True:
            try:
                return self._journal.pending_events(self._batch_size)
            except (ValueError, TypeError) as exc:
                # A row the journal cannot turn back into a record would block the outbox for
                # good: find it by reading the raw rows and dead-letter it.
                if not self._quarantine_unreadable_events(report):
                    raise JournalError(f"cannot read pending events: {exc}") from None

    def _fetch_snapshots(self, report: SyncReport) -> list[SnapshotRecord]:
        limit = max(1, min(self._batch_size, self._snapshot_batch_bytes // max(1, self._snapshot_estimate)))
        snapshots = self._journal.pending_snapshots(limit)
        if snapshots:
            self._snapshot_estimate = max(_snapshot_bytes(snapshot) for snapshot in snapshots)
        else:
            self._quarantine_orphan_snapshots(report)
        return snapshots

    def _send(
        self,
        kind: RecordKind,
        insert: Callable[[Sequence[Any]], None],
        batch: Sequence[EventRecord] | Sequence[SnapshotRecord],
        report: SyncReport,
    ) -> None:
        remaining: list[Any] = list(batch)
        while remaining:
            try:
                insert(remaining)
            except RecordRejectedError as exc:
                index = next((i for i, record in enumerate(remaining) if record.uuid == exc.uuid), None)
                if index is None:
                    # Cannot isolate a record the batch does not hold: retry later, never guess.
                    raise CentralUnavailableError(
                        f"server rejected {exc.uuid}, which is not in the batch sent: {exc.reason}"
                    ) from None
                # The whole batch was rolled back: park the bad record, send the rest again.
                self._dead_letter(kind, remaining.pop(index), exc.reason, report)
                continue
            # Only now, after the server's COMMIT returned, may the records count as synced.
            uuids = [record.uuid for record in remaining]
            if kind == "event":
                self._journal.mark_events_synced(uuids)
                report.events_synced += len(uuids)
            else:
                self._journal.mark_snapshots_synced(uuids)
                report.snapshots_synced += len(uuids)
                report.snapshot_bytes += sum(_snapshot_bytes(record) for record in remaining)
            report.batches += 1
            return

    # --- dead letters ------------------------------------------------------------------------

    def _dead_letter(
        self,
        kind: RecordKind,
        record: EventRecord | SnapshotRecord | _RawRecord,
        reason: str,
        report: SyncReport,
    ) -> None:
        if not self._journal.mark_dead(kind, record.uuid, reason):
            return  # no longer pending (another process synced or parked it meanwhile)
        report.dead_letters.append(Rejected(kind, record.uuid, reason))
        where = f"seq {record.seq}" if kind == "event" else "snapshot"
        logger.error("sync: %s %s (%s) dead-lettered: %s", kind, record.uuid, where, reason)
        if not self._dead_letter_notices:
            return
        if isinstance(record, EventRecord) and record.kind == SYNC_DEAD_LETTER:
            return
        notice: dict[str, Any] = {"record": kind, "uuid": record.uuid}
        if isinstance(record, SnapshotRecord):
            notice["event_uuid"] = record.event_uuid
        elif kind == "snapshot":
            notice["event_seq"] = record.seq  # a raw snapshot row carries its event's seq
        else:
            notice["seq"] = record.seq
        self._append_notice(notice, reason)

    def _append_notice(self, notice: dict[str, Any], reason: str) -> None:
        for text in (reason[:_NOTICE_REASON_CHARS], "withheld (see the ATM's dead letters)"):
            try:
                self._journal.append_event(SYNC_DEAD_LETTER, {**notice, "reason": text})
                return
            except PayloadError:
                continue  # the reason text tripped the payload checks: send without it
            except JournalError as exc:
                logger.error("sync: cannot journal the dead-letter notice for %s: %s", notice["uuid"], exc)
                return

    def _raw_connection(self) -> sqlite3.Connection:
        # Read-only, beside the journal's own connection: only used to find rows the journal's
        # reader cannot turn into records (WAL readers never block the writer).
        return sqlite3.connect(
            f"{Path(self._journal.path).resolve().as_uri()}?mode=ro", uri=True, isolation_level=None
        )

    def _quarantine_unreadable_events(self, report: SyncReport) -> int:
        import json

        conn = self._raw_connection()
        try:
            rows = conn.execute(
                "SELECT uuid, seq, payload FROM events WHERE sync_state = 'pending' ORDER BY seq LIMIT ?",
                (self._batch_size,),
            ).fetchall()
        finally:
            conn.close()
        found = 0
        for uuid, seq, payload in rows:
            try:
                json.loads(payload)
            except (ValueError, TypeError):
                self._dead_letter("event", _RawRecord(uuid, seq), _UNREADABLE_EVENT, report)
                found += 1
        return found

    def _quarantine_orphan_snapshots(self, report: SyncReport) -> None:
        conn = self._raw_connection()
        try:
            rows = conn.execute(
                "SELECT s.uuid, s.event_seq FROM snapshots AS s LEFT JOIN snapshot_blobs AS b ON b.seq = s.seq"
                " WHERE s.sync_state = 'pending' AND b.seq IS NULL LIMIT ?",
                (self._batch_size,),
            ).fetchall()
        except sqlite3.Error as exc:
            logger.warning("sync: cannot look for snapshots without blobs: %s", exc)
            return
        finally:
            conn.close()
        for uuid, event_seq in rows:
            self._dead_letter("snapshot", _RawRecord(uuid, event_seq), _ORPHAN_SNAPSHOT, report)


@dataclass(frozen=True, slots=True)
class _RawRecord:
    """A journal row that cannot be read back as a record: enough to dead-letter it."""

    uuid: str
    seq: int


def _snapshot_bytes(record: SnapshotRecord) -> int:
    return len(record.sealed_frame) + (len(record.sealed_crop) if record.sealed_crop is not None else 0)


# --- bench ---------------------------------------------------------------------------------------

TARGET_DRAIN_S = 60.0
"""Issue 4: 10,000 events + 1,000 sealed ~40 KB snapshots drain into the local MariaDB in 60 s."""


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process (this one by default), from /proc."""
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        if pid != "self":
            raise
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _RssSampler:
    """Peak resident memory while a block runs, sampled every ``period_s`` (and on demand)."""

    def __init__(self, *, period_s: float = 0.02) -> None:
        self._period_s = period_s
        self._stop = threading.Event()
        self.samples: list[int] = []
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._period_s):
            self.samples.append(rss_bytes())

    def __enter__(self) -> Self:
        self.samples.append(rss_bytes())
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(rss_bytes())


def _growth(samples: Sequence[int]) -> int:
    quarter = max(1, len(samples) // 4)
    if len(samples) <= quarter:
        return 0
    return max(0, max(samples[quarter:]) - max(samples[:quarter]))


def measure_sync(
    tmp_dir: str | os.PathLike[str],
    *,
    events: int = 10_000,
    snapshots: int = 1_000,
    snapshot_bytes: int = 40_000,
    batch_size: int = 200,
    snapshot_batch_bytes: int = DEFAULT_SNAPSHOT_BATCH_BYTES,
    server: ThrowawayMariaDB | None = None,
) -> dict[str, Any]:
    """Drain a backlog of ``events`` events and ``snapshots`` sealed snapshots into a MariaDB.

    The backlog is built in a temporary journal with fsync off (it only has to exist; a
    snapshot also adds its ``snapshot_taken`` event, so ``events + snapshots`` events are
    sent). ``server``: an already running ThrowawayMariaDB (a fresh database is created on it
    and dropped afterwards); None starts and stops one. Memory is sampled while draining:
    ``rss_peak_delta_mib`` is the peak above the resident size before the drain, and
    ``rss_growth_events_mib`` / ``rss_growth_snapshots_mib`` how much the resident size after
    the last three quarters of a phase's batches exceeds its peak over the first quarter
    (about 0 when memory is flat, i.e. does not grow with the backlog).
    """
    import pymysql

    from atmguard.store.central import CentralStore
    from atmguard.store.journal import Journal
    from atmguard.store.migrate import migrate, register_atm
    from atmguard.store.throwaway_mariadb import ThrowawayMariaDB

    directory = Path(tmp_dir)
    own_server = server is None
    if server is None:
        server = ThrowawayMariaDB().start()
    tag = f"{os.getpid()}_{secrets.token_hex(3)}"
    database = f"sync_bench_{tag}"
    atm_id = f"BENCH-SYNC-{tag}".replace("_", "-")
    user = f"bench_{tag}"
    password = secrets.token_urlsafe(16)
    result: dict[str, Any] = {
        "events": events + snapshots,
        "snapshots": snapshots,
        "snapshot_bytes": snapshot_bytes,
        "batch_size": batch_size,
    }
    try:
        conn = server.admin_connect()
        try:
            migrate(conn, database=database)
            register_atm(
                conn, database=database, atm_id=atm_id, atm_user=user, atm_host="127.0.0.1", password=password
            )
        finally:
            conn.close()

        def connect() -> pymysql.connections.Connection:
            return pymysql.connect(
                host=server.host,
                port=server.port,
                user=user,
                password=password,
                database=database,
                autocommit=True,
                ssl_disabled=True,
                charset="utf8mb4",
                connect_timeout=5,
                read_timeout=60,
                write_timeout=60,
            )

        payload = {"covered": False, "score": 0.25, "masked_pan": "411111******1111", "latency_ms": 12.5}
        every = max(1, events // snapshots) if snapshots else 0
        with Journal(
            directory / f"sync-bench-{tag}.sqlite3", atm_id=atm_id, fsync=False, reserve_bytes=0
        ) as journal:
            started = time.perf_counter()
            added = 0
            for index in range(events):
                journal.append_event("face_state", {**payload, "covered": index % 3 == 0})
                if every and index % every == every - 1 and added < snapshots:
                    journal.add_snapshot(
                        os.urandom(snapshot_bytes), sealed_crop=None, reason="bench", is_fraud_evidence=True
                    )
                    added += 1
            while added < snapshots:
                journal.add_snapshot(
                    os.urandom(snapshot_bytes), sealed_crop=None, reason="bench", is_fraud_evidence=True
                )
                added += 1
            result["backlog_fill_s"] = time.perf_counter() - started

            worker = SyncWorker(
                journal,
                lambda: CentralStore(connect, atm_id=atm_id, where=f"{server.host}:{server.port}"),
                batch_size=batch_size,
                snapshot_batch_bytes=snapshot_batch_bytes,
                dead_letter_notices=False,
            )
            # Resident size after each batch, per kind: flat memory means the last batches of a
            # phase need no more than its first ones, however long the backlog.
            by_kind: dict[str, list[int]] = {"event": [], "snapshot": []}
            seen = [0, 0]

            def on_batch(report: SyncReport) -> None:
                kind = "event" if report.events_synced != seen[0] else "snapshot"
                seen[:] = [report.events_synced, report.snapshots_synced]
                by_kind[kind].append(rss_bytes())

            gc.collect()
            with worker, _RssSampler() as sampler:
                started = time.perf_counter()
                report = worker.run_once(progress=on_batch)
                seconds = time.perf_counter() - started
            stats = journal.outbox_stats()
        if report.error is not None:
            raise RuntimeError(f"sync bench failed: {report.error}")
        stored_events, stored_snapshots = server.execute(
            "SELECT (SELECT COUNT(*) FROM events WHERE atm_id = %s),"
            " (SELECT COUNT(*) FROM snapshots WHERE atm_id = %s)",
            (atm_id, atm_id),
            database=database,
        )[0]
        baseline = sampler.samples[0]
        mib = 1024 * 1024
        result.update(
            seconds=seconds,
            events_per_s=report.events_synced / seconds if seconds else 0.0,
            snapshots_per_s=report.snapshots_synced / seconds if seconds else 0.0,
            mb_per_s=report.snapshot_bytes / seconds / 1e6 if seconds else 0.0,
            batches=report.batches,
            target_s=TARGET_DRAIN_S,
            full_size=events >= 10_000 and snapshots >= 1_000,
            meets_target=seconds <= TARGET_DRAIN_S,
            rss_before_mib=baseline / mib,
            rss_peak_delta_mib=(max(sampler.samples) - baseline) / mib,
            rss_growth_events_mib=_growth(by_kind["event"]) / mib,
            rss_growth_snapshots_mib=_growth(by_kind["snapshot"]) / mib,
            stored_events=int(stored_events),
            stored_snapshots=int(stored_snapshots),
            pending_after=stats.pending_events + stats.pending_snapshots,
        )
    finally:
        with contextlib.suppress(Exception):
            server.execute(f"DROP DATABASE IF EXISTS `{database}`")
            server.execute("DROP USER IF EXISTS %s@%s", (user, "127.0.0.1"))
        if own_server:
            server.stop()
    return result
