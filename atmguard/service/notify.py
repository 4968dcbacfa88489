"""systemd service notification (sd_notify): READY, STATUS, WATCHDOG, STOPPING, RELOADING.

systemd passes the address of its notification socket in ``$NOTIFY_SOCKET`` (a path, or
``@name`` for the abstract namespace). Each message is one datagram of ``KEY=value`` lines. We
speak this small, stable protocol ourselves rather than through systemd-python's
``systemd.daemon.notify``: that call keeps the GIL across libsystemd's blocking ``sendmsg``, so a
manager that stops draining its socket froze every thread of the daemon (seen in the end-to-end
test: the bank worker waited > 15 s for the GIL). Our ``sendto`` releases the GIL and gives up
after a short timeout.

A notification failure must never take the service down: the ATM keeps refusing or serving
cards exactly as before, and systemd's own watchdog is what notices a daemon that really hangs.
So sending never raises; the first failure is logged at WARNING, repeats at DEBUG until a send
works again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)

# A datagram to systemd must not hold the caller (the controller thread pings the watchdog).
# systemd drains its socket promptly; if it does not within this bound, the message is dropped.
_SEND_TIMEOUT_S = 0.25
# STATUS= is shown by `systemctl status`; systemd truncates long lines anyway.
_STATUS_MAX_CHARS = 400


def _socket_address(raw: str) -> str | bytes:
    """``@name`` is Linux's abstract namespace: the kernel wants a leading NUL byte."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


def _parse_watchdog_interval_s(environ: Mapping[str, str]) -> float | None:
    """WATCHDOG_USEC as seconds, if it is meant for this process (WATCHDOG_PID unset or ours)."""
    raw_usec = environ.get("WATCHDOG_USEC", "").strip()
    if not raw_usec:
        return None
    raw_pid = environ.get("WATCHDOG_PID", "").strip()
    if raw_pid:
        try:
            pid = int(raw_pid)
        except ValueError:
            logger.warning("ignoring the systemd watchdog: WATCHDOG_PID=%r is not a number", raw_pid)
            return None
        if pid != os.getpid():
            # Inherited from a parent that systemd watches, not us: pinging would lie for it.
            logger.debug("WATCHDOG_PID=%d is not this process (%d): no watchdog", pid, os.getpid())
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        logger.warning("ignoring the systemd watchdog: WATCHDOG_USEC=%r is not a number", raw_usec)
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000


def _one_line(text: str) -> str:
    """A newline would start a new KEY=value assignment (e.g. a forged READY=1): flatten it."""
    flat = " ".join(text.splitlines())
    return flat[:_STATUS_MAX_CHARS]


class Notifier:
    """Tells systemd how the service is doing. Every method is a no-op without ``$NOTIFY_SOCKET``.

    Thread-safe: the controller thread pings the watchdog while others report status.
    """

    def __init__(self, address: str | None, *, watchdog_interval_s: float | None = None) -> None:
        """``address``: the NOTIFY_SOCKET value (None: disabled)."""
        self._address = address or None
        self._watchdog_interval_s = watchdog_interval_s if self._address else None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """The notifier systemd asked for through the environment (a no-op one outside systemd)."""
        address = environ.get("NOTIFY_SOCKET", "").strip() or None
        interval_s = _parse_watchdog_interval_s(environ) if address else None
        logger.debug(
            "systemd notification: %s, watchdog %s",
            address or "off",
            f"{interval_s:g} s" if interval_s else "off",
        )
        return cls(address, watchdog_interval_s=interval_s)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """systemd's WatchdogSec for us, or None; ping at half of it."""
        return self._watchdog_interval_s

    def ready(self) -> None:
        self._notify("READY=1")

    def status(self, text: str) -> None:
        self._notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> None:
        self._notify("WATCHDOG=1")

    def stopping(self) -> None:
        self._notify("STOPPING=1")

    def reloading(self) -> None:
        # Type=notify-reload (systemd 253+) wants the monotonic time with RELOADING=1; older
        # systemd ignores the extra field. READY=1 again ends the reload.
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")

    def extend_timeout(self, usec: int) -> None:
        """Ask for ``usec`` more microseconds before systemd's start/stop timeout fires."""
        self._notify(f"EXTEND_TIMEOUT_USEC={max(0, int(usec))}")

    def close(self) -> None:
        """Release the plain-protocol socket (later messages reopen it)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    # --- delivery -----------------------------------------------------------------------------

    def _notify(self, message: str) -> None:
        if self._address is None:
            return
        with self._lock:
            try:
                self._send_datagram(message)
                delivered, error = True, ""
            except Exception as exc:  # whatever the transport raised, the service carries on
                delivered, error = False, str(exc) or type(exc).__name__
            self._account(message, delivered, error)

    def _send_datagram(self, message: str) -> None:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.settimeout(_SEND_TIMEOUT_S)
            self._sock = sock
        assert self._address is not None
        try:
            self._sock.sendto(message.encode(), _socket_address(self._address))
        except OSError:
            # A fresh socket next time, in case this one is in a bad state.
            self._sock.close()
            self._sock = None
            raise

    def _account(self, message: str, delivered: bool, error: str) -> None:
        what = message.split("=", 1)[0]
        if delivered:
            if self._failing:
                logger.info("systemd notification works again (%s)", what)
                self._failing = False
            return
        if not self._failing:
            logger.warning(
                "systemd notification to %s failed (%s: %s); carrying on, repeats logged at DEBUG",
                self._address,
                what,
                error,
            )
            self._failing = True
        else:
            logger.debug("systemd notification failed again (%s: %s)", what, error)
