"""ISO/IEC 7813 magnetic-stripe track 1 (format B) and track 2 parsing into a :class:`CardRead`.

Layouts::

    track 1  %B<PAN 12-19>^<NAME 2-26>^<YYMM><SVC 3><discretionary>?[LRC]   at most 79 characters
    track 2  ;<PAN 12-19>=<YYMM><SVC 3><discretionary>?[LRC]               at most 40 characters

(the limits count the LRC even when the reader has stripped it).

Two representations reach this module, and they differ in what can be checked:

* **ASCII text** (what readers hand to the host: the swipe reader's text line, the Sankyo
  read-track response). Character parity cannot be represented, and the LRC character after
  the end sentinel is usually stripped by the reader (it already verified it). ``lrc`` says
  what to expect: ``"absent"`` (nothing may follow ``?``), ``"optional"`` (one character after
  ``?`` is taken as the LRC and verified), ``"required"``.
* **Raw stripe codes** (:func:`decode_raw`): track 1 characters are 6 data bits + an odd parity
  bit (7 bits), track 2 characters 4 data bits + odd parity (5 bits). Every character's parity
  and the LRC are verified, then the ASCII text is parsed as above with the LRC removed.

The LRC covers the start sentinel through the end sentinel: its data bits are the XOR of the
characters' data bits (its own parity bit is then set for odd parity like any character).

Nothing here logs or puts track data or a full PAN into a message; :class:`CardRead` keeps the
PAN in a ``bytearray`` that :meth:`CardRead.wipe` overwrites, and shows only the masked PAN.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from datetime import date
from typing import Literal, NoReturn

from atmguard.errors import CardDataError

logger = logging.getLogger(__name__)

LrcMode = Literal["absent", "optional", "required"]

TRACK1_MAX_CHARS = 79
TRACK2_MAX_CHARS = 40
PAN_MIN_DIGITS = 12
PAN_MAX_DIGITS = 19
_NAME_MAX_CHARS = 26

# (first character code, data bits) of each track's character set.
_TRACK_CHARSET = {1: (0x20, 6), 2: (0x30, 4)}
_SENTINELS = {1: (ord("%"), ord("?")), 2: (ord(";"), ord("?"))}
_DIGITS = frozenset(b"0123456789")

# Reason codes carried by CardDataError.reason.
REASONS = (
    "no_track",
    "bad_sentinel",
    "bad_char",
    "bad_parity",
    "bad_lrc",
    "too_long",
    "bad_format",
    "bad_pan",
    "luhn",
    "bad_expiry",
    "expired",
    "bad_service_code",
    "track_mismatch",
)


def _fail(reason: str, message: str) -> NoReturn:
    raise CardDataError(reason, message)


def _as_bytes(data: bytes | bytearray | str) -> bytes | bytearray:
    if isinstance(data, str):
        try:
            return data.encode("ascii")
        except UnicodeEncodeError:
            _fail("bad_char", "track data contains non-ASCII characters")
    return data


def luhn_valid(digits: bytes | bytearray | str) -> bool:
    """True when the ASCII digit string passes the Luhn (mod 10) check."""
    raw = _as_bytes(digits)
    if not raw or any(b not in _DIGITS for b in raw):
        return False
    total = 0
    for i, b in enumerate(reversed(raw)):
        d = b - 0x30
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def lrc_char(track: Literal[1, 2], text: bytes | bytearray | str) -> str:
    """The ASCII form of the LRC of ``text`` (start sentinel .. end sentinel inclusive)."""
    base, bits = _TRACK_CHARSET[track]
    mask = (1 << bits) - 1
    lrc = 0
    for b in _as_bytes(text):
        lrc ^= (b - base) & mask
    return chr(lrc + base)


def _odd_parity_bit(value: int, bits: int) -> int:
    return 0 if bin(value & ((1 << bits) - 1)).count("1") % 2 else 1


def encode_raw(track: Literal[1, 2], text: bytes | bytearray | str) -> bytes:
    """Stripe codes for ``text`` (sentinels included) with odd parity, followed by the LRC."""
    base, bits = _TRACK_CHARSET[track]
    raw = _as_bytes(text)
    codes = bytearray()
    for b in raw:
        value = b - base
        if not 0 <= value < (1 << bits):
            _fail("bad_char", f"track {track}: character outside the track's character set")
        codes.append(value | _odd_parity_bit(value, bits) << bits)
    lrc = ord(lrc_char(track, raw)) - base
    codes.append(lrc | _odd_parity_bit(lrc, bits) << bits)
    return bytes(codes)


def decode_raw(track: Literal[1, 2], codes: bytes | bytearray) -> bytearray:
    """Check parity of every stripe code and the trailing LRC; return the ASCII text without the LRC."""
    base, bits = _TRACK_CHARSET[track]
    if len(codes) < 2:
        _fail("bad_sentinel", f"track {track}: raw data too short")
    text = bytearray()
    for code in codes:
        if code >> (bits + 1):
            _fail("bad_char", f"track {track}: raw code wider than {bits + 1} bits")
        value = code & ((1 << bits) - 1)
        if (code >> bits) != _odd_parity_bit(value, bits):
            _fail("bad_parity", f"track {track}: character parity error")
        text.append(value + base)
    end = text.find(_SENTINELS[track][1])
    if end < 0 or end != len(text) - 2:
        _fail("bad_sentinel", f"track {track}: end sentinel not followed by exactly one LRC character")
    if lrc_char(track, text[: end + 1]) != chr(text[-1]):
        _fail("bad_lrc", f"track {track}: LRC mismatch")
    del text[-1]
    return text


def _split_sentinels(track: Literal[1, 2], raw: bytes | bytearray, lrc: LrcMode) -> bytes | bytearray:
    """Check sentinels, length, character set and LRC; return the text between the sentinels."""
    start, end_sentinel = _SENTINELS[track]
    limit = TRACK1_MAX_CHARS if track == 1 else TRACK2_MAX_CHARS
    if len(raw) > limit:
        _fail("too_long", f"track {track}: {len(raw)} characters exceed the {limit} allowed")
    if not raw or raw[0] != start:
        _fail("bad_sentinel", f"track {track}: missing start sentinel")
    end = raw.find(end_sentinel, 1)
    if end < 0:
        _fail("bad_sentinel", f"track {track}: missing end sentinel")
    tail = raw[end + 1 :]
    if not tail and len(raw) > limit - 1:
        # The limit counts the LRC, stripped or not.
        _fail("too_long", f"track {track}: {len(raw)} characters plus LRC exceed the {limit} allowed")
    if len(tail) > 1 or (tail and lrc == "absent"):
        _fail("bad_sentinel", f"track {track}: unexpected data after the end sentinel")
    if not tail and lrc == "required":
        _fail("bad_lrc", f"track {track}: LRC missing")
    base, bits = _TRACK_CHARSET[track]
    for b in raw:
        if not base <= b < base + (1 << bits):
            _fail("bad_char", f"track {track}: character outside the track's character set")
    if tail and lrc_char(track, raw[: end + 1]) != chr(tail[0]):
        _fail("bad_lrc", f"track {track}: LRC mismatch")
    body = raw[1:end]
    if start in body:
        _fail("bad_sentinel", f"track {track}: start sentinel inside the data")
    return body


class _Fields:
    """What a single track yields; transient, never leaves this module."""

    __slots__ = ("expiry_month", "expiry_year", "pan", "service_code")

    def __init__(self, pan: bytearray, expiry_year: int, expiry_month: int, service_code: str) -> None:
        self.pan = pan
        self.expiry_year = expiry_year
        self.expiry_month = expiry_month
        self.service_code = service_code

    def wipe(self) -> None:
        self.pan[:] = bytes(len(self.pan))


def _check_pan(track: int, pan: bytes | bytearray) -> bytearray:
    if not PAN_MIN_DIGITS <= len(pan) <= PAN_MAX_DIGITS or any(b not in _DIGITS for b in pan):
        _fail("bad_pan", f"track {track}: PAN must be {PAN_MIN_DIGITS}-{PAN_MAX_DIGITS} digits")
    if not luhn_valid(pan):
        _fail("luhn", f"track {track}: PAN fails the Luhn check")
    return bytearray(pan)


def _expiry_and_service(track: int, rest: bytes | bytearray) -> tuple[int, int, str]:
    if len(rest) < 4 or any(b not in _DIGITS for b in rest[:4]):
        _fail("bad_expiry", f"track {track}: expiry date (YYMM) missing or not numeric")
    year = 2000 + int(rest[0:2])
    month = int(rest[2:4])
    if not 1 <= month <= 12:
        _fail("bad_expiry", f"track {track}: expiry month {month:02d} out of range")
    svc = rest[4:7]
    if len(svc) != 3 or any(b not in _DIGITS for b in svc):
        _fail("bad_service_code", f"track {track}: service code missing or not 3 digits")
    return year, month, svc.decode("ascii")


def _parse_track1(data: bytes | bytearray | str, lrc: LrcMode) -> _Fields:
    body = _split_sentinels(1, _as_bytes(data), lrc)
    if not body or body[0] != ord("B"):
        _fail("bad_format", "track 1: format code is not B")
    parts = body[1:].split(b"^", 2)
    if len(parts) != 3:
        _fail("bad_format", "track 1: field separators missing")
    pan_field, name, rest = parts
    if len(name) > _NAME_MAX_CHARS:
        _fail("bad_format", "track 1: cardholder name too long")
    pan = _check_pan(1, pan_field)
    try:
        year, month, svc = _expiry_and_service(1, rest)
    except CardDataError:
        pan[:] = bytes(len(pan))
        raise
    return _Fields(pan, year, month, svc)


def _parse_track2(data: bytes | bytearray | str, lrc: LrcMode) -> _Fields:
    body = _split_sentinels(2, _as_bytes(data), lrc)
    sep = body.find(b"=")
    if sep < 0:
        _fail("bad_format", "track 2: field separator missing")
    pan = _check_pan(2, body[:sep])
    try:
        year, month, svc = _expiry_and_service(2, body[sep + 1 :])
    except CardDataError:
        pan[:] = bytes(len(pan))
        raise
    return _Fields(pan, year, month, svc)


def _mask(pan: bytes | bytearray) -> str:
    # First 6 / last 4 is the most ever shown; on PANs shorter than 16 digits fewer leading digits
    # are shown so that at least 6 digits always stay hidden.
    n = len(pan)
    lead = max(0, min(6, n - 10))
    return pan[:lead].decode("ascii") + "*" * (n - lead - 4) + pan[n - 4 :].decode("ascii")


class CardRead:
    """A validated card read. Only the masked PAN is ever shown; :meth:`wipe` erases the PAN.

    Attributes are read-only; the object cannot be pickled or copied (the PAN must not leave the
    process by accident).
    """

    __slots__ = (
        "_last4",
        "_masked",
        "_pan",
        "_wiped",
        "expiry_month",
        "expiry_year",
        "service_code",
        "tracks",
    )

    _pan: bytearray
    _masked: str
    _last4: str
    _wiped: bool
    expiry_year: int
    expiry_month: int
    service_code: str
    tracks: frozenset[int]

    def __init__(
        self,
        pan: bytearray,
        *,
        expiry_year: int,
        expiry_month: int,
        service_code: str,
        tracks: frozenset[int],
    ) -> None:
        """Takes ownership of ``pan`` (ASCII digits): the caller must not keep another reference."""
        if not PAN_MIN_DIGITS <= len(pan) <= PAN_MAX_DIGITS or any(b not in _DIGITS for b in pan):
            raise CardDataError("bad_pan", "PAN must be 12-19 digits")
        init = object.__setattr__
        init(self, "_pan", pan)
        init(self, "_masked", _mask(pan))
        init(self, "_last4", pan[-4:].decode("ascii"))
        init(self, "_wiped", False)
        init(self, "expiry_year", expiry_year)
        init(self, "expiry_month", expiry_month)
        init(self, "service_code", service_code)
        init(self, "tracks", frozenset(tracks))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"CardRead is read-only (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"CardRead is read-only (cannot delete {name!r})")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("CardRead cannot be pickled or copied: it holds a PAN")

    @property
    def masked_pan(self) -> str:
        return self._masked

    @property
    def last4(self) -> str:
        return self._last4

    @property
    def pan_length(self) -> int:
        return len(self._masked)

    @property
    def has_track1(self) -> bool:
        return 1 in self.tracks

    @property
    def has_track2(self) -> bool:
        return 2 in self.tracks

    @property
    def chip_card(self) -> bool:
        """Service code says the card has a chip (first digit 2 or 6): a swipe is a fallback."""
        return self.service_code[0] in "26"

    @property
    def wiped(self) -> bool:
        return self._wiped

    def is_expired(self, today: date) -> bool:
        """Valid through the last day of the expiry month."""
        return (today.year, today.month) > (self.expiry_year, self.expiry_month)

    def pan_bytes(self) -> bytearray:
        """A fresh copy of the PAN digits; the caller must wipe it when done."""
        if self._wiped:
            raise CardDataError("wiped", "the PAN of this card read has been wiped")
        return bytearray(self._pan)

    def pan_digest(self, key: bytes) -> str:
        """Keyed fingerprint (HMAC-SHA256, hex) to recognise a card again without keeping its PAN."""
        if self._wiped:
            raise CardDataError("wiped", "the PAN of this card read has been wiped")
        return hmac.new(key, self._pan, hashlib.sha256).hexdigest()

    def wipe(self) -> None:
        """Overwrite the PAN in memory; idempotent."""
        self._pan[:] = bytes(len(self._pan))
        object.__setattr__(self, "_wiped", True)

    def __del__(self) -> None:
        # Best effort: a forgotten CardRead does not leave the PAN in freed memory.
        pan = getattr(self, "_pan", None)
        if pan is not None:
            pan[:] = bytes(len(pan))

    def __repr__(self) -> str:
        tracks = "+".join(str(t) for t in sorted(self.tracks))
        return (
            f"CardRead(pan={self._masked}, expiry={self.expiry_year:04d}-{self.expiry_month:02d},"
            f" service_code={self.service_code}, tracks={tracks}{', wiped' if self._wiped else ''})"
        )

    __str__ = __repr__


def parse_card(
    track1: bytes | bytearray | str | None,
    track2: bytes | bytearray | str | None,
    *,
    today: date,
    lrc: LrcMode = "optional",
) -> CardRead:
    """Validate whichever tracks are present and build a :class:`CardRead`.

    Raises :class:`CardDataError` with ``reason`` one of :data:`REASONS`. With both tracks present
    each must be valid and they must agree on PAN and expiry (``track_mismatch``).
    """
    has1 = bool(track1)
    has2 = bool(track2)
    if not has1 and not has2:
        _fail("no_track", "no track 1 or track 2 data")
    f1 = _parse_track1(track1, lrc) if has1 else None  # type: ignore[arg-type]
    try:
        f2 = _parse_track2(track2, lrc) if has2 else None  # type: ignore[arg-type]
    except CardDataError:
        if f1 is not None:
            f1.wipe()
        raise
    try:
        if f1 is not None and f2 is not None:
            if not hmac.compare_digest(bytes(f1.pan), bytes(f2.pan)):
                _fail("track_mismatch", "track 1 and track 2 carry different PANs")
            if (f1.expiry_year, f1.expiry_month) != (f2.expiry_year, f2.expiry_month):
                _fail("track_mismatch", "track 1 and track 2 carry different expiry dates")
        # Track 2 is what issuers authorise on; prefer its service code when both are present.
        primary = f2 if f2 is not None else f1
        assert primary is not None
        if (today.year, today.month) > (primary.expiry_year, primary.expiry_month):
            _fail(
                "expired",
                f"card expired at the end of {primary.expiry_year:04d}-{primary.expiry_month:02d}",
            )
        tracks = frozenset(t for t, f in ((1, f1), (2, f2)) if f is not None)
        card = CardRead(
            bytearray(primary.pan),
            expiry_year=primary.expiry_year,
            expiry_month=primary.expiry_month,
            service_code=primary.service_code,
            tracks=tracks,
        )
    finally:
        for fields in (f1, f2):
            if fields is not None:
                fields.wipe()
    logger.debug("card read: %s", card)
    return card


def parse_swipe_line(line: bytes | bytearray | str, *, today: date) -> CardRead:
    """Parse a swipe reader's ASCII line ``[%...?][;...?]`` (CR/LF already stripped; no LRC)."""
    raw = _as_bytes(line)
    if len(raw) > TRACK1_MAX_CHARS + TRACK2_MAX_CHARS:
        _fail("too_long", "swipe line longer than track 1 and track 2 together")
    track1: bytes | bytearray | None = None
    track2: bytes | bytearray | None = None
    rest = raw
    if rest[:1] == b"%":
        end = rest.find(b"?")
        if end < 0:
            _fail("bad_sentinel", "track 1: missing end sentinel")
        track1, rest = rest[: end + 1], rest[end + 1 :]
    if rest[:1] == b";":
        track2, rest = rest, b""
    if rest:
        _fail("bad_sentinel", "swipe line: data outside the track sentinels")
    return parse_card(track1, track2, today=today, lrc="absent")
