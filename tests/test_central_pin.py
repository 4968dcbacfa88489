"""PIN verification: derived on the ATM, compared and counted atomically on the server."""

from __future__ import annotations

import hashlib
import secrets
import threading
from pathlib import Path

import pytest
from mariadb_server import TEST_PAN_KEY, TEST_PIN_PEPPER, AtmLogin, CentralTestDB

from atmguard.hardware.keypad.pinbuffer import PinBuffer
from atmguard.store.central import (
    CardStatus,
    InvalidPinError,
    PinCheck,
    PinResult,
    derive_pin_value,
    mask_pan,
    pan_hmac,
    pin_verifier,
    provision_account,
    set_card_status,
)

SALT = bytes(range(16))


def _new_card(central_db: CentralTestDB, pin: bytes, **kwargs: object) -> tuple[bytes, bytes]:
    """A fresh card: (PAN, pan_hmac)."""
    pan = b"41234" + str(secrets.randbelow(10**11)).zfill(11).encode()
    admin = central_db.admin()
    try:
        key = provision_account(admin, pan, pin, pan_key=TEST_PAN_KEY, pepper=TEST_PIN_PEPPER, **kwargs)
    finally:
        admin.close()
    return pan, key


def _account(central_db: CentralTestDB, key: bytes) -> tuple:
    return central_db.server.execute(
        "SELECT failed_pin_attempts, locked_at IS NOT NULL, pin_verifier, pin_salt FROM accounts WHERE pan_hmac = %s",
        (key,),
        database=central_db.database,
    )[0]


@pytest.fixture(scope="module")
def atms(central_db: CentralTestDB) -> tuple[AtmLogin, AtmLogin]:
    return central_db.add_atm(), central_db.add_atm()


# --- derivation (ATM side) ---------------------------------------------------------------------


def test_pin_value_depends_on_pin_salt_and_pepper():
    base = derive_pin_value(b"1234", salt=SALT, pepper=TEST_PIN_PEPPER)
    assert len(base) == 32
    assert derive_pin_value(bytearray(b"1234"), salt=SALT, pepper=TEST_PIN_PEPPER) == base
    assert derive_pin_value(b"1235", salt=SALT, pepper=TEST_PIN_PEPPER) != base
    assert derive_pin_value(b"1234", salt=bytes(16), pepper=TEST_PIN_PEPPER) != base
    assert derive_pin_value(b"1234", salt=SALT, pepper=TEST_PIN_PEPPER + b"x") != base
    # Slow hash of the digits, not a plain hash a table leak could be matched against.
    assert base != hashlib.sha256(b"1234").digest()


def test_pin_must_be_bytes_never_a_str():
    with pytest.raises(TypeError, match="not str"):
        derive_pin_value("1234", salt=SALT, pepper=TEST_PIN_PEPPER)


@pytest.mark.parametrize("pin", [b"123", b"1234567890123", b"12a4", b"12 4", b""])
def test_malformed_pins_are_refused_without_echoing_them(pin: bytes):
    with pytest.raises(InvalidPinError) as info:
        derive_pin_value(pin, salt=SALT, pepper=TEST_PIN_PEPPER)
    if pin:
        assert pin.decode() not in str(info.value)


def test_pin_buffer_view_is_accepted_in_place():
    buffer = PinBuffer(min_digits=4, max_digits=6)
    for digit in "2468":
        buffer.append(digit)
    with buffer.reveal() as view:
        value = derive_pin_value(view, salt=SALT, pepper=TEST_PIN_PEPPER)
    assert value == derive_pin_value(b"2468", salt=SALT, pepper=TEST_PIN_PEPPER)


def test_pan_is_keyed_hashed_and_masked_to_first6_last4():
    assert pan_hmac(b"4123450000001234", key=TEST_PAN_KEY) != pan_hmac(
        b"4123450000001234", key=TEST_PAN_KEY + b"!"
    )
    assert mask_pan(b"4123450000001234") == "412345******1234"
    with pytest.raises(TypeError):
        pan_hmac("4123450000001234", key=TEST_PAN_KEY)


# --- the server procedure ----------------------------------------------------------------------


def test_correct_pin_is_ok_and_the_table_holds_only_a_hash_of_the_pin_value(central_db, atms):
    pan, key = _new_card(central_db, b"90817263")
    with central_db.store(atms[0]) as store:
        assert store.check_pin(key, b"90817263", pepper=TEST_PIN_PEPPER) == PinCheck(PinResult.OK, 3)
    _failed, _locked, verifier, salt = _account(central_db, key)
    value = derive_pin_value(b"90817263", salt=salt, pepper=TEST_PIN_PEPPER)
    assert verifier == pin_verifier(value) and verifier != value
    row = central_db.server.execute(
        "SELECT * FROM accounts WHERE pan_hmac = %s", (key,), database=central_db.database
    )[0]
    flat = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in row)
    assert b"90817263" not in flat and pan not in flat and value not in flat


