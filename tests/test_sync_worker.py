"""SyncWorker against the real throwaway MariaDB: drain, idempotency, dead letters, backoff."""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pymysql
import pytest
from mariadb_server import AtmLogin, CentralTestDB, free_port

from atmguard.store.central import CentralStore, CentralUnavailableError
from atmguard.store.journal import Journal
from atmguard.store.records import EventRecord, chain_hash, snapshot_digest, verify_chain
from atmguard.store.sync import SYNC_DEAD_LETTER, SyncWorker

PAYLOAD = {"covered": False, "score": 0.25, "masked_pan": "411111******1111"}


class MaxRandom(random.Random):
    """Full jitter pinned to its upper bound, so a test sees the backoff caps themselves."""

    def uniform(self, a: float, b: float) -> float:
        return b


class RecordingWait:
    """Stands in for Event.wait: records each delay and returns at once; stops after ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.delays: list[float] = []

    def __call__(self, stop_event: threading.Event, timeout_s: float) -> bool:
        self.delays.append(timeout_s)
        return len(self.delays) >= self.limit or stop_event.is_set()


@pytest.fixture
def atm(central_db: CentralTestDB) -> AtmLogin:
    return central_db.add_atm()


@pytest.fixture
def journal(tmp_path: Path, atm: AtmLogin) -> Iterator[Journal]:
    with Journal(tmp_path / "journal.sqlite3", atm_id=atm.atm_id, fsync=False, reserve_bytes=0) as j:
        yield j


def fill(journal: Journal, events: int, snapshots: int = 0, *, size: int = 4096) -> list[str]:
    """Events with snapshots spread among them; returns the snapshot uuids."""
    every = max(1, events // snapshots) if snapshots else 0
    snaps = []
    for i in range(events):
        journal.append_event("face_state", {**PAYLOAD, "i": i}, session_id="sess-1")
        if every and i % every == 0 and len(snaps) < snapshots:
            crop = os.urandom(size // 4) if len(snaps) % 2 else None
            snaps.append(
                journal.add_snapshot(
                    os.urandom(size), sealed_crop=crop, reason="covered_timeout", is_fraud_evidence=True
                ).uuid
            )
    return snaps


def make_worker(journal: Journal, central_db: CentralTestDB, atm: AtmLogin, **options) -> SyncWorker:
    options.setdefault("batch_size", 50)
    return SyncWorker(journal, lambda: central_db.store(atm), **options)


def server_events(central_db: CentralTestDB, atm_id: str) -> list[EventRecord]:
    rows = central_db.server.execute(
        "SELECT uuid, seq, atm_id, kind, t_wall, session_id, payload, prev_hash, hash"
        " FROM events WHERE atm_id = %s ORDER BY seq",
        (atm_id,),
        database=central_db.database,
    )
    return [
        EventRecord(u, int(s), a, k, t, sid, json.loads(p), ph, h) for u, s, a, k, t, sid, p, ph, h in rows
    ]


def server_snapshots(central_db: CentralTestDB, atm_id: str) -> dict[str, tuple[str, str]]:
    """uuid -> (stored sha256, sha256 the server computes over the stored blobs)."""
    rows = central_db.server.execute(
        "SELECT uuid, sha256, SHA2(CONCAT(sealed_frame, COALESCE(sealed_crop, '')), 256)"
        " FROM snapshots WHERE atm_id = %s",
        (atm_id,),
        database=central_db.database,
    )
    return {u: (stored, computed) for u, stored, computed in rows}


def local_uuids(journal: Journal) -> list[str]:
    return [record.uuid for record in journal.events(limit=100_000)]


def raw(journal: Journal) -> sqlite3.Connection:
    return sqlite3.connect(journal.path, isolation_level=None)


# --- draining ----------------------------------------------------------------------------------


def test_run_once_drains_everything_once_in_order_and_marks_it_synced(journal, central_db, atm):
    snaps = fill(journal, 230, 6)
    report = make_worker(journal, central_db, atm).run_once()

    assert report.error is None and report.drained
    assert (report.events_synced, report.snapshots_synced) == (236, 6)
    stored = server_events(central_db, atm.atm_id)
    assert [e.uuid for e in stored] == local_uuids(journal)  # same records, same seq order
    assert verify_chain(stored) == []
    assert central_db.bank_store().verify_chain(atm.atm_id) == []
    on_server = server_snapshots(central_db, atm.atm_id)
    assert set(on_server) == set(snaps)
    for uuid in snaps:
        stored_sha, computed = on_server[uuid]
        assert stored_sha == computed == journal.get_snapshot(uuid).sha256
    stats = journal.outbox_stats()
    assert (stats.pending_events, stats.pending_snapshots, stats.dead_events) == (0, 0, 0)

    again = make_worker(journal, central_db, atm).run_once()  # nothing left: nothing sent
    assert (again.events_synced, again.snapshots_synced, again.batches) == (0, 0, 0)


def test_a_batch_resent_after_a_crash_between_commit_and_mark_is_not_doubled(journal, central_db, atm):
    fill(journal, 120, 3)
    # The server commits, then the ATM dies before marking: nothing local says it was sent.
    with central_db.store(atm) as store:
        store.insert_events(journal.pending_events(80))
        store.insert_snapshots(journal.pending_snapshots(2))
    assert journal.outbox_stats().pending_events == 123

    report = make_worker(journal, central_db, atm).run_once()

    assert report.drained and report.dead_letters == []
    assert report.events_synced == 123  # re-sent, accepted silently, now marked
    stored = server_events(central_db, atm.atm_id)
    assert len(stored) == len({e.uuid for e in stored}) == 123
    assert verify_chain(stored) == []
    assert len(server_snapshots(central_db, atm.atm_id)) == 3


def test_snapshots_are_sent_after_their_snapshot_taken_event(journal, central_db, atm):
    fill(journal, 40, 4)
    seen: list[tuple[str, list[str]]] = []

    class Recording(CentralStore):
        def insert_events(self, records):
            super().insert_events(records)
            seen.append(("event", [r.uuid for r in records]))

        def insert_snapshots(self, records):
            super().insert_snapshots(records)
            seen.append(("snapshot", [r.event_uuid for r in records]))

    worker = SyncWorker(
        journal,
        lambda: Recording(lambda: central_db.atm_connect(atm), atm_id=atm.atm_id),
        batch_size=10,
    )
    assert worker.run_once().drained
    sent: set[str] = set()
    for kind, uuids in seen:
        if kind == "event":
            sent.update(uuids)
        else:
            assert set(uuids) <= sent  # every snapshot's chain entry was already on the server


def test_snapshot_batches_are_bounded_by_bytes(journal, central_db, atm):
    fill(journal, 10, 8, size=40_000)
    sizes: list[int] = []

    class Recording(CentralStore):
        def insert_snapshots(self, records):
            sizes.append(len(records))
            super().insert_snapshots(records)

    worker = SyncWorker(
        journal,
        lambda: Recording(lambda: central_db.atm_connect(atm), atm_id=atm.atm_id),
        batch_size=200,
        snapshot_batch_bytes=100_000,
    )
    report = worker.run_once()
    assert report.drained and report.snapshots_synced == 8
    assert max(sizes) <= 2  # 100 kB budget / 40 kB blobs, whatever batch_size says
    assert sum(sizes) == 8


# --- dead letters ------------------------------------------------------------------------------


def foreign_event(atm_id: str, seq: int) -> EventRecord:
    body = {
        "uuid": str(uuidlib.uuid4()),
        "seq": seq,
        "atm_id": atm_id,
        "kind": "face_state",
        "t_wall": "2026-01-01T00:00:00.000000Z",
        "session_id": None,
        "payload": {"foreign": True},
    }
    return EventRecord(**body, prev_hash="f" * 64, hash=chain_hash("f" * 64, body))


def test_a_record_the_server_rejects_is_dead_lettered_with_its_reason_and_the_rest_syncs(
    journal, central_db, atm
):
    fill(journal, 30)
    # Seq 7 already holds another event on the server (e.g. a restored old journal): permanent.
    with central_db.store(atm) as store:
        store.insert_events([foreign_event(atm.atm_id, 7)])
    victim = journal.events(after_seq=6, limit=1)[0]

    report = make_worker(journal, central_db, atm, batch_size=10).run_once()

    assert report.drained and report.error is None
    assert [(d.kind, d.uuid) for d in report.dead_letters] == [("event", victim.uuid)]
    assert "seq already holds another event" in report.dead_letters[0].reason
    letters = journal.dead_letters()
    assert [(d.kind, d.uuid, d.seq) for d in letters] == [("event", victim.uuid, 7)]
    assert "seq already holds another event" in letters[0].reason
    stored = {e.uuid: e for e in server_events(central_db, atm.atm_id)}
    local = local_uuids(journal)
    assert victim.uuid not in stored
    assert set(local) - {victim.uuid} <= set(stored)  # all the others, and the notice, arrived
    assert journal.outbox_stats().pending_events == 0
    notices = [e for e in stored.values() if e.kind == SYNC_DEAD_LETTER]
    assert len(notices) == 1
    assert notices[0].payload["uuid"] == victim.uuid and notices[0].payload["seq"] == 7
    assert "seq already holds another event" in notices[0].payload["reason"]
    # The bank's verification shows the gap honestly (the foreign record sits at seq 7).
    assert central_db.bank_store().verify_chain(atm.atm_id) != []

    # Never retried by itself: the next run sends nothing and parks nothing new.
    again = make_worker(journal, central_db, atm).run_once()
    assert (again.events_synced, again.dead_letters, again.batches) == (0, [], 0)
    assert journal.outbox_stats().dead_events == 1


def test_requeued_dead_letter_is_tried_again(journal, central_db, atm):
    fill(journal, 5)
    with central_db.store(atm) as store:
        store.insert_events([foreign_event(atm.atm_id, 3)])
    make_worker(journal, central_db, atm, dead_letter_notices=False).run_once()
    victim = journal.dead_letters()[0]
    # The bank removes its wrong row, the technician requeues: the event now goes through.
    central_db.server.execute(
        "DELETE FROM events WHERE atm_id = %s AND seq = 3", (atm.atm_id,), database=central_db.database
    )
    assert journal.requeue_dead("event", victim.uuid)
    report = make_worker(journal, central_db, atm).run_once()
    assert report.events_synced == 1 and report.dead_letters == []
    assert verify_chain(server_events(central_db, atm.atm_id)) == []


def test_a_conflicting_snapshot_is_dead_lettered_and_its_event_still_syncs(journal, central_db, atm):
    [snap_uuid] = fill(journal, 3, 1)
    snap = journal.get_snapshot(snap_uuid)
    other = os.urandom(1000)
    impostor = replace(snap, sealed_frame=other, sealed_crop=None, sha256=snapshot_digest(other, None))
    with central_db.store(atm) as store:
        store.insert_snapshots([impostor])

    report = make_worker(journal, central_db, atm).run_once()

    assert [(d.kind, d.uuid) for d in report.dead_letters] == [("snapshot", snap_uuid)]
    assert "different content" in report.dead_letters[0].reason
    stored = server_events(central_db, atm.atm_id)
    assert snap.event_uuid in {e.uuid for e in stored}  # its chain entry (with the real sha256) is there
    notice = next(e for e in stored if e.kind == SYNC_DEAD_LETTER)
    assert notice.payload["record"] == "snapshot" and notice.payload["event_uuid"] == snap.event_uuid
    assert journal.outbox_stats().pending_events == 0  # the notice went in the same run
    assert journal.outbox_stats().dead_snapshots == 1


def test_locally_altered_or_unreadable_records_are_dead_lettered_never_sent(journal, central_db, atm):
    snaps = fill(journal, 20, 3)
    with raw(journal) as conn:
        # seq 4: still JSON, but no longer what was hashed; seq 9: not JSON at all.
        conn.execute("UPDATE events SET payload = '{\"covered\":true}' WHERE seq = 4")
        conn.execute("UPDATE events SET payload = '{broken' WHERE seq = 9")
        conn.execute(
            "UPDATE snapshot_blobs SET sealed_frame = zeroblob(4096)"
            " WHERE seq = (SELECT seq FROM snapshots WHERE uuid = ?)",
            (snaps[1],),
        )
        conn.execute(
            "DELETE FROM snapshot_blobs WHERE seq = (SELECT seq FROM snapshots WHERE uuid = ?)", (snaps[2],)
        )
    uuids = {r[1]: r[0] for r in raw(journal).execute("SELECT uuid, seq FROM events WHERE seq IN (4, 9)")}

    report = make_worker(journal, central_db, atm, batch_size=8).run_once()

    assert report.drained and report.error is None
    dead = {(d.kind, d.uuid): d.reason for d in report.dead_letters}
    assert "hash does not match" in dead[("event", uuids[4])]
    assert "not valid JSON" in dead[("event", uuids[9])]
    assert "sha256 does not match" in dead[("snapshot", snaps[1])]
    assert "blobs are missing" in dead[("snapshot", snaps[2])]
    assert len(dead) == 4
    stored = {e.uuid for e in server_events(central_db, atm.atm_id)}
    assert uuids[4] not in stored and uuids[9] not in stored
    assert set(server_snapshots(central_db, atm.atm_id)) == {snaps[0]}
    stats = journal.outbox_stats()
    assert (stats.pending_events, stats.pending_snapshots) == (0, 0)
    assert (stats.dead_events, stats.dead_snapshots) == (2, 2)


# --- server down, backoff, bugs, stopping ------------------------------------------------------


def closed_port_store(atm: AtmLogin) -> CentralStore:
    port = free_port()  # nothing listens there

    def connect() -> pymysql.connections.Connection:
        return pymysql.connect(
            host="127.0.0.1", port=port, user=atm.user, password=atm.password, connect_timeout=2
        )

    return CentralStore(connect, atm_id=atm.atm_id, where=f"127.0.0.1:{port}")


def test_server_down_is_reported_unavailable_and_nothing_is_marked(journal, atm):
    fill(journal, 12, 1)
    report = SyncWorker(journal, lambda: closed_port_store(atm)).run_once()
    assert report.unavailable and not report.drained
    assert "127.0.0.1" in report.error
    assert (report.events_synced, report.snapshots_synced) == (0, 0)
    stats = journal.outbox_stats()
    assert (stats.pending_events, stats.pending_snapshots, stats.dead_events) == (13, 1, 0)


class FlakyStore(CentralStore):
    """The real store, but the first ``failures`` uploads fail with ``error``."""

    def __init__(self, *args, failures: int, error: Exception, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.failures = failures
        self.error = error

    def insert_events(self, records):
        if self.failures > 0:
            self.failures -= 1
            raise self.error
        super().insert_events(records)


def test_backoff_grows_exponentially_up_to_the_cap_and_resets_after_success(journal, central_db, atm):
    fill(journal, 10)
    wait = RecordingWait(limit=7)
    store = FlakyStore(
        lambda: central_db.atm_connect(atm),
        atm_id=atm.atm_id,
        failures=5,
        error=CentralUnavailableError("central: server down (test)"),
    )
    worker = SyncWorker(
        journal,
        lambda: store,
        interval_s=2.5,
        backoff_initial_s=0.1,
        backoff_max_s=1.0,
        rng=MaxRandom(),
        wait=wait,
    )
    worker.run(threading.Event())
    # Five failures: caps 0.1, 0.2, 0.4, 0.8, 1.0 (max); then success -> the normal interval.
    assert wait.delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 2.5, 2.5])
    assert worker.consecutive_failures == 0
    assert journal.outbox_stats().pending_events == 0


def test_an_unexpected_error_is_logged_with_its_type_and_backed_off_not_spun(
    journal, central_db, atm, caplog
):
    fill(journal, 3)
    wait = RecordingWait(limit=4)
    store = FlakyStore(
        lambda: central_db.atm_connect(atm), atm_id=atm.atm_id, failures=99, error=RuntimeError("a bug")
    )
    worker = SyncWorker(
        journal, lambda: store, backoff_initial_s=0.5, backoff_max_s=60, rng=random.Random(7), wait=wait
    )
    with caplog.at_level(logging.ERROR, logger="atmguard.store.sync"):
        worker.run(threading.Event())
    assert "RuntimeError" in caplog.text
    assert len(wait.delays) == 4
    caps = [0.5, 1.0, 2.0, 4.0]
    assert all(0 <= d <= cap for d, cap in zip(wait.delays, caps, strict=True))
    assert sum(wait.delays) > 0.5  # jittered waits, not a tight loop
    assert journal.outbox_stats().pending_events == 3  # nothing marked on a failure


def test_full_jitter_is_uniform_below_a_capped_exponential():
    # Pure arithmetic: no journal or server is touched.
    worker = SyncWorker(None, None, backoff_initial_s=1.0, backoff_max_s=300.0, rng=random.Random(1234))
    for failures, cap in ((0, 1.0), (3, 8.0), (8, 256.0), (9, 300.0), (5000, 300.0)):
        delays = [worker.backoff_delay(failures) for _ in range(2000)]
        assert min(delays) >= 0.0 and max(delays) <= cap
        assert sum(delays) / len(delays) == pytest.approx(cap / 2, rel=0.08)  # spread over [0, cap]


def test_stop_wakes_the_worker_promptly(journal, central_db, atm):
    fill(journal, 5)
    worker = make_worker(journal, central_db, atm, interval_s=30.0)
    worker.start()
    deadline = time.monotonic() + 10
    while journal.outbox_stats().pending_events and time.monotonic() < deadline:
        time.sleep(0.02)
    assert journal.outbox_stats().pending_events == 0  # the thread did its work, now it waits 30 s
    started = time.monotonic()
    assert worker.stop(timeout_s=5)
    assert time.monotonic() - started < 1.0
    worker.close()
    worker.close()  # idempotent


def test_from_settings_reads_the_sync_section(journal):
    from atmguard.config import Settings

    settings = Settings.model_validate(
        {"sync": {"batch_size": 7, "interval_s": 3.0, "backoff_initial_s": 0.25, "backoff_max_s": 9.0}}
    )
    worker = SyncWorker.from_settings(settings, journal=journal, rng=MaxRandom())
    assert worker.backoff_delay(0) == 0.25
    assert worker.backoff_delay(10) == 9.0
    assert worker._batch_size == 7
