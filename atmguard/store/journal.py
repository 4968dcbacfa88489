"""The local journal: every event and sealed snapshot is committed here before anything uses it.

One SQLite file in the state directory, WAL mode with ``synchronous=FULL``: a commit is on the
storage (the WAL is fsynced) before ``append_event`` returns, and a power cut at any moment
leaves either the whole transaction or none of it. Events form a hash chain per ATM
(:mod:`atmguard.store.records`), so a deleted or altered record is detectable, locally by
:meth:`Journal.verify` and centrally by re-hashing what was synced.

Sealed snapshot blobs live in the same database rather than in files: the blob and its
``snapshot_taken`` chain entry commit in one transaction, so a crash can never leave a snapshot
without its event (or an event pointing at a half-written file), and SQLite reads and writes
blobs of tens of kilobytes at least as fast as separate files would.

The sync worker drains the outbox (``pending_events`` / ``pending_snapshots`` in creation order,
served from partial indexes so a 10,000-record backlog costs the same per batch as a small one)
and says what reached the server; only then does a record's state change. ``purge`` applies
retention and the disk watermark, and never deletes anything unsynced.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import statistics
import threading
import time
import uuid as uuid_module
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Self, TypeVar

from atmguard.errors import AtmguardError
from atmguard.store.records import (
    GENESIS_HASH,
    EventRecord,
    SnapshotRecord,
    canonical_json,
    chain_hash,
    snapshot_digest,
    verify_chain,
)

if TYPE_CHECKING:
    from atmguard.config import Settings

logger = logging.getLogger(__name__)

JOURNAL_FILENAME = "journal.sqlite3"
SCHEMA_VERSION = 1
SNAPSHOT_TAKEN = "snapshot_taken"
"""Written only by :meth:`Journal.add_snapshot`, in the same transaction as the snapshot."""

STANDARD_KINDS = (
    "startup",  # config and model identity at start
    "card_inserted",
    "card_removed",
    "pin_result",  # ok / wrong / timeout: never the PIN
    "face_state",
    "prompt_shown",
    "decision",
    "card_retained",
    "hardware_fault",
    "disk_pressure",
    SNAPSHOT_TAKEN,
)
"""Event kinds the daemon uses; any name matching ``[a-z][a-z0-9_]*`` is accepted."""

DEFAULT_MAX_PAYLOAD_BYTES = 16 * 1024
DEFAULT_MAX_SNAPSHOT_BYTES = 16 * 1024 * 1024
DEFAULT_RESERVE_BYTES = 4 * 1024 * 1024
RESERVE_SUFFIX = ".reserve"
_SEAL_OVERHEAD_BYTES = 48  # see snapshots.SEAL_OVERHEAD_BYTES; not imported to keep numpy out
_MAX_PAYLOAD_DEPTH = 16
_EVENT_ROW_OVERHEAD_BYTES = 300  # uuid, hashes, time and index entries beside the payload
_PURGE_BATCH = 2000
_WAL_AUTOCHECKPOINT_PAGES = 256
_WAL_SIZE_LIMIT_BYTES = 1024 * 1024
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_SESSION_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_MAX_PROBLEMS = 1000
_SECONDS_PER_DAY = 86_400.0

# Defence in depth, not the primary control: card and keypad code never hand a PIN, a PAN or
# track data to the journal (they journal masked PANs, PAN hashes and outcomes). This guard only
# catches a mistake on its way to permanent, synced evidence. It checks key names and looks for
# a 13-19 digit run, plain or grouped as PANs are printed (4-4-4-4 and Amex 4-6-5, spaces or
# dashes), that stands alone: digits inside a longer token (a hex digest, a UUID's 8-4-4-4-12
# groups) are not a card number, and flagging them would refuse random, legitimate events.
_SECRET_KEYS = frozenset(
    {"pin", "pan", "track", "track1", "track2", "track3", "trackdata", "pinblock", "cvv", "cvc", "cvv2"}
)
_PAN_LIKE_RE = re.compile(
    r"(?<![0-9A-Za-z])"
    r"(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{5})"
    r"(?![0-9A-Za-z])"
)

_CREATE_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid TEXT NOT NULL UNIQUE,
    atm_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    t_wall TEXT NOT NULL,
    created_at REAL NOT NULL,
    session_id TEXT,
    payload TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    sync_state TEXT NOT NULL DEFAULT 'pending' CHECK (sync_state IN ('pending', 'synced', 'dead')),
    state_changed_at REAL,
    dead_reason TEXT
);
CREATE INDEX events_pending ON events(seq) WHERE sync_state = 'pending';
CREATE INDEX events_dead ON events(seq) WHERE sync_state = 'dead';
CREATE TABLE snapshots (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid TEXT NOT NULL UNIQUE,
    atm_id TEXT NOT NULL,
    session_id TEXT,
    event_uuid TEXT NOT NULL UNIQUE,
    event_seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    is_fraud_evidence INTEGER NOT NULL CHECK (is_fraud_evidence IN (0, 1)),
    t_wall TEXT NOT NULL,
    created_at REAL NOT NULL,
    sha256 TEXT NOT NULL,
    sync_state TEXT NOT NULL DEFAULT 'pending' CHECK (sync_state IN ('pending', 'synced', 'dead')),
    state_changed_at REAL,
    dead_reason TEXT,
    blob_bytes INTEGER NOT NULL
);
-- Blobs apart from the metadata: a state change rewrites a small row, not tens of kilobytes
-- (which, on a full disk, would not even fit in the WAL).
CREATE TABLE snapshot_blobs (
    seq INTEGER PRIMARY KEY,
    sealed_frame BLOB NOT NULL,
    sealed_crop BLOB
);
CREATE INDEX snapshots_pending ON snapshots(seq) WHERE sync_state = 'pending';
CREATE INDEX snapshots_dead ON snapshots(seq) WHERE sync_state = 'dead';
CREATE INDEX snapshots_synced ON snapshots(is_fraud_evidence, seq) WHERE sync_state = 'synced';
CREATE INDEX snapshots_session ON snapshots(session_id) WHERE session_id IS NOT NULL;
-- seq and hash of the last purged event: verification of what remains starts from here
CREATE TABLE chain_checkpoint (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    purged_at REAL NOT NULL
);
"""

