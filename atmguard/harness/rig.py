"""A whole simulated ATM around a real `atmguard run` process.

``SimRig`` prepares everything a bank and an installer would: a central database (on a server the
caller provides, e.g. a :class:`~atmguard.store.throwaway_mariadb.ThrowawayMariaDB`) with this ATM's
login and customer accounts, the bank's evidence key pair, the secrets as 0600 files, camera scenes
(symlinks into ../shared/datasets, read in place), and a config with every hardware role on its
simulator. It starts the daemon as systemd would (NOTIFY_SOCKET bound here, WATCHDOG_USEC set) and
hands out a :class:`SimClient` that drives the simulators and reads the host socket.

Used by the end-to-end test and by ``make bench``; nothing here runs on an ATM.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atmguard.datasets import REPO_ROOT, SCENE_IMAGES, shared_datasets_dir
from atmguard.harness.scenes import SceneSource, build_scene_dir
from atmguard.store.central import CardStatus, provision_account
from atmguard.store.keys import generate_keypair
from atmguard.store.migrate import migrate, register_atm
from atmguard.store.throwaway_mariadb import ThrowawayMariaDB

SOCKET_TIMEOUT_S = 30.0


class NotifyListener:
    """systemd's side of sd_notify: a datagram socket drained on a thread, like the manager does,
    recording (monotonic time, message)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="notify-listener", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._closing.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            self.messages += [(now, line) for line in data.decode(errors="replace").splitlines()]

    def pump(self, duration_s: float) -> None:
        """Let ``duration_s`` pass while messages are collected."""
        time.sleep(duration_s)

    def wait_for(self, message: str, *, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> float:
        """When ``message`` arrived; AssertionError after ``timeout_s`` or when ``alive()`` turns false."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and alive():
            for t, line in list(self.messages):
                if line == message:
                    return t
            time.sleep(0.05)
        seen = [m for _, m in self.messages][-10:]
        raise AssertionError(f"no {message!r} within {timeout_s} s (process alive: {alive()}); last: {seen}")

    def pings(self, since: float, until: float) -> list[float]:
        return [t for t, line in list(self.messages) if line == "WATCHDOG=1" and since <= t <= until]

    def close(self) -> None:
        self._closing.set()
        self._thread.join(1.0)
        self.sock.close()


class HostFeed:
    """The ATM host software's side of the host socket: every line, timestamped, read on a thread."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lines: list[tuple[float, dict[str, Any]]] = []
        self._handed_out: set[int] = set()
        self._changed = threading.Condition()
        self.closed = False
        self._thread = threading.Thread(target=self._read, name="host-feed", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        pending = b""
        while True:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            now = time.monotonic()
            *lines, pending = (pending + data).split(b"\n")
            with self._changed:
                self._lines += [(now, json.loads(line)) for line in lines if line]
                if not data:
                    self.closed = True
                self._changed.notify_all()
            if not data:
                return

    def lines(self, since_s: float = 0.0) -> list[tuple[float, dict[str, Any]]]:
        """Every (arrival time, message) received at or after ``since_s``."""
        with self._changed:
            return [(t, line) for t, line in self._lines if t >= since_s]

    def wait(
        self, predicate: Callable[[dict[str, Any]], bool], *, since_s: float, timeout_s: float
    ) -> tuple[float, dict[str, Any]] | None:
        """The first message since ``since_s`` matching ``predicate``, waiting up to ``timeout_s``."""
        end = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for t, line in self._lines:
                    if t >= since_s and predicate(line):
                        return t, line
                remaining = end - time.monotonic()
                if remaining <= 0 or self.closed:
                    return None
                self._changed.wait(remaining)

    def next_message(self, kind: str, *, timeout_s: float) -> dict[str, Any]:
        """The next line of ``type`` ``kind`` not yet handed out by this method."""
        end = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for index, (_, line) in enumerate(self._lines):
                    if index not in self._handed_out and line.get("type") == kind:
                        self._handed_out.add(index)
                        return line
                remaining = end - time.monotonic()
                if remaining <= 0 or self.closed:
                    seen = [line for i, (_, line) in enumerate(self._lines) if i not in self._handed_out]
                    raise AssertionError(f"no {kind} message within {timeout_s} s; host saw {seen}")
                self._changed.wait(remaining)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(2.0)


@dataclass
class SimClient:
    """The sim control socket (drive the hardware) and the host socket (read decisions)."""

    sim: socket.socket
    host: HostFeed

    def command(self, **command: Any) -> dict[str, Any]:
        self.sim.sendall(json.dumps(command).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = self.sim.recv(4096)
            if not chunk:
                raise ConnectionError("sim control socket closed")
            reply += chunk
        answer = json.loads(reply)
        if not answer.get("ok"):
            raise RuntimeError(f"sim control refused {command}: {answer.get('error')}")
        return answer

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], *, timeout_s: float) -> dict[str, Any]:
        end = time.monotonic() + timeout_s
        state: dict[str, Any] = {}
        while time.monotonic() < end:
            state = self.command(cmd="state")
            if predicate(state):
                return state
            time.sleep(0.05)
        raise AssertionError(f"the daemon's state never matched within {timeout_s} s: last {state}")

    def wait_state(self, *, timeout_s: float, **expected: Any) -> dict[str, Any]:
        return self.wait_for(lambda s: all(s.get(k) == v for k, v in expected.items()), timeout_s=timeout_s)

    def show(self, scene: str, *, expect: str, timeout_s: float = 10.0) -> None:
        """Put ``scene`` before the camera and wait until the tracker reports ``expect``."""
        self.command(cmd="scene", name=scene)
        self.wait_state(timeout_s=timeout_s, face_state=expect)

    def start_session(self, pan: str | None = None, *, timeout_s: float = 10.0, **card: Any) -> str:
        """Insert a card (a PAN, or raw ``track1``/``track2``) once the slot is open; wait for its
        session and return its id."""
        before = self.wait_state(timeout_s=timeout_s, card_entry=True).get("session_id")
        if not self.command(cmd="insert_card", **({"pan": pan} if pan else {}), **card)["accepted"]:
            raise AssertionError("the card reader refused the card")
        state = self.wait_for(
            lambda s: s.get("session_id") is not None and s.get("session_id") != before, timeout_s=timeout_s
        )
        return str(state["session_id"])

    def take_card(self, *, timeout_s: float = 10.0) -> None:
        """Wait for the ejected card at the gate and take it."""
        self.wait_state(timeout_s=timeout_s, card="gate")
        self.command(cmd="take_card")

    def next_message(self, kind: str, *, timeout_s: float) -> dict[str, Any]:
        """The next host-socket line of ``type`` ``kind`` (earlier lines of other types are kept)."""
        return self.host.next_message(kind, timeout_s=timeout_s)

    def close(self) -> None:
        self.sim.close()
        self.host.close()


def _connect(path: Path, *, timeout_s: float = 10.0) -> socket.socket:
    end = time.monotonic() + timeout_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(SOCKET_TIMEOUT_S)  # a daemon that stops answering fails the caller, never hangs it
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() >= end:
                raise
            time.sleep(0.1)


class SimRig:
    """Prepare, start and stop one simulated ATM running the real daemon."""

    def __init__(
        self,
        work_dir: Path,
        *,
        server: ThrowawayMariaDB | None,
        database: str = "atmguard",
        atm_id: str = "SIM-ATM-0001",
        overrides: dict[str, dict[str, Any]] | None = None,
        watchdog_usec: int = 1_000_000,
        datasets: Path | None = None,
        extra_scenes: dict[str, str] | None = None,
    ) -> None:
        self.work_dir = work_dir
        self.server = server
        self.database = database
        self.atm_id = atm_id
        self.overrides = overrides or {}
        self.watchdog_usec = watchdog_usec
        self.datasets = datasets or shared_datasets_dir()
        self.extra_scenes = extra_scenes or {}
        self.scene_source: SceneSource | None = None
        # Printable, so a trailing-newline strip by the secret reader can never change them.
        self.pan_key = secrets.token_hex(32).encode()
        self.pin_pepper = secrets.token_hex(32).encode()
        self.process: subprocess.Popen[bytes] | None = None
        self.notify: NotifyListener | None = None
        self.config_path = work_dir / "atmguard.toml"
        self.log_path = work_dir / "daemon.log"
        self.display_path = work_dir / "display.txt"
        self.journal_path = work_dir / "state" / "journal.sqlite3"
        self.private_key_path: Path | None = None

    # --- preparation -----------------------------------------------------------------------------

    def prepare(self) -> Path:
        """Bank database, keys, secrets, scenes and config; returns the config path.

        Without a server the ATM runs journal-only (``central.enabled = false``): every card is
        declined as "bank unavailable", which is what a real ATM without its bank must do.
        """
        self.work_dir.mkdir(parents=True, exist_ok=True)
        keys = generate_keypair(self.work_dir / "bank-keys")
        self.private_key_path = keys.private_key_file
        scenes = self.work_dir / "scenes"
        self.scene_source = build_scene_dir(scenes, datasets=self.datasets, extra=self.extra_scenes)
        sections: dict[str, dict[str, Any]] = {
            "atm": {"id": self.atm_id},
            "paths": {"state_dir": "state", "models_dir": str(REPO_ROOT / "firmware_models")},
            "card_reader": {"backend": "sim", "poll_interval_s": 0.05, "response_timeout_s": 0.25},
            "keypad": {"backend": "sim"},
            "actuator": {"backend": "sim", "cooldown_s": 0.5},
            "camera": {"backend": "sim", "fps": 15.0},
            "camera.sim": {"scene_dir": str(scenes)},
            "display": {"backend": "terminal", "device": str(self.display_path)},
            "journal": {"bank_public_key_file": str(keys.public_key_file)},
            "central": self._central_section() if self.server is not None else {"enabled": False},
            "sync": {"interval_s": 0.5},
            "daemon": {
                "host_socket_path": str(self.work_dir / "host.sock"),
                "sim_control_socket": str(self.work_dir / "sim.sock"),
                "status_socket_path": str(self.work_dir / "status.sock"),
            },
        }
        for section, values in self.overrides.items():
            sections.setdefault(section, {}).update(values)
        self.display_path.touch()  # the terminal display writes to a device; it never creates one
        self.config_path.write_text(toml_text(sections))
        return self.config_path

    def _central_section(self) -> dict[str, Any]:
        """This ATM's login at the bank (schema migrated, account registered) and its secrets."""
        assert self.server is not None
        password = secrets.token_urlsafe(18)
        user = "atm_" + self.atm_id.lower().replace("-", "_")[:24]
        conn = self.server.admin_connect()
        try:
            migrate(conn, database=self.database)
            register_atm(
                conn,
                database=self.database,
                atm_id=self.atm_id,
                atm_user=user,
                atm_host="127.0.0.1",
                password=password,
            )
        finally:
            conn.close()
        secret_dir = self.work_dir / "secrets"
        secret_dir.mkdir(mode=0o700, exist_ok=True)
        for name, value in (
            ("central-password", password.encode()),
            ("pin-pepper", self.pin_pepper),
            ("pan-key", self.pan_key),
        ):
            (secret_dir / name).write_bytes(value)
            (secret_dir / name).chmod(0o600)
        return {
            "host": self.server.host,
            "port": self.server.port,
            "database": self.database,
            "user": user,
            "password_file": str(secret_dir / "central-password"),
            "pin_pepper_file": str(secret_dir / "pin-pepper"),
            "pan_key_file": str(secret_dir / "pan-key"),
            "connect_timeout_s": 3.0,
        }

    def provision(
        self, pan: str, pin: str, *, status: CardStatus = CardStatus.ACTIVE, max_pin_attempts: int = 3
    ) -> None:
        """Open (or reset) a customer account at the bank."""
        if self.server is None:
            raise RuntimeError("no central server: this rig runs journal-only")
        conn = self.server.admin_connect(database=self.database)
        try:
            provision_account(
                conn,
                bytearray(pan.encode()),
                bytearray(pin.encode()),
                pan_key=self.pan_key,
                pepper=self.pin_pepper,
                status=status,
                max_pin_attempts=max_pin_attempts,
            )
        finally:
            conn.close()

    def enroll(self, pan: str, folder: Path) -> None:
        """Enrol the card's account holder from the photos in ``folder`` as the bank would
        (``atmguard enroll``, with consent). The first ``SCENE_IMAGES`` photos are left out: they
        are what the camera shows for a scene of that folder, and a live face is never an
        enrolment photo."""
        from datetime import UTC, datetime

        from atmguard.config import settings_from_mapping
        from atmguard.store.central import pan_hmac
        from atmguard.store.enrolment import find_account_by_pan_hmac, model_id_for, store_template
        from atmguard.vision.detector import FaceDetector
        from atmguard.vision.embedder import FaceEmbedder
        from atmguard.vision.enrol import build_template

        if self.server is None:
            raise RuntimeError("no central server: this rig runs journal-only")
        photos = self.work_dir / "enrolment" / f"{pan[-4:]}-{folder.name}"
        photos.mkdir(parents=True, exist_ok=True)
        for image in sorted(folder.glob("*.jpg"))[SCENE_IMAGES:]:
            link = photos / image.name
            if not link.is_symlink():
                link.symlink_to(image.resolve())  # read in place: the datasets' licences forbid copies
        settings = settings_from_mapping({"paths": {"models_dir": str(REPO_ROOT / "firmware_models")}})
        with (
            FaceDetector.from_settings(settings) as detector,
            FaceEmbedder.from_settings(settings) as embedder,
        ):
            enrolment = build_template(photos, detector=detector, embedder=embedder)
            model_id = model_id_for(embedder)
        if enrolment.template is None:
            raise RuntimeError(f"enrolment from {folder} failed: {enrolment.accepted_count} good photo(s)")
        conn = self.server.admin_connect(database=self.database)
        try:
            account = find_account_by_pan_hmac(conn, pan_hmac(bytearray(pan.encode()), key=self.pan_key))
            if account is None:
                raise RuntimeError("enrol: the card's account does not exist (provision it first)")
            store_template(
                conn,
                account.account_id,
                model_id=model_id,
                template=enrolment.template.to_bytes(),
                consent=True,
                consent_at=datetime.now(UTC),
            )
        finally:
            conn.close()

    # --- the daemon process ------------------------------------------------------------------------

    def start(self) -> None:
        self.notify = NotifyListener(self.work_dir / "notify.sock")
        env = {
            **os.environ,
            **unit_environment(),
            "NOTIFY_SOCKET": str(self.notify.path),
            "WATCHDOG_USEC": str(self.watchdog_usec),
        }
        env.pop("LG_WD", None)  # the unit's runtime directory does not exist here
        env.pop("WATCHDOG_PID", None)
        env.pop("INVOCATION_ID", None)
        env.pop("JOURNAL_STREAM", None)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "atmguard", "--config", str(self.config_path), "run"],
                cwd=self.work_dir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, *, timeout_s: float = 90.0) -> float:
        assert self.notify is not None and self.process is not None
        process = self.process
        return self.notify.wait_for("READY=1", timeout_s=timeout_s, alive=lambda: process.poll() is None)

    def client(self) -> SimClient:
        return SimClient(
            sim=_connect(self.work_dir / "sim.sock"), host=HostFeed(_connect(self.work_dir / "host.sock"))
        )

    def stop(self, *, timeout_s: float = 10.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        process = self.process
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        return process.returncode

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self.notify is not None:
            self.notify.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def unit_environment(unit: Path = REPO_ROOT / "deploy" / "atmguard.service") -> dict[str, str]:
    """The ``Environment=`` assignments of the systemd unit, so the rig runs the daemon as it deploys."""
    env: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            for assignment in shlex.split(line.removeprefix("Environment=")):
                key, _, value = assignment.partition("=")
                env[key] = value
    return env


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    """A config file's text: one table per section, values written as JSON (valid TOML for these)."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)
