"""The local journal: durable appends, hash chain, outbox, retention, full disk, crash consistency."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import namedtuple
from pathlib import Path

import pytest

from atmguard.errors import AtmguardError
from atmguard.store.journal import (
    JOURNAL_FILENAME,
    SCHEMA_VERSION,
    DiskPressureError,
    Journal,
    JournalError,
    JournalFullError,
    PayloadError,
    SecretInPayloadError,
    measure_journal,
    validate_payload,
    verify_journal,
)
from atmguard.store.records import GENESIS_HASH, canonical_json, chain_hash, snapshot_digest

REPO_ROOT = Path(__file__).resolve().parents[1]
T0 = 1_780_000_000.0  # 2026-05-28, a fixed wall clock for the tests
DAY_S = 86_400.0
BLOB = bytes(range(256)) * 160  # 40 KB stand-in for a sealed JPEG (the journal never opens it)


class FakeClock:
    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / JOURNAL_FILENAME


@pytest.fixture
def journal(journal_path: Path, clock: FakeClock):
    with Journal(journal_path, atm_id="ATM-0042", clock_wall=clock, reserve_bytes=0) as j:
        yield j


def tamper(path: Path, sql: str, params: tuple = ()) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(sql, params)
    conn.close()


# --- appending ----------------------------------------------------------------------------------


def test_append_returns_a_committed_chained_record(journal: Journal, journal_path: Path, clock: FakeClock):
    record = journal.append_event("card_inserted", {"masked_pan": "411111******1111"}, session_id="s-1")

    assert record.seq == 1
    assert record.prev_hash == GENESIS_HASH
    assert record.hash == chain_hash(GENESIS_HASH, record.body())
    assert uuid.UUID(record.uuid).version == 4
    assert record.t_wall == "2026-05-28T20:26:40.000000Z"
    # Committed: another connection (another process, the sync worker) sees it right away.
    reader = Journal(journal_path, atm_id=None, read_only=True)
    with reader:
        assert reader.get_event(record.uuid) == record
        assert reader.atm_id == "ATM-0042"


def test_seq_and_chain_continue_across_reopen(journal_path: Path, clock: FakeClock):
    with Journal(journal_path, atm_id="ATM-0042", clock_wall=clock, reserve_bytes=0) as j:
        first = [j.append_event("face_state", {"faces": n}) for n in range(3)]
    with Journal(journal_path, atm_id="ATM-0042", clock_wall=clock, reserve_bytes=0) as j:
        fourth = j.append_event("face_state", {"faces": 3})
        report = j.verify()
    assert [r.seq for r in first] == [1, 2, 3]
    assert fourth.seq == 4 and fourth.prev_hash == first[-1].hash
    assert report.ok and report.events_checked == 4


def test_files_are_private_and_the_database_is_wal_with_full_sync(journal: Journal, journal_path: Path):
    journal.append_event("startup", {"version": "1"})
    assert journal_path.parent.stat().st_mode & 0o777 == 0o700
    assert journal_path.stat().st_mode & 0o777 == 0o600
    assert Path(f"{journal_path}-wal").stat().st_mode & 0o777 == 0o600
    conn = sqlite3.connect(journal_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    assert journal._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_journal_of_another_atm_or_a_newer_schema_is_refused(journal_path: Path, clock: FakeClock):
    with Journal(journal_path, atm_id="ATM-0042", clock_wall=clock, reserve_bytes=0) as j:
        j.append_event("startup", {})
    with pytest.raises(JournalError, match="belongs to ATM 'ATM-0042', not 'ATM-9999'"):
        Journal(journal_path, atm_id="ATM-9999", reserve_bytes=0).open()
    tamper(journal_path, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(JournalError, match="newer than this atmguard"):
        Journal(journal_path, atm_id="ATM-0042", reserve_bytes=0).open()


def test_closed_journal_refuses_writes_and_close_is_idempotent(journal_path: Path):
    j = Journal(journal_path, atm_id="ATM-0042", reserve_bytes=0)
    with pytest.raises(JournalError, match="not open"):
        j.append_event("startup", {})
    j.open()
    j.close()
    j.close()
    assert not j.is_open


@pytest.mark.parametrize(
    "payload, where",
    [
        ({"pin": "1234"}, "payload.pin"),
        ({"PIN": 1234}, "payload.PIN"),
        ({"card": {"Track_2": "x"}}, "payload.card.Track_2"),
        ({"pan": "4111111111111111"}, "payload.pan"),
        ({"note": "card 4111111111111111 read"}, "payload.note"),
        ({"note": "4111 1111 1111 1111"}, "payload.note"),
        ({"note": "4111-1111-1111-1111"}, "payload.note"),
        ({"cards": ["x", "5500000000000004"]}, "payload.cards[1]"),
        ({"raw": ";4111111111111111=28121010000000000000?"}, "payload.raw"),
    ],
)
def test_payloads_that_look_like_card_secrets_are_refused_without_echoing_them(
    journal: Journal, payload: dict, where: str
):
    with pytest.raises(SecretInPayloadError) as caught:
        journal.append_event("card_inserted", payload)
    message = str(caught.value)
    assert where in message
    assert "4111" not in message and "5500" not in message and "1234" not in message
    assert journal.head() == (0, GENESIS_HASH)  # nothing was written


@pytest.mark.parametrize(
    "payload",
    [
        {"masked_pan": "411111******1111"},
        {"sha256": "1234567890123456789abcdef" * 2},  # digits inside a hex token are not a PAN
        {"session": "00000000-0000-4000-8000-000000000000"},  # a UUID whose groups are all digits
        {"amount": "1234 5678"},
        {"phone": "+44 20 7946 0958"},
        {"epoch_ms": 1715240000000, "at": "2026-05-09 12:34:56.123456"},
        {"pin_result": "wrong", "attempt": 2},
    ],
)
def test_ordinary_payloads_are_accepted_and_hashed_as_canonical_json(journal: Journal, payload: dict):
    record = journal.append_event("pin_result", payload)
    assert record.payload == payload
    assert canonical_json(journal.get_event(record.uuid).payload) == canonical_json(payload)


def test_random_uuids_and_digests_are_never_mistaken_for_card_numbers():
    # snapshot_taken payloads carry a UUID and a SHA-256; a false positive would drop evidence.
    rng = random.Random(7)
    for _ in range(20_000):
        token = uuid.UUID(int=rng.getrandbits(128), version=4)
        validate_payload({"snapshot_uuid": str(token), "sha256": hashlib.sha256(token.bytes).hexdigest()})


@pytest.mark.parametrize(
    "kind, payload, message",
    [
        ("decision", ["not", "an", "object"], "must be a JSON object"),
        ("decision", {"x": {1, 2}}, "set is not a JSON type"),
        ("decision", {"x": b"bytes"}, "bytes is not a JSON type"),
        ("decision", {"x": (1, 2)}, "tuple is not a JSON type"),
        ("decision", {"x": float("nan")}, "NaN"),
        ("decision", {1: "x"}, "keys must be strings"),
        ("decision", {"x": "y" * 20_000}, "cap"),
        ("Decision", {}, "kind must match"),
        ("", {}, "kind must match"),
        ("snapshot_taken", {}, "add_snapshot only"),
    ],
)
def test_malformed_events_are_refused(journal: Journal, kind: str, payload: object, message: str):
    with pytest.raises(PayloadError, match=message):
        journal.append_event(kind, payload)  # type: ignore[arg-type]
    assert journal.head()[0] == 0


def test_deeply_nested_payload_is_refused(journal: Journal):
    payload: dict = {}
    node = payload
    for _ in range(20):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(PayloadError, match="nested deeper"):
        journal.append_event("decision", payload)


def test_concurrent_appends_from_threads_form_one_contiguous_chain(journal_path: Path):
    with Journal(journal_path, atm_id="ATM-0042", fsync=False, reserve_bytes=0) as j:
        results: list = []
        errors: list = []

        def worker(n: int) -> None:
            try:
                for i in range(25):
                    results.append(j.append_event("face_state", {"thread": n, "i": i}))
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        report = j.verify()
    assert not errors
    assert sorted(r.seq for r in results) == list(range(1, 101))
    assert len({r.uuid for r in results}) == 100
    assert report.ok and report.events_checked == 100


# --- snapshots ----------------------------------------------------------------------------------


def test_snapshot_and_its_chain_entry_are_committed_together(journal: Journal):
    crop = b"c" * 5000
    snap = journal.add_snapshot(
        BLOB, sealed_crop=crop, reason="uncovered", is_fraud_evidence=True, session_id="s-1", key_id="ab12"
    )
    event = journal.get_event(snap.event_uuid)

    assert snap.sha256 == snapshot_digest(BLOB, crop)
    assert event is not None and event.kind == "snapshot_taken" and event.session_id == "s-1"
    assert event.payload == {
        "snapshot_uuid": snap.uuid,
        "sha256": snap.sha256,
        "reason": "uncovered",
        "is_fraud_evidence": True,
        "sealed_frame_bytes": len(BLOB),
        "sealed_crop_bytes": 5000,
        "key_id": "ab12",
    }
    assert journal.get_snapshot(snap.uuid) == snap
    assert journal.snapshots_for_session("s-1") == [snap]
    assert journal.verify().ok


def test_a_snapshot_that_does_not_fit_leaves_no_event_behind(journal_path: Path):
    with Journal(journal_path, atm_id="ATM-0042", max_db_bytes=400_000, reserve_bytes=0) as j:
        j.append_event("startup", {})
        head = j.head()
        with pytest.raises(JournalFullError):
            j.add_snapshot(os.urandom(600_000), sealed_crop=None, reason="uncovered", is_fraud_evidence=True)
        assert j.head() == head  # the snapshot_taken event went with the failed blob
        assert j.pending_snapshots(10) == []
        assert j.append_event("decision", {"ok": True}).seq == head[0] + 1


def test_snapshot_blobs_must_look_sealed(journal: Journal):
    with pytest.raises(PayloadError, match="too short to be a sealed box"):
        journal.add_snapshot(b"\xff\xd8\xff", sealed_crop=None, reason="uncovered", is_fraud_evidence=False)
    with pytest.raises(PayloadError, match="reason must match"):
        journal.add_snapshot(BLOB, sealed_crop=None, reason="Uncovered!", is_fraud_evidence=False)


# --- verification -------------------------------------------------------------------------------


def _filled(journal: Journal, n: int = 6) -> None:
    for i in range(n):
        journal.append_event("face_state", {"i": i})


@pytest.mark.parametrize(
    "sql, params, problem",
    [
        ("UPDATE events SET payload = ? WHERE seq = 3", ('{"i":99}',), r"seq 3: hash does not match"),
        ("DELETE FROM events WHERE seq = 3", (), r"seq 4: expected seq 3 \(a record is missing\)"),
        ("DELETE FROM events WHERE seq >= 5", (), r"up to seq 6 are missing \(journal truncated\)"),
        ("UPDATE events SET atm_id = 'ATM-EVIL' WHERE seq = 2", (), r"seq 2: hash does not match"),
        ("UPDATE events SET payload = 'not json' WHERE seq = 2", (), r"seq 2: payload is not valid JSON"),
    ],
)
def test_verify_finds_altered_missing_and_truncated_events(
    journal_path: Path, clock: FakeClock, sql: str, params: tuple, problem: str
):
    with Journal(journal_path, atm_id="ATM-0042", clock_wall=clock, reserve_bytes=0) as j:
        _filled(j)
        assert j.verify().ok
    tamper(journal_path, sql, params)
    report = verify_journal(journal_path)
    assert not report.ok
    assert any(re.search(problem, p) for p in report.problems), report.problems


def test_verify_finds_altered_snapshot_blobs_and_snapshots_without_event(
    journal_path: Path, clock: FakeClock
):
    with Journal(journal_path, atm_id="ATM-0042", clock_wall=clock, reserve_bytes=0) as j:
        snap = j.add_snapshot(BLOB, sealed_crop=None, reason="uncovered", is_fraud_evidence=True)
        j.append_event("decision", {"refuse": True})
    tamper(journal_path, "UPDATE snapshot_blobs SET sealed_frame = ?", (BLOB[:-1] + b"!",))
    report = verify_journal(journal_path)
    assert any(f"snapshot {snap.uuid}: sealed blobs do not match" in p for p in report.problems)

    tamper(journal_path, "DELETE FROM events WHERE uuid = ?", (snap.event_uuid,))
    report = verify_journal(journal_path)
    assert any(f"snapshot {snap.uuid}: its event (seq 1) is missing" in p for p in report.problems)


def test_verify_streams_with_progress_and_runs_beside_the_writer(journal_path: Path):
    with Journal(journal_path, atm_id="ATM-0042", fsync=False, reserve_bytes=0) as j:
        _filled(j, 250)
        calls: list[tuple[int, int]] = []
        report = verify_journal(
            journal_path, progress=lambda done, total: calls.append((done, total)), batch=100
        )
        j.append_event("decision", {"after": True})  # the writer was never blocked
    assert report.ok and report.events_checked == 250 and (report.first_seq, report.last_seq) == (1, 250)
    assert calls == [(100, 250), (200, 250), (250, 250)]


# --- outbox -------------------------------------------------------------------------------------


def test_outbox_hands_out_pending_records_in_order_until_marked(journal: Journal, clock: FakeClock):
    events = [journal.append_event("face_state", {"i": i}) for i in range(5)]
    clock.now += 10
    snaps = [
        journal.add_snapshot(BLOB, sealed_crop=None, reason="uncovered", is_fraud_evidence=i == 0)
        for i in range(3)
    ]
    clock.now += 5

    assert [e.seq for e in journal.pending_events(3)] == [1, 2, 3]
    assert [s.uuid for s in journal.pending_snapshots(10)] == [s.uuid for s in snaps]
    stats = journal.outbox_stats()
    assert (stats.pending_events, stats.pending_snapshots) == (8, 3)  # 5 + 3 snapshot_taken
    assert stats.oldest_pending_age_s == pytest.approx(15.0)
    assert stats.db_bytes > 3 * len(BLOB)

    assert journal.mark_events_synced([e.uuid for e in events[:3]]) == 3
    assert journal.mark_events_synced([e.uuid for e in events[:3]]) == 0  # idempotent
    assert journal.mark_snapshots_synced([snaps[0].uuid, "no-such-uuid"]) == 1
    assert [e.seq for e in journal.pending_events(100)] == [4, 5, 6, 7, 8]
    assert [s.uuid for s in journal.pending_snapshots(10)] == [snaps[1].uuid, snaps[2].uuid]


def test_dead_letters_leave_the_outbox_and_can_be_requeued(journal: Journal, clock: FakeClock):
    events = [journal.append_event("face_state", {"i": i}) for i in range(3)]
    snap = journal.add_snapshot(BLOB, sealed_crop=None, reason="uncovered", is_fraud_evidence=False)
    clock.now += 1
    assert journal.mark_dead("event", events[1].uuid, "server: payload rejected")
    assert journal.mark_dead("snapshot", snap.uuid, "server: too large")
    assert not journal.mark_dead("event", events[1].uuid, "again")  # only pending records die

    assert [e.seq for e in journal.pending_events(10)] == [1, 3, 4]
    assert journal.pending_snapshots(10) == []
    letters = journal.dead_letters()
    assert [(d.kind, d.uuid, d.reason) for d in letters] == [
        ("event", events[1].uuid, "server: payload rejected"),
        ("snapshot", snap.uuid, "server: too large"),
    ]
    stats = journal.outbox_stats()
    assert (stats.dead_events, stats.dead_snapshots) == (1, 1)

    assert journal.requeue_dead("event", events[1].uuid)
    assert [e.seq for e in journal.pending_events(10)] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="'event' or 'snapshot'"):
        journal.mark_dead("session", "x", "y")  # type: ignore[arg-type]


def test_outbox_queries_use_indexes_so_a_large_backlog_stays_cheap(journal: Journal):
    conn = journal._conn
    for sql in (
        "SELECT seq FROM events WHERE sync_state = 'pending' ORDER BY seq LIMIT 200",
        "SELECT s.seq FROM snapshots AS s JOIN snapshot_blobs AS b ON b.seq = s.seq"
        " WHERE s.sync_state = 'pending' ORDER BY s.seq LIMIT 200",
    ):
        plan = " ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
        assert "USING INDEX events_pending" in plan or "USING INDEX snapshots_pending" in plan, plan
        assert "TEMP B-TREE" not in plan, plan  # no sort of the whole backlog per batch


# --- retention ----------------------------------------------------------------------------------

Usage = namedtuple("Usage", "total used free")


def test_retention_purges_only_old_synced_records_and_verify_resumes_from_the_checkpoint(
    journal: Journal, clock: FakeClock
):
    old = [journal.append_event("face_state", {"i": i}) for i in range(4)]
    old_snap = journal.add_snapshot(BLOB, sealed_crop=None, reason="uncovered", is_fraud_evidence=True)
    clock.now += 40 * DAY_S
    young = journal.append_event("face_state", {"i": 99})
    journal.mark_events_synced([e.uuid for e in old[:3]] + [young.uuid])
    journal.mark_snapshots_synced([old_snap.uuid])

    report = journal.purge(disk_usage=lambda _: Usage(100, 10, 90))

    # Event 4 is unsynced: it and everything after it stay, so the chain keeps no holes.
    assert report.events_purged == 3 and report.snapshots_purged == 1 and report.pressure is None
    assert [e.seq for e in journal.events()] == [4, 5, 6]
    assert journal.get_snapshot(old_snap.uuid) is None
    verified = journal.verify()
    assert verified.ok and verified.checkpoint_seq == 3 and verified.first_seq == 4


def test_purging_every_event_keeps_seq_and_chain_going(journal_path: Path, clock: FakeClock):
    with Journal(journal_path, atm_id="ATM-0042", clock_wall=clock, reserve_bytes=0) as j:
        events = [j.append_event("face_state", {"i": i}) for i in range(3)]
        j.mark_events_synced(e.uuid for e in events)
        clock.now += 31 * DAY_S
        assert j.purge(disk_usage=lambda _: Usage(100, 10, 90)).events_purged == 3
        assert j.events() == []
    with Journal(journal_path, atm_id="ATM-0042", clock_wall=clock, reserve_bytes=0) as j:
        nxt = j.append_event("face_state", {"i": 3})
        assert nxt.seq == 4 and nxt.prev_hash == events[-1].hash
        assert j.verify().ok


def _disk_with(journal: Journal, *, total: int, other: int):
    """A file system of ``total`` bytes whose use is ``other`` plus the journal's real size."""

    def usage(_path: str) -> Usage:
        used = other + journal.db_bytes()
        return Usage(total, used, total - used)

    return usage


