"""sd_notify against a real AF_UNIX datagram socket bound by the test (systemd's side)."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from atmguard.service.notify import Notifier


class Listener:
    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2.0)

    def recv(self) -> str:
        return self.sock.recv(65536).decode()

    def recv_all(self, quiet_s: float = 0.2) -> list[str]:
        messages = []
        self.sock.settimeout(quiet_s)
        try:
            while True:
                messages.append(self.sock.recv(65536).decode())
        except TimeoutError:
            return messages
        finally:
            self.sock.settimeout(2.0)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[Listener, str]]:
    path = tmp_path / "notify.sock"
    listener = Listener(str(path))
    yield listener, str(path)
    listener.sock.close()


def test_each_call_sends_its_datagram(listener: tuple[Listener, str]) -> None:
    sock, path = listener
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    notifier.ready()
    notifier.status("starting: journal")
    notifier.watchdog()
    notifier.stopping()
    notifier.extend_timeout(5_000_000)
    assert [sock.recv() for _ in range(5)] == [
        "READY=1",
        "STATUS=starting: journal",
        "WATCHDOG=1",
        "STOPPING=1",
        "EXTEND_TIMEOUT_USEC=5000000",
    ]


def test_reloading_carries_the_monotonic_clock(listener: tuple[Listener, str]) -> None:
    sock, path = listener
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    before_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = sock.recv().split("\n")
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC"
    assert before_usec <= int(value) <= after_usec


def test_status_cannot_inject_another_assignment(listener: tuple[Listener, str]) -> None:
    sock, path = listener
    Notifier.from_environment({"NOTIFY_SOCKET": path}).status("start-up failed: camera\nREADY=1")
    message = sock.recv()
    assert "\n" not in message
    assert message == "STATUS=start-up failed: camera READY=1"


def test_abstract_namespace_socket() -> None:
    name = f"atmguard-test-{os.getpid()}-{secrets.token_hex(4)}"
    listener = Listener(b"\0" + name.encode())
    try:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        notifier.ready()
        notifier.watchdog()
        assert [listener.recv(), listener.recv()] == ["READY=1", "WATCHDOG=1"]
    finally:
        listener.sock.close()


def test_a_manager_that_stops_reading_never_freezes_other_threads(tmp_path: Path) -> None:
    # Nobody drains this socket: once its queue is full every send waits for the timeout, and
    # meanwhile other threads must keep running (libsystemd's notify held the GIL here).
    path = tmp_path / "full.sock"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(path))
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(path)})
    ticks = 0
    stop = threading.Event()

    def count() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.001)

    counter = threading.Thread(target=count)
    counter.start()
    try:
        started = time.monotonic()
        for _ in range(2000):
            notifier.watchdog()
            if time.monotonic() - started > 1.0:
                break
        ticks_before = ticks
        time.sleep(0.2)
        assert ticks > ticks_before + 20, "another thread stopped running while notify blocked"
        t0 = time.monotonic()
        notifier.status("still here")
        assert time.monotonic() - t0 < 1.0, "a send to a full socket must give up quickly"
    finally:
        stop.set()
        counter.join()
        sink.close()


@pytest.mark.parametrize(
    ("extra", "expected_s"),
    [
        ({"WATCHDOG_USEC": "3000000"}, 3.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        (
            {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)},
            None,
        ),  # meant for another process
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(extra: dict[str, str], expected_s: float | None) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": "/run/systemd/notify", **extra})
    assert notifier.watchdog_interval_s == expected_s


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "3000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None  # nobody to ping
    started = time.perf_counter()
    for _ in range(1000):
        notifier.ready()
        notifier.status("x")
        notifier.watchdog()
        notifier.reloading()
        notifier.stopping()
    assert time.perf_counter() - started < 0.5


def test_unbound_socket_does_not_raise_and_warns_once(tmp_path: Path, caplog) -> None:
    path = tmp_path / "gone.sock"
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(path)})
    with caplog.at_level(logging.DEBUG, logger="atmguard.service.notify"):
        for _ in range(5):
            notifier.watchdog()
            notifier.status("still here")
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "WATCHDOG" in warnings[0].getMessage()

        # systemd comes back (socket bound again): messages flow, and the recovery is logged.
        listener = Listener(str(path))
        try:
            notifier.ready()
            assert listener.recv() == "READY=1"
        finally:
            listener.sock.close()
    assert any("works again" in r.getMessage() for r in caplog.records)

    # And a socket closed under us is again only a warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="atmguard.service.notify"):
        notifier.ready()
    assert len(caplog.records) == 1


def test_concurrent_callers_each_deliver_whole_messages(listener: tuple[Listener, str]) -> None:
    sock, path = listener
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    received: list[str] = []
    done = threading.Event()

    def drain() -> None:
        sock.sock.settimeout(0.1)
        while True:
            try:
                received.append(sock.sock.recv(65536).decode())
            except TimeoutError:
                if done.is_set():
                    return

    reader = threading.Thread(target=drain)
    reader.start()

    def work(n: int) -> None:
        for i in range(100):
            notifier.status(f"thread {n} message {i}")
            notifier.watchdog()

    workers = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    time.sleep(0.3)
    done.set()
    reader.join()
    assert received.count("WATCHDOG=1") == 400
    statuses = sorted(m for m in received if m.startswith("STATUS="))
    assert statuses == sorted(f"STATUS=thread {n} message {i}" for n in range(4) for i in range(100))