MIGRATIONS: tuple[str, ...] = (_CREATE_V1,)
"""``MIGRATIONS[n]`` takes the schema from version n to n + 1 (``PRAGMA user_version``)."""

_EVENT_COLUMNS = "uuid, seq, atm_id, kind, t_wall, session_id, payload, prev_hash, hash"
_SNAPSHOT_COLUMNS = (
    "s.uuid, s.atm_id, s.session_id, s.event_uuid, s.reason, s.is_fraud_evidence, s.t_wall,"
    " b.sealed_frame, b.sealed_crop, s.sha256"
)
_SNAPSHOTS_JOINED = "snapshots AS s JOIN snapshot_blobs AS b ON b.seq = s.seq"


# --- errors -------------------------------------------------------------------------------------


class JournalError(AtmguardError, OSError):
    """The journal cannot be opened or written (storage problem, wrong ATM, newer schema)."""


class JournalFullError(JournalError):
    """The disk (or the journal's size cap) is full: nothing of the failed write was kept."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


class DiskPressureError(JournalFullError):
    """A non-fraud snapshot was refused because the disk is above its watermark (room is kept for fraud evidence)."""


class JournalBusyError(JournalError, TimeoutError):
    """The journal's writer lock was not obtained within the timeout."""


class PayloadError(AtmguardError, ValueError):
    """An event's kind, session id or payload is not acceptable (wrong types, too big)."""


class SecretInPayloadError(PayloadError):
    """A payload looks like it carries a PIN, a PAN or track data. The message names the key, never the value."""