def test_above_the_watermark_synced_non_fraud_snapshots_go_first(journal: Journal, clock: FakeClock):
    kinds = [False, True, False, True, False, False]
    snaps = [
        journal.add_snapshot(os.urandom(40_000), sealed_crop=None, reason="r", is_fraud_evidence=f)
        for f in kinds
    ]
    pending_fraud = journal.add_snapshot(
        os.urandom(40_000), sealed_crop=None, reason="r", is_fraud_evidence=True
    )
    journal.mark_snapshots_synced(s.uuid for s in snaps)
    size = journal.db_bytes()
    # Nothing is old enough for retention; the disk is ~60 KB above an 85 % watermark.
    disk = _disk_with(journal, total=1_000_000, other=850_000 - size + 60_000)

    report = journal.purge(disk_usage=disk)

    kept = {s.uuid for s in snaps if journal.get_snapshot(s.uuid) is not None}
    assert report.pressure is None and report.used_percent_after <= 85.0 < report.used_percent_before
    assert report.fraud_snapshots_purged == 0
    assert {snaps[1].uuid, snaps[3].uuid} <= kept  # fraud evidence outlives ordinary snapshots
    assert snaps[0].uuid not in kept  # the oldest ordinary one went first
    assert journal.get_snapshot(pending_fraud.uuid) is not None
    assert journal.db_bytes() < size  # the pages really went back to the file system


