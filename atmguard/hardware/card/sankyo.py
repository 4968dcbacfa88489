"""Framing and messages of Sankyo ICT3K5 / ICT3Q8-style motorized card readers.

Frame (both directions)::

    STX 0xF2 | LEN (2 bytes, big-endian, = len(TEXT)) | TEXT | CRC (2 bytes, big-endian)

CRC-16/CCITT in its *XMODEM* form: polynomial 0x1021, initial value 0x0000, not reflected, no final
XOR, computed over STX, LEN and TEXT (``binascii.crc_hqx(frame, 0)``; check value of ``b"123456789"``
is 0x31C3). There is **no ETX**: the frame ends after LEN text bytes and the CRC. A frame is at most
1024 bytes (TEXT <= 1019).

Link control, single bytes outside frames: the receiver of a frame answers ACK 0x06 (CRC good) or
NAK 0x15 (CRC bad: the sender repeats the frame). The host sends a command, waits for ACK, then waits
for the response frame and ACKs it. EOT 0x04 received instead of ACK is taken as "command refused"
(:class:`CommandRefusedError`, not retried); a NAK or a missing ACK makes the client resend.

Text::

    command   'C' CM PM [data]
    positive  'P' CM PM ST1 ST0 [data]      ST1 ST0 = card position after the command
    negative  'N' CM PM E1 E0 [data]        E1 E0   = error code (two ASCII hex digits)

Commands implemented (client and emulator)::

    CM PM   meaning                              positive data
    0  0    initialise; card inside -> gate      -
    1  0    status (card position)               -
    :  0    entry enable (accept any card)       -
    :  1    entry disable                        -
    3  0    eject: carry the card to the gate    -      answered when the motion ends
    3  1    capture: carry the card out the rear -      answered when the motion ends
    6  1    read track 1                         track 1 text (sentinels included)
    6  2    read track 2                         track 2 text (sentinels included)

    ST1 ST0: "00" no card, "01" card at the gate, "02" card inside (transport/read position)

Error codes (E1 E0) known here: see :data:`ERROR_CODES`.

Checked against two public host implementations (no Sankyo manual text was available here): the
Smartware ICT3K5 Ruby driver (frame layout, CRC with init 0x0000 over the whole frame, ACK/NAK
handling, commands 0x/10/:0/:1/30/31/6n, status "00/01/02", error table) and dd5xl/Sankyo_Reader
for the ICT3Q8 (same layout and CRC - its C example computes CRC-16 poly 0x1021 init 0 from STX
on, TEXT <= 1019 - plus EOT/DLE as link bytes, C30 = eject to the customer, C31 = pull in to the
rear). Both open the port 8E1; the ICT3K5 runs at 115200 with RTS/CTS. Not verified: the init
parameter block real firmware expects after ``C00`` (sent empty here unless configured), and
whether the reader returns track text with sentinels (the emulator does; the parser needs them).
"""

from __future__ import annotations

import binascii
import logging
from dataclasses import dataclass, field
from typing import Final

from atmguard.errors import ProtocolError

logger = logging.getLogger(__name__)

STX: Final = 0xF2
ACK: Final = 0x06
NAK: Final = 0x15
EOT: Final = 0x04
HEADER_LEN: Final = 3
CRC_LEN: Final = 2
MAX_FRAME_LEN: Final = 1024
MAX_TEXT_LEN: Final = MAX_FRAME_LEN - HEADER_LEN - CRC_LEN
_CONTROL_NAMES = {ACK: "ACK", NAK: "NAK", EOT: "EOT"}

# Card position codes (ST1 ST0) in positive responses.
POS_NO_CARD: Final = "00"
POS_AT_GATE: Final = "01"
POS_INSIDE: Final = "02"

