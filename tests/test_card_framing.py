from __future__ import annotations

import time

import pytest
import serial
from hypothesis import given, settings
from hypothesis import strategies as st

from atmguard.errors import ProtocolError
from atmguard.hardware.card import sankyo
from atmguard.hardware.card.sankyo import (
    ACK,
    EOT,
    NAK,
    STX,
    Command,
    Control,
    Frame,
    FrameDecoder,
    FramingError,
    Response,
    crc16,
    encode_frame,
)


def feed_in_chunks(decoder: FrameDecoder, data: bytes, cuts: list[int]) -> list:
    events = []
    points = [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    start = 0
    for point in points:
        events += decoder.feed(data[start:point])
        start = point
    return events


def frames(events) -> list[bytes]:
    return [e.text for e in events if isinstance(e, Frame)]


# -- known values ---------------------------------------------------------------------------------


def test_crc_is_xmodem_variant_over_the_whole_frame():
    assert crc16(b"123456789") == 0x31C3  # CRC-16/XMODEM check value
    # The ICT3Q8 example frame (initialise with parameter block) from the public driver.
    frame = encode_frame(b"C0032400")
    assert frame[:3] == bytes((0xF2, 0x00, 0x08))
    assert frame[-2:] == bytes((0xFA, 0xCE))
    assert len(frame) == 3 + 8 + 2  # no ETX


def test_command_and_response_texts():
    assert sankyo.STATUS.text() == b"C10"
    assert sankyo.EJECT.text() == b"C30" and sankyo.CAPTURE.text() == b"C31"
    assert Command.parse(b"C61") == sankyo.READ_TRACK1
    response = Response.parse(b"P6102;123?")
    assert response.positive and response.status == "02" and response.data == b";123?"
    assert response.answers(sankyo.READ_TRACK1) and not response.answers(sankyo.READ_TRACK2)
    assert "123" not in repr(response)  # track data stays out of repr
    negative = Response.parse(b"N1010")
    assert not negative.positive and negative.status == "10"
    assert Response(True, "1", "0", "01").text() == b"P1001"
    for bad in (b"", b"P10", b"X1000", b"C10"):
        with pytest.raises(ProtocolError):
            Response.parse(bad)
    with pytest.raises(ProtocolError):
        Command.parse(b"P1000")


def test_negative_response_error_describes_the_code():
    err = sankyo.NegativeResponseError("C30", "10")
    assert isinstance(err, ProtocolError)
    assert err.reason == "jam" and "card jam" in str(err)
    assert sankyo.describe_error("7F") == ("error_7F", "reader error 7F")


def test_encode_rejects_empty_and_oversized_text():
    with pytest.raises(ValueError):
        encode_frame(b"")
    with pytest.raises(ValueError):
        encode_frame(b"x" * (sankyo.MAX_TEXT_LEN + 1))
    assert len(encode_frame(b"x" * sankyo.MAX_TEXT_LEN)) == sankyo.MAX_FRAME_LEN


# -- decoder behaviour -----------------------------------------------------------------------------


def test_control_bytes_and_a_frame_split_byte_by_byte():
    decoder = FrameDecoder()
    data = bytes((ACK,)) + encode_frame(b"P1000") + bytes((NAK, EOT))
    events = []
    for b in data:
        events += decoder.feed(bytes((b,)))
    assert events == [Control(ACK), Frame(b"P1000"), Control(NAK), Control(EOT)]
    assert decoder.buffered == 0


def test_bad_crc_is_reported_and_the_next_frame_still_decodes():
    decoder = FrameDecoder()
    bad = bytearray(encode_frame(b"P1000"))
    bad[-1] ^= 0x01
    events = decoder.feed(bytes(bad) + encode_frame(b"P1001"))
    errors = [e for e in events if isinstance(e, FramingError)]
    assert errors and errors[0].reason == "bad_crc"
    assert isinstance(errors[0], ProtocolError)
    assert frames(events) == [b"P1001"]


def test_impossible_length_is_rejected():
    decoder = FrameDecoder(max_text_len=16)
    events = decoder.feed(bytes((STX, 0x00, 0x00)) + bytes((STX, 0x00, 0x20)) + encode_frame(b"P1000"))
    reasons = [e.reason for e in events if isinstance(e, FramingError)]
    assert reasons == ["bad_length", "bad_length"]
    assert frames(events) == [b"P1000"]


def test_false_stx_with_huge_length_does_not_swallow_a_real_frame():
    decoder = FrameDecoder()
    # A garbage STX claiming 1000 bytes, then a real answer: the answer must come out now,
    # not after 1000 more bytes have arrived.
    events = decoder.feed(bytes((0x11, STX, 0x03, 0xE8, 0x41)))
    assert events == []
    events = decoder.feed(encode_frame(b"P1002"))
    assert frames(events) == [b"P1002"]
    assert decoder.buffered == 0


def test_frame_text_may_contain_stx_and_control_bytes():
    text = bytes((ord("P"), STX, ACK, NAK, EOT, 0x00, 0xFF))
    assert frames(FrameDecoder().feed(encode_frame(text))) == [text]


# -- properties ----------------------------------------------------------------------------------

texts = st.binary(min_size=1, max_size=300)


@settings(max_examples=200, deadline=None)
@given(st.lists(texts, min_size=1, max_size=5), st.lists(st.integers(0, 2000), max_size=8))
def test_roundtrip_any_chunking(payloads, cuts):
    stream = b"".join(encode_frame(p) for p in payloads)
    decoder = FrameDecoder()
    events = feed_in_chunks(decoder, stream, cuts)
    assert frames(events) == payloads
    assert not [e for e in events if isinstance(e, FramingError)]
    assert decoder.buffered == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.lists(st.integers(0, 4000), max_size=10), st.integers(1, 1019))
def test_random_bytes_never_crash_hang_or_grow(data, cuts, max_text_len):
    decoder = FrameDecoder(max_text_len=max_text_len)
    start = time.monotonic()
    events = feed_in_chunks(decoder, data, cuts)
    assert time.monotonic() - start < 2.0
    assert all(isinstance(e, Frame | Control | FramingError) for e in events)
    assert decoder.buffered <= decoder.max_frame_len


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=200),
    st.binary(min_size=1, max_size=100),
    st.binary(max_size=50),
    st.lists(st.integers(0, 400), max_size=6),
)
def test_garbage_before_a_frame_resyncs(garbage, text, trailing, cuts):
    decoder = FrameDecoder()
    # Garbage biased towards the worst case: bytes that look like the start of a frame.
    stream = garbage + bytes((STX,)) + garbage[:2] + encode_frame(text) + encode_frame(b"P1000") + trailing
    events = feed_in_chunks(decoder, stream, cuts)
    decoded = frames(events)
    assert text in decoded
    assert decoded.index(text) + 1 < len(decoded) and decoded[decoded.index(text) + 1] == b"P1000"


# -- over a pyserial loop:// port --------------------------------------------------------------------


def test_frames_survive_a_loop_port_in_pieces():
    port = serial.serial_for_url("loop://", baudrate=38400, timeout=0.05)
    try:
        payloads = [b"C10", b"P6102;4111111111111111=3012201?", b"N3010"]
        stream = b"".join(encode_frame(p) for p in payloads)
        decoder = FrameDecoder()
        events = []
        for i in range(0, len(stream), 5):
            port.write(stream[i : i + 5])
            events += decoder.feed(port.read(port.in_waiting or 1))
        while port.in_waiting:
            events += decoder.feed(port.read(port.in_waiting))
        assert frames(events) == payloads
    finally:
        port.close()