def test_when_only_unsynced_evidence_is_left_the_alarm_is_raised_and_fraud_gets_the_room(
    journal: Journal, clock: FakeClock
):
    pending = [
        journal.add_snapshot(os.urandom(40_000), sealed_crop=None, reason="r", is_fraud_evidence=f)
        for f in (True, False)
    ]
    events = [journal.append_event("face_state", {"i": i}) for i in range(3)]
    disk = _disk_with(journal, total=1_000_000, other=900_000)

    report = journal.purge(disk_usage=disk)

    assert report.pressure is not None and journal.pressure == report.pressure
    assert report.pressure.unsynced_fraud_snapshots == 1
    assert (report.events_purged, report.snapshots_purged) == (0, 0)  # nothing unsynced is ever purged
    assert all(journal.get_snapshot(s.uuid) is not None for s in pending)
    assert all(journal.get_event(e.uuid) is not None for e in events)
    with pytest.raises(DiskPressureError, match="non-fraud snapshot refused"):
        journal.add_snapshot(BLOB, sealed_crop=None, reason="r", is_fraud_evidence=False)
    assert journal.add_snapshot(BLOB, sealed_crop=None, reason="r", is_fraud_evidence=True)
    assert journal.append_event("disk_pressure", {"used_percent": report.pressure.used_percent})

    # The link comes back: once synced, the records can go and the alarm clears.
    journal.mark_events_synced(e.uuid for e in journal.pending_events(100))
    journal.mark_snapshots_synced(s.uuid for s in journal.pending_snapshots(100))
    cleared = journal.purge(disk_usage=_disk_with(journal, total=1_000_000, other=700_000))
    assert cleared.pressure is None and journal.pressure is None
    assert journal.add_snapshot(BLOB, sealed_crop=None, reason="r", is_fraud_evidence=False)


