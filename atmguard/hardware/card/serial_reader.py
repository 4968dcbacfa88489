"""``SerialCardReader``: a card reader on a serial port (device, pty or any pyserial URL).

Two protocols:

* ``sankyo`` - motorized reader, framed protocol of :mod:`atmguard.hardware.card.sankyo`.
  ``poll()`` queries the status every ``poll_interval_s``; when a card arrives inside it reads
  tracks 1 and 2 and reports ``CardInserted``; a card leaving the gate is ``CardTaken``.
  Each command: send, wait ``response_timeout_s`` for ACK, then for the response frame
  (``motion_timeout_s`` for initialise/eject/capture, which answer when the motor stops). A NAK or
  a missing ACK is retried ``retries`` times, then ``CardReaderTimeout``. A motion command that was
  ACKed but never finished is *not* repeated (the card may have moved): ``CardReaderTimeout``.
* ``ascii`` - swipe reader printing ``%B...?;...?\\r\\n`` per swipe (no LRC). ``holds_card`` is
  False, ``eject()`` is a no-op, ``capture()`` raises ``UnsupportedOperationError``; swipes made while
  entry is disabled are dropped (a swipe cannot be physically refused). A line cut off for
  ``swipe_line_timeout_s`` is reported as an unreadable swipe if it started like a track.

A port that fails (``SerialException``/``OSError``) raises ``CardReaderError`` now and on every
later call; garbage on the line is skipped by the frame decoder. Frames are never logged with
their data: track text travels only into :func:`~atmguard.hardware.card.tracks.parse_card`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import date
from typing import Any, Literal, NoReturn, Self

import serial

from atmguard.config import Settings
from atmguard.errors import CardDataError, CardReaderError, CardReaderTimeout
from atmguard.hardware.card import sankyo
from atmguard.hardware.card.base import (
    CardEvent,
    CardInserted,
    CardReader,
    CardTaken,
    ReaderFault,
    ReaderStatus,
    UnsupportedOperationError,
)
from atmguard.hardware.card.tracks import parse_card, parse_swipe_line

logger = logging.getLogger(__name__)

Protocol = Literal["sankyo", "ascii"]
_MAX_SWIPE_LINE = 256
# Reader error codes for a track that is simply not on the card.
_NO_TRACK_DATA = frozenset({"23", "24"})
_READ_ERROR_REASONS = {"20": "bad_parity", "21": "bad_sentinel"}


class SerialCardReader(CardReader):
    """A card reader on ``port`` (opened with ``serial.serial_for_url``)."""

    def __init__(
        self,
        port: str,
        *,
        protocol: Protocol = "sankyo",
        baudrate: int = 38400,
        parity: str | None = None,
        response_timeout_s: float = 1.0,
        retries: int = 3,
        poll_interval_s: float = 0.2,
        motion_timeout_s: float = 5.0,
        init_data: bytes = b"",
        swipe_line_timeout_s: float = 0.5,
        serial_factory: Callable[..., Any] = serial.serial_for_url,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        today: Callable[[], date] = date.today,
    ) -> None:
        if protocol not in ("sankyo", "ascii"):
            raise ValueError(f"unknown card reader protocol {protocol!r}")
        if response_timeout_s <= 0 or poll_interval_s <= 0 or motion_timeout_s <= 0 or retries < 0:
            raise ValueError("timeouts and poll interval must be positive, retries >= 0")
        self._port_name = port
        self._protocol: Protocol = protocol
        self._baudrate = baudrate
        # Both public Sankyo host drivers open the reader 8E1; swipe readers are usually 8N1.
        self._parity = parity if parity is not None else ("E" if protocol == "sankyo" else "N")
        self._response_timeout_s = response_timeout_s
        self._retries = retries
        self._poll_interval_s = poll_interval_s
        self._motion_timeout_s = max(motion_timeout_s, response_timeout_s)
        self._init_data = init_data
        self._swipe_line_timeout_s = swipe_line_timeout_s
        self._serial_factory = serial_factory
        self._clock = clock
        self._sleep = sleep
        self._today = today
        # Reads block at most this long so deadlines are checked often; a byte ends the wait at once.
        self._read_slice_s = min(0.01, response_timeout_s / 4)
        self._lock = threading.RLock()
        self._port: Any = None
        self._broken: str | None = None
        self._reset_state()

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        section = settings.card_reader
        return cls(
            section.port,
            protocol=section.protocol,
            baudrate=section.baudrate,
            parity=None if section.parity == "auto" else section.parity,
            response_timeout_s=section.response_timeout_s,
            motion_timeout_s=section.motion_timeout_s,
            retries=section.retries,
            poll_interval_s=section.poll_interval_s,
        )

    def _reset_state(self) -> None:
        self._decoder = sankyo.FrameDecoder()
        self._pending: deque[sankyo.DecoderEvent] = deque()
        self._events: deque[CardEvent] = deque()
        self._position: str | None = None
        self._custody = False
        self._entry_enabled = False
        self._last_fault: str | None = None
        self._next_status_at = -math.inf
        self._line = bytearray()
        self._line_last_byte_at = 0.0
        self._discarding_line = False

    # -- properties -------------------------------------------------------------------------

    @property
    def holds_card(self) -> bool:
        return self._protocol == "sankyo"

    @property
    def protocol(self) -> Protocol:
        return self._protocol

    @property
    def port_name(self) -> str:
        return self._port_name

    @property
    def is_open(self) -> bool:
        return self._port is not None

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> None:
        with self._lock:
            if self._port is not None:
                return
            self._reset_state()
            self._broken = None
            try:
                self._port = self._serial_factory(
                    self._port_name,
                    baudrate=self._baudrate,
                    parity=self._parity,
                    timeout=self._read_slice_s,
                    write_timeout=self._response_timeout_s,
                )
            except (serial.SerialException, OSError, ValueError) as exc:
                raise CardReaderError(f"card reader: cannot open {self._port_name!r}: {exc}") from exc
            logger.info(
                "card reader: opened %s (%s, %d baud)", self._port_name, self._protocol, self._baudrate
            )
            if self._protocol == "ascii":
                return
            try:
                init = sankyo.Command(sankyo.INITIALISE.code, sankyo.INITIALISE.param, self._init_data)
                self._require_positive(self._transact(init, wait_s=self._motion_timeout_s, idempotent=True))
                self._require_positive(self._transact(sankyo.ENTRY_DISABLE, idempotent=True))
                status, position = self._query_status(None)
                self._position = position
                logger.info("card reader: initialised (%s)", status)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        with self._lock:
            if self._port is None:
                return
            if self._protocol == "sankyo" and self._entry_enabled and self._broken is None:
                # Leave the entry shut, but spend at most one attempt on it: close() must be quick.
                try:
                    self._transact(sankyo.ENTRY_DISABLE, idempotent=True, timeout_s=self._response_timeout_s)
                except CardReaderError as exc:
                    logger.warning("card reader: could not disable entry while closing: %s", exc)
            port, self._port = self._port, None
            try:
                port.close()
            except (serial.SerialException, OSError) as exc:
                logger.debug("card reader: error closing port: %s", exc)
            self._line[:] = bytes(len(self._line))
            self._decoder.reset()
            logger.info("card reader: closed %s", self._port_name)

    # -- public commands --------------------------------------------------------------------

    def status(self, *, timeout_s: float | None = None) -> ReaderStatus:
        with self._lock:
            self._require_open()
            if self._protocol == "ascii":
                self._check_port_alive()
                return ReaderStatus(card_present=False, card_at_gate=False, entry_enabled=self._entry_enabled)
            return self._query_status(timeout_s)[0]

    def set_entry_enabled(self, enabled: bool, *, timeout_s: float | None = None) -> None:
        with self._lock:
            self._require_open()
            if self._protocol == "sankyo":
                command = sankyo.ENTRY_ENABLE if enabled else sankyo.ENTRY_DISABLE
                self._require_positive(self._transact(command, idempotent=True, timeout_s=timeout_s))
            else:
                self._check_port_alive()
            self._entry_enabled = enabled
            logger.info("card reader: entry %s", "enabled" if enabled else "disabled")

    def eject(self, *, timeout_s: float | None = None) -> None:
        with self._lock:
            self._require_open()
            if self._protocol == "ascii":
                logger.debug("card reader: eject ignored, a swipe reader never holds the card")
                return
            response = self._transact(
                sankyo.EJECT, wait_s=self._motion_timeout_s, idempotent=False, timeout_s=timeout_s
            )
            self._require_positive(response)
            self._position = sankyo.POS_AT_GATE
            logger.info("card reader: card ejected to the gate")

    def capture(self, *, timeout_s: float | None = None) -> None:
        with self._lock:
            self._require_open()
            if self._protocol == "ascii":
                raise UnsupportedOperationError(
                    "card reader: a swipe reader cannot capture a card, it never holds one"
                )
            response = self._transact(
                sankyo.CAPTURE, wait_s=self._motion_timeout_s, idempotent=False, timeout_s=timeout_s
            )
            self._require_positive(response)
            self._position = sankyo.POS_NO_CARD
            self._custody = False
            logger.warning("card reader: card captured")

    def poll(self, *, timeout_s: float) -> CardEvent | None:
        deadline = self._clock() + max(0.0, timeout_s)
        while True:
            with self._lock:
                self._require_open()
                if self._events:
                    return self._events.popleft()
                if self._protocol == "ascii":
                    self._read_swipes(deadline)
                    return self._events.popleft() if self._events else None
                now = self._clock()
                if now >= self._next_status_at:
                    self._next_status_at = now + self._poll_interval_s
                    self._poll_status()
                    if self._events:
                        return self._events.popleft()
                    now = self._clock()
                if now >= deadline:
                    return None
                # The status exchange may have outlasted the poll interval: never a negative pause.
                pause = max(0.0, min(deadline, self._next_status_at) - now)
            self._sleep(pause)

    # -- sankyo: status tracking ----------------------------------------------------------

    def _query_status(self, timeout_s: float | None) -> tuple[ReaderStatus, str | None]:
        response = self._transact(sankyo.STATUS, idempotent=True, timeout_s=timeout_s)
        if not response.positive:
            reason, description = sankyo.describe_error(response.status)
            fault = f"{description} (error {response.status})"
            return ReaderStatus(False, False, self._entry_enabled, fault, reason), None
        position = response.status
        if position not in (sankyo.POS_NO_CARD, sankyo.POS_AT_GATE, sankyo.POS_INSIDE):
            fault = f"unknown card position code {position!r}"
            return ReaderStatus(False, False, self._entry_enabled, fault, "protocol"), None
        status = ReaderStatus(
            card_present=position == sankyo.POS_INSIDE,
            card_at_gate=position == sankyo.POS_AT_GATE,
            entry_enabled=self._entry_enabled,
        )
        return status, position

    def _poll_status(self) -> None:
        status, position = self._query_status(None)
        if status.fault is not None:
            reason = status.fault_reason or "fault"
            if reason != self._last_fault:
                self._last_fault = reason
                logger.error("card reader fault: %s", status.fault)
                self._events.append(ReaderFault(reason, status.fault))
            return
        if self._last_fault is not None:
            logger.info("card reader: fault %s cleared", self._last_fault)
            self._last_fault = None
        previous, self._position = self._position, position
        if position == sankyo.POS_INSIDE and previous != sankyo.POS_INSIDE:
            # Also when the card came back from the gate: it may not be the same card.
            try:
                event = self._read_card()
            except CardReaderError:
                # Not read yet: the next poll must try again rather than think the card is known.
                self._position = previous
                raise
            self._custody = True
            self._events.append(event)
        elif position == sankyo.POS_NO_CARD and self._custody:
            self._custody = False
            logger.info("card reader: card taken")
            self._events.append(CardTaken())

    def _read_card(self) -> CardInserted:
        tracks: list[bytes | None] = []
        for command in (sankyo.READ_TRACK1, sankyo.READ_TRACK2):
            response = self._transact(command, idempotent=True)
            if response.positive:
                tracks.append(response.data or None)
            elif response.status in _NO_TRACK_DATA:
                tracks.append(None)
            else:
                reason = _READ_ERROR_REASONS.get(response.status) or sankyo.describe_error(response.status)[0]
                logger.warning("card reader: card inserted but %s failed: %s", command.name, reason)
                return CardInserted(None, reason)
        try:
            card = parse_card(tracks[0], tracks[1], today=self._today())
        except CardDataError as exc:
            logger.warning("card reader: unusable card inserted: %s", exc.reason)
            return CardInserted(None, exc.reason)
        finally:
            tracks.clear()
        logger.info("card reader: card inserted %s", card)
        return CardInserted(card)

    # -- sankyo: link layer -----------------------------------------------------------------

    def _transact(
        self,
        command: sankyo.Command,
        *,
        wait_s: float | None = None,
        idempotent: bool,
        timeout_s: float | None = None,
    ) -> sankyo.Response:
        """Send ``command`` until it is answered; the response may be negative."""
        frame = sankyo.encode_frame(command.text())
        response_wait_s = self._response_timeout_s if wait_s is None else wait_s
        deadline = math.inf if timeout_s is None else self._clock() + timeout_s
        attempts = self._retries + 1
        problem = "no time left"
        attempt = 0
        while attempt < attempts and self._clock() < deadline:
            attempt += 1
            self._write(frame)
            outcome = self._await_ack(command, min(self._clock() + self._response_timeout_s, deadline))
            if isinstance(outcome, sankyo.Response):
                return outcome
            if outcome == sankyo.ACK:
                response = self._await_response(command, min(self._clock() + response_wait_s, deadline))
                if response is not None:
                    return response
                if not idempotent:
                    raise CardReaderTimeout(
                        f"card reader accepted {command.name} but did not finish within"
                        f" {response_wait_s:g} s; not repeated because the card may have moved"
                    )
                problem = "no response"
            elif outcome == sankyo.EOT:
                raise sankyo.CommandRefusedError(f"card reader refused {command.name} (EOT)")
            else:
                problem = "NAK" if outcome == sankyo.NAK else "no ACK"
            logger.warning(
                "card reader: %s to %s (attempt %d of %d)", problem, command.name, attempt, attempts
            )
        raise CardReaderTimeout(
            f"card reader did not answer {command.name}: {problem} after {attempt} attempt(s)"
        )

    def _await_ack(self, command: sankyo.Command, deadline: float) -> int | sankyo.Response | None:
        while (event := self._next_event(deadline)) is not None:
            if isinstance(event, sankyo.Control):
                return event.byte
            if isinstance(event, sankyo.Frame):
                response = self._acknowledge(event)
                # The reader's ACK may have been lost in noise while its answer got through.
                if response is not None and response.answers(command):
                    return response
            # A framing error while no frame is expected is line noise.
        return None

    def _await_response(self, command: sankyo.Command, deadline: float) -> sankyo.Response | None:
        naks = 0
        while (event := self._next_event(deadline)) is not None:
            if isinstance(event, sankyo.FramingError):
                if naks <= self._retries:
                    naks += 1
                    logger.warning("card reader: %s, asking for a repeat", event)
                    self._write(bytes((sankyo.NAK,)))
                continue
            if isinstance(event, sankyo.Frame):
                response = self._acknowledge(event)
                if response is not None and response.answers(command):
                    return response
        return None

    def _acknowledge(self, frame: sankyo.Frame) -> sankyo.Response | None:
        """ACK a response frame (so the reader stops repeating it) and parse it; None if not a response."""
        try:
            response = sankyo.Response.parse(frame.text)
        except sankyo.ProtocolError:
            # Not a response (e.g. our own command echoed by a loopback): ignore it.
            logger.debug("card reader: ignoring non-response %r", frame)
            return None
        self._write(bytes((sankyo.ACK,)))
        logger.debug("card reader: response %r", response)
        return response

    def _next_event(self, deadline: float) -> sankyo.DecoderEvent | None:
        while not self._pending:
            if self._clock() >= deadline:
                return None
            data = self._read_chunk()
            if data:
                self._pending.extend(self._decoder.feed(data))
        return self._pending.popleft()

    # -- ascii ----------------------------------------------------------------------------------

    def _read_swipes(self, deadline: float) -> None:
        while True:
            data = self._read_chunk()
            now = self._clock()
            if data:
                self._line_last_byte_at = now
                for byte in data:
                    self._swipe_byte(byte)
            elif self._line and now - self._line_last_byte_at >= self._swipe_line_timeout_s:
                logger.warning("card reader: swipe line cut off after %d bytes", len(self._line))
                self._finish_line()
            if self._events or now >= deadline:
                return

    def _swipe_byte(self, byte: int) -> None:
        if byte in (0x0A, 0x0D):
            if self._line:
                self._finish_line()
            self._discarding_line = False
            return
        if self._discarding_line:
            return
        if len(self._line) >= _MAX_SWIPE_LINE:
            logger.warning("card reader: swipe line longer than %d bytes discarded", _MAX_SWIPE_LINE)
            self._wipe_line()
            self._discarding_line = True
            return
        self._line.append(byte)

    def _finish_line(self) -> None:
        line = self._line
        try:
            if not self._entry_enabled:
                logger.info("card reader: swipe ignored, entry disabled")
                return
            if line[:1] not in (b"%", b";"):
                logger.warning("card reader: %d bytes of noise from the swipe reader discarded", len(line))
                return
            try:
                card = parse_swipe_line(line, today=self._today())
            except CardDataError as exc:
                logger.warning("card reader: unusable card swiped: %s", exc.reason)
                self._events.append(CardInserted(None, exc.reason))
                return
            logger.info("card reader: card swiped %s", card)
            self._events.append(CardInserted(card))
        finally:
            self._wipe_line()

    def _wipe_line(self) -> None:
        self._line[:] = bytes(len(self._line))
        self._line.clear()

    # -- port access -----------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._port is None:
            raise CardReaderError(f"card reader {self._port_name!r} is not open")
        if self._broken is not None:
            raise CardReaderError(f"card reader port {self._port_name!r} failed: {self._broken}")

    def _require_positive(self, response: sankyo.Response) -> sankyo.Response:
        if not response.positive:
            raise sankyo.NegativeResponseError(f"C{response.code}{response.param}", response.status)
        return response

    def _lost(self, exc: BaseException) -> NoReturn:
        self._broken = str(exc) or type(exc).__name__
        logger.error("card reader port %s failed: %s", self._port_name, self._broken)
        raise CardReaderError(f"card reader port {self._port_name!r} failed: {self._broken}") from exc

    def _check_port_alive(self) -> None:
        try:
            _ = self._port.in_waiting
        except (serial.SerialException, OSError) as exc:
            self._lost(exc)

    def _read_chunk(self) -> bytes:
        self._require_open()
        try:
            waiting = self._port.in_waiting
            return bytes(self._port.read(waiting if waiting > 0 else 1))
        except (serial.SerialException, OSError) as exc:
            self._lost(exc)

    def _write(self, data: bytes) -> None:
        self._require_open()
        try:
            self._port.write(data)
        except serial.SerialTimeoutException as exc:
            raise CardReaderTimeout(f"card reader port {self._port_name!r}: write timed out") from exc
        except (serial.SerialException, OSError) as exc:
            self._lost(exc)
