"""Drive a running daemon's simulated hardware from outside: the harness's side door.

`atmguard run` with every hardware role on its sim backend and ``daemon.sim_control_socket`` set
listens on that UNIX socket for JSON lines, one command each, and answers one JSON line each:

    {"cmd": "insert_card", "pan": "4761739001010119", "expiry": "2028-11"}  -> {"ok": true, "accepted": true}
    {"cmd": "insert_card", "track1": "...", "track2": "..."}                 (raw stripe text, e.g. garbage)
    {"cmd": "take_card"}        the customer takes the card from the gate
    {"cmd": "keys", "keys": "1234#", "interval_s": 0.15}                     (typed on the sim keypad's matrix)
    {"cmd": "scene", "name": "uncovered"}                                     (what the sim camera sees)
    {"cmd": "state"}            -> {"ok": true, "phase": "idle", "faults": [], "face_state": "...", ...}
    {"cmd": "stall", "seconds": 30}                                           (wedge the controller: watchdog test)

Errors answer ``{"ok": false, "error": "..."}``. The socket is refused on real hardware: a card
must never be "inserted" into a real ATM by software.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

from atmguard.config import Settings
from atmguard.errors import ConfigError
from atmguard.hardware.camera.sim import SimCamera
from atmguard.hardware.card.emulator import SimCardReader
from atmguard.hardware.card.testcards import TestCard
from atmguard.hardware.keypad.sim import SimKeypad

logger = logging.getLogger(__name__)

SIM_ROLES = ("card_reader", "keypad", "actuator", "camera")
MAX_LINE_BYTES = 4096


def require_simulated_hardware(settings: Settings) -> None:
    """ConfigError unless every hardware role runs on its simulator."""
    real = [
        f"{role}.backend = {getattr(settings, role).backend!r}"
        for role in SIM_ROLES
        if getattr(settings, role).backend != "sim"
    ]
    if real:
        raise ConfigError(f"daemon.sim_control_socket needs simulated hardware, but {', '.join(real)}")


class SimControl:
    """The control socket's server thread. Commands run on it, one client at a time."""

    def __init__(
        self,
        path: Path,
        *,
        card_reader: SimCardReader,
        keypad: SimKeypad,
        camera: SimCamera,
        describe_state: Callable[[], dict[str, Any]],
        stall: Callable[[float], None],
        today: Callable[[], date] = date.today,
    ) -> None:
        self._path = path
        self._reader = card_reader
        self._keypad = keypad
        self._camera = camera
        self._describe_state = describe_state
        self._stall = stall
        self._today = today
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    def open(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self._path.is_socket():
                self._path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self._path))
        os.chmod(self._path, 0o600)
        server.listen(4)
        server.settimeout(0.5)
        self._server = server
        self._thread = threading.Thread(target=self._serve, name="atmguard-simcontrol", daemon=True)
        self._thread.start()
        logger.warning("sim control socket open at %s (simulated hardware only)", self._path)

    def close(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()

    def _serve(self) -> None:
        assert self._server is not None
        while not self._closing.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with client:
                client.settimeout(0.5)
                self._converse(client)

    def _converse(self, client: socket.socket) -> None:
        pending = b""
        while not self._closing.is_set():
            try:
                data = client.recv(MAX_LINE_BYTES)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                reply = self.handle_line(line)
                try:
                    client.sendall(json.dumps(reply, sort_keys=True).encode() + b"\n")
                except OSError:
                    return
            if len(pending) > MAX_LINE_BYTES:
                return

    def handle_line(self, line: bytes) -> dict[str, Any]:
        try:
            command = json.loads(line)
            if not isinstance(command, dict) or not isinstance(command.get("cmd"), str):
                raise ValueError('expected a JSON object with a "cmd" string')
            return {"ok": True, **self._handle(command)}
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def _handle(self, command: dict[str, Any]) -> dict[str, Any]:
        name = command["cmd"]
        if name == "insert_card":
            if "pan" in command:
                year, month = (
                    (int(part) for part in str(command.get("expiry", "")).split("-"))
                    if command.get("expiry")
                    else (self._today().year + 2, self._today().month)
                )
                card = TestCard.build(str(command["pan"]), expiry=date(year, month, 1))
                track1, track2 = card.track1, card.track2
            else:
                track1, track2 = command.get("track1"), command.get("track2")
            return {"accepted": self._reader.emulator.insert(track1, track2)}
        if name == "take_card":
            self._reader.emulator.take()
            return {}
        if name == "keys":
            self._keypad.type_keys(str(command["keys"]), interval_s=float(command.get("interval_s", 0.15)))
            return {}
        if name == "scene":
            self._camera.set_scene(str(command["name"]))
            return {}
        if name == "state":
            emulator = self._reader.emulator
            return {
                **self._describe_state(),
                "card": emulator.card_state,
                "card_entry": emulator.entry_enabled,
                "captured_cards": emulator.captured_count,
            }
        if name == "stall":
            self._stall(float(command["seconds"]))
            return {}
        raise ValueError(f"unknown command {name!r}")