# (reason, description) per error code; reason is what a ReaderFault carries.
ERROR_CODES: Final[dict[str, tuple[str, str]]] = {
    "00": ("protocol", "command code not recognised"),
    "01": ("protocol", "parameter not correct"),
    "02": ("not_possible", "command cannot be executed now"),
    "03": ("protocol", "function not implemented"),
    "04": ("protocol", "command data error"),
    "10": ("jam", "card jam"),
    "11": ("shutter", "shutter error"),
    "13": ("card_error", "long card"),
    "14": ("card_error", "short card"),
    "16": ("card_error", "card position moved"),
    "17": ("jam", "jam at retrieve"),
    "18": ("card_error", "two cards"),
    "20": ("read_error", "parity error"),
    "21": ("read_error", "sentinel error"),
    "23": ("read_error", "no data on track"),
    "24": ("read_error", "no magnetic stripe"),
    "30": ("power", "power loss"),
    "40": ("card_error", "card pulled out during transport"),
    "50": ("capture_bin_full", "capture counter overflow"),
    "B0": ("not_initialised", "initialise command not received"),
}


def describe_error(code: str) -> tuple[str, str]:
    """(reason, description) for an error code; unknown codes map to ``error_<code>``."""
    return ERROR_CODES.get(code, (f"error_{code}", f"reader error {code}"))


def crc16(data: bytes | bytearray) -> int:
    """CRC-16/XMODEM (poly 0x1021, init 0) as used by the reader."""
    return binascii.crc_hqx(data, 0)


def encode_frame(text: bytes | bytearray) -> bytes:
    """STX + LEN + TEXT + CRC."""
    if not 1 <= len(text) <= MAX_TEXT_LEN:
        raise ValueError(f"frame text must be 1..{MAX_TEXT_LEN} bytes, got {len(text)}")
    head = bytes((STX, len(text) >> 8, len(text) & 0xFF)) + bytes(text)
    return head + crc16(head).to_bytes(2, "big")


@dataclass(frozen=True)
class Frame:
    """A frame whose CRC checked out. ``text`` may hold track data: it is left out of repr()."""

    text: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"Frame({self.text[:3]!r}..., {len(self.text)} bytes)"


@dataclass(frozen=True)
class Control:
    """A link-control byte (ACK, NAK, EOT) seen outside a frame."""

    byte: int

    def __repr__(self) -> str:
        return f"Control({_CONTROL_NAMES.get(self.byte, hex(self.byte))})"


