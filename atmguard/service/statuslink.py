"""The status socket: the running daemon's state, health and recent events, for technicians.

Protocol (version 1)
====================

The daemon listens on a UNIX stream socket, ``daemon.status_socket_path`` (default
``/run/atmguard/status.sock``, mode ``daemon.status_socket_mode``, default 0660: readable by the
accounts in atmguard's group). It is read-only: a client connects, the daemon writes **one JSON
object** (UTF-8, keys sorted, ending in ``\\n``) and closes the connection. Nothing the client sends
is read. One answer per connection keeps the daemon's side trivially safe (no parser, no state per
client) and the client's side one ``recv`` loop; ``atmguard status`` and ``atmguard diag`` are the
clients.

Top-level keys (a new key may appear in version 1; a changed meaning gets a new version):

- ``v`` (1), ``t`` (UTC ISO-8601 ms), ``version`` (atmguard), ``atm_id``, ``pid``, ``uptime_s``;
- ``phase`` (``starting``, ``idle``, ``session``, ``returning``, ``retaining``, ``out_of_service``,
  ``stopping``, ``stopped``), ``in_service`` (bool), ``faults`` (``{component: reason}``);
- ``face``: ``{"state": "uncovered"|"covered"|"no_face", "count": n}``;
- ``session``: null, or ``{"session_id", "masked_pan", "phase", "age_s"}`` - the PAN masked (first 6 /
  last 4 at most), never a PIN or a PIN length;
- ``hardware``: per role (``camera``, ``card_reader``, ``keypad``, ``actuator``, ``display``) a dict
  with ``backend``, ``ok`` (true / false / null when the daemon has no health signal for it),
  ``detail`` and the role's figures (camera ``fps_measured``, ``fps_configured``,
  ``last_frame_age_s``; keypad ``scans``; actuator ``bin_sensor``...);
- ``vision``: ``{"heartbeat_age_s", "analysed_fps", "faults"}``;
- ``watchdog``: ``{"enabled", "interval_s", "last_ping_age_s"}`` - the last time the controller loop
  pinged (it does so only while the vision loop is responsive);
- ``events``: the last ``daemon.status_recent_events`` decisions and service status changes, oldest
  first: ``{"t", "type": "decision", "session_id", "outcome", "reason", "masked_pan",
  "journal_uuid"}`` or ``{"t", "type": "status", "state", "detail"}``;
- ``outbox``: ``{"pending_events", "pending_snapshots", "dead_events", "dead_snapshots",
  "oldest_pending_age_s", "db_bytes"}`` (or ``{"error": ...}``), and ``sync``: ``{"enabled",
  "last_success_t", "last_error", "consecutive_failures", "last_run": summary}``.

Never blocks the controller: the answer is put together on the socket's own thread from immutable
snapshots (the controller's frozen ``SessionState``, the vision loop's ``health()``, a bounded
ring of events filled under its own lock) and the outbox is counted on a separate read-only
SQLite connection (a WAL reader never waits for the journal's writer).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atmguard import __version__
from atmguard.errors import AtmguardError
from atmguard.service.hostlink import utc_iso_ms
from atmguard.service.unixsocket import bind_listener, unlink_if_ours

if TYPE_CHECKING:
    from atmguard.config import Settings
    from atmguard.session.actions import Decision

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
CLIENT_TIMEOUT_S = 2.0
"""How long a client may take to read the answer before the daemon gives up on it."""
_ACCEPT_POLL_S = 0.5
_MAX_ANSWER_BYTES = 4 * 1024 * 1024
_THREAD_JOIN_S = 3.0
ROLES = ("camera", "card_reader", "keypad", "actuator", "display")


class StatusLinkError(AtmguardError, OSError):
    """The status socket cannot be created at its path."""


class StatusUnavailable(AtmguardError, ConnectionError):
    """No answer from the daemon's status socket; ``reason`` is ``disabled``, ``absent`` (no socket:
    the daemon is not running), ``refused`` (a stale socket), ``denied`` (permissions),
    ``timeout`` or ``invalid``."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


# --- what the daemon records for the socket ---------------------------------------------------------


class RecentEvents:
    """The last decisions and service status changes, bounded, filled from any thread."""

    def __init__(self, size: int, *, clock_wall: Callable[[], float] = time.time) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=max(1, size))
        self._lock = threading.Lock()
        self._clock_wall = clock_wall

    def add_decision(self, decision: Decision, journal_uuid: str | None) -> None:
        self._add(
            {
                "type": "decision",
                "session_id": decision.session_id,
                "outcome": decision.outcome.value,
                "reason": decision.reason.value,
                "masked_pan": decision.masked_pan,  # already first 6 / last 4 at most
                "journal_uuid": journal_uuid,
            }
        )

    def add_status(self, in_service: bool, detail: str) -> None:
        self._add(
            {"type": "status", "state": "in_service" if in_service else "out_of_service", "detail": detail}
        )

    def _add(self, event: dict[str, Any]) -> None:
        event["t"] = utc_iso_ms(self._clock_wall())
        with self._lock:
            self._events.append(event)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(event) for event in self._events]