def test_wrong_pins_count_down_then_lock_and_a_right_pin_no_longer_helps(central_db, atms):
    _pan, key = _new_card(central_db, b"1111")
    with central_db.store(atms[0]) as store:
        assert store.check_pin(key, b"2222", pepper=TEST_PIN_PEPPER) == PinCheck(PinResult.WRONG_PIN, 2)
        assert store.check_pin(key, b"3333", pepper=TEST_PIN_PEPPER) == PinCheck(PinResult.WRONG_PIN, 1)
        assert store.check_pin(key, b"4444", pepper=TEST_PIN_PEPPER) == PinCheck(PinResult.LOCKED, 0)
        assert store.check_pin(key, b"1111", pepper=TEST_PIN_PEPPER) == PinCheck(PinResult.LOCKED, 0)
        state = store.card_state(key)
    assert state.status is CardStatus.ACTIVE and state.pin_locked
    assert _account(central_db, key)[:2] == (3, 1)


def test_a_right_pin_resets_the_counter(central_db, atms):
    _pan, key = _new_card(central_db, b"1111")
    with central_db.store(atms[0]) as store:
        assert store.check_pin(key, b"0000", pepper=TEST_PIN_PEPPER).result is PinResult.WRONG_PIN
        assert store.check_pin(key, b"1111", pepper=TEST_PIN_PEPPER).ok
        assert store.check_pin(key, b"0000", pepper=TEST_PIN_PEPPER) == PinCheck(PinResult.WRONG_PIN, 2)


def test_moving_to_another_atm_does_not_reset_the_attempts(central_db, atms):
    _pan, key = _new_card(central_db, b"5555")
    with central_db.store(atms[0]) as first, central_db.store(atms[1]) as second:
        assert first.check_pin(key, b"0000", pepper=TEST_PIN_PEPPER).attempts_left == 2
        assert first.check_pin(key, b"0001", pepper=TEST_PIN_PEPPER).attempts_left == 1
        assert second.check_pin(key, b"0002", pepper=TEST_PIN_PEPPER) == PinCheck(PinResult.LOCKED, 0)


def test_concurrent_wrong_pins_are_counted_exactly(central_db, atms):
    # Eight ATMs race on one card: the row lock serialises them, so exactly the first two see
    # WRONG_PIN, one locks the card and the rest find it locked; none is lost or double counted.
    _pan, key = _new_card(central_db, b"7777")
    wrong = derive_pin_value(b"0000", salt=_account(central_db, key)[3], pepper=TEST_PIN_PEPPER)
    results: list[PinCheck] = []
    lock = threading.Lock()
    stores = [central_db.store(atms[i % 2]) for i in range(8)]
    for store in stores:
        store.open()
    start = threading.Barrier(len(stores))

    def attempt(store) -> None:
        start.wait()
        check = store.verify_pin(key, wrong)
        with lock:
            results.append(check)

    threads = [threading.Thread(target=attempt, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for store in stores:
        store.close()
    assert sorted(r.attempts_left for r in results if r.result is PinResult.WRONG_PIN) == [1, 2]
    assert [r.result for r in results].count(PinResult.LOCKED) == 6
    assert _account(central_db, key)[:2] == (3, 1)


@pytest.mark.parametrize(
    ("status", "expected"),
    [(CardStatus.HOT_LISTED, PinResult.HOT_LISTED), (CardStatus.CLOSED, PinResult.CLOSED)],
)
def test_hot_listed_and_closed_cards_are_refused_even_with_the_right_pin(central_db, atms, status, expected):
    _pan, key = _new_card(central_db, b"8888")
    admin = central_db.admin()
    try:
        set_card_status(admin, key, status)
    finally:
        admin.close()
    with central_db.store(atms[0]) as store:
        assert store.check_pin(key, b"8888", pepper=TEST_PIN_PEPPER) == PinCheck(expected, 0)
        assert store.card_state(key).status is status
    assert _account(central_db, key)[0] == 0  # not counted as a PIN attempt


def test_unknown_card(central_db, atms):
    stranger = pan_hmac(b"4999990000000000", key=TEST_PAN_KEY)
    with central_db.store(atms[0]) as store:
        assert store.pin_salt(stranger) is None
        assert store.check_pin(stranger, b"1234", pepper=TEST_PIN_PEPPER) == PinCheck(
            PinResult.UNKNOWN_CARD, 0
        )
        assert store.verify_pin(stranger, bytes(32)) == PinCheck(PinResult.UNKNOWN_CARD, 0)
        assert store.card_state(stranger).status is CardStatus.UNKNOWN


def test_the_pin_digits_never_reach_the_server(central_db, atms, tmp_path: Path):
    # Everything the server receives is in its general log while it is on.
    log = central_db.server.base_dir / "general.log"
    _pan, key = _new_card(central_db, b"31415926")
    central_db.server.execute(f"SET GLOBAL general_log_file = '{log}'")
    central_db.server.execute("SET GLOBAL general_log = 1")
    try:
        with central_db.store(atms[0]) as store:
            assert store.check_pin(key, b"31415926", pepper=TEST_PIN_PEPPER).ok
    finally:
        central_db.server.execute("SET GLOBAL general_log = 0")
    text = log.read_bytes()
    assert b"verify_pin" in text  # the log did capture the exchange
    assert b"31415926" not in text