class FramingError(ProtocolError):
    """A frame was rejected (``reason``: ``bad_length`` or ``bad_crc``); the decoder moved past it."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class NegativeResponseError(ProtocolError):
    """The reader answered a command with 'N' and an error code."""

    def __init__(self, command: str, code: str) -> None:
        self.command = command
        self.code = code
        self.reason, self.description = describe_error(code)
        super().__init__(f"card reader refused command {command}: error {code} ({self.description})")


class CommandRefusedError(ProtocolError):
    """The reader answered EOT instead of ACK."""


DecoderEvent = Frame | Control | FramingError


class FrameDecoder:
    """Incremental decoder: bytes in, frames / control bytes / framing errors out.

    Resynchronises on garbage: bytes that are neither a control byte nor the start of a frame
    are skipped; a rejected frame (impossible length, bad CRC) costs one byte - scanning resumes
    right after its STX so a real frame hidden behind a false STX is still found. When a
    candidate frame is incomplete but a complete CRC-valid frame starts later in the buffer, the
    candidate was garbage and is dropped, so a false STX with a large length cannot stall the
    link. The buffer never holds more than one maximum-size frame.
    """

    def __init__(self, *, max_text_len: int = MAX_TEXT_LEN) -> None:
        if not 1 <= max_text_len <= 0xFFFF:
            raise ValueError("max_text_len must be 1..65535")
        self._max_text_len = max_text_len
        self._buf = bytearray()
        self.garbage_bytes = 0
        self.frames = 0
        self.errors = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def max_frame_len(self) -> int:
        return HEADER_LEN + self._max_text_len + CRC_LEN

    def reset(self) -> None:
        self._buf[:] = bytes(len(self._buf))
        self._buf.clear()

    def feed(self, data: bytes | bytearray) -> list[DecoderEvent]:
        """Consume ``data``; return everything it completed, in order."""
        events: list[DecoderEvent] = []
        # Feed in slices so the buffer stays bounded even for one huge chunk.
        step = self.max_frame_len
        for offset in range(0, len(data), step):
            self._buf += data[offset : offset + step]
            self._drain(events)
        return events

    def _drain(self, events: list[DecoderEvent]) -> None:
        buf = self._buf
        while buf:
            first = buf[0]
            if first in _CONTROL_NAMES:
                events.append(Control(first))
                del buf[0]
                continue
            if first != STX:
                stx = buf.find(STX)
                skip = len(buf) if stx < 0 else stx
                # Control bytes inside skipped garbage still count as control bytes.
                ctrl = next((i for i in range(skip) if buf[i] in _CONTROL_NAMES), None)
                if ctrl is not None:
                    skip = ctrl
                self.garbage_bytes += skip
                del buf[:skip]
                continue
            if len(buf) < HEADER_LEN:
                return
            length = (buf[1] << 8) | buf[2]
            if not 1 <= length <= self._max_text_len:
                self._reject(events, "bad_length", f"frame length {length} outside 1..{self._max_text_len}")
                continue
            total = HEADER_LEN + length + CRC_LEN
            if len(buf) < total:
                later = self._later_valid_frame()
                if later is None:
                    return
                self.garbage_bytes += later
                del buf[:later]
                continue
            body = buf[: HEADER_LEN + length]
            if crc16(body) != int.from_bytes(buf[HEADER_LEN + length : total], "big"):
                self._reject(events, "bad_crc", f"frame CRC mismatch ({length} text bytes)")
                continue
            events.append(Frame(bytes(buf[HEADER_LEN : HEADER_LEN + length])))
            self.frames += 1
            del buf[:total]

    def _reject(self, events: list[DecoderEvent], reason: str, message: str) -> None:
        self.errors += 1
        self.garbage_bytes += 1
        del self._buf[0]
        events.append(FramingError(reason, message))

    def _later_valid_frame(self) -> int | None:
        buf = self._buf
        pos = buf.find(STX, 1)
        while pos >= 0:
            if len(buf) - pos >= HEADER_LEN:
                length = (buf[pos + 1] << 8) | buf[pos + 2]
                end = pos + HEADER_LEN + length + CRC_LEN
                if 1 <= length <= self._max_text_len and end <= len(buf):
                    body = buf[pos : pos + HEADER_LEN + length]
                    if crc16(body) == int.from_bytes(buf[end - CRC_LEN : end], "big"):
                        return pos
            pos = buf.find(STX, pos + 1)
        return None


@dataclass(frozen=True)
class Command:
    """``'C' CM PM [data]``."""

    code: str
    param: str
    data: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if len(self.code) != 1 or len(self.param) != 1:
            raise ValueError("command code and parameter are one character each")

    @property
    def name(self) -> str:
        return f"C{self.code}{self.param}"

    def text(self) -> bytes:
        return b"C" + (self.code + self.param).encode("ascii") + self.data

    @classmethod
    def parse(cls, text: bytes) -> Command:
        if len(text) < 3 or text[:1] != b"C":
            raise ProtocolError("not a command text")
        try:
            code, param = text[1:3].decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError("command code is not ASCII") from None
        return cls(code, param, bytes(text[3:]))


@dataclass(frozen=True)
class Response:
    """``'P' CM PM ST1 ST0 [data]`` or ``'N' CM PM E1 E0 [data]``; ``data`` is kept out of repr()."""

    positive: bool
    code: str
    param: str
    status: str
    data: bytes = field(default=b"", repr=False)

    def text(self) -> bytes:
        head = ("P" if self.positive else "N") + self.code + self.param + self.status
        return head.encode("ascii") + self.data

    def answers(self, command: Command) -> bool:
        return (self.code, self.param) == (command.code, command.param)

    @classmethod
    def parse(cls, text: bytes) -> Response:
        if len(text) < 5 or text[:1] not in (b"P", b"N"):
            raise ProtocolError(f"malformed response ({len(text)} bytes)")
        try:
            head = text[1:5].decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError("response header is not ASCII") from None
        return cls(text[:1] == b"P", head[0], head[1], head[2:4], bytes(text[5:]))


INITIALISE: Final = Command("0", "0")
STATUS: Final = Command("1", "0")
ENTRY_ENABLE: Final = Command(":", "0")
ENTRY_DISABLE: Final = Command(":", "1")
EJECT: Final = Command("3", "0")
CAPTURE: Final = Command("3", "1")
READ_TRACK1: Final = Command("6", "1")
READ_TRACK2: Final = Command("6", "2")
MOTION_COMMANDS: Final = frozenset({(INITIALISE.code, INITIALISE.param), ("3", "0"), ("3", "1")})