class Heartbeat:
    """Remembers when the controller last pinged the watchdog (wraps the pinger it is given)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last_s: float | None = None

    def wrap(self, ping: Callable[[], None]) -> Callable[[], None]:
        def beat() -> None:
            self._last_s = self._clock()  # one float store: atomic, no lock needed
            ping()

        return beat

    def age_s(self) -> float | None:
        last = self._last_s
        return None if last is None else max(0.0, self._clock() - last)


@dataclass
class StatusSources:
    """Everything the answer is built from; each is read without blocking its owner."""

    settings: Settings
    controller: Any
    """``.state``: the frozen SessionState (None while starting)."""
    vision: Any
    """``.health()``: a VisionHealth."""
    hardware: Mapping[str, Any]
    journal_path: Path
    events: RecentEvents
    heartbeat: Heartbeat
    sync: Any = None
    """The SyncWorker (None when central.enabled is false)."""
    watchdog_interval_s: float | None = None
    started_s: float = field(default_factory=time.monotonic)


def _rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def _faults(state: Any) -> dict[str, str]:
    if state is None:
        return {}
    reasons = {component.value: reason for component, reason in state.fault_reasons}
    return {component.value: reasons.get(component.value, "") for component in state.faults}


def _camera_health(sources: StatusSources, faults: Mapping[str, str]) -> dict[str, Any]:
    settings = sources.settings
    health = sources.vision.health()
    camera = sources.hardware.get("camera")
    age = health.last_frame_age_s
    ok = "camera" not in faults and age is not None and age < settings.session.camera_timeout_s
    if "camera" in faults:
        detail = faults["camera"]
    elif age is None:
        detail = "no frame yet"
    else:
        fps = f"{health.camera_fps:.1f} fps" if health.camera_fps is not None else "rate not measured yet"
        detail = f"{fps}, last frame {age:.1f} s ago"
    return {
        "backend": settings.camera.backend,
        "ok": ok,
        "detail": detail,
        "open": bool(getattr(camera, "is_open", False)),
        "fps_measured": _rounded(health.camera_fps, 2),
        "fps_configured": settings.camera.fps,
        "last_frame_age_s": _rounded(age),
    }


def _card_reader_health(sources: StatusSources, faults: Mapping[str, str]) -> dict[str, Any]:
    reader = sources.hardware.get("card_reader")
    fault = faults.get("card_reader")
    return {
        "backend": sources.settings.card_reader.backend,
        "protocol": sources.settings.card_reader.protocol,
        "ok": fault is None,
        "detail": fault if fault is not None else "last status ok",
        "open": bool(getattr(reader, "is_open", False)),
    }


def _keypad_health(sources: StatusSources, faults: Mapping[str, str]) -> dict[str, Any]:
    keypad = sources.hardware.get("keypad")
    failure = getattr(keypad, "failure", None)
    stats = keypad.scan_stats() if hasattr(keypad, "scan_stats") else None
    fault = faults.get("keypad") or (str(failure) if failure is not None else None)
    is_open = bool(getattr(keypad, "is_open", False))
    if fault is None and not is_open:
        fault = "not scanning"
    detail = fault or (f"scanning: {stats.scans} scans, {stats.overruns} late" if stats else "scanning")
    return {
        "backend": sources.settings.keypad.backend,
        "ok": fault is None,
        "detail": detail,
        "open": is_open,
        "scans": stats.scans if stats else None,
        "overruns": stats.overruns if stats else None,
    }


def _actuator_health(sources: StatusSources, faults: Mapping[str, str]) -> dict[str, Any]:
    actuator = sources.hardware.get("actuator")
    fault = faults.get("actuator")
    bin_sensor: bool | None = None
    sensor_detail = "no bin sensor"
    if getattr(actuator, "has_bin_sensor", False):
        try:
            bin_sensor = actuator.bin_sensor_active()
            sensor_detail = "bin sensor active (blocked?)" if bin_sensor else "bin sensor clear"
        except AtmguardError as exc:
            sensor_detail = f"bin sensor unreadable: {exc}"
            fault = fault or sensor_detail
    cooldown = getattr(actuator, "cooldown_remaining_s", None)
    return {
        "backend": sources.settings.actuator.backend,
        "ok": fault is None,
        "detail": fault if fault is not None else sensor_detail,
        "open": bool(getattr(actuator, "is_open", False)),
        "bin_sensor": bin_sensor,
        "cooldown_remaining_s": _rounded(cooldown() if callable(cooldown) else cooldown),
    }


def _display_health(sources: StatusSources, faults: Mapping[str, str]) -> dict[str, Any]:
    settings = sources.settings
    display = sources.hardware.get("display")
    # The machine's fault (raised by the controller's failed write) until the fault event is in.
    fault = faults.get("display") or getattr(sources.controller, "display_fault", None)
    is_open = bool(getattr(display, "is_open", False))
    return {
        "backend": settings.display.backend,
        "ok": fault is None and is_open,
        "detail": fault or ("last prompt written" if is_open else "not open"),
        "device": settings.display.device if settings.display.backend == "terminal" else "",
    }


def _sync_status(sources: StatusSources) -> dict[str, Any]:
    worker = sources.sync
    if worker is None:
        return {"enabled": False}
    report = worker.last_report
    success = worker.last_success_wall_s
    return {
        "enabled": True,
        "last_success_t": utc_iso_ms(success) if success is not None else None,
        "last_error": report.error if report is not None else None,
        "consecutive_failures": worker.consecutive_failures,
        "last_run": report.summary() if report is not None else None,
    }


class _OutboxReader:
    """A read-only journal connection of the status thread's own (lazily opened)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._journal: Any = None

    def stats(self) -> dict[str, Any]:
        from atmguard.store.journal import Journal

        try:
            if self._journal is None:
                journal = Journal(self._path, atm_id=None, read_only=True)
                journal.open()
                self._journal = journal
            stats = self._journal.outbox_stats()
        except AtmguardError as exc:
            self.close()
            return {"error": str(exc)}
        return {
            "pending_events": stats.pending_events,
            "pending_snapshots": stats.pending_snapshots,
            "dead_events": stats.dead_events,
            "dead_snapshots": stats.dead_snapshots,
            "oldest_pending_age_s": _rounded(stats.oldest_pending_age_s, 1),
            "db_bytes": stats.db_bytes,
        }

    def close(self) -> None:
        journal, self._journal = self._journal, None
        if journal is not None:
            journal.close()


