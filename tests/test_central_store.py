"""CentralStore: idempotent batches, conflicts named by uuid, error classes the sync worker needs."""

from __future__ import annotations

import os
import time
import uuid as uuidlib
from dataclasses import replace

import pymysql
import pytest
from mariadb_server import AtmLogin, CentralTestDB

from atmguard.store.central import (
    CentralAccessDeniedError,
    CentralStore,
    CentralUnavailableError,
    RecordConflictError,
    RecordRejectedError,
    classify_error,
)
from atmguard.store.records import GENESIS_HASH, EventRecord, SnapshotRecord, chain_hash, snapshot_digest

T_WALL = "2026-03-04T05:06:07.123456Z"


def make_chain(
    atm_id: str, count: int, *, start_seq: int = 1, prev: str = GENESIS_HASH, **fields
) -> list[EventRecord]:
    records = []
    for seq in range(start_seq, start_seq + count):
        body = {
            "uuid": str(uuidlib.uuid4()),
            "seq": seq,
            "atm_id": atm_id,
            "kind": fields.get("kind", "face_state"),
            "t_wall": T_WALL,
            "session_id": "sess-1",
            "payload": fields.get(
                "payload", {"covered": seq % 2 == 0, "score": 0.25, "pan": "412345******1234"}
            ),
        }
        digest = chain_hash(prev, body)
        records.append(EventRecord(**body, prev_hash=prev, hash=digest))
        prev = digest
    return records


