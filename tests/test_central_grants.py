"""Least privilege: logged in as an ATM, only the procedures work; everything else is refused."""

from __future__ import annotations

import re
import uuid as uuidlib

import pymysql
import pytest
from mariadb_server import TEST_PAN_KEY, TEST_PIN_PEPPER, AtmLogin, CentralTestDB

from atmguard.store.central import CardStatus, provision_account
from atmguard.store.records import GENESIS_HASH, EventRecord, chain_hash

# Access denied for a table / a command / a procedure / a database.
DENIED = {1044, 1142, 1227, 1370}


def _event(atm_id: str, seq: int = 1, prev: str = GENESIS_HASH) -> EventRecord:
    body = {
        "uuid": str(uuidlib.uuid4()),
        "seq": seq,
        "atm_id": atm_id,
        "kind": "card_inserted",
        "t_wall": "2026-01-02T03:04:05.000006Z",
        "session_id": "s-1",
        "payload": {"pan": "412345******1234"},
    }
    return EventRecord(**body, prev_hash=prev, hash=chain_hash(prev, body))


def _call_ingest(cursor: pymysql.cursors.Cursor, record: EventRecord) -> None:
    cursor.execute(
        "CALL ingest_event(%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            record.atm_id,
            record.uuid,
            record.seq,
            record.kind,
            record.t_wall,
            record.session_id,
            '{"pan":"412345******1234"}',
            record.prev_hash,
            record.hash,
        ),
    )
    while cursor.nextset():
        pass


@pytest.fixture(scope="module")
def two_atms(central_db: CentralTestDB) -> tuple[AtmLogin, AtmLogin, bytes]:
    """ATM A with one event stored, ATM B, and a provisioned card."""
    a, b = central_db.add_atm(), central_db.add_atm()
    admin = central_db.admin()
    try:
        card = provision_account(
            admin, b"4123450000001234", b"2468", pan_key=TEST_PAN_KEY, pepper=TEST_PIN_PEPPER
        )
    finally:
        admin.close()
    conn = central_db.atm_connect(a)
    try:
        with conn.cursor() as cursor:
            _call_ingest(cursor, _event(a.atm_id))
    finally:
        conn.close()
    return a, b, card


FORBIDDEN = {
    "read PIN verifiers": "SELECT pin_verifier FROM accounts",
    "read the salt table directly": "SELECT pan_hmac, pin_salt FROM accounts",
    "read events": "SELECT * FROM events",
    "read snapshots": "SELECT uuid FROM snapshots",
    "read the ATM map": "SELECT * FROM atms",
    "delete events": "DELETE FROM events",
    "delete snapshots": "DELETE FROM snapshots",
    "reset PIN attempts": "UPDATE accounts SET failed_pin_attempts = 0",
    "un-hot-list a card": "UPDATE accounts SET status = 'active'",
    "insert an event directly": (
        "INSERT INTO events (atm_id, uuid, seq, kind, t_wall, payload, prev_hash, hash)"
        " VALUES ('x', 'y', 1, 'k', 't', '{}', 'p', 'h')"
    ),
    "drop a table": "DROP TABLE events",
    "truncate": "TRUNCATE TABLE events",
    "alter a table": "ALTER TABLE accounts ADD COLUMN pin VARCHAR(12)",
    "create a table": "CREATE TABLE mine (x INT)",
    "drop a procedure": "DROP PROCEDURE verify_pin",
    "replace a procedure": "CREATE PROCEDURE verify_pin() SELECT 'OK', 3",
    "read the account list": "SELECT user, host FROM mysql.user",
    "grant itself more": "GRANT SELECT ON atmguard.accounts TO CURRENT_USER()",
}


@pytest.mark.parametrize("statement", list(FORBIDDEN.values()), ids=list(FORBIDDEN))
def test_atm_account_is_refused(
    central_db: CentralTestDB, two_atms: tuple[AtmLogin, AtmLogin, bytes], statement: str
):
    a, _b, _card = two_atms
    before = central_db.server.execute(
        "SELECT (SELECT COUNT(*) FROM events), (SELECT COUNT(*) FROM accounts)", database=central_db.database
    )
    conn = central_db.atm_connect(a)
    try:
        with conn.cursor() as cursor, pytest.raises(pymysql.err.MySQLError) as info:
            cursor.execute(statement)
    finally:
        conn.close()
    assert info.value.args[0] in DENIED, info.value
    after = central_db.server.execute(
        "SELECT (SELECT COUNT(*) FROM events), (SELECT COUNT(*) FROM accounts)", database=central_db.database
    )
    assert after == before


