"""The card reader's side of the line, on a pty, plus ``SimCardReader`` which talks to it.

``CardReaderEmulator`` owns the master end of a pseudo-terminal and plays the device on a
daemon thread; anything that opens the slave (``emulator.port``) sees a serial card reader.

Sankyo protocol, as the device does it (see :mod:`atmguard.hardware.card.sankyo`):

* a command frame is ACKed at once (NAKed if its CRC is bad); commands run one after the other,
  each answered ``latency_s`` after it starts; motions (initialise with a card inside, eject,
  capture, and drawing in an inserted card) take ``motor_s`` and are answered when they end;
* commands other than initialise answer error B0 until the reader has been initialised;
* responses are sent at line speed (``baudrate``, 10 bits a byte) in ``chunk_bytes`` pieces, so
  the host sees partial frames; a response the host NAKs is repeated (up to 3 times);
* card positions: none -> (insert while entry enabled) entering [gate] -> inside ->
  (eject) ejecting -> gate -> (take) none, or (capture) capturing -> captured (counted).

Faults for tests and the harness: ``jam()`` (every command answers error 10 until
``clear_jam()``), ``mute()`` (no ACK, no response, pending answers dropped), ``inject_garbage()``,
``corrupt_next_responses()`` (bad CRC on the first transmission), ``unplug()`` (the master is
closed: the host's port fails with EIO).

ASCII protocol: ``insert()`` emits one swipe line ``track1 track2 CR LF`` at line speed; the
card never enters the reader; host input is ignored.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import os
import select
import threading
import time
import tty
from collections import deque
from collections.abc import Callable
from datetime import date
from types import TracebackType
from typing import Any, Literal, Self

from atmguard.config import Settings
from atmguard.hardware.card import sankyo
from atmguard.hardware.card.serial_reader import Protocol, SerialCardReader

logger = logging.getLogger(__name__)

CardState = Literal["none", "entering", "inside", "ejecting", "gate", "capturing", "captured"]
_POSITION: dict[str, str] = {
    "none": sankyo.POS_NO_CARD,
    "captured": sankyo.POS_NO_CARD,
    "entering": sankyo.POS_AT_GATE,
    "gate": sankyo.POS_AT_GATE,
    "inside": sankyo.POS_INSIDE,
    # Moving cards are reported from where they started: the host only sees a position once the
    # motion command has been answered anyway, since commands run one after the other.
    "ejecting": sankyo.POS_INSIDE,
    "capturing": sankyo.POS_INSIDE,
}
_MAX_RESENDS = 3


class EmulatorError(RuntimeError):
    """The harness asked for something the device cannot do (e.g. take a card that is not at the gate)."""


class CardReaderEmulator:
    """A card reader on the master end of a pty. ``start()`` creates the pty; ``port`` is the slave path."""

    def __init__(
        self,
        *,
        protocol: Protocol = "sankyo",
        latency_s: float = 0.02,
        motor_s: float = 0.4,
        baudrate: int = 38400,
        chunk_bytes: int = 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if protocol not in ("sankyo", "ascii"):
            raise ValueError(f"unknown card reader protocol {protocol!r}")
        if latency_s < 0 or motor_s < 0 or baudrate <= 0 or chunk_bytes <= 0:
            raise ValueError("latency_s and motor_s must be >= 0, baudrate and chunk_bytes > 0")
        self.protocol: Protocol = protocol
        self.latency_s = latency_s
        self.motor_s = motor_s
        self._byte_time_s = 10.0 / baudrate
        self._chunk_bytes = chunk_bytes
        self._clock = clock
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._master: int | None = None
        self._slave: int | None = None
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._port: str | None = None
        self._stopping = False
        self._unplugged = False
        self._decoder = sankyo.FrameDecoder()
        self._tx = bytearray()
        self._tx_wire_at = 0.0
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._busy_until = 0.0
        self._last_response: bytes | None = None
        self._resends = 0
        self._corrupt = 0
        # Device state
        self._state: CardState = "none"
        self._track1: bytes | None = None
        self._track2: bytes | None = None
        self._entry_enabled = False
        self._initialised = False
        self._jammed = False
        self._muted = False
        self._mute_countdown: int | None = None
        self._captured = 0
        self.commands: deque[str] = deque(maxlen=256)
        """Names of the commands received (``C10`` ...), for assertions; never their data."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        section = settings.card_reader
        return cls(protocol=section.protocol, baudrate=section.baudrate)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def port(self) -> str:
        if self._port is None:
            raise EmulatorError("emulator not started")
        return self._port

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            master, slave = os.openpty()
            # Raw from the start: a byte like EOT (^D) must not be taken by the line discipline.
            tty.setraw(slave)
            os.set_blocking(master, False)
            self._master, self._slave = master, slave
            self._port = os.ttyname(slave)
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="card-reader-emulator", daemon=True)
            self._thread.start()
            logger.info("card reader emulator (%s) on %s", self.protocol, self._port)

    def stop(self) -> None:
        """Stop the thread and close the pty; idempotent."""
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._stopping = True
            self._wake()
        thread.join(timeout=2.0)
        with self._lock:
            self._thread = None
            for name in ("_master", "_slave", "_wake_r", "_wake_w"):
                fd = getattr(self, name)
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    setattr(self, name, None)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- harness: the customer ------------------------------------------------------------

    @property
    def card_state(self) -> CardState:
        with self._lock:
            return self._state

    @property
    def captured_count(self) -> int:
        with self._lock:
            return self._captured

    @property
    def entry_enabled(self) -> bool:
        with self._lock:
            return self._entry_enabled

    @property
    def initialised(self) -> bool:
        with self._lock:
            return self._initialised

    def insert(self, track1: str | bytes | None, track2: str | bytes | None) -> bool:
        """Offer a card whose stripe holds this raw track text. False when the reader does not take it."""
        t1 = track1.encode("latin-1") if isinstance(track1, str) else track1
        t2 = track2.encode("latin-1") if isinstance(track2, str) else track2
        with self._lock:
            self._require_plugged()
            if self.protocol == "ascii":
                if self._muted:
                    return False
                self._send((t1 or b"") + (t2 or b"") + b"\r\n")
                return True
            if self._state not in ("none", "captured") or not self._entry_enabled or self._jammed:
                # Shutter closed, or the slot is occupied: the card does not go in.
                return False
            self._track1, self._track2 = t1 or None, t2 or None
            self._state = "entering"
            self._schedule(self._clock() + self.motor_s, self._finish_entering)
            return True

    def take(self) -> None:
        """The customer pulls the card out of the gate."""
        with self._lock:
            if self._state != "gate":
                raise EmulatorError(f"no card at the gate to take (card state: {self._state})")
            self._state = "none"
            self._track1 = self._track2 = None

    # -- harness: faults --------------------------------------------------------------------

    def jam(self) -> None:
        with self._lock:
            self._jammed = True

    def clear_jam(self) -> None:
        with self._lock:
            self._jammed = False

    def mute(self, *, after_commands: int = 0) -> None:
        """Stop answering: no ACK, no response; answers not yet sent are dropped (motions still finish).

        ``after_commands``: answer that many more commands first (a reader hanging mid-exchange).
        """
        with self._lock:
            if after_commands > 0:
                self._mute_countdown = after_commands
                return
            self._muted = True
            self._tx.clear()

    def unmute(self) -> None:
        with self._lock:
            self._muted = False
            self._mute_countdown = None

    def inject_garbage(self, data: bytes) -> None:
        with self._lock:
            self._require_plugged()
            self._send(bytes(data))

    def corrupt_next_responses(self, count: int = 1) -> None:
        """The next ``count`` response frames go out with a bad CRC (repeats after a NAK are clean)."""
        with self._lock:
            self._corrupt += count

    def unplug(self) -> None:
        """Close the master end: the host's port reports an I/O error from now on."""
        with self._lock:
            self._unplugged = True
            self._stopping = True
            self._wake()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        with self._lock:
            if self._master is not None:
                os.close(self._master)
                self._master = None
            # The slave we hold must go too, or the pty stays half alive.
            if self._slave is not None:
                os.close(self._slave)
                self._slave = None

    # -- device loop ------------------------------------------------------------------------

    def _require_plugged(self) -> None:
        if self._unplugged:
            raise EmulatorError("card reader emulator is unplugged")
        if self._thread is None:
            raise EmulatorError("card reader emulator not started")

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"x")

    def _schedule(self, at: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (at, next(self._seq), action))
        self._wake()

    def _send(self, data: bytes) -> None:
        if not self._tx:
            # The line is idle: transmission of these bytes starts now (or when the last ended).
            self._tx_wire_at = max(self._tx_wire_at, self._clock())
        self._tx += data
        self._wake()

    def _tx_due_at(self) -> float:
        # A chunk reaches the host only once its last byte has been clocked out.
        return self._tx_wire_at + min(len(self._tx), self._chunk_bytes) * self._byte_time_s

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            logger.exception("card reader emulator crashed")

    def _loop(self) -> None:
        assert self._master is not None and self._wake_r is not None
        master, wake_r = self._master, self._wake_r
        while True:
            with self._lock:
                if self._stopping:
                    return
                now = self._clock()
                while self._timers and self._timers[0][0] <= now:
                    _, _, action = heapq.heappop(self._timers)
                    action()
                timeout = 0.1
                if self._timers:
                    timeout = min(timeout, max(0.0, self._timers[0][0] - now))
                writers: list[int] = []
                if self._tx:
                    due = self._tx_due_at()
                    if now >= due:
                        writers.append(master)
                    else:
                        timeout = min(timeout, due - now)
            readable, writable, _ = select.select([master, wake_r], writers, [], timeout)
            if wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
            if master in readable:
                try:
                    data = os.read(master, 4096)
                except BlockingIOError:
                    data = b""
                except OSError as exc:
                    # EIO: nobody has the slave open (cannot happen while we hold it, but be safe).
                    if exc.errno != errno.EIO:
                        raise
                    data = b""
                if data:
                    with self._lock:
                        self._receive(data)
            if master in writable:
                with self._lock:
                    self._transmit(master)

    def _transmit(self, master: int) -> None:
        chunk = bytes(self._tx[: self._chunk_bytes])
        try:
            written = os.write(master, chunk)
        except BlockingIOError:
            return
        del self._tx[:written]
        self._tx_wire_at += written * self._byte_time_s

    def _receive(self, data: bytes) -> None:
        if self.protocol == "ascii":
            return
        for event in self._decoder.feed(data):
            if isinstance(event, sankyo.Frame) and self._mute_countdown is not None:
                if self._mute_countdown == 0:
                    self._muted, self._mute_countdown = True, None
                else:
                    self._mute_countdown -= 1
            if self._muted:
                continue
            if isinstance(event, sankyo.FramingError):
                self._send(bytes((sankyo.NAK,)))
            elif isinstance(event, sankyo.Control):
                self._on_control(event.byte)
            else:
                self._on_command_frame(event.text)

    def _on_control(self, byte: int) -> None:
        if byte == sankyo.NAK and self._last_response is not None and self._resends < _MAX_RESENDS:
            self._resends += 1
            self._send(self._last_response)
        elif byte in (sankyo.ACK, sankyo.EOT):
            self._last_response = None

    def _on_command_frame(self, text: bytes) -> None:
        try:
            command = sankyo.Command.parse(text)
        except sankyo.ProtocolError:
            self._send(bytes((sankyo.NAK,)))
            return
        self._send(bytes((sankyo.ACK,)))
        self.commands.append(command.name)
        start = max(self._clock(), self._busy_until)
        self._busy_until = start + self.latency_s
        if (command.code, command.param) in sankyo.MOTION_COMMANDS:
            self._busy_until += self.motor_s
        self._schedule(start + self.latency_s, lambda: self._execute(command))

    # -- command execution (loop thread, lock held) -----------------------------------------

    def _respond(self, command: sankyo.Command, *, error: str | None = None, data: bytes = b"") -> None:
        if self._muted:
            return
        status = error if error is not None else _POSITION[self._state]
        response = sankyo.Response(error is None, command.code, command.param, status, data)
        frame = sankyo.encode_frame(response.text())
        self._last_response, self._resends = frame, 0
        if self._corrupt:
            self._corrupt -= 1
            frame = frame[:-1] + bytes((frame[-1] ^ 0xFF,))
        self._send(frame)

    def _execute(self, command: sankyo.Command) -> None:
        key = (command.code, command.param)
        if self._jammed:
            self._respond(command, error="10")
            return
        if command.code == sankyo.INITIALISE.code:
            self._initialised = True
            if self._state == "inside":
                self._move(command, "ejecting", "gate")
            else:
                self._respond(command)
            return
        if not self._initialised:
            self._respond(command, error="B0")
            return
        if key == (sankyo.STATUS.code, sankyo.STATUS.param):
            self._respond(command)
        elif command.code == sankyo.ENTRY_ENABLE.code and command.param in "01":
            self._entry_enabled = command.param == "0"
            self._respond(command)
        elif key == (sankyo.EJECT.code, sankyo.EJECT.param):
            if self._state == "inside":
                self._move(command, "ejecting", "gate")
            elif self._state == "gate":
                self._respond(command)
            else:
                self._respond(command, error="02")
        elif key == (sankyo.CAPTURE.code, sankyo.CAPTURE.param):
            if self._state in ("inside", "gate"):
                self._move(command, "capturing", "captured")
            else:
                self._respond(command, error="02")
        elif command.code == sankyo.READ_TRACK1.code and command.param in "12":
            self._read_track(command)
        elif command.code in "01:36":
            self._respond(command, error="01")
        else:
            self._respond(command, error="00")

    def _read_track(self, command: sankyo.Command) -> None:
        if self._state != "inside":
            self._respond(command, error="02")
            return
        if self._track1 is None and self._track2 is None:
            self._respond(command, error="24")
            return
        track = self._track1 if command.param == "1" else self._track2
        if track is None:
            self._respond(command, error="23")
        else:
            self._respond(command, data=track)

    def _move(self, command: sankyo.Command, moving: CardState, target: CardState) -> None:
        self._state = moving

        def arrive() -> None:
            if self._jammed:
                # The card stops where the jam caught it; the host hears about it.
                self._respond(command, error="10")
                return
            self._state = target
            if target == "captured":
                self._captured += 1
                self._track1 = self._track2 = None
            self._respond(command)

        self._schedule(self._clock() + self.motor_s, arrive)

    def _finish_entering(self) -> None:
        if self._state == "entering" and not self._jammed:
            self._state = "inside"