def make_snapshot(atm_id: str, *, size: int = 40 * 1024, crop: bool = True, **fields) -> SnapshotRecord:
    frame = os.urandom(size)
    face = os.urandom(size // 8) if crop else None
    return SnapshotRecord(
        uuid=str(uuidlib.uuid4()),
        atm_id=atm_id,
        session_id=fields.get("session_id", "sess-1"),
        event_uuid=str(uuidlib.uuid4()),
        reason=fields.get("reason", "covered_timeout"),
        is_fraud_evidence=True,
        t_wall=T_WALL,
        sealed_frame=frame,
        sealed_crop=face,
        sha256=snapshot_digest(frame, face),
    )


def _count(central_db: CentralTestDB, table: str, atm_id: str) -> int:
    return central_db.server.execute(
        f"SELECT COUNT(*) FROM {table} WHERE atm_id = %s", (atm_id,), database=central_db.database
    )[0][0]


@pytest.fixture
def atm(central_db: CentralTestDB) -> AtmLogin:
    return central_db.add_atm()


# --- events ------------------------------------------------------------------------------------


def test_events_are_stored_once_and_a_resent_batch_is_accepted_silently(central_db, atm):
    chain = make_chain(atm.atm_id, 30)
    with central_db.store(atm) as store:
        store.insert_events(chain[:20])
        store.insert_events(chain[10:])  # overlaps: 10 duplicates, 10 new
        store.insert_events(chain)
        assert store.chain_head() == (30, chain[-1].hash)
    assert _count(central_db, "events", atm.atm_id) == 30
    assert central_db.bank_store().verify_chain(atm.atm_id) == []


def test_same_uuid_with_different_content_is_a_conflict_naming_the_uuid(central_db, atm):
    chain = make_chain(atm.atm_id, 3)
    fresh = make_chain(atm.atm_id, 1, start_seq=4, prev=chain[-1].hash)
    body = chain[1].body() | {"payload": {"covered": True, "tampered": 1}}
    altered = replace(chain[1], payload=body["payload"], hash=chain_hash(chain[1].prev_hash, body))
    with central_db.store(atm) as store:
        store.insert_events(chain)
        with pytest.raises(RecordConflictError) as info:
            store.insert_events([*fresh, altered])
        assert info.value.uuid == chain[1].uuid
        assert chain[1].uuid in str(info.value)
        store.insert_events(fresh)  # the store is still usable, the rest of the batch can go
    # Nothing of the failed batch was kept (one transaction), and the original is untouched.
    assert _count(central_db, "events", atm.atm_id) == 4
    assert central_db.bank_store().verify_chain(atm.atm_id) == []


def test_a_record_whose_hash_does_not_match_is_rejected_before_sending(central_db, atm):
    chain = make_chain(atm.atm_id, 2)
    forged = replace(chain[1], kind="decision")
    with (
        central_db.store(atm) as store,
        pytest.raises(RecordRejectedError, match="hash does not match") as info,
    ):
        store.insert_events([chain[0], forged])
    assert info.value.uuid == forged.uuid
    assert _count(central_db, "events", atm.atm_id) == 0


def test_another_atms_record_is_rejected(central_db, atm):
    other = make_chain("ATM-SOMEONE-ELSE", 1)
    with central_db.store(atm) as store, pytest.raises(RecordRejectedError, match="ATM-SOMEONE-ELSE"):
        store.insert_events(other)


def test_data_too_long_is_a_permanent_rejection_of_that_record(central_db, atm):
    good = make_chain(atm.atm_id, 1)
    too_long = make_chain(atm.atm_id, 1, start_seq=2, prev=good[0].hash, kind="k" * 100)
    with central_db.store(atm) as store:
        with pytest.raises(RecordRejectedError) as info:
            store.insert_events(good + too_long)
        assert info.value.uuid == too_long[0].uuid
        assert "1406" in info.value.reason
        store.insert_events(good)
    assert _count(central_db, "events", atm.atm_id) == 1


def test_a_second_event_for_a_used_seq_is_rejected(central_db, atm):
    first = make_chain(atm.atm_id, 1)
    fork = make_chain(atm.atm_id, 1)  # same seq 1, another uuid
    with central_db.store(atm) as store:
        store.insert_events(first)
        with pytest.raises(RecordRejectedError, match="seq already holds another event") as info:
            store.insert_events(fork)
    assert info.value.uuid == fork[0].uuid


def test_bank_side_chain_verification_finds_tampering_and_gaps(central_db, atm):
    chain = make_chain(atm.atm_id, 5)
    with central_db.store(atm) as store:
        store.insert_events(chain)
    bank = central_db.bank_store()
    admin = central_db.admin()
    try:
        with admin.cursor() as cursor:
            cursor.execute(
                "UPDATE events SET payload = '{\"covered\": false}' WHERE uuid = %s", (chain[1].uuid,)
            )
            cursor.execute("DELETE FROM events WHERE uuid = %s", (chain[3].uuid,))
    finally:
        admin.close()
    problems = bank.verify_chain(atm.atm_id)
    assert "seq 2: hash does not match its contents (altered)" in problems
    assert "seq 5: expected seq 4 (a record is missing)" in problems


# --- snapshots ---------------------------------------------------------------------------------


def test_snapshots_are_stored_byte_exact_and_duplicates_accepted(central_db, atm):
    snaps = [make_snapshot(atm.atm_id), make_snapshot(atm.atm_id, crop=False, session_id=None)]
    with central_db.store(atm) as store:
        store.insert_snapshots(snaps)
        store.insert_snapshots(snaps)
    rows = central_db.server.execute(
        "SELECT uuid, sealed_frame, sealed_crop, sha256, session_id FROM snapshots WHERE atm_id = %s",
        (atm.atm_id,),
        database=central_db.database,
    )
    stored = {row[0]: row[1:] for row in rows}
    assert len(rows) == 2
    for snap in snaps:
        assert stored[snap.uuid] == (snap.sealed_frame, snap.sealed_crop, snap.sha256, snap.session_id)


def test_snapshot_with_same_uuid_and_other_metadata_is_a_conflict(central_db, atm):
    snap = make_snapshot(atm.atm_id, size=1024)
    with central_db.store(atm) as store:
        store.insert_snapshots([snap])
        with pytest.raises(RecordConflictError) as info:
            store.insert_snapshots([replace(snap, reason="retained")])
    assert info.value.uuid == snap.uuid


def test_snapshot_whose_sha256_does_not_match_is_rejected(central_db, atm):
    snap = make_snapshot(atm.atm_id, size=1024)
    with central_db.store(atm) as store, pytest.raises(RecordRejectedError, match="sha256"):
        store.insert_snapshots([replace(snap, sealed_frame=snap.sealed_frame + b"x")])


def test_snapshot_larger_than_the_server_accepts_is_rejected_not_retried_forever(central_db, atm):
    central_db.server.execute("SET GLOBAL max_allowed_packet = 1048576")
    try:
        store = central_db.store(atm)  # connects now, so it sees the smaller limit
        with store, pytest.raises(RecordRejectedError, match="max_allowed_packet") as info:
            store.insert_snapshots([make_snapshot(atm.atm_id, size=2 * 1024 * 1024)])
    finally:
        central_db.server.execute("SET GLOBAL max_allowed_packet = 67108864")
    assert _count(central_db, "snapshots", atm.atm_id) == 0
    assert "at most 1048576" in info.value.reason


# --- failures the sync worker must tell apart --------------------------------------------------


def test_unreachable_server_is_transient(central_db, atm):
    def refused() -> pymysql.connections.Connection:
        return pymysql.connect(host="127.0.0.1", port=1, user="x", password="y", connect_timeout=1)

    store = CentralStore(refused, atm_id=atm.atm_id)
    with pytest.raises(CentralUnavailableError):
        store.insert_events(make_chain(atm.atm_id, 1))
    assert not store.is_open


def test_a_killed_connection_fails_once_as_transient_then_reconnects(central_db, atm):
    chain = make_chain(atm.atm_id, 2)
    with central_db.store(atm) as store:
        store.insert_events(chain[:1])
        ids = central_db.server.execute(
            "SELECT id FROM information_schema.processlist WHERE user = %s", (atm.user,)
        )
        for (thread_id,) in ids:
            central_db.server.execute(f"KILL {int(thread_id)}")
        with pytest.raises(CentralUnavailableError):
            store.insert_events(chain[1:])
        store.insert_events(chain[1:])
    assert _count(central_db, "events", atm.atm_id) == 2


def test_wrong_password_is_access_denied_and_never_shows_the_password(central_db, atm):
    bad = AtmLogin(atm.atm_id, atm.user, "Wr0ng-Secret-Value")
    store = central_db.store(bad)
    with pytest.raises(CentralAccessDeniedError) as info:
        store.open()
    assert isinstance(info.value, CentralUnavailableError)  # retried with back-off, never dropped
    assert "Wr0ng-Secret-Value" not in str(info.value)


def test_a_lock_wait_timeout_is_transient_and_stores_nothing(central_db, atm):
    chain = make_chain(atm.atm_id, 1)
    admin = central_db.admin()
    admin.autocommit(False)
    try:
        with admin.cursor() as cursor:
            cursor.execute("SET SESSION innodb_lock_wait_timeout = 1")
            cursor.execute("SELECT * FROM atms WHERE atm_id = %s FOR UPDATE", (atm.atm_id,))
        conn = central_db.atm_connect(atm)
        with conn.cursor() as cursor:
            cursor.execute("SET SESSION innodb_lock_wait_timeout = 1")
        store = CentralStore(lambda: conn, atm_id=atm.atm_id)
        with pytest.raises(CentralUnavailableError, match="1205"):
            store.insert_events(chain)
    finally:
        admin.rollback()
        admin.close()
    assert _count(central_db, "events", atm.atm_id) == 0


@pytest.mark.parametrize(
    ("errno", "kind"),
    [
        (2003, CentralUnavailableError),
        (2013, CentralUnavailableError),
        (1213, CentralUnavailableError),
        (1205, CentralUnavailableError),
        (1045, CentralAccessDeniedError),
        (1370, CentralAccessDeniedError),
        (1406, RecordRejectedError),
        (1366, RecordRejectedError),
        (4025, RecordRejectedError),
        (1146, CentralUnavailableError),  # schema not migrated yet: retry, do not dead-letter
    ],
)
def test_error_classes(errno: int, kind: type):
    error = classify_error(pymysql.err.OperationalError(errno, "message"), where="h:1", uuid="u-1")
    assert type(error) is kind


# --- throughput --------------------------------------------------------------------------------


def test_upload_rate_meets_the_10k_events_and_1k_snapshots_in_60s_budget(central_db, atm):
    # Scaled down 10x to keep the suite light (the projection must fit the full budget);
    # ATMGUARD_CENTRAL_FULL_THROUGHPUT=1 runs the full 10,000 events + 1,000 snapshots.
    scale = 1 if os.environ.get("ATMGUARD_CENTRAL_FULL_THROUGHPUT") == "1" else 10
    chain = make_chain(atm.atm_id, 10_000 // scale)
    snaps = [make_snapshot(atm.atm_id, crop=False) for _ in range(1_000 // scale)]
    with central_db.store(atm) as store:
        started = time.perf_counter()
        for i in range(0, len(chain), 200):
            store.insert_events(chain[i : i + 200])
        events_s = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(0, len(snaps), 25):
            store.insert_snapshots(snaps[i : i + 25])
        snaps_s = time.perf_counter() - started
    projected_s = scale * (events_s + snaps_s)
    print(
        f"\n{len(chain)} events: {len(chain) / events_s:.0f}/s; {len(snaps)} snapshots of 40 KB: "
        f"{len(snaps) / snaps_s:.0f}/s; 10,000 + 1,000 take {projected_s:.1f} s"
        + (" (projected)" if scale > 1 else "")
    )
    assert projected_s <= 60
    assert _count(central_db, "events", atm.atm_id) == len(chain)
    assert _count(central_db, "snapshots", atm.atm_id) == len(snaps)
