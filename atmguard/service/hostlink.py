"""The host socket: atmguard's decisions, live, for the ATM host software.

Protocol (version 1)
====================

atmguard listens on a UNIX stream socket, ``daemon.host_socket_path`` (default
``/run/atmguard/host.sock``, mode ``daemon.host_socket_mode``, default 0660: the host software's
user must be in atmguard's group). Any number of clients may connect. atmguard only writes; what
a client sends is read and thrown away.

Every message is one line: a JSON object, UTF-8, keys sorted, ending in ``\\n``. Each has
``"v": 1`` (the protocol version; a new field may appear in version 1, a changed meaning gets a
new version), ``"type"``, ``"atm_id"`` and ``"t"`` (UTC, ISO-8601 with milliseconds and ``Z``).

``type = "status"``: whether the ATM may serve customers. Sent to every client when it changes,
and to each new client as its first line (with the ``t`` of the change), so a host that connects
or reconnects knows at once.

    {"atm_id":"ATM-0001","detail":"","state":"in_service","t":"2025-03-01T09:12:44.031Z","type":"status","v":1}
    {"atm_id":"ATM-0001","detail":"faults: camera","state":"out_of_service","t":"2025-03-01T09:20:02.540Z","type":"status","v":1}

- ``state``: ``"in_service"`` or ``"out_of_service"``.
- ``detail``: why it is out of service (``"starting"``, ``"stopping"``, ``"faults: camera, journal"``);
  empty when in service.

``type = "decision"``: how a card session ended, sent once when the decision is made (after it is
committed to the local journal).

    {"atm_id":"ATM-0001","journal_uuid":"0b6f5c1e-3d0e-4c47-9d0a-7c1f2f3e9a10","masked_pan":"476173******0001","outcome":"approve","reason":"approved","session_id":"s-20250301-0042","t":"2025-03-01T09:14:05.112Z","type":"decision","v":1}
    {"atm_id":"ATM-0001","journal_uuid":"5d1c...","masked_pan":"476173******0002","outcome":"retain","reason":"hot_listed","session_id":"s-20250301-0043","t":"2025-03-01T09:16:40.870Z","type":"decision","v":1}

- ``session_id``: the session, as in the journal and the central database.
- ``outcome``: ``"approve"`` (card, PIN and uncovered face accepted: the host may go on with the
  transaction), ``"deny"`` (card returned, no transaction) or ``"retain"`` (the card was kept).
- ``reason``: why, one of ``approved``, ``card_unreadable``, ``card_invalid``, ``card_expired``,
  ``card_closed``, ``unknown_card``, ``hot_listed``, ``pin_attempts_exhausted``,
  ``pin_cancelled``, ``pin_timeout``, ``face_covered``, ``no_face``, ``bank_unavailable``,
  ``evidence_failed``, ``session_timeout``, ``forgotten_card``, ``out_of_service``, ``shutdown``,
  ``card_removed``, ``face_mismatch``, ``face_unverified``, ``not_enrolled`` (new reasons may be
  added: treat an unknown one as a denial).
- ``masked_pan``: first 6 and last 4 digits at most (``""`` when no card was read). Never a PIN.
- ``journal_uuid``: the decision's record in the journal (``null`` if it could not be journaled).

Delivery
--------

This is a live feed, at most once. A client that is not connected when a line is sent never gets
it; a client that does not keep up (its socket buffer is full) or has hung up is disconnected,
never waited for, so the host software cannot stall the ATM. Reconnect and you get the current
status first. The local journal and the central database are the record of what happened; this
socket is not.

A host must treat anything but a received ``"outcome": "approve"`` for the current session as
"no approval": a missing socket, a refused or closed connection, a partial last line (no ``\\n``
before the connection closed: discard it), an unknown ``outcome`` or ``reason``, and
``out_of_service``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import selectors
import socket
import struct
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atmguard.errors import AtmguardError
from atmguard.lifecycle import Managed
from atmguard.service.unixsocket import bind_listener, unlink_if_ours

if TYPE_CHECKING:
    from atmguard.config import Settings
    from atmguard.session.actions import Decision

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
STATES = ("in_service", "out_of_service")
_READ_CHUNK_BYTES = 65536
_THREAD_JOIN_S = 2.0


class HostLinkError(AtmguardError, OSError):
    """The host socket cannot be created at its path."""


def utc_iso_ms(t_wall_s: float) -> str:
    """``2025-03-01T09:14:05.112Z``."""
    return datetime.fromtimestamp(t_wall_s, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode_line(message: Mapping[str, Any]) -> bytes:
    """One protocol line: JSON, sorted keys, UTF-8, no NaN/Infinity (not JSON), ``\\n``-terminated."""
    text = json.dumps(
        dict(message), sort_keys=True, allow_nan=False, ensure_ascii=False, separators=(",", ":")
    )
    return text.encode("utf-8") + b"\n"


class _Client:
    __slots__ = ("label", "sock")

    def __init__(self, sock: socket.socket, label: str) -> None:
        self.sock = sock
        self.label = label


def _peer_label(sock: socket.socket, number: int) -> str:
    """``#3 pid 812 uid 1001``: who connected, for the log (SO_PEERCRED, Linux)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
    except (OSError, AttributeError, struct.error):
        return f"#{number}"
    return f"#{number} pid {pid} uid {uid}"


