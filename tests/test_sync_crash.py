"""Crash consistency: a writer + sync worker process is SIGKILLed at random points, many times.

The child (this file run as a script) journals events and snapshots as fast as fsync allows
while its SyncWorker drains them on a thread, and reports each record on a line of its log
*after* the journal committed it. The parent kills it with SIGKILL after a seeded random
delay, restarts it, and so on; then drains what is left and proves that every reported event
and snapshot is on the server exactly once, the central chain verifies, and every snapshot's
blobs match their sha256. ATMGUARD_SYNC_CRASH_SEED / ATMGUARD_SYNC_CRASH_ROUNDS change the run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SEED = int(os.environ.get("ATMGUARD_SYNC_CRASH_SEED", "20260305"))
ROUNDS = int(os.environ.get("ATMGUARD_SYNC_CRASH_ROUNDS", "10"))
REPO_ROOT = Path(__file__).resolve().parents[1]


# --- the child ---------------------------------------------------------------------------------


def child_main(config: dict[str, Any]) -> None:
    import pymysql

    from atmguard.store.central import CentralStore
    from atmguard.store.journal import Journal
    from atmguard.store.sync import SyncWorker

    rng = random.Random(config["seed"])
    journal = Journal(config["journal"], atm_id=config["atm_id"], fsync=True, reserve_bytes=0)
    journal.open()

    def connect() -> pymysql.connections.Connection:
        return pymysql.connect(
            host=config["host"],
            port=config["port"],
            user=config["user"],
            password=config["password"],
            database=config["database"],
            autocommit=True,
            ssl_disabled=True,
            connect_timeout=5,
            read_timeout=30,
            write_timeout=30,
        )

    class Store(CentralStore):
        """Kills its own process right after the k-th central COMMIT (before the local mark),
        when the parent asks for it: the narrowest window a timer rarely hits."""

        commits = 0

        def _run_batch(self, statements):
            super()._run_batch(statements)
            Store.commits += 1
            if Store.commits == config["kill_after_commit"]:
                os.kill(os.getpid(), signal.SIGKILL)

    worker = SyncWorker(
        journal,
        lambda: Store(connect, atm_id=config["atm_id"]),
        batch_size=rng.choice((5, 20, 50)),
        interval_s=0.01,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
        snapshot_batch_bytes=rng.choice((30_000, 200_000)),
        rng=random.Random(config["seed"] + 1),
    )
    log = os.open(config["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    worker.start()
    os.write(log, b"READY\n")
    n = 0
    while True:
        # Only after the journal's commit returned does the record count as committed.
        if rng.random() < 0.12:
            size = rng.randint(1_000, 40_000)
            crop = os.urandom(size // 5) if rng.random() < 0.5 else None
            snap = journal.add_snapshot(
                os.urandom(size), sealed_crop=crop, reason="covered_timeout", is_fraud_evidence=True
            )
            os.write(log, f"S {snap.uuid} {snap.sha256} {snap.event_uuid}\n".encode())
        else:
            event = journal.append_event("face_state", {"n": n, "covered": n % 2 == 0}, session_id="s-1")
            os.write(log, f"E {event.uuid}\n".encode())
        n += 1


# --- the test ----------------------------------------------------------------------------------


def _read_log(path: Path) -> tuple[set[str], dict[str, str], int]:
    events: set[str] = set()
    snapshots: dict[str, str] = {}
    starts = 0
    text = path.read_text() if path.exists() else ""
    lines = text.split("\n")
    for line in lines[:-1]:  # the last piece has no newline: a write the kill cut short
        parts = line.split()
        if parts == ["READY"]:
            starts += 1
        elif parts[0] == "E":
            events.add(parts[1])
        elif parts[0] == "S":
            snapshots[parts[1]] = parts[2]
            events.add(parts[3])
    return events, snapshots, starts


def test_sigkill_at_random_points_loses_and_doubles_nothing(central_db, tmp_path: Path):
    from test_sync_worker import server_events

    from atmguard.store.journal import Journal, verify_journal
    from atmguard.store.records import verify_chain
    from atmguard.store.sync import SyncWorker

    atm = central_db.add_atm()
    rng = random.Random(SEED)
    log_path = tmp_path / "committed.log"
    config = {
        "journal": str(tmp_path / "journal.sqlite3"),
        "log": str(log_path),
        "atm_id": atm.atm_id,
        "host": central_db.server.host,
        "port": central_db.server.port,
        "user": atm.user,
        "password": atm.password,
        "database": central_db.database,
    }
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    in_window = 0  # kills that left records committed on the server but not marked locally
    pending_at_kill = 0
    for round_no in range(ROUNDS):
        # Odd rounds: the child kills itself between a central commit and the local mark;
        # even rounds: the parent kills it after a random delay, wherever it happens to be.
        kill_after = rng.randint(1, 8) if round_no % 2 else 0
        child_config = {**config, "seed": SEED * 1000 + round_no, "kill_after_commit": kill_after}
        with open(tmp_path / f"child-{round_no}.err", "wb") as err:
            child = subprocess.Popen(
                [sys.executable, __file__, "child", json.dumps(child_config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
            )
        try:
            deadline = time.monotonic() + 30
            while _read_log(log_path)[2] <= round_no:  # wait for this child's READY
                assert child.poll() is None, (tmp_path / f"child-{round_no}.err").read_text()[-3000:]
                assert time.monotonic() < deadline, "child did not start"
                time.sleep(0.01)
            if kill_after:
                child.wait(timeout=30)
                assert child.returncode == -signal.SIGKILL, (tmp_path / f"child-{round_no}.err").read_text()
            else:
                time.sleep(rng.uniform(0.05, 0.7))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
        # What did the kill interrupt? Records on the server that the journal still calls pending.
        with Journal(config["journal"], atm_id=None, read_only=True) as reader:
            pending = [r.uuid for r in reader.pending_events(100_000)]
        pending_at_kill += len(pending)
        if pending:
            marks = ", ".join(["%s"] * len(pending))
            in_window += central_db.server.execute(
                f"SELECT COUNT(*) FROM events WHERE uuid IN ({marks})", pending, database=central_db.database
            )[0][0]

    # Restart once more and drain: this is what the daemon does after the last power cut.
    with Journal(config["journal"], atm_id=atm.atm_id, reserve_bytes=0) as journal:
        report = SyncWorker(journal, lambda: central_db.store(atm), batch_size=100).run_once()
        stats = journal.outbox_stats()
        local_events = [r.uuid for r in journal.events(limit=1_000_000)]
    assert report.error is None and report.drained
    assert (stats.pending_events, stats.pending_snapshots, stats.dead_events, stats.dead_snapshots) == (
        0,
    ) * 4
    assert verify_journal(config["journal"]).ok

    committed_events, committed_snapshots, starts = _read_log(log_path)
    print(
        f"\n{ROUNDS} kills (seed {SEED}): {len(committed_events)} events and {len(committed_snapshots)} "
        f"snapshots reported committed; {pending_at_kill} pending at the kills, {in_window} of them "
        f"already on the server (killed between commit and mark); final drain sent {report.events_synced}"
    )
    assert starts == ROUNDS
    assert len(committed_events) > 10 * ROUNDS  # the children really worked between kills
    assert pending_at_kill > 0  # and the kills landed while there was something to sync
    assert in_window > 0  # some between the server's commit and the local mark

    # Every reported event is on the server exactly once.
    counts = dict(
        central_db.server.execute(
            "SELECT uuid, COUNT(*) FROM events WHERE atm_id = %s GROUP BY uuid",
            (atm.atm_id,),
            database=central_db.database,
        )
    )
    assert all(counts.get(uuid) == 1 for uuid in committed_events)
    # Nothing else either: the server holds exactly the journal's events, in seq order.
    stored = server_events(central_db, atm.atm_id)
    assert [e.uuid for e in stored] == local_events
    assert stored[0].seq == 1
    assert verify_chain(stored) == []
    assert central_db.bank_store().verify_chain(atm.atm_id) == []

    # Every reported snapshot once, its blobs matching the sha256 the child saw committed.
    rows = central_db.server.execute(
        "SELECT uuid, COUNT(*), MIN(sha256), SHA2(CONCAT(MIN(sealed_frame), COALESCE(MIN(sealed_crop), '')), 256)"
        " FROM snapshots WHERE atm_id = %s GROUP BY uuid",
        (atm.atm_id,),
        database=central_db.database,
    )
    on_server = {uuid: (count, sha, computed) for uuid, count, sha, computed in rows}
    for uuid, sha in committed_snapshots.items():
        assert on_server[uuid] == (1, sha, sha)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "child":
    child_main(json.loads(sys.argv[2]))