# --- a full disk --------------------------------------------------------------------------------


@pytest.fixture(params=["tmpfs", "page_cap"])
def full_disk_journal(request, tmp_path: Path):
    """A journal on a really tiny file system (tmpfs, needs root) or capped by max_page_count."""
    if request.param == "tmpfs":
        mount_dir = tmp_path / "tiny"
        mount_dir.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mount_dir)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        # 2 MB reserve: more than the 1 MB WAL, so a checkpoint can still complete on a full disk.
        j = Journal(mount_dir / "state" / JOURNAL_FILENAME, atm_id="ATM-0042", reserve_bytes=2 * 1024 * 1024)
        try:
            yield j
        finally:
            j.close()
            subprocess.run(["umount", str(mount_dir)], check=False)
    else:
        j = Journal(tmp_path / JOURNAL_FILENAME, atm_id="ATM-0042", max_db_bytes=1_500_000, reserve_bytes=0)
        try:
            yield j
        finally:
            j.close()


def test_full_disk_raises_a_typed_error_keeps_everything_committed_and_recovers(full_disk_journal: Journal):
    j = full_disk_journal
    j.open()
    committed_events: list[str] = []
    committed_snaps: list[str] = []
    with pytest.raises(JournalFullError) as caught:
        for i in range(2000):
            if i % 3 == 2:
                committed_snaps.append(
                    j.add_snapshot(
                        os.urandom(40_000), sealed_crop=None, reason="r", is_fraud_evidence=False
                    ).uuid
                )
            else:
                committed_events.append(j.append_event("face_state", {"i": i}).uuid)
    error = caught.value
    assert isinstance(error, OSError) and isinstance(error, AtmguardError) and error.errno == errno.ENOSPC
    assert len(committed_snaps) > 10

    report = j.verify()
    assert report.ok, report.problems
    assert all(j.get_event(u) is not None for u in committed_events)
    assert all(j.get_snapshot(u) is not None for u in committed_snaps)
    head = j.head()
    with pytest.raises(JournalFullError):
        j.add_snapshot(os.urandom(40_000), sealed_crop=None, reason="r", is_fraud_evidence=False)
    assert j.head() == head

    # The link comes back: records are marked synced and purged, even though the disk is full.
    j.mark_events_synced(e.uuid for e in j.pending_events(10_000))
    j.mark_snapshots_synced(s.uuid for s in j.pending_snapshots(10_000))
    purged = j.purge(time.time() + 365 * DAY_S)
    assert purged.snapshots_purged == len(committed_snaps)
    after = j.append_event("face_state", {"recovered": True})
    assert after.seq == head[0] + 1 and after.prev_hash == head[1]
    assert j.verify().ok