class HostLink(Managed):
    """Publishes decisions and service status as JSON lines on a UNIX socket (see module doc).

    A background thread accepts clients, sends each its first status line, and reads and discards
    whatever they send. ``publish`` writes from the caller's thread without ever blocking on a
    client. With ``path=None`` the link is disabled: everything is a no-op, ``publish`` returns 0.
    """

    def __init__(self, path: Path | None, *, atm_id: str = "", mode: int = 0o660) -> None:
        self._path = path
        self._atm_id = atm_id
        self._mode = mode
        self._lock = threading.Lock()
        self._clients: dict[int, _Client] = {}  # by fd; guarded by _lock
        self._doomed: list[_Client] = []  # dropped by publish(), closed by the thread; guarded by _lock
        self._connections = 0
        self._status_line = encode_line(self._status_message("out_of_service", "starting", time.time()))
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> HostLink:
        from atmguard.config import relative_to_config

        raw = settings.daemon.host_socket_path
        path = relative_to_config(settings, raw) if raw else None
        return cls(path, atm_id=settings.atm.id, mode=settings.daemon.host_socket_mode)

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def enabled(self) -> bool:
        return self._path is not None

    @property
    def clients(self) -> int:
        """How many clients are connected now."""
        with self._lock:
            return len(self._clients)

    # --- lifecycle -------------------------------------------------------------------------------

    def open(self) -> None:
        if self._path is None:
            logger.info("host socket disabled (daemon.host_socket_path is empty)")
            return
        if self._listener is not None:
            return
        path = self._path
        listener, self._inode = bind_listener(
            path, mode=self._mode, backlog=16, what="host socket", error=HostLinkError
        )
        listener.setblocking(False)
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="atmguard-hostlink", daemon=True)
        self._thread.start()
        logger.info("host socket listening at %s (mode %03o)", path, self._mode)

    def close(self) -> None:
        if self._listener is None:
            return
        # A host still connected learns at once rather than from the closed socket alone.
        self.publish_status("out_of_service", "stopping")
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(_THREAD_JOIN_S)
            if self._thread.is_alive():
                logger.warning("host socket thread did not stop within %.1f s", _THREAD_JOIN_S)
            self._thread = None
        with self._lock:
            leaving = list(self._clients.values()) + self._doomed
            self._clients.clear()
            self._doomed.clear()
        for client in leaving:
            client.sock.close()
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._listener = self._wake_r = self._wake_w = None
        self._unlink_own_socket()
        logger.info("host socket closed")

    # --- publishing ------------------------------------------------------------------------------

    def publish(self, message: Mapping[str, Any]) -> int:
        """Send one JSON line to every connected client; how many got all of it.

        Never waits for a client: one whose socket buffer is full, or that hung up, is dropped.
        """
        line = encode_line(message)
        with self._lock:
            return self._send_locked(line)

    def publish_decision(self, decision: Decision, *, t_wall_s: float, journal_uuid: str | None) -> int:
        """The decision message (see the module doc); returns how many clients got it."""
        return self.publish(
            {
                "v": PROTOCOL_VERSION,
                "type": "decision",
                "atm_id": self._atm_id,
                "session_id": decision.session_id,
                "outcome": decision.outcome.value,
                "reason": decision.reason.value,
                "masked_pan": decision.masked_pan,
                "t": utc_iso_ms(t_wall_s),
                "journal_uuid": journal_uuid,
            }
        )

    def publish_status(self, state: str, detail: str, *, t_wall_s: float | None = None) -> int:
        """Record the service state (replayed to each new client) and send it to every client."""
        if state not in STATES:
            raise ValueError(f"status state must be one of {STATES}, not {state!r}")
        line = encode_line(self._status_message(state, detail, time.time() if t_wall_s is None else t_wall_s))
        with self._lock:
            self._status_line = line
            return self._send_locked(line)

    def _status_message(self, state: str, detail: str, t_wall_s: float) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "type": "status",
            "atm_id": self._atm_id,
            "state": state,
            "detail": detail,
            "t": utc_iso_ms(t_wall_s),
        }

    def _send_locked(self, line: bytes) -> int:
        delivered = 0
        for fd, client in list(self._clients.items()):
            why = self._try_send(client, line)
            if why is None:
                delivered += 1
            else:
                self._drop_locked(fd, client, why)
        if self._doomed:
            self._wake()
        return delivered

    @staticmethod
    def _try_send(client: _Client, line: bytes) -> str | None:
        """None when the whole line went into the client's socket buffer, else why not."""
        try:
            sent = client.sock.send(line, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return "not reading (socket buffer full)"
        except OSError as exc:
            return f"hung up ({exc.strerror or exc})"
        if sent < len(line):
            # Part of a line is in its buffer: it must see EOF so it discards that part.
            return "not reading (socket buffer full mid-line)"
        return None

    def _drop_locked(self, fd: int, client: _Client, why: str) -> None:
        """Forget a client now; the thread closes it (it may be inside select() with it)."""
        self._clients.pop(fd, None)
        # shutdown, not close: the fd number stays ours until the thread unregisters it.
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_RDWR)
        self._doomed.append(client)
        logger.warning("host client %s dropped: %s", client.label, why)

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):  # BlockingIOError: a wake-up is pending anyway
                self._wake_w.send(b"\0")

    # --- the accept / drain thread -------------------------------------------------------------

    def _serve(self) -> None:
        selector, listener = self._selector, self._listener
        assert selector is not None and listener is not None
        while not self._stopping.is_set():
            try:
                events = selector.select(timeout=1.0)
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            for key, _mask in events:
                sock = key.fileobj
                if sock is listener:
                    self._accept_all(selector, listener)
                elif sock is self._wake_r:
                    with contextlib.suppress(OSError):
                        while self._wake_r.recv(4096):
                            pass
                else:
                    self._drain(key.data)
            self._close_doomed(selector)

    def _accept_all(self, selector: selectors.BaseSelector, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: keep serving those already connected
                logger.warning("host socket accept failed: %s", exc)
                return
            sock.setblocking(False)
            self._connections += 1
            client = _Client(sock, _peer_label(sock, self._connections))
            with self._lock:
                self._clients[sock.fileno()] = client
                why = self._try_send(client, self._status_line)
                if why is not None:
                    self._drop_locked(sock.fileno(), client, why)
                    continue
            selector.register(sock, selectors.EVENT_READ, client)
            logger.info("host client %s connected", client.label)

    def _drain(self, client: _Client) -> None:
        """Read and discard what a client sent; EOF or an error means it hung up."""
        hung_up = False
        try:
            # Bounded, so a client that floods us cannot starve the others.
            for _ in range(16):
                if not client.sock.recv(_READ_CHUNK_BYTES):
                    hung_up = True
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            hung_up = True
        if hung_up:
            with self._lock:
                fd = client.sock.fileno()
                if self._clients.get(fd) is client:
                    self._clients.pop(fd)
                    self._doomed.append(client)
                    logger.info("host client %s disconnected", client.label)

    def _close_doomed(self, selector: selectors.BaseSelector) -> None:
        with self._lock:
            doomed, self._doomed = self._doomed, []
        for client in doomed:
            with contextlib.suppress(KeyError, ValueError, OSError):
                selector.unregister(client.sock)
            client.sock.close()

    def _unlink_own_socket(self) -> None:
        if self._path is not None and self._inode is not None:
            unlink_if_ours(self._path, self._inode, what="host socket")
        self._inode = None
