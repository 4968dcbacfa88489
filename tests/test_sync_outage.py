"""Outage: the central server stops in the middle of a run and comes back; nothing lost or doubled."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mariadb_server import CentralTestDB, ThrowawayMariaDB
from test_sync_worker import MaxRandom, fill, server_events, server_snapshots

from atmguard.store.journal import Journal
from atmguard.store.records import verify_chain
from atmguard.store.sync import SyncWorker


@pytest.fixture(scope="module")
def outage_db() -> Iterator[CentralTestDB]:
    # Its own server: stopping the session's shared one would break other tests if this failed.
    server = ThrowawayMariaDB().start()
    try:
        yield CentralTestDB.create(server, "atmguard_outage")
    finally:
        server.stop()


def _wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_server_stopped_mid_run_then_restarted_backlog_drains_nothing_lost_or_doubled(
    outage_db: CentralTestDB, tmp_path: Path
):
    db = outage_db
    atm = db.add_atm()
    journal = Journal(tmp_path / "journal.sqlite3", atm_id=atm.atm_id, fsync=False, reserve_bytes=0)
    journal.open()
    fill(journal, 1500, 20, size=20_000)
    total_before = journal.outbox_stats().pending_events

    waits: list[tuple[float, int]] = []
    worker: SyncWorker

    def wait(stop_event: threading.Event, timeout_s: float) -> bool:
        waits.append((timeout_s, worker.consecutive_failures))
        return stop_event.wait(timeout_s)

    worker = SyncWorker(
        journal,
        lambda: db.store(atm),
        batch_size=50,
        interval_s=0.02,
        backoff_initial_s=0.05,
        backoff_max_s=0.4,
        rng=MaxRandom(),
        wait=wait,
    )
    # The ATM keeps working through the outage: events keep arriving.
    stop_writer = threading.Event()

    def writer() -> None:
        n = 0
        while not stop_writer.wait(0.005):
            journal.append_event("face_state", {"during_outage": True, "n": n})
            n += 1

    writer_thread = threading.Thread(target=writer)
    writer_thread.start()
    worker.start()
    try:
        # Mid-run: part of the backlog is on the server, most of it is not.
        assert _wait_until(lambda: journal.outbox_stats().pending_events < total_before - 200, 20)
        assert journal.outbox_stats().pending_events > 300
        db.server.stop(keep_data=True)
        assert _wait_until(lambda: worker.consecutive_failures >= 5, 15)
        pending_during = journal.outbox_stats().pending_events
        db.server.start()
        time.sleep(0.2)
        stop_writer.set()
        writer_thread.join()
        assert _wait_until(lambda: journal.outbox_stats().pending_events == 0, 30)
        assert _wait_until(lambda: worker.consecutive_failures == 0, 5)
    finally:
        stop_writer.set()
        worker.close()
        if not db.server.running:
            db.server.start()

    # Backoff while the server was down: full jitter pinned to its cap shows 0.05 * 2**n, capped.
    backoffs = [delay for delay, failures in waits if failures > 0]
    assert backoffs[:4] == pytest.approx([0.05, 0.1, 0.2, 0.4])
    assert all(delay == pytest.approx(0.4) for delay in backoffs[4:])
    assert pending_during > 0

    stats = journal.outbox_stats()
    assert (stats.pending_snapshots, stats.dead_events, stats.dead_snapshots) == (0, 0, 0)
    local = [record.uuid for record in journal.events(limit=100_000)]
    stored = server_events(db, atm.atm_id)
    assert [e.uuid for e in stored] == local  # every event once, in order: nothing lost or doubled
    assert verify_chain(stored) == []
    assert db.bank_store().verify_chain(atm.atm_id) == []
    snapshots = server_snapshots(db, atm.atm_id)
    assert len(snapshots) == 20
    assert all(stored_sha == computed for stored_sha, computed in snapshots.values())
    journal.close()