class SimCardReader(SerialCardReader):
    """A ``SerialCardReader`` wired to its own :class:`CardReaderEmulator` (started in ``open()``)."""

    def __init__(
        self,
        *,
        protocol: Protocol = "sankyo",
        emulator: CardReaderEmulator | None = None,
        today: Callable[[], date] = date.today,
        **reader_kwargs: Any,
    ) -> None:
        self._emulator = emulator if emulator is not None else CardReaderEmulator(protocol=protocol)
        if self._emulator.protocol != protocol:
            raise ValueError("emulator and reader protocols differ")
        # The real port name is only known once the emulator has made its pty.
        super().__init__("<emulator pty>", protocol=protocol, today=today, **reader_kwargs)

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        section = settings.card_reader
        return cls(
            protocol=section.protocol,
            emulator=CardReaderEmulator.from_settings(settings),
            baudrate=section.baudrate,
            parity=None if section.parity == "auto" else section.parity,
            response_timeout_s=section.response_timeout_s,
            motion_timeout_s=section.motion_timeout_s,
            retries=section.retries,
            poll_interval_s=section.poll_interval_s,
        )

    @property
    def emulator(self) -> CardReaderEmulator:
        return self._emulator

    def open(self) -> None:
        if self.is_open:
            return
        self._emulator.start()
        self._port_name = self._emulator.port
        try:
            super().open()
        except BaseException:
            self._emulator.stop()
            raise

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._emulator.stop()