# --- result types -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboxStats:
    pending_events: int
    pending_snapshots: int
    dead_events: int
    dead_snapshots: int
    oldest_pending_age_s: float | None
    """Age of the oldest unsynced record; None when nothing is pending."""
    db_bytes: int
    """Database plus write-ahead log on disk."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    kind: Literal["event", "snapshot"]
    uuid: str
    seq: int
    reason: str
    marked_at: float


@dataclass(frozen=True, slots=True)
class DiskPressure:
    """Alarm state: the disk stays above the watermark after every synced record that could go went."""

    used_percent: float
    watermark_percent: float
    unsynced_bytes: int
    """Bytes of evidence still waiting for the central server (never purged)."""
    unsynced_fraud_snapshots: int

    def describe(self) -> str:
        return (
            f"disk {self.used_percent:.1f}% used (watermark {self.watermark_percent:g}%); "
            f"{self.unsynced_bytes} bytes unsynced, {self.unsynced_fraud_snapshots} unsynced fraud snapshot(s) kept"
        )


@dataclass(frozen=True, slots=True)
class PurgeReport:
    events_purged: int
    snapshots_purged: int
    fraud_snapshots_purged: int
    bytes_freed_estimate: int
    used_percent_before: float
    used_percent_after: float
    pressure: DiskPressure | None
    """Set when the watermark could not be restored: the daemon must raise its alarm."""


@dataclass(slots=True)
class VerifyReport:
    ok: bool = True
    events_checked: int = 0
    snapshots_checked: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    checkpoint_seq: int = 0
    """Events up to this seq were purged after sync; verification starts after it."""
    problem_count: int = 0
    problems: list[str] = field(default_factory=list)
    """The first problems found (capped; ``problem_count`` has the total)."""

    def add(self, problem: str) -> None:
        self.ok = False
        self.problem_count += 1
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(problem)

    def summary(self) -> str:
        span = f"seq {self.first_seq}..{self.last_seq}" if self.first_seq is not None else "no events"
        checkpoint = f", after checkpoint seq {self.checkpoint_seq}" if self.checkpoint_seq else ""
        verdict = "OK" if self.ok else f"BROKEN ({self.problem_count} problem(s))"
        return f"{verdict}: {self.events_checked} events ({span}{checkpoint}), {self.snapshots_checked} snapshots"


_T = TypeVar("_T")


class _Head(NamedTuple):
    seq: int
    hash: str


# --- validation ---------------------------------------------------------------------------------


def _check_name(what: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise PayloadError(f"{what} must match [a-z][a-z0-9_]{{0,63}}, got {_describe(value)}")
    return value


def _describe(value: object) -> str:
    # For error messages: the type and length only, never the content (it may be a secret).
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    return type(value).__name__


def _check_session_id(session_id: str | None) -> None:
    if session_id is None:
        return
    if not isinstance(session_id, str) or not _SESSION_RE.match(session_id):
        raise PayloadError(f"session_id must match [A-Za-z0-9._:-]{{1,64}}, got {_describe(session_id)}")
    if _PAN_LIKE_RE.search(session_id):
        raise SecretInPayloadError("session_id looks like a card number (13-19 digit run); refused")


def _walk_payload(value: Any, path: str, depth: int) -> None:
    if depth > _MAX_PAYLOAD_DEPTH:
        raise PayloadError(f"{path}: nested deeper than {_MAX_PAYLOAD_DEPTH} levels")
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PayloadError(f"{path}: NaN and infinities are not JSON")
        return
    if isinstance(value, str):
        if _PAN_LIKE_RE.search(value):
            raise SecretInPayloadError(
                f"{path}: looks like a card number (13-19 digit run); journal a masked PAN (first 6 / last 4)"
            )
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _walk_payload(item, f"{path}[{index}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise PayloadError(f"{path}: keys must be strings, got {type(key).__name__}")
            if key.lower().replace("_", "").replace("-", "") in _SECRET_KEYS:
                raise SecretInPayloadError(
                    f"{path}.{key}: key names a secret (PIN, PAN or track data); refused"
                )
            if _PAN_LIKE_RE.search(key):
                raise SecretInPayloadError(f"{path}: a key looks like a card number; refused")
            _walk_payload(item, f"{path}.{key}", depth + 1)
        return
    raise PayloadError(f"{path}: {type(value).__name__} is not a JSON type")


def validate_payload(payload: Any, *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> str:
    """Check an event payload and return its canonical JSON (what is stored and hashed)."""
    if not isinstance(payload, dict):
        raise PayloadError(f"payload must be a JSON object (dict), got {type(payload).__name__}")
    _walk_payload(payload, "payload", 0)
    text = canonical_json(payload)
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise PayloadError(f"payload is {size} bytes of JSON, more than the {max_bytes}-byte cap")
    return text


def format_t_wall(unix_s: float) -> str:
    """UTC, ISO 8601 with microseconds and ``Z`` (the format of ``EventRecord.t_wall``)."""
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _translate(exc: sqlite3.Error, action: str) -> AtmguardError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "database or disk is full" in str(exc):
        return JournalFullError(f"journal {action}: disk or journal size cap is full; nothing was written")
    if code == sqlite3.SQLITE_BUSY or "database is locked" in str(exc):
        return JournalBusyError(f"journal {action}: database is locked by another process")
    return JournalError(f"journal {action}: {exc}")


def _fsync_dir(directory: Path) -> None:
    # A newly created file (the db, its WAL) is only durable once its directory entry is.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _snapshot_from_row(row: Sequence[Any]) -> SnapshotRecord:
    return SnapshotRecord(
        uuid=row[0],
        atm_id=row[1],
        session_id=row[2],
        event_uuid=row[3],
        reason=row[4],
        is_fraud_evidence=bool(row[5]),
        t_wall=row[6],
        sealed_frame=bytes(row[7]),
        sealed_crop=None if row[8] is None else bytes(row[8]),
        sha256=row[9],
    )


# --- the journal --------------------------------------------------------------------------------


class Journal:
    """The ATM's local evidence journal (one SQLite file). Thread-safe; one writer at a time."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        atm_id: str | None,
        clock_wall: Callable[[], float] = time.time,
        fsync: bool = True,
        read_only: bool = False,
        synced_retention_days: float = 30.0,
        disk_high_watermark_percent: float = 85.0,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        max_snapshot_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES,
        max_db_bytes: int | None = None,
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
        lock_timeout_s: float = 5.0,
    ) -> None:
        """``atm_id`` may be None only with ``read_only`` (it is then read from the journal).

        ``fsync=False`` (``synchronous=NORMAL``) is for tests and bulk fills only: a power cut may
        then lose the last commits. ``max_db_bytes`` caps the database (SQLite's max_page_count).
        ``reserve_bytes``: size of the reserve file kept beside the database (0: none), see
        :meth:`_release_reserve`.
        """
        if atm_id is None and not read_only:
            raise ValueError("atm_id is required to write a journal")
        self.path = Path(path)
        self.atm_id = atm_id
        self.read_only = read_only
        self._clock_wall = clock_wall
        self._fsync = fsync
        self._retention_s = synced_retention_days * _SECONDS_PER_DAY
        self._watermark_percent = disk_high_watermark_percent
        self._max_payload_bytes = max_payload_bytes
        self._max_snapshot_bytes = max_snapshot_bytes
        self._max_db_bytes = max_db_bytes
        self._lock_timeout_s = lock_timeout_s
        self._reserve_bytes = reserve_bytes
        self.reserve_path = self.path.with_name(self.path.name + RESERVE_SUFFIX)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pressure: DiskPressure | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> Self:
        from atmguard.config import relative_to_config

        options: dict[str, Any] = {
            "atm_id": settings.atm.id,
            "synced_retention_days": settings.journal.synced_retention_days,
            "disk_high_watermark_percent": settings.journal.disk_high_watermark_percent,
            "reserve_bytes": int(settings.journal.emergency_reserve_mib * 1024 * 1024),
        }
        return cls(
            relative_to_config(settings, settings.paths.state_dir) / JOURNAL_FILENAME,
            **{**options, **overrides},
        )

    # --- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    @property
    def pressure(self) -> DiskPressure | None:
        """The disk-pressure alarm from the last :meth:`purge` (None: below the watermark)."""
        return self._pressure

    def open(self) -> None:
        if self._conn is not None:
            return
        conn = self._connect_read_only() if self.read_only else self._connect_writable()
        try:
            self._check_identity(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise _translate(exc, f"{self.path}: open") from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        if not self.read_only:
            self._ensure_reserve()
        head = self._head(conn)
        logger.info("journal %s open (atm %s, head seq %d)", self.path, self.atm_id, head.seq)

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _connect_writable(self) -> sqlite3.Connection:
        directory = self.path.parent
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True)
            directory.chmod(0o700)  # mkdir's mode is filtered by the umask
        created = False
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            created = True
        except FileExistsError:
            if self.path.stat().st_mode & 0o077:
                logger.warning("journal %s was readable by others; restricting to 0600", self.path)
                self.path.chmod(0o600)
        except OSError as exc:
            raise JournalError(f"journal {self.path}: cannot create: {exc.strerror or exc}") from None
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=self._lock_timeout_s
            )
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: cannot open: {exc}") from None
        try:
            # Must precede the first table: lets purge hand freed pages back to the file system.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise JournalError(f"journal {self.path}: cannot switch to WAL mode (got {mode})")
            conn.execute(f"PRAGMA synchronous = {'FULL' if self._fsync else 'NORMAL'}")
            # A small WAL: whatever it holds must be written a second time into the database at
            # the next checkpoint, so on a nearly full disk a large WAL could never be folded
            # back. Checkpoint every ~1 MB and truncate the file back to that size afterwards.
            conn.execute(f"PRAGMA wal_autocheckpoint = {_WAL_AUTOCHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT_BYTES}")
            conn.execute("PRAGMA trusted_schema = OFF")
            # Some builds (Debian's) zero every freed page, which writes each purged blob page to
            # the WAL once more: purging a full disk would then need as much room as it frees.
            # FAST still scrubs what costs no extra I/O; the blobs are ciphertext anyway.
            conn.execute("PRAGMA secure_delete = FAST")
            if self._max_db_bytes is not None:
                page_size = conn.execute("PRAGMA page_size").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count = {max(1, self._max_db_bytes // page_size)}")
            self._migrate(conn)
            if created:
                _fsync_dir(self.path.parent)
        except sqlite3.Error as exc:
            conn.close()
            raise _translate(exc, f"{self.path}: open") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect_read_only(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise JournalError(f"journal {self.path}: no such file")
        try:
            conn = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                timeout=self._lock_timeout_s,
            )
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: cannot open read-only: {exc}") from None
        if version != SCHEMA_VERSION:
            conn.close()
            raise JournalError(
                f"journal {self.path}: schema version {version}, this atmguard reads version {SCHEMA_VERSION}"
            )
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"journal {self.path}: schema version {version} is newer than this atmguard ({SCHEMA_VERSION})"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            # DDL is transactional in SQLite: a crash mid-migration leaves the old version intact.
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[target - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            logger.info("journal %s: schema migrated to version %d", self.path, target)

    def _check_identity(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT value FROM meta WHERE key = 'atm_id'").fetchone()
        if row is None:
            if self.read_only:
                raise JournalError(f"journal {self.path}: no ATM id recorded")
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO meta(key, value) VALUES ('atm_id', ?)", (self.atm_id,))
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('created_at', ?)", (format_t_wall(self._clock_wall()),)
            )
            conn.execute("COMMIT")
            return
        if self.atm_id is None:
            self.atm_id = row[0]
        elif row[0] != self.atm_id:
            # One chain per ATM: appending under another id would mix two ATMs' evidence.
            raise JournalError(
                f"journal {self.path} belongs to ATM {row[0]!r}, not {self.atm_id!r} (atm.id changed?)"
            )

    # --- plumbing -------------------------------------------------------------------------------

    def _require_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalError(f"journal {self.path} is not open")
        return self._conn

    @contextmanager
    def _locked(self, action: str) -> Iterator[sqlite3.Connection]:
        if not self._lock.acquire(timeout=self._lock_timeout_s):
            raise JournalBusyError(f"journal {action}: writer lock not free after {self._lock_timeout_s:g} s")
        try:
            conn = self._require_conn()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise _translate(exc, action) from None
        finally:
            self._lock.release()

    @contextmanager
    def _transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; on any failure it is rolled back, so nothing is half-written."""
        if self.read_only:
            raise JournalError(f"journal {self.path} is open read-only")
        with self._locked(action) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back (e.g. after SQLITE_FULL during COMMIT).
                if conn.in_transaction:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def _write(
        self, action: str, body: Callable[[sqlite3.Connection], _T], *, use_reserve: bool = False
    ) -> _T:
        """Run ``body`` in one transaction. On a full disk, make room and retry.

        First the WAL is checkpointed and truncated (it only shrinks at a checkpoint); then, if
        ``use_reserve``, the reserve file is freed, which also lets a checkpoint grow the database.
        """

        def attempt() -> _T:
            with self._transaction(action) as conn:
                return body(conn)

        def spend_reserve() -> bool:
            if not self._release_reserve():
                return False
            self._truncate_wal()
            return True

        steps: list[Callable[[], bool]] = [self._truncate_wal]
        if use_reserve:
            steps.append(spend_reserve)
        try:
            return attempt()
        except JournalFullError as exc:
            error = exc
        for make_room in steps:
            if not make_room():
                continue
            try:
                return attempt()
            except JournalFullError as exc:
                error = exc
        raise error

    def _truncate_wal(self) -> bool:
        """Checkpoint and truncate the WAL; True if it completed (a full disk can stop it)."""
        try:
            with self._locked("checkpoint") as conn:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except JournalError:
            return False
        return busy == 0

    def _ensure_reserve(self) -> None:
        """Keep ``reserve_bytes`` of real (not sparse) space allocated beside the database."""
        if self._reserve_bytes <= 0:
            return
        with suppress(OSError):
            if self.reserve_path.stat().st_size >= self._reserve_bytes:
                return
        chunk = bytes(min(self._reserve_bytes, 64 * 1024))
        try:
            with open(self.reserve_path, "wb") as handle:
                written = 0
                while written < self._reserve_bytes:
                    written += handle.write(chunk[: self._reserve_bytes - written])
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            self.reserve_path.unlink(missing_ok=True)
            logger.warning("journal %s: cannot allocate the reserve file: %s", self.path, exc.strerror or exc)

    def _release_reserve(self) -> bool:
        """Free the reserve file: the way out of a full disk.

        When unsynced evidence has filled the disk, even marking records synced (so that they can
        be purged) needs a little space for the WAL; without a reserve the journal would be stuck
        full for good. The reserve is also spent on fraud snapshots, which matter more than
        anything else. It is re-created by a purge that brings the disk below the watermark.
        """
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            logger.error("journal %s: cannot release the reserve file: %s", self.path, exc.strerror or exc)
            return False
        logger.warning("journal %s: disk full; reserve file released", self.path)
        return True

    @staticmethod
    def _head(conn: sqlite3.Connection) -> _Head:
        row = conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        if row is not None:
            return _Head(row[0], row[1])
        # Every event purged: the chain continues from the checkpoint, never from genesis again.
        row = conn.execute("SELECT seq, hash FROM chain_checkpoint WHERE id = 1").fetchone()
        return _Head(row[0], row[1]) if row is not None else _Head(0, GENESIS_HASH)

    def _insert_event(
        self, conn: sqlite3.Connection, kind: str, payload_json: str, session_id: str | None
    ) -> EventRecord:
        head = self._head(conn)
        now = self._clock_wall()
        record_body = {
            "uuid": str(uuid_module.uuid4()),
            "seq": head.seq + 1,
            "atm_id": self.atm_id,
            "kind": kind,
            "t_wall": format_t_wall(now),
            "session_id": session_id,
            # Parsed back from the stored text, so the record returned hashes exactly like a reload.
            "payload": json.loads(payload_json),
        }
        digest = chain_hash(head.hash, record_body)
        conn.execute(
            "INSERT INTO events(seq, uuid, atm_id, kind, t_wall, created_at, session_id, payload, prev_hash, hash)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record_body["seq"],
                record_body["uuid"],
                self.atm_id,
                kind,
                record_body["t_wall"],
                now,
                session_id,
                payload_json,
                head.hash,
                digest,
            ),
        )
        return EventRecord(prev_hash=head.hash, hash=digest, **record_body)

    # --- writing --------------------------------------------------------------------------------

    def append_event(
        self, kind: str, payload: dict[str, Any], *, session_id: str | None = None
    ) -> EventRecord:
        """Commit one event (fsynced) and return it; nothing may use the event before this returns."""
        _check_name("kind", kind)
        if kind == SNAPSHOT_TAKEN:
            raise PayloadError(f"{SNAPSHOT_TAKEN} events are written by add_snapshot only")
        _check_session_id(session_id)
        payload_json = validate_payload(payload, max_bytes=self._max_payload_bytes)
        with self._transaction(f"append {kind}") as conn:
            return self._insert_event(conn, kind, payload_json, session_id)

    def add_snapshot(
        self,
        sealed_frame: bytes,
        *,
        sealed_crop: bytes | None,
        reason: str,
        is_fraud_evidence: bool,
        session_id: str | None = None,
        key_id: str | None = None,
    ) -> SnapshotRecord:
        """Commit sealed blobs and their ``snapshot_taken`` event in one transaction.

        Under disk pressure (see :meth:`purge`) a non-fraud snapshot is refused with
        DiskPressureError, so the remaining space goes to fraud evidence and events.
        """
        _check_name("reason", reason)
        _check_session_id(session_id)
        for name, blob in (("sealed_frame", sealed_frame), ("sealed_crop", sealed_crop)):
            if blob is None and name == "sealed_crop":
                continue
            if not isinstance(blob, bytes | bytearray | memoryview):
                raise PayloadError(f"{name} must be bytes, got {type(blob).__name__}")
            if len(blob) <= _SEAL_OVERHEAD_BYTES:
                raise PayloadError(f"{name} is {len(blob)} bytes: too short to be a sealed box")
        frame = bytes(sealed_frame)
        crop = None if sealed_crop is None else bytes(sealed_crop)
        total = len(frame) + (len(crop) if crop is not None else 0)
        if total > self._max_snapshot_bytes:
            raise PayloadError(
                f"snapshot is {total} bytes, more than the {self._max_snapshot_bytes}-byte cap"
            )
        if self._pressure is not None and not is_fraud_evidence:
            raise DiskPressureError(f"non-fraud snapshot refused: {self._pressure.describe()}")
        sha256 = snapshot_digest(frame, crop)
        snapshot_uuid = str(uuid_module.uuid4())
        payload: dict[str, Any] = {
            "snapshot_uuid": snapshot_uuid,
            "sha256": sha256,
            "reason": reason,
            "is_fraud_evidence": bool(is_fraud_evidence),
            "sealed_frame_bytes": len(frame),
            "sealed_crop_bytes": None if crop is None else len(crop),
        }
        if key_id is not None:
            payload["key_id"] = key_id
        payload_json = validate_payload(payload, max_bytes=self._max_payload_bytes)

        def insert(conn: sqlite3.Connection) -> EventRecord:
            event = self._insert_event(conn, SNAPSHOT_TAKEN, payload_json, session_id)
            cursor = conn.execute(
                "INSERT INTO snapshots(uuid, atm_id, session_id, event_uuid, event_seq, reason, is_fraud_evidence,"
                " t_wall, created_at, sha256, blob_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    snapshot_uuid,
                    self.atm_id,
                    session_id,
                    event.uuid,
                    event.seq,
                    reason,
                    int(bool(is_fraud_evidence)),
                    event.t_wall,
                    self._clock_wall(),
                    sha256,
                    total,
                ),
            )
            conn.execute(
                "INSERT INTO snapshot_blobs(seq, sealed_frame, sealed_crop) VALUES (?, ?, ?)",
                (cursor.lastrowid, frame, crop),
            )
            return event

        # Fraud evidence may spend the reserve: it matters more than anything else on the disk.
        event = self._write(f"add snapshot ({reason})", insert, use_reserve=bool(is_fraud_evidence))
        return SnapshotRecord(
            uuid=snapshot_uuid,
            atm_id=event.atm_id,
            session_id=session_id,
            event_uuid=event.uuid,
            reason=reason,
            is_fraud_evidence=bool(is_fraud_evidence),
            t_wall=event.t_wall,
            sealed_frame=frame,
            sealed_crop=crop,
            sha256=sha256,
        )

    # --- reading --------------------------------------------------------------------------------

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the newest event, or of the checkpoint / genesis when there is none."""
        with self._locked("head") as conn:
            return self._head(conn)

    def get_event(self, uuid: str) -> EventRecord | None:
        with self._locked("read event") as conn:
            row = conn.execute(f"SELECT {_EVENT_COLUMNS} FROM events WHERE uuid = ?", (uuid,)).fetchone()
        return None if row is None else EventRecord.from_row(row)

    def get_snapshot(self, uuid: str) -> SnapshotRecord | None:
        with self._locked("read snapshot") as conn:
            row = conn.execute(
                f"SELECT {_SNAPSHOT_COLUMNS} FROM {_SNAPSHOTS_JOINED} WHERE s.uuid = ?", (uuid,)
            ).fetchone()
        return None if row is None else _snapshot_from_row(row)

    def snapshots_for_session(self, session_id: str) -> list[SnapshotRecord]:
        with self._locked("read snapshots") as conn:
            rows = conn.execute(
                f"SELECT {_SNAPSHOT_COLUMNS} FROM {_SNAPSHOTS_JOINED} WHERE s.session_id = ? ORDER BY s.seq",
                (session_id,),
            ).fetchall()
        return [_snapshot_from_row(row) for row in rows]

    def events(self, *, after_seq: int = 0, limit: int = 1000) -> list[EventRecord]:
        """Events in seq order after ``after_seq`` (whatever their sync state)."""
        with self._locked("read events") as conn:
            rows = conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
            ).fetchall()
        return [EventRecord.from_row(row) for row in rows]

    # --- outbox (for the sync worker) -----------------------------------------------------------

    def pending_events(self, limit: int) -> list[EventRecord]:
        """The oldest unsynced events, ascending seq (dead letters excluded)."""
        with self._locked("read outbox") as conn:
            # The literal 'pending' lets SQLite use the partial index events_pending.
            rows = conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE sync_state = 'pending' ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [EventRecord.from_row(row) for row in rows]

    def pending_snapshots(self, limit: int) -> list[SnapshotRecord]:
        """The oldest unsynced snapshots, in creation order, blobs included."""
        with self._locked("read outbox") as conn:
            rows = conn.execute(
                f"SELECT {_SNAPSHOT_COLUMNS} FROM {_SNAPSHOTS_JOINED}"
                " WHERE s.sync_state = 'pending' ORDER BY s.seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [_snapshot_from_row(row) for row in rows]

    def _set_state(self, table: str, uuids: Iterable[str], *, to: str, from_states: tuple[str, ...]) -> int:
        wanted = list(dict.fromkeys(uuids))
        if not wanted:
            return 0
        now = self._clock_wall()
        states = ", ".join(f"'{state}'" for state in from_states)

        def update(conn: sqlite3.Connection) -> int:
            changed = 0
            for start in range(0, len(wanted), 500):  # stay far below SQLite's bound-variable limit
                chunk = wanted[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                cursor = conn.execute(
                    f"UPDATE {table} SET sync_state = ?, state_changed_at = ?, dead_reason = NULL"
                    f" WHERE uuid IN ({marks}) AND sync_state IN ({states})",
                    (to, now, *chunk),
                )
                changed += cursor.rowcount
            return changed

        # May spend the reserve: marking records synced is what lets a full disk be purged.
        return self._write(f"mark {table} {to}", update, use_reserve=True)

    def mark_events_synced(self, uuids: Iterable[str]) -> int:
        """Record that the central server committed these events; returns how many changed state."""
        return self._set_state("events", uuids, to="synced", from_states=("pending", "dead"))

    def mark_snapshots_synced(self, uuids: Iterable[str]) -> int:
        return self._set_state("snapshots", uuids, to="synced", from_states=("pending", "dead"))

    def mark_dead(self, kind: Literal["event", "snapshot"], uuid: str, reason: str) -> bool:
        """Park a record the server rejects for good (it stops blocking the outbox; kept locally)."""
        table = {"event": "events", "snapshot": "snapshots"}.get(kind)
        if table is None:
            raise ValueError(f"kind must be 'event' or 'snapshot', got {kind!r}")
        now = self._clock_wall()

        def update(conn: sqlite3.Connection) -> int:
            return conn.execute(
                f"UPDATE {table} SET sync_state = 'dead', state_changed_at = ?, dead_reason = ?"
                " WHERE uuid = ? AND sync_state = 'pending'",
                (now, str(reason)[:500], uuid),
            ).rowcount

        return self._write(f"mark {kind} dead", update, use_reserve=True) == 1

    def requeue_dead(self, kind: Literal["event", "snapshot"], uuid: str) -> bool:
        """Put a dead letter back in the outbox (after the server side was fixed)."""
        table = {"event": "events", "snapshot": "snapshots"}.get(kind)
        if table is None:
            raise ValueError(f"kind must be 'event' or 'snapshot', got {kind!r}")
        return self._set_state(table, [uuid], to="pending", from_states=("dead",)) == 1

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        with self._locked("read dead letters") as conn:
            rows = conn.execute(
                "SELECT 'event', uuid, seq, dead_reason, state_changed_at FROM events WHERE sync_state = 'dead'"
                " UNION ALL SELECT 'snapshot', uuid, seq, dead_reason, state_changed_at FROM snapshots"
                " WHERE sync_state = 'dead' ORDER BY 5, 1, 3 LIMIT ?",
                (limit,),
            ).fetchall()
        return [DeadLetter(row[0], row[1], row[2], row[3] or "", row[4] or 0.0) for row in rows]

    def db_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with suppress(OSError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    def outbox_stats(self, now: float | None = None) -> OutboxStats:
        now = self._clock_wall() if now is None else now
        with self._locked("outbox stats") as conn:
            conn.execute("BEGIN")  # one consistent read snapshot for all the counts
            try:
                counts = [
                    conn.execute(f"SELECT count(*) FROM {table} WHERE sync_state = '{state}'").fetchone()[0]
                    for table, state in (
                        ("events", "pending"),
                        ("snapshots", "pending"),
                        ("events", "dead"),
                        ("snapshots", "dead"),
                    )
                ]
                oldest = [
                    conn.execute(
                        f"SELECT created_at FROM {table} WHERE sync_state = 'pending' ORDER BY seq LIMIT 1"
                    ).fetchone()
                    for table in ("events", "snapshots")
                ]
            finally:
                conn.execute("COMMIT")
        created = [row[0] for row in oldest if row is not None]
        return OutboxStats(
            pending_events=counts[0],
            pending_snapshots=counts[1],
            dead_events=counts[2],
            dead_snapshots=counts[3],
            oldest_pending_age_s=max(0.0, now - min(created)) if created else None,
            db_bytes=self.db_bytes(),
        )

    # --- verification ---------------------------------------------------------------------------

    def verify(self, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
        """Walk the chain in seq order (streaming) and report missing or altered records.

        Runs on its own read connection, so appends continue meanwhile (WAL readers see a
        consistent snapshot and do not block the writer).
        """
        self._require_conn()
        return verify_journal(self.path, progress=progress)

    # --- retention ------------------------------------------------------------------------------

    def _purge_event_prefix(self, *, created_before: float | None, max_bytes: int | None) -> tuple[int, int]:
        """Delete the oldest synced events (a prefix of the chain only) and move the checkpoint."""
        purged = freed = 0

        def delete_batch(conn: sqlite3.Connection) -> tuple[int, int, bool]:
            rows = conn.execute(
                "SELECT seq, hash, sync_state, created_at, length(payload) FROM events ORDER BY seq LIMIT ?",
                (_PURGE_BATCH,),
            ).fetchall()
            last: tuple[int, str] | None = None
            count = size = 0
            for seq, digest, state, created_at, payload_bytes in rows:
                # Only a contiguous prefix can go: the checkpoint (seq, hash) must stand for
                # everything before it, or local verification would see holes.
                if state != "synced" or (created_before is not None and created_at >= created_before):
                    break
                if max_bytes is not None and freed + size >= max_bytes:
                    break
                last = (seq, digest)
                count += 1
                size += payload_bytes + _EVENT_ROW_OVERHEAD_BYTES
            if last is not None:
                conn.execute("DELETE FROM events WHERE seq <= ?", (last[0],))
                conn.execute(
                    "INSERT INTO chain_checkpoint(id, seq, hash, purged_at) VALUES (1, ?, ?, ?)"
                    " ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash,"
                    " purged_at = excluded.purged_at",
                    (last[0], last[1], self._clock_wall()),
                )
            return count, size, count == len(rows) == _PURGE_BATCH

        while True:
            count, size, more = self._write("purge events", delete_batch, use_reserve=True)
            purged += count
            freed += size
            if not more:
                return purged, freed

    def _purge_snapshots(
        self, *, fraud: bool | None, created_before: float | None, max_bytes: int | None
    ) -> tuple[int, int]:
        """Delete synced snapshots, oldest first; ``fraud`` None means both kinds."""
        where = "sync_state = 'synced'"
        params: list[Any] = []
        if fraud is not None:
            where += " AND is_fraud_evidence = ?"
            params.append(int(fraud))
        if created_before is not None:
            where += " AND created_at < ?"
            params.append(created_before)

        def delete(conn: sqlite3.Connection) -> tuple[int, int]:
            rows = conn.execute(
                f"SELECT seq, blob_bytes FROM snapshots WHERE {where} ORDER BY seq",
                params,
            ).fetchall()
            doomed: list[int] = []
            freed = 0
            for seq, size in rows:
                if max_bytes is not None and freed >= max_bytes:
                    break
                doomed.append(seq)
                freed += size
            for start in range(0, len(doomed), 500):
                chunk = doomed[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                conn.execute(f"DELETE FROM snapshot_blobs WHERE seq IN ({marks})", chunk)
                conn.execute(f"DELETE FROM snapshots WHERE seq IN ({marks})", chunk)
            return len(doomed), freed

        return self._write("purge snapshots", delete, use_reserve=True)

    def _release_space(self) -> None:
        # Deleted rows only free pages inside the file; hand them back to the file system, then
        # fold the WAL into the database and truncate it.
        with self._locked("release space") as conn:
            # executescript steps the pragma to completion; execute() would free a single page.
            conn.executescript("PRAGMA incremental_vacuum;")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _unsynced_totals(self) -> tuple[int, int]:
        with self._locked("unsynced totals") as conn:
            snapshot_bytes, fraud = conn.execute(
                "SELECT coalesce(sum(blob_bytes), 0),"
                " coalesce(sum(is_fraud_evidence), 0) FROM snapshots WHERE sync_state != 'synced'"
            ).fetchone()
            event_bytes = conn.execute(
                f"SELECT coalesce(sum(length(payload) + {_EVENT_ROW_OVERHEAD_BYTES}), 0) FROM events"
                " WHERE sync_state != 'synced'"
            ).fetchone()[0]
        return snapshot_bytes + event_bytes, fraud

    def purge(
        self,
        now: float | None = None,
        *,
        disk_usage: Callable[[str], Any] = shutil.disk_usage,
    ) -> PurgeReport:
        """Apply retention, then the disk watermark; never deletes anything unsynced.

        1. synced records older than ``synced_retention_days`` go;
        2. while the state directory's file system is above the watermark, synced records go,
           oldest first: non-fraud snapshots, then events (oldest prefix), then fraud snapshots;
        3. if it is still above, the returned report (and :attr:`pressure`) carries a
           DiskPressure alarm, and non-fraud snapshots are refused until a purge finds room.
        """
        now = self._clock_wall() if now is None else now
        before = self._used_percent(disk_usage)
        cutoff = now - self._retention_s
        events_purged, freed = self._purge_event_prefix(created_before=cutoff, max_bytes=None)
        snapshots_purged, snapshot_bytes = self._purge_snapshots(
            fraud=None, created_before=cutoff, max_bytes=None
        )
        freed += snapshot_bytes
        fraud_purged = 0
        if events_purged or snapshots_purged:
            self._release_space()

        for _ in range(3):  # estimates of freed bytes are approximate: re-measure, retry a little
            need = self._bytes_above_watermark(disk_usage)
            if need <= 0:
                break
            progress = 0
            for step in ("snapshots", "events", "fraud_snapshots"):
                if need <= 0:
                    break
                if step == "events":
                    count, size = self._purge_event_prefix(created_before=None, max_bytes=need)
                    events_purged += count
                else:
                    fraud = step == "fraud_snapshots"
                    count, size = self._purge_snapshots(fraud=fraud, created_before=None, max_bytes=need)
                    snapshots_purged += count
                    fraud_purged += count if fraud else 0
                progress += count
                need -= size
                freed += size
            if not progress:
                break
            self._release_space()
        after = self._used_percent(disk_usage)

        pressure = None
        if after > self._watermark_percent:
            unsynced_bytes, unsynced_fraud = self._unsynced_totals()
            pressure = DiskPressure(after, self._watermark_percent, unsynced_bytes, unsynced_fraud)
            logger.error("journal %s: disk pressure: %s", self.path, pressure.describe())
        elif self._pressure is not None:
            logger.warning("journal %s: disk back below the watermark (%.1f%%)", self.path, after)
        self._pressure = pressure
        if pressure is None:
            self._ensure_reserve()
        if events_purged or snapshots_purged:
            logger.info(
                "journal %s: purged %d synced events and %d synced snapshots (%d fraud), ~%d bytes",
                self.path,
                events_purged,
                snapshots_purged,
                fraud_purged,
                freed,
            )
        return PurgeReport(events_purged, snapshots_purged, fraud_purged, freed, before, after, pressure)

    def _used_percent(self, disk_usage: Callable[[str], Any]) -> float:
        usage = disk_usage(str(self.path.parent))
        return 100.0 * (usage.total - usage.free) / usage.total if usage.total else 100.0

    def _bytes_above_watermark(self, disk_usage: Callable[[str], Any]) -> int:
        usage = disk_usage(str(self.path.parent))
        return int((usage.total - usage.free) - usage.total * self._watermark_percent / 100.0)


# --- verification (streaming, on its own connection) --------------------------------------------


def verify_journal(
    path: str | os.PathLike[str], *, progress: Callable[[int, int], None] | None = None, batch: int = 1000
) -> VerifyReport:
    """Verify a journal file read-only: chain, seq continuity, truncation, snapshot digests.

    Memory stays constant: events are streamed in batches and only the last hash is carried.
    """
    report = VerifyReport()
    reader = Journal(path, atm_id=None, read_only=True)
    reader.open()
    try:
        conn = reader._require_conn()
        conn.execute("BEGIN")  # one consistent snapshot of the whole file while we walk it
        try:
            _verify_events(conn, reader.atm_id or "", report, progress, batch)
            _verify_snapshots(conn, report, batch)
        finally:
            conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise JournalError(f"journal {path}: cannot verify: {exc}") from None
    finally:
        reader.close()
    return report


def _verify_events(
    conn: sqlite3.Connection,
    atm_id: str,
    report: VerifyReport,
    progress: Callable[[int, int], None] | None,
    batch: int,
) -> None:
    checkpoint = conn.execute("SELECT seq, hash FROM chain_checkpoint WHERE id = 1").fetchone()
    expected_seq, prev_hash = (checkpoint[0] + 1, checkpoint[1]) if checkpoint else (1, GENESIS_HASH)
    report.checkpoint_seq = expected_seq - 1
    total = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    cursor = conn.execute(f"SELECT {_EVENT_COLUMNS} FROM events ORDER BY seq")
    while rows := cursor.fetchmany(batch):
        records = []
        for row in rows:
            try:
                records.append(EventRecord.from_row(row))
            except (ValueError, TypeError):
                report.add(f"seq {row[1]}: payload is not valid JSON (altered)")
        if not records:
            continue
        if report.first_seq is None:
            report.first_seq = records[0].seq
        if records[0].seq != expected_seq:
            report.add(f"seq {records[0].seq}: expected seq {expected_seq} (a record is missing)")
        # The shared definition (also used by the central side) judges each run of records.
        for problem in verify_chain(records, prev_hash=prev_hash):
            report.add(problem)
        for record in records:
            if record.atm_id != atm_id:
                report.add(f"seq {record.seq}: atm_id {record.atm_id!r} is not this journal's {atm_id!r}")
        prev_hash = records[-1].hash
        expected_seq = records[-1].seq + 1
        report.last_seq = records[-1].seq
        report.events_checked += len(records)
        if progress is not None:
            progress(report.events_checked, total)
    # AUTOINCREMENT remembers the highest seq ever used: a cut-off tail shows up here.
    high = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    if high is not None and high[0] > expected_seq - 1:
        report.add(f"events after seq {expected_seq - 1} up to seq {high[0]} are missing (journal truncated)")


def _verify_snapshots(conn: sqlite3.Connection, report: VerifyReport, batch: int) -> None:
    cursor = conn.execute(
        "SELECT s.uuid, s.event_uuid, s.event_seq, s.sha256, b.sealed_frame, b.sealed_crop, e.payload, e.kind"
        " FROM snapshots AS s LEFT JOIN snapshot_blobs AS b ON b.seq = s.seq"
        " LEFT JOIN events AS e ON e.uuid = s.event_uuid ORDER BY s.seq"
    )
    while rows := cursor.fetchmany(batch):
        for snap_uuid, event_uuid, event_seq, sha256, frame, crop, payload, kind in rows:
            report.snapshots_checked += 1
            if frame is None:
                report.add(f"snapshot {snap_uuid}: its sealed blobs are missing")
            elif snapshot_digest(bytes(frame), None if crop is None else bytes(crop)) != sha256:
                report.add(f"snapshot {snap_uuid}: sealed blobs do not match their sha256 (altered)")
            if payload is None:
                # Its event may have been purged after sync; within the kept range it must exist.
                if event_seq > report.checkpoint_seq:
                    report.add(f"snapshot {snap_uuid}: its event (seq {event_seq}) is missing")
                continue
            try:
                facts = json.loads(payload)
            except ValueError:
                continue  # already reported by the chain walk
            if (
                kind != SNAPSHOT_TAKEN
                or facts.get("snapshot_uuid") != snap_uuid
                or facts.get("sha256") != sha256
            ):
                report.add(f"snapshot {snap_uuid}: does not match its {SNAPSHOT_TAKEN} event {event_uuid}")


# --- bench --------------------------------------------------------------------------------------


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure_journal(
    tmp_dir: str | os.PathLike[str],
    *,
    appends: int = 300,
    snapshots: int = 30,
    backlog_events: int = 10_000,
    backlog_snapshots: int = 1_000,
    snapshot_bytes: int = 40_000,
    batch_size: int = 200,
) -> dict[str, Any]:
    """Durable append latency (fsync on) and outbox batch costs with a backlog, in milliseconds.

    Target (issue 4): append p50 <= 5 ms. The backlog is filled with fsync off (it only has to
    exist); batch reads then show what the sync worker pays per batch.
    """
    directory = Path(tmp_dir)
    payload = {"result": "ok", "attempt": 1, "masked_pan": "411111******1111", "latency_ms": 12.5}
    blob = os.urandom(snapshot_bytes)
    result: dict[str, Any] = {}
    with Journal(directory / "bench-durable.sqlite3", atm_id="BENCH") as journal:
        for _ in range(10):
            journal.append_event("pin_result", payload)
        times = []
        for _ in range(appends):
            start = time.perf_counter()
            journal.append_event("pin_result", payload)
            times.append((time.perf_counter() - start) * 1000)
        snap_times = []
        for _ in range(snapshots):
            start = time.perf_counter()
            journal.add_snapshot(blob, sealed_crop=None, reason="bench", is_fraud_evidence=False)
            snap_times.append((time.perf_counter() - start) * 1000)
    result["append_p50_ms"] = statistics.median(times)
    result["append_p95_ms"] = _percentile(times, 0.95)
    result["append_max_ms"] = max(times)
    result["appends"] = appends
    if snap_times:
        result["snapshot_add_p50_ms"] = statistics.median(snap_times)
        result["snapshot_bytes"] = snapshot_bytes
    if backlog_events or backlog_snapshots:
        with Journal(directory / "bench-backlog.sqlite3", atm_id="BENCH", fsync=False) as journal:
            start = time.perf_counter()
            for _ in range(backlog_events):
                journal.append_event("face_state", payload)
            for _ in range(backlog_snapshots):
                journal.add_snapshot(blob, sealed_crop=None, reason="bench", is_fraud_evidence=False)
            result["backlog_fill_s"] = time.perf_counter() - start
            drain_event_ms: list[float] = []
            drain_snapshot_ms: list[float] = []
            start = time.perf_counter()
            while batch := _timed(drain_event_ms, journal.pending_events, batch_size):
                journal.mark_events_synced(record.uuid for record in batch)
            while snap_batch := _timed(drain_snapshot_ms, journal.pending_snapshots, batch_size):
                journal.mark_snapshots_synced(record.uuid for record in snap_batch)
            result["backlog_drain_local_s"] = time.perf_counter() - start
            result["pending_events_batch_p50_ms"] = statistics.median(drain_event_ms)
            result["pending_snapshots_batch_p50_ms"] = statistics.median(drain_snapshot_ms)
            result["backlog_events"] = backlog_events
            result["backlog_snapshots"] = backlog_snapshots
            result["batch_size"] = batch_size
    return result


def _timed(sink: list[float], fetch: Callable[[int], list[Any]], limit: int) -> list[Any]:
    start = time.perf_counter()
    rows = fetch(limit)
    sink.append((time.perf_counter() - start) * 1000)
    return rows