# --- crash consistency --------------------------------------------------------------------------

_CRASH_CHILD = r"""
import os, random, sys
sys.path.insert(0, sys.argv[3])
from atmguard.store.journal import Journal

path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
journal = Journal(path, atm_id="ATM-CRASH", reserve_bytes=0)
journal.open()
print("ready", flush=True)
i = 0
while True:
    i += 1
    if i % 4 == 0:
        crop = os.urandom(rng.randrange(2_000, 8_000)) if i % 8 == 0 else None
        snap = journal.add_snapshot(
            os.urandom(rng.randrange(20_000, 60_000)), sealed_crop=crop, reason="uncovered",
            is_fraud_evidence=bool(i % 3), session_id=f"s{seed}",
        )
        print("S", snap.uuid, snap.event_uuid, flush=True)
    else:
        event = journal.append_event("face_state", {"i": i, "seed": seed}, session_id=f"s{seed}")
        print("E", event.uuid, event.seq, flush=True)
    if i % 10 == 0:
        journal.mark_events_synced(e.uuid for e in journal.pending_events(5))
"""
_LINE = re.compile(r"^(E [0-9a-f-]{36} \d+|S [0-9a-f-]{36} [0-9a-f-]{36})$")


def test_sigkill_at_random_points_loses_nothing_that_was_acknowledged(tmp_path: Path):
    rng = random.Random(20260528)
    path = tmp_path / JOURNAL_FILENAME
    acknowledged_events: set[str] = set()
    acknowledged_snaps: set[str] = set()
    started = time.monotonic()
    kills = 10
    for round_no in range(kills):
        child = subprocess.Popen(
            [sys.executable, "-c", _CRASH_CHILD, str(path), str(round_no), str(REPO_ROOT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            first = child.stdout.readline()
            assert first == "ready\n", child.stderr.read() if child.stderr else first
            time.sleep(rng.uniform(0.01, 0.2))
            child.send_signal(signal.SIGKILL)
            out, _ = child.communicate(timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=5)
        assert child.returncode == -signal.SIGKILL
        for line in out.splitlines():
            if not _LINE.match(line):
                continue  # a line cut short by the kill acknowledges nothing
            tag, first_uuid, _ = line.split()
            (acknowledged_snaps if tag == "S" else acknowledged_events).add(first_uuid)

        with Journal(path, atm_id="ATM-CRASH", reserve_bytes=0) as j:
            report = j.verify()
            assert report.ok, report.problems
            assert report.first_seq in (None, 1)
            assert all(j.get_event(u) is not None for u in acknowledged_events)
            assert all(j.get_snapshot(u) is not None for u in acknowledged_snaps)
            seqs = [e.seq for e in j.events(limit=1_000_000)]
            assert seqs == list(range(1, len(seqs) + 1))
            conn = j._conn
            orphans = conn.execute(
                "SELECT count(*) FROM snapshots AS s LEFT JOIN events AS e ON e.uuid = s.event_uuid"
                " WHERE e.uuid IS NULL"
            ).fetchone()[0]
            assert orphans == 0
            without_snapshot = conn.execute(
                "SELECT count(*) FROM events AS e LEFT JOIN snapshots AS s ON s.event_uuid = e.uuid"
                " WHERE e.kind = 'snapshot_taken' AND s.uuid IS NULL"
            ).fetchone()[0]
            assert without_snapshot == 0
            blobless = conn.execute(
                "SELECT count(*) FROM snapshots AS s LEFT JOIN snapshot_blobs AS b ON b.seq = s.seq"
                " WHERE b.seq IS NULL"
            ).fetchone()[0]
            assert blobless == 0
    assert len(acknowledged_events) > kills and len(acknowledged_snaps) > 0
    assert time.monotonic() - started < 40


# --- bench --------------------------------------------------------------------------------------


def test_measure_journal_reports_durable_append_latency(tmp_path: Path):
    result = measure_journal(
        tmp_path, appends=20, snapshots=3, backlog_events=300, backlog_snapshots=10, batch_size=100
    )
    assert 0 < result["append_p50_ms"] <= result["append_p95_ms"] <= result["append_max_ms"]
    assert result["appends"] == 20
    assert result["pending_events_batch_p50_ms"] > 0 and result["pending_snapshots_batch_p50_ms"] > 0
