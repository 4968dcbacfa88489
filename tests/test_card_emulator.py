"""The emulator as a device: what a host sees on the wire, byte by byte."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import serial

from atmguard.hardware.card import sankyo
from atmguard.hardware.card.emulator import CardReaderEmulator, EmulatorError
from atmguard.hardware.card.sankyo import ACK, NAK, Control, Frame, FrameDecoder, Response, encode_frame


class Host:
    """A bare host on the pty: raw bytes out, decoded events in."""

    def __init__(self, port: str) -> None:
        self.port = serial.serial_for_url(port, baudrate=38400, timeout=0.01)
        self.decoder = FrameDecoder()

    def send(self, data: bytes) -> None:
        self.port.write(data)

    def events(self, *, until_s: float, stop_after: int | None = None) -> list:
        out: list = []
        deadline = time.monotonic() + until_s
        while time.monotonic() < deadline and (stop_after is None or len(out) < stop_after):
            out += self.decoder.feed(self.port.read(self.port.in_waiting or 1))
        return out

    def command(self, text: bytes, until_s: float = 1.0) -> tuple[list, float]:
        start = time.monotonic()
        self.send(encode_frame(text))
        events = self.events(until_s=until_s, stop_after=2)
        elapsed = time.monotonic() - start
        if any(isinstance(e, Frame) for e in events):
            self.send(bytes((ACK,)))
        return events, elapsed


@pytest.fixture
def emu() -> Iterator[CardReaderEmulator]:
    e = CardReaderEmulator(latency_s=0.02, motor_s=0.1)
    e.start()
    yield e
    e.stop()


@pytest.fixture
def host(emu) -> Iterator[Host]:
    h = Host(emu.port)
    yield h
    h.port.close()


def response_of(events) -> Response:
    frames = [e for e in events if isinstance(e, Frame)]
    assert frames, events
    return Response.parse(frames[-1].text)


def test_acks_at_once_and_answers_after_the_latency(emu, host):
    events, elapsed = host.command(b"C00")
    assert events[0] == Control(ACK)
    assert response_of(events).positive
    assert elapsed >= emu.latency_s


def test_commands_before_initialise_answer_b0(host):
    events, _ = host.command(b"C10")
    response = response_of(events)
    assert not response.positive and response.status == "B0"


def test_bad_crc_from_host_is_nacked(host):
    frame = bytearray(encode_frame(b"C10"))
    frame[-1] ^= 0xFF
    host.send(bytes(frame))
    assert host.events(until_s=0.2, stop_after=1) == [Control(NAK)]


def test_unknown_command_and_bad_parameter(host):
    host.command(b"C00")
    assert response_of(host.command(b"CZ0")[0]).status == "00"
    assert response_of(host.command(b"C39")[0]).status == "01"


def test_host_nak_makes_the_reader_repeat_its_answer(host):
    host.send(encode_frame(b"C00"))
    first = host.events(until_s=1.0, stop_after=2)
    host.send(bytes((NAK,)))
    repeat = host.events(until_s=1.0, stop_after=1)
    assert [e.text for e in repeat if isinstance(e, Frame)] == [e.text for e in first if isinstance(e, Frame)]


def test_eject_is_answered_when_the_motor_stops(emu, host):
    host.command(b"C00")
    host.command(b"C:0")
    assert emu.insert(";4111111111111111=3012201?", None)
    assert emu.card_state == "entering"
    time.sleep(emu.motor_s + 0.05)
    assert emu.card_state == "inside"
    events, elapsed = host.command(b"C30")
    assert response_of(events).status == sankyo.POS_AT_GATE
    assert elapsed >= emu.latency_s + emu.motor_s
    assert emu.card_state == "gate"
    emu.take()
    assert emu.card_state == "none"
    with pytest.raises(EmulatorError):
        emu.take()


def test_track_reads(emu, host):
    host.command(b"C00")
    host.command(b"C:0")
    emu.insert(None, ";4111111111111111=3012201?")
    time.sleep(emu.motor_s + 0.05)
    track2 = response_of(host.command(b"C62")[0])
    assert track2.positive and track2.data == b";4111111111111111=3012201?"
    assert response_of(host.command(b"C61")[0]).status == "23"  # no data on track 1


def test_responses_leave_at_line_speed_in_pieces():
    emu = CardReaderEmulator(latency_s=0.0, motor_s=0.0, baudrate=1200, chunk_bytes=4)
    with emu:
        host = Host(emu.port)
        try:
            host.send(encode_frame(b"C00"))
            start = time.monotonic()
            events = host.events(until_s=1.0, stop_after=2)
            # ACK + 10-byte frame = 11 bytes at 1200 baud (10 bits each): about 92 ms on the wire.
            assert time.monotonic() - start >= 0.08
            assert response_of(events).positive
        finally:
            host.port.close()


def test_mute_silences_the_reader(emu, host):
    emu.mute()
    host.send(encode_frame(b"C00"))
    assert host.events(until_s=0.2) == []
    emu.unmute()
    assert response_of(host.command(b"C00")[0]).positive


def test_insert_rules(emu, host):
    assert not emu.insert(";4111111111111111=3012201?", None)  # entry disabled
    host.command(b"C00")
    host.command(b"C:0")
    assert emu.insert(";4111111111111111=3012201?", None)
    assert not emu.insert(";5500000000000004=3012201?", None)  # slot occupied
    with pytest.raises(EmulatorError):
        emu.take()  # not at the gate


def test_stop_is_idempotent_and_unplug_closes_the_pty():
    emu = CardReaderEmulator()
    emu.start()
    host = Host(emu.port)
    emu.unplug()
    with pytest.raises(serial.SerialException):
        host.port.write(b"x")
        host.port.read(1)
    with pytest.raises(EmulatorError):
        emu.insert(None, None)
    emu.stop()
    emu.stop()
    assert not emu.running
    host.port.close()
