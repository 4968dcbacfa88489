"""One contract for every card reader backend that can run here.

``serial_pty``: the real ``SerialCardReader`` on a pty pair whose other end is the emulator.
``sim``: ``SimCardReader`` (the same client owning its emulator). Plus ``loop://`` tests of the
client against canned answers.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date

import pytest
import serial

from atmguard.config import settings_from_mapping
from atmguard.errors import CardReaderError, CardReaderTimeout, ProtocolError
from atmguard.hardware import registry
from atmguard.hardware.card import sankyo
from atmguard.hardware.card.base import (
    CardInserted,
    CardReader,
    CardTaken,
    ReaderFault,
    UnsupportedOperationError,
)
from atmguard.hardware.card.emulator import CardReaderEmulator, EmulatorError, SimCardReader
from atmguard.hardware.card.serial_reader import SerialCardReader

TODAY = date(2025, 6, 15)
PAN = "4111111111111111"
TRACK1 = f"%B{PAN}^DOE/JOHN^3012201100000?"
TRACK2 = f";{PAN}=30122011000000?"
RESPONSE_TIMEOUT_S = 0.15
RETRIES = 2
FAST = {
    "response_timeout_s": RESPONSE_TIMEOUT_S,
    "retries": RETRIES,
    "poll_interval_s": 0.01,
    "motion_timeout_s": 1.0,
    "swipe_line_timeout_s": 0.1,
}
# Every attempt waits at most one response timeout for the ACK; slack for a loaded machine.
MUTE_BOUND_S = (RETRIES + 1) * RESPONSE_TIMEOUT_S + 0.5


@dataclass
class Rig:
    reader: SerialCardReader
    emulator: CardReaderEmulator


def make_rig(kind: str, protocol: str) -> Rig:
    emulator = CardReaderEmulator(protocol=protocol, latency_s=0.002, motor_s=0.03)  # type: ignore[arg-type]
    if kind == "serial_pty":
        emulator.start()
        reader: SerialCardReader = SerialCardReader(
            emulator.port,
            protocol=protocol,  # type: ignore[arg-type]
            today=lambda: TODAY,
            **FAST,  # type: ignore[arg-type]
        )
    else:
        reader = SimCardReader(protocol=protocol, emulator=emulator, today=lambda: TODAY, **FAST)  # type: ignore[arg-type]
    return Rig(reader, emulator)


@pytest.fixture(params=["serial_pty", "sim"])
def rig(request) -> Iterator[Rig]:
    r = make_rig(request.param, "sankyo")
    r.reader.open()
    yield r
    r.reader.close()
    r.emulator.stop()


@pytest.fixture(params=["serial_pty", "sim"])
def swipe_rig(request) -> Iterator[Rig]:
    r = make_rig(request.param, "ascii")
    r.reader.open()
    yield r
    r.reader.close()
    r.emulator.stop()


def next_event(reader: CardReader, timeout_s: float = 2.0):
    return reader.poll(timeout_s=timeout_s)


def insert_card(r: Rig, track1: str | None = TRACK1, track2: str | None = TRACK2) -> CardInserted:
    r.reader.set_entry_enabled(True)
    assert r.emulator.insert(track1, track2)
    event = next_event(r.reader)
    assert isinstance(event, CardInserted), event
    return event


# -- motorized (sankyo) ------------------------------------------------------------------------------


def test_open_initialises_the_reader_and_keeps_entry_shut(rig):
    assert rig.reader.holds_card
    assert rig.emulator.initialised
    assert not rig.emulator.entry_enabled
    assert rig.emulator.commands[0] == "C00"
    status = rig.reader.status()
    assert not status.card_present and not status.card_at_gate and not status.entry_enabled
    assert status.fault is None
    assert rig.reader.poll(timeout_s=0.05) is None


def test_card_is_refused_while_entry_disabled(rig):
    assert not rig.emulator.insert(TRACK1, TRACK2)
    assert rig.reader.poll(timeout_s=0.1) is None
    assert rig.emulator.card_state == "none"


def test_insert_reports_card_with_masked_pan(rig, caplog):
    caplog.set_level(logging.DEBUG)
    event = insert_card(rig)
    assert event.error_reason is None and event.card is not None
    assert event.card.masked_pan == "411111******1111"
    assert (event.card.expiry_year, event.card.expiry_month) == (2030, 12)
    assert event.card.tracks == {1, 2}
    status = rig.reader.status()
    assert status.card_present and status.entry_enabled
    for text in (repr(event), str(event), caplog.text):
        assert PAN not in text and "DOE" not in text and "3012201" not in text


@pytest.mark.parametrize(
    ("track1", "track2", "reason"),
    [
        (None, ";4111111111111112=30122011000000?", "luhn"),
        (None, ";4111111111111111=25052011000000?", "expired"),
        ("%B5500000000000004^DOE/JOHN^3012201100000?", TRACK2, "track_mismatch"),
        (None, None, "no_track"),  # no stripe: the reader answers error 24
        ("%B4111111111111111^DOE", None, "bad_sentinel"),
    ],
)
def test_invalid_card_is_still_an_insertion_with_a_reason(rig, track1, track2, reason):
    event = insert_card(rig, track1, track2)
    assert event.card is None
    assert event.error_reason == reason
    assert rig.reader.status().card_present  # still inside: the controller decides eject or capture


def test_eject_then_take_reports_card_taken(rig):
    insert_card(rig)
    rig.reader.eject()
    assert rig.emulator.card_state == "gate"
    status = rig.reader.status()
    assert status.card_at_gate and not status.card_present
    assert rig.reader.poll(timeout_s=0.05) is None  # waiting at the gate is not an event
    rig.emulator.take()
    assert isinstance(next_event(rig.reader), CardTaken)
    assert not rig.reader.status().card_at_gate
    assert rig.reader.poll(timeout_s=0.05) is None


def test_eject_waits_for_the_motor(rig):
    insert_card(rig)
    start = time.monotonic()
    rig.reader.eject()
    assert time.monotonic() - start >= rig.emulator.motor_s


def test_card_pushed_back_from_the_gate_is_read_again(rig):
    insert_card(rig)
    rig.reader.eject()
    rig.emulator.take()
    # Swapped for another card within one poll interval: it must be read, not assumed the same.
    other = ";5500000000000004=30122011000000?"
    assert rig.emulator.insert(None, other)
    # A CardTaken may or may not come first, depending on whether a poll saw the empty slot.
    event = next_event(rig.reader)
    if isinstance(event, CardTaken):
        event = next_event(rig.reader)
    assert isinstance(event, CardInserted) and event.card is not None and event.card.last4 == "0004"


def test_capture_retains_the_card(rig):
    insert_card(rig)
    rig.reader.capture()
    assert rig.emulator.card_state == "captured"
    assert rig.emulator.captured_count == 1
    status = rig.reader.status()
    assert not status.card_present and not status.card_at_gate
    assert rig.reader.poll(timeout_s=0.1) is None  # a captured card is not "taken"


def test_capture_pulls_back_a_card_left_at_the_gate(rig):
    insert_card(rig)
    rig.reader.eject()
    rig.reader.capture()
    assert rig.emulator.captured_count == 1
    with pytest.raises(EmulatorError):
        rig.emulator.take()


def test_eject_or_capture_without_a_card_is_refused(rig):
    for action in (rig.reader.eject, rig.reader.capture):
        with pytest.raises(sankyo.NegativeResponseError) as info:
            action()
        assert isinstance(info.value, ProtocolError)
        assert info.value.code == "02"


def test_mute_gives_card_reader_timeout_in_bounded_time(rig):
    rig.emulator.mute()
    for call in (rig.reader.status, lambda: rig.reader.poll(timeout_s=5.0)):
        start = time.monotonic()
        with pytest.raises(CardReaderTimeout):
            call()
        assert time.monotonic() - start < MUTE_BOUND_S
    rig.emulator.unmute()
    assert rig.reader.status().fault is None  # the link recovers by itself


def test_card_whose_read_timed_out_is_read_on_the_next_poll(rig):
    rig.reader.set_entry_enabled(True)
    assert rig.emulator.insert(TRACK1, TRACK2)
    deadline = time.monotonic() + 2.0
    while rig.emulator.card_state != "inside" and time.monotonic() < deadline:
        time.sleep(0.005)
    rig.emulator.mute(after_commands=1)  # answers the status, then hangs on the track read
    with pytest.raises(CardReaderTimeout):
        rig.reader.poll(timeout_s=1.0)
    rig.emulator.unmute()
    event = next_event(rig.reader)
    assert isinstance(event, CardInserted) and event.card is not None


def test_status_timeout_bounds_the_whole_exchange(rig):
    rig.emulator.mute()
    start = time.monotonic()
    with pytest.raises(CardReaderTimeout):
        rig.reader.status(timeout_s=0.05)
    assert time.monotonic() - start < 0.05 + 0.3


def test_motion_that_never_finishes_is_not_repeated(rig):
    insert_card(rig)
    # The reader ACKs the eject, then goes silent: repeating a motion blindly could move the card twice.
    rig.emulator.motor_s = 5.0
    start = time.monotonic()
    with pytest.raises(CardReaderTimeout, match="not repeated"):
        rig.reader.eject(timeout_s=0.3)
    assert time.monotonic() - start < 1.0
    assert list(rig.emulator.commands).count("C30") == 1


def test_garbage_on_the_line_is_skipped(rig):
    rig.emulator.inject_garbage(b"\x00\xff\x13noise" + bytes((sankyo.STX, 0x03, 0xE8)) + b"\x11\x22")
    assert not rig.reader.status().card_present
    insert_card(rig)
    rig.emulator.inject_garbage(bytes((sankyo.STX, 0x00, 0x05)) + b"P10")
    assert rig.reader.status().card_present


def test_corrupted_response_is_nacked_and_repeated(rig):
    insert_card(rig)
    sent_before = list(rig.emulator.commands).count("C10")
    rig.emulator.corrupt_next_responses(1)
    assert rig.reader.status().card_present
    # The reader repeated its answer after our NAK; the command itself was sent once.
    assert list(rig.emulator.commands).count("C10") == sent_before + 1


def test_jam_is_reported_as_a_fault_once(rig):
    insert_card(rig)
    rig.emulator.jam()
    event = next_event(rig.reader)
    assert isinstance(event, ReaderFault) and event.reason == "jam"
    assert rig.reader.poll(timeout_s=0.1) is None  # not repeated while the jam lasts
    status = rig.reader.status()
    assert status.fault_reason == "jam" and "jam" in (status.fault or "")
    with pytest.raises(sankyo.NegativeResponseError):
        rig.reader.eject()
    rig.emulator.clear_jam()
    assert rig.reader.status().card_present
    rig.reader.eject()


def test_unplug_gives_card_reader_error_promptly(rig):
    rig.emulator.unplug()
    start = time.monotonic()
    with pytest.raises(CardReaderError) as info:
        rig.reader.status()
    assert not isinstance(info.value, CardReaderTimeout)
    assert time.monotonic() - start < 1.0
    with pytest.raises(CardReaderError):
        rig.reader.poll(timeout_s=0.1)
    rig.reader.close()  # still closes cleanly
    rig.reader.close()


def test_close_shuts_entry_and_is_idempotent(rig):
    rig.reader.set_entry_enabled(True)
    rig.reader.close()
    assert not rig.emulator.entry_enabled
    rig.reader.close()
    with pytest.raises(CardReaderError):
        rig.reader.status()


def test_poll_interval_shorter_than_a_status_round_trip():
    # Regression: the pause after a slow status exchange went negative and time.sleep raised.
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        time.sleep(seconds)

    with CardReaderEmulator(latency_s=0.01, motor_s=0.01) as emulator:
        reader = SerialCardReader(
            emulator.port, response_timeout_s=0.5, retries=0, poll_interval_s=0.0001, sleep=sleep
        )
        with reader:
            assert reader.poll(timeout_s=0.1) is None
    assert pauses and min(pauses) >= 0.0


# -- swipe reader (ascii) --------------------------------------------------------------------------


def test_swipe_reports_card(swipe_rig, caplog):
    caplog.set_level(logging.DEBUG)
    reader, emulator = swipe_rig.reader, swipe_rig.emulator
    assert not reader.holds_card
    reader.set_entry_enabled(True)
    assert emulator.insert(TRACK1, TRACK2)
    event = next_event(reader)
    assert isinstance(event, CardInserted) and event.card is not None
    assert event.card.masked_pan == "411111******1111" and event.card.tracks == {1, 2}
    assert emulator.card_state == "none"  # the customer kept the card
    assert PAN not in caplog.text


def test_swipe_while_disabled_is_ignored(swipe_rig):
    swipe_rig.emulator.insert(TRACK1, TRACK2)
    assert swipe_rig.reader.poll(timeout_s=0.2) is None


def test_bad_swipe_and_noise(swipe_rig):
    reader, emulator = swipe_rig.reader, swipe_rig.emulator
    reader.set_entry_enabled(True)
    emulator.inject_garbage(b"\x00\x07 line noise\r\n")
    emulator.insert(None, ";4111111111111112=30122011000000?")
    event = next_event(reader)
    assert isinstance(event, CardInserted) and event.card is None and event.error_reason == "luhn"
    emulator.inject_garbage(b"%B41111111")  # swipe cut off: no line end ever comes
    event = next_event(reader)
    assert isinstance(event, CardInserted) and event.error_reason == "bad_sentinel"
    emulator.insert(None, TRACK2)
    event = next_event(reader)
    assert isinstance(event, CardInserted) and event.card is not None and event.card.tracks == {2}


def test_swipe_reader_cannot_eject_or_capture(swipe_rig):
    swipe_rig.reader.eject()  # no-op: the card never left the customer's hand
    with pytest.raises(UnsupportedOperationError):
        swipe_rig.reader.capture()
    status = swipe_rig.reader.status()
    assert not status.card_present and not status.card_at_gate


def test_swipe_reader_unplug(swipe_rig):
    swipe_rig.emulator.unplug()
    with pytest.raises(CardReaderError):
        swipe_rig.reader.poll(timeout_s=0.2)


# -- loop:// -----------------------------------------------------------------------------------------


def canned(*texts: bytes) -> bytes:
    return b"".join(bytes((sankyo.ACK,)) + sankyo.encode_frame(t) for t in texts)


def loop_reader(preload: bytes, **kwargs) -> SerialCardReader:
    def factory(url: str, **port_kwargs):
        port = serial.serial_for_url(url, **port_kwargs)
        port.write(preload)
        return port

    return SerialCardReader("loop://", serial_factory=factory, today=lambda: TODAY, **{**FAST, **kwargs})


def test_loop_client_matches_answers_and_ignores_its_own_echo():
    # Answers queued ahead of the echoed commands: the client must skip the echoes ('C' frames)
    # and pick each answer by its command code.
    reader = loop_reader(canned(b"P0000", b"P:100", b"P1000", b"P1002"))
    with reader:
        assert reader.status().card_present


def test_loop_echo_only_line_times_out_in_bounded_time():
    reader = loop_reader(b"")
    start = time.monotonic()
    with pytest.raises(CardReaderTimeout):
        reader.open()
    assert time.monotonic() - start < MUTE_BOUND_S
    assert not reader.is_open


def test_loop_eot_means_refused():
    reader = loop_reader(bytes((sankyo.EOT,)))
    with pytest.raises(sankyo.CommandRefusedError):
        reader.open()


def test_loop_nak_then_answer_is_retried():
    # The first initialise is NAKed; the repeat is answered. Then: disable, status, status.
    reader = loop_reader(bytes((sankyo.NAK,)) + canned(b"P0000", b"P:100", b"P1000", b"P1001"))
    with reader:
        assert reader.status().card_at_gate


def test_loop_unopenable_port_is_a_card_reader_error():
    reader = SerialCardReader("/nonexistent/ttyUSB9", **FAST)  # type: ignore[arg-type]
    with pytest.raises(CardReaderError, match="cannot open"):
        reader.open()


# -- construction ---------------------------------------------------------------------------------


def test_registry_builds_both_backends_without_touching_hardware():
    settings = settings_from_mapping({"card_reader": {"backend": "serial", "port": "/nonexistent/tty"}})
    reader = registry.build("card_reader", settings)
    assert isinstance(reader, SerialCardReader) and not reader.is_open
    sim_settings = settings_from_mapping({"card_reader": {"backend": "sim", "response_timeout_s": 0.5}})
    sim = registry.build("card_reader", sim_settings)
    assert isinstance(sim, SimCardReader) and not sim.emulator.running
    with sim:
        assert sim.emulator.running and not sim.status().card_present
    assert not sim.emulator.running


def test_importing_the_card_package_touches_no_serial_code():
    code = "import sys, atmguard.hardware.card; assert 'serial' not in sys.modules, 'serial imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