def gather_status(sources: StatusSources, outbox: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The status answer (see the module doc), from snapshots only."""
    settings = sources.settings
    state = sources.controller.state if sources.controller is not None else None
    faults = _faults(state)
    session = None
    if state is not None and state.session is not None:
        current = state.session
        session = {
            "session_id": current.session_id,
            "masked_pan": current.masked_pan,
            "phase": state.phase.value,
            "age_s": _rounded(max(0.0, time.monotonic() - current.inserted_s), 1),
        }
    health = sources.vision.health()
    hardware = {
        "camera": _camera_health(sources, faults),
        "card_reader": _card_reader_health(sources, faults),
        "keypad": _keypad_health(sources, faults),
        "actuator": _actuator_health(sources, faults),
        "display": _display_health(sources, faults),
    }
    return {
        "v": PROTOCOL_VERSION,
        "t": utc_iso_ms(time.time()),
        "version": __version__,
        "atm_id": settings.atm.id,
        "pid": os.getpid(),
        "uptime_s": _rounded(time.monotonic() - sources.started_s, 1),
        "phase": state.phase.value if state is not None else "starting",
        "in_service": state is not None and not state.out_of_service,
        "faults": faults,
        "face": {
            "state": state.face_state.value if state is not None else "no_face",
            "count": state.face_count if state is not None else 0,
        },
        "session": session,
        "hardware": hardware,
        "vision": {
            "heartbeat_age_s": _rounded(health.heartbeat_age_s),
            "analysed_fps": _rounded(health.analysed_fps, 2),
            "faults": list(health.faults),
        },
        "watchdog": {
            "enabled": sources.watchdog_interval_s is not None,
            "interval_s": sources.watchdog_interval_s,
            "last_ping_age_s": _rounded(sources.heartbeat.age_s()),
        },
        "events": sources.events.snapshot(),
        "outbox": outbox(),
        "sync": _sync_status(sources),
    }


def encode_answer(answer: Mapping[str, Any]) -> bytes:
    text = json.dumps(
        dict(answer), sort_keys=True, allow_nan=False, ensure_ascii=False, separators=(",", ":")
    )
    return text.encode("utf-8") + b"\n"


# --- the server ------------------------------------------------------------------------------------


class StatusLink:
    """Serves one status answer per connection on its own thread (see the module doc).

    ``path=None`` disables it: ``open()`` and ``close()`` do nothing.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        mode: int = 0o660,
        answer: Callable[[], dict[str, Any]],
        on_close: Callable[[], None] | None = None,
    ) -> None:
        """``answer`` builds one answer (on the socket's thread); ``on_close`` releases what it used."""
        self._path = path
        self._mode = mode
        self._answer = answer
        self._on_close = on_close
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.answered = 0

    @classmethod
    def for_daemon(cls, sources: StatusSources) -> StatusLink:
        from atmguard.config import relative_to_config

        settings = sources.settings
        raw = settings.daemon.status_socket_path
        path = relative_to_config(settings, raw) if raw else None
        outbox = _OutboxReader(sources.journal_path)
        return cls(
            path,
            mode=settings.daemon.status_socket_mode,
            answer=lambda: gather_status(sources, outbox.stats),
            on_close=outbox.close,
        )

    @property
    def path(self) -> Path | None:
        return self._path

    def open(self) -> None:
        if self._path is None:
            logger.info("status socket disabled (daemon.status_socket_path is empty)")
            return
        if self._listener is not None:
            return
        path = self._path
        listener, self._inode = bind_listener(
            path, mode=self._mode, backlog=8, what="status socket", error=StatusLinkError
        )
        listener.settimeout(_ACCEPT_POLL_S)
        self._listener = listener
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="atmguard-statuslink", daemon=True)
        self._thread.start()
        logger.info("status socket listening at %s (mode %03o)", path, self._mode)

    def close(self) -> None:
        if self._listener is None:
            return
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(_THREAD_JOIN_S)
            if self._thread.is_alive():
                logger.warning("status socket thread did not stop within %.1f s", _THREAD_JOIN_S)
            self._thread = None
        self._listener.close()
        self._listener = None
        if self._on_close is not None:
            self._on_close()
        self._unlink_own_socket()
        logger.info("status socket closed")

    def _serve(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                logger.warning("status socket accept failed: %s", exc)
                self._stopping.wait(_ACCEPT_POLL_S)
                continue
            with client:
                self._answer_one(client)

    def _answer_one(self, client: socket.socket) -> None:
        try:
            data = encode_answer(self._answer())
        except Exception:  # a bug here must not end the thread, nor the daemon
            logger.exception("status answer failed")
            data = encode_answer({"v": PROTOCOL_VERSION, "error": "the daemon could not build its status"})
        try:
            client.settimeout(CLIENT_TIMEOUT_S)
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
            self.answered += 1
        except OSError as exc:
            logger.info("status client went away: %s", exc)

    def _unlink_own_socket(self) -> None:
        if self._path is not None and self._inode is not None:
            unlink_if_ours(self._path, self._inode, what="status socket")
        self._inode = None


# --- the client ------------------------------------------------------------------------------------


def status_socket_path(settings: Settings) -> Path | None:
    from atmguard.config import relative_to_config

    raw = settings.daemon.status_socket_path
    return relative_to_config(settings, raw) if raw else None


def query_status(path: Path | None, *, timeout_s: float = CLIENT_TIMEOUT_S) -> dict[str, Any]:
    """Ask the daemon for its status; StatusUnavailable (with a reason) when it does not answer."""
    if path is None:
        raise StatusUnavailable(
            "disabled", "the status socket is disabled (daemon.status_socket_path is empty)"
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout_s)
    deadline = time.monotonic() + timeout_s
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise StatusUnavailable("absent", f"{path}: no status socket (is the daemon running?)") from None
        except ConnectionRefusedError:
            raise StatusUnavailable(
                "refused", f"{path}: nobody answers (the daemon is not running)"
            ) from None
        except PermissionError:
            raise StatusUnavailable(
                "denied", f"{path}: permission denied (run as root or from an account in the atmguard group)"
            ) from None
        except TimeoutError:
            raise StatusUnavailable("timeout", f"{path}: no answer within {timeout_s:g} s") from None
        except OSError as exc:
            raise StatusUnavailable("absent", f"{path}: {exc.strerror or exc}") from None
        chunks: list[bytes] = []
        size = 0
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise StatusUnavailable(
                    "timeout", f"{path}: no complete answer within {timeout_s:g} s"
                ) from None
            except OSError as exc:
                raise StatusUnavailable("invalid", f"{path}: {exc.strerror or exc}") from None
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > _MAX_ANSWER_BYTES:
                raise StatusUnavailable("invalid", f"{path}: answer larger than {_MAX_ANSWER_BYTES} bytes")
    finally:
        sock.close()
    raw = b"".join(chunks)
    if not raw.endswith(b"\n"):
        raise StatusUnavailable("invalid", f"{path}: the answer was cut off")
    try:
        answer = json.loads(raw)
    except ValueError:
        raise StatusUnavailable("invalid", f"{path}: the answer is not JSON") from None
    if not isinstance(answer, dict) or answer.get("v") != PROTOCOL_VERSION:
        raise StatusUnavailable(
            "invalid",
            f"{path}: unsupported status protocol (v={answer.get('v') if isinstance(answer, dict) else None!r})",
        )
    return answer