def test_atm_grants_are_exactly_execute_on_the_procedures(central_db: CentralTestDB, two_atms):
    a, _b, _card = two_atms
    grants = [row[0] for row in central_db.server.execute(f"SHOW GRANTS FOR '{a.user}'@'{a.host}'")]
    usage = [g for g in grants if g.startswith("GRANT USAGE ON *.*")]
    execute = sorted(re.findall(r"GRANT EXECUTE ON PROCEDURE `atmguard`\.`(\w+)`", " ".join(grants)))
    assert len(usage) == 1
    assert len(grants) == 1 + len(execute)
    assert execute == sorted(
        [
            "atm_chain_head",
            "face_template",
            "hot_list_status",
            "ingest_event",
            "ingest_snapshot",
            "pin_salt",
            "schema_version",
            "verify_pin",
        ]
    )


def test_allowed_calls_work_for_the_atm(central_db: CentralTestDB, two_atms):
    a, _b, card = two_atms
    conn = central_db.atm_connect(a)
    try:
        with conn.cursor() as cursor:
            cursor.execute("CALL hot_list_status(%s)", (card,))
            assert cursor.fetchall() == (("active", 0),)
            cursor.nextset()
            cursor.execute("CALL pin_salt(%s)", (card,))
            salt, kdf = cursor.fetchone()
            assert len(salt) == 16 and kdf.startswith("scrypt")
            cursor.nextset()
            cursor.execute("CALL atm_chain_head()")
            assert cursor.fetchone()[:2] == (a.atm_id, 1)
    finally:
        conn.close()


def test_an_atm_cannot_write_as_another_atm(central_db: CentralTestDB, two_atms):
    a, b, _card = two_atms
    conn = central_db.atm_connect(b)
    try:
        with conn.cursor() as cursor, pytest.raises(pymysql.err.MySQLError, match="ATMGUARD-DENIED"):
            _call_ingest(cursor, _event(a.atm_id, seq=2))
    finally:
        conn.close()
    stored = central_db.server.execute(
        "SELECT COUNT(*) FROM events WHERE atm_id = %s", (a.atm_id,), database=central_db.database
    )
    assert stored == [(1,)]


def test_an_atm_sees_only_its_own_chain_head(central_db: CentralTestDB, two_atms):
    _a, b, _card = two_atms
    conn = central_db.atm_connect(b)
    try:
        with conn.cursor() as cursor:
            cursor.execute("CALL atm_chain_head()")
            assert cursor.fetchall() == ((b.atm_id, 0, GENESIS_HASH),)
    finally:
        conn.close()


def test_a_login_not_registered_as_an_atm_cannot_use_the_procedures(central_db: CentralTestDB, two_atms):
    # Granted by hand but missing from atms: the procedures still refuse it.
    _a, _b, card = two_atms
    from atmguard.store.migrate import grant_atm

    central_db.server.create_user("stray_login", "stray-pw")
    admin = central_db.server.admin_connect()
    try:
        grant_atm(admin, database=central_db.database, atm_user="stray_login", atm_host="127.0.0.1")
    finally:
        admin.close()
    stray = AtmLogin(atm_id="ATM-STRAY", user="stray_login", password="stray-pw")
    conn = central_db.atm_connect(stray)
    try:
        with conn.cursor() as cursor:
            for sql, args in (
                ("CALL hot_list_status(%s)", (card,)),
                ("CALL pin_salt(%s)", (card,)),
                ("CALL verify_pin(%s, %s, %s)", ("ATM-STRAY", card, b"\0" * 32)),
                ("CALL atm_chain_head()", ()),
            ):
                with pytest.raises(pymysql.err.MySQLError, match="ATMGUARD-DENIED"):
                    cursor.execute(sql, args)
    finally:
        conn.close()


def test_card_status_is_readable_but_hot_listing_is_bank_only(central_db: CentralTestDB, two_atms):
    a, _b, _card = two_atms
    admin = central_db.admin()
    try:
        hot = provision_account(
            admin,
            b"4123450000009999",
            b"1357",
            pan_key=TEST_PAN_KEY,
            pepper=TEST_PIN_PEPPER,
            status=CardStatus.HOT_LISTED,
        )
    finally:
        admin.close()
    store = central_db.store(a)
    with store:
        assert store.card_state(hot).status is CardStatus.HOT_LISTED
    conn = central_db.atm_connect(a)
    try:
        with conn.cursor() as cursor, pytest.raises(pymysql.err.MySQLError) as info:
            cursor.execute("UPDATE accounts SET status = 'active' WHERE pan_hmac = %s", (hot,))
    finally:
        conn.close()
    assert info.value.args[0] in DENIED
