"""`atmguard run` as a subprocess on simulated hardware, as systemd would run it.

The test binds the NOTIFY_SOCKET itself, reads decisions from the host socket like the ATM host
software, drives the simulated card reader, keypad and camera through the sim control socket,
and talks to a real (throwaway) MariaDB holding the accounts.
"""

from __future__ import annotations

import itertools
import json
import os
import pty
import select
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from atmguard.datasets import scene_images, shared_datasets_dir
from atmguard.hardware.card.testcards import luhn_complete
from atmguard.harness.rig import SimClient, SimRig
from atmguard.service.statuslink import query_status
from atmguard.store.central import CardStatus
from atmguard.store.throwaway_mariadb import ThrowawayMariaDB

PIN = "739184"
# The camera scenes are real photos read in place from ../shared/datasets (present in CI).
pytestmark = pytest.mark.skipif(
    not scene_images("uncovered"),
    reason=f"face images for the camera scenes: {shared_datasets_dir()} is absent",
)
GOOD_PAN = luhn_complete("476173100", length=16)
HOT_PAN = luhn_complete("476173200", length=16)


@pytest.fixture
def rig(tmp_path: Path, mariadb_server: ThrowawayMariaDB) -> Iterator[SimRig]:
    rig = SimRig(
        tmp_path, server=mariadb_server, database="atm_e2e", atm_id="E2E-ATM-1", watchdog_usec=1_000_000
    )
    rig.prepare()
    rig.provision(GOOD_PAN, PIN)
    rig.provision(HOT_PAN, PIN, status=CardStatus.HOT_LISTED)
    try:
        yield rig
    finally:
        rig.close()


def test_daemon_runs_sessions_under_the_systemd_protocol(rig: SimRig) -> None:
    rig.start()
    ready_at = rig.wait_ready(timeout_s=90)
    notify = rig.notify
    assert notify is not None

    # Watchdog pings at half of WATCHDOG_USEC while all is well.
    notify.pump(3.0)
    pings = notify.pings(ready_at, time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) >= 4, notify.messages
    assert all(0.3 <= gap <= 0.8 for gap in gaps), gaps
    assert any(line.startswith("STATUS=in service") for _, line in notify.messages), notify.messages

    client = rig.client()
    assert_comes_into_service(client)
    client.wait_state(timeout_s=10, phase="idle", faults=[])

    # 1. An uncovered customer with a good card and the right PIN is approved.
    client.show("uncovered", expect="uncovered")
    client.start_session(GOOD_PAN)
    client.command(cmd="keys", keys=PIN + "#")
    decision = client.next_message("decision", timeout_s=15)
    assert (decision["outcome"], decision["reason"]) == ("approve", "approved"), decision
    assert decision["masked_pan"].startswith(GOOD_PAN[:6]) and GOOD_PAN not in json.dumps(decision)
    client.take_card()
    client.wait_state(timeout_s=10, phase="idle", card_entry=True)

    # 2. A hot-listed card is retained, whatever the face.
    client.command(cmd="scene", name="covered")
    client.start_session(HOT_PAN)
    decision = client.next_message("decision", timeout_s=15)
    assert (decision["outcome"], decision["reason"]) == ("retain", "hot_listed"), decision
    state = client.wait_state(timeout_s=10, phase="idle")
    assert state["captured_cards"] == 1

    # 3. A wedged controller stops the pings (systemd would kill and restart the service).
    client.command(cmd="stall", seconds=4.0)
    stalled_at = time.monotonic()
    notify.pump(3.5)
    assert notify.pings(stalled_at + 0.6, stalled_at + 3.5) == []
    notify.pump(2.5)
    assert notify.pings(stalled_at + 4.0, time.monotonic()), "pings did not resume after the stall"

    # 4. SIGTERM: STOPPING=1 and exit 0 within a few seconds.
    client.close()
    term_at = time.monotonic()
    assert rig.stop(timeout_s=10) == 0, rig.log_text()[-3000:]
    assert time.monotonic() - term_at < 8
    notify.pump(0.3)
    assert any(line == "STOPPING=1" for _, line in notify.messages)

    # The journal holds both decisions and sealed evidence; the PIN and the PANs are nowhere.
    journal = sqlite3.connect(rig.journal_path)
    kinds = [row[0] for row in journal.execute("SELECT kind FROM events ORDER BY seq")]
    assert kinds.count("decision") == 2 and "daemon_started" in kinds
    assert journal.execute("SELECT COUNT(*) FROM snapshots").fetchone()[0] >= 2
    payloads = "\n".join(row[0] for row in journal.execute("SELECT payload FROM events"))
    journal.close()
    # The PIN in text (hex ids could hold six digits by chance); the 16-digit PANs in whole files.
    for text in (rig.log_text(), rig.display_path.read_text(), payloads):
        assert PIN not in text
    for path in (rig.log_path, rig.display_path, rig.journal_path):
        data = path.read_bytes()
        assert GOOD_PAN.encode() not in data and HOT_PAN.encode() not in data, f"a full PAN in {path.name}"


def test_daemon_declines_covered_faces_retains_on_pin_exhaustion_and_rides_out_a_lost_camera(
    tmp_path: Path, mariadb_server: ThrowawayMariaDB
) -> None:
    rig = SimRig(
        tmp_path,
        server=mariadb_server,
        database="atm_e2e_rules",
        atm_id="E2E-ATM-2",
        overrides={"session": {"uncover_timeout_s": 3.0}},
    )
    rig.prepare()
    rig.provision(GOOD_PAN, PIN, max_pin_attempts=3)
    try:
        rig.start()
        rig.wait_ready(timeout_s=90)
        client = rig.client()
        assert_comes_into_service(client)
        client.wait_state(timeout_s=10, phase="idle", card_entry=True)

        # 1. A covered face: prompted, then declined after uncover_timeout_s; the card comes back.
        client.show("covered", expect="covered")
        client.start_session(GOOD_PAN)
        client.command(cmd="keys", keys=PIN + "#")
        decision = client.next_message("decision", timeout_s=15)
        assert (decision["outcome"], decision["reason"]) == ("deny", "face_covered"), decision
        assert "Please remove your face covering" in rig.display_path.read_text()
        client.take_card()
        assert client.command(cmd="state")["captured_cards"] == 0
        client.wait_state(timeout_s=10, phase="idle", card_entry=True)

        # 2. Three wrong PINs (counted by the bank): the card is retained.
        client.show("uncovered", expect="uncovered")
        client.start_session(GOOD_PAN)
        for attempt in range(3):
            client.command(cmd="keys", keys="000000#")
            if attempt < 2:  # the machine asks again once the bank has answered
                _wait_for_text(rig.display_path, f"Wrong PIN - {2 - attempt} attempt", timeout_s=10)
        decision = client.next_message("decision", timeout_s=15)
        assert (decision["outcome"], decision["reason"]) == ("retain", "pin_attempts_exhausted"), decision
        client.wait_state(timeout_s=10, phase="idle", captured_cards=1)

        # 3. The camera is lost: out of service at once, back in service by itself.
        client.command(cmd="scene", name="lost")
        status = client.next_message("status", timeout_s=10)
        assert status["state"] == "out_of_service" and "camera" in status["detail"], status
        assert client.next_message("status", timeout_s=15)["state"] == "in_service"
        client.wait_state(timeout_s=10, phase="idle", faults=[], card_entry=True)

        # 4. SIGHUP reloads without a restart.
        assert rig.process is not None and rig.notify is not None
        rig.process.send_signal(signal.SIGHUP)
        reloading_at = rig.notify.wait_for("RELOADING=1", timeout_s=10)
        end = time.monotonic() + 10
        while not any(t > reloading_at and line == "READY=1" for t, line in list(rig.notify.messages)):
            assert time.monotonic() < end, "no READY=1 after the reload"
            time.sleep(0.05)
        assert "session policy and log level reloaded" in rig.log_text()
        client.close()
        assert rig.stop() == 0, rig.log_text()[-3000:]
    finally:
        rig.close()


def assert_comes_into_service(client: SimClient) -> None:
    """The host's first line is the current status: in service, or "starting" when the client
    connected between READY=1 and the controller's first status, followed by in service."""
    first = client.next_message("status", timeout_s=5)
    if first["state"] == "out_of_service":
        assert first["detail"] == "starting", first
        first = client.next_message("status", timeout_s=5)
    assert first["state"] == "in_service", first


def _wait_for_text(path: Path, text: str, *, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never shown; display: {path.read_text()[-500:]}")


class Screen:
    """The customer display as a pty behind a udev-style symlink, read by a thread like a screen."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self.text = ""
        self._lock = threading.Lock()
        self._fds: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.plug_in()

    def plug_in(self) -> None:
        controller, terminal = pty.openpty()
        tmp = self.link.with_name(self.link.name + ".new")
        tmp.symlink_to(os.ttyname(terminal))
        tmp.replace(self.link)
        self._fds = (controller, terminal)
        self._stop.clear()
        self._thread = threading.Thread(target=self._read, args=(controller,), daemon=True)
        self._thread.start()

    def _read(self, controller: int) -> None:
        while not self._stop.is_set():
            if select.select([controller], [], [], 0.05)[0]:
                try:
                    data = os.read(controller, 4096)
                except OSError:
                    return
                with self._lock:
                    self.text += data.decode(errors="replace")

    def unplug(self) -> None:
        """The screen's side of the line goes away: every later write to it fails (EIO)."""
        self._stop.set()
        assert self._thread is not None and self._fds is not None
        self._thread.join(2.0)
        for fd in self._fds:
            os.close(fd)
        self._fds = None
        with self._lock:
            self.text = ""

    def wait_for(self, text: str, *, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while text not in self.text:
            assert time.monotonic() < end, f"{text!r} never shown; screen: {self.text[-500:]!r}"
            time.sleep(0.05)

    def close(self) -> None:
        if self._fds is not None:
            self.unplug()


def test_a_dead_screen_ends_the_session_and_keeps_the_atm_out_of_service_until_it_is_back(
    tmp_path: Path, mariadb_server: ThrowawayMariaDB
) -> None:
    screen = Screen(tmp_path / "atm-display")
    rig = SimRig(
        tmp_path / "rig",
        server=mariadb_server,
        database="atm_e2e_display",
        atm_id="E2E-ATM-3",
        overrides={"display": {"device": str(screen.link)}},
    )
    rig.prepare()
    rig.provision(GOOD_PAN, PIN)
    try:
        rig.start()
        rig.wait_ready(timeout_s=90)
        client = rig.client()
        assert_comes_into_service(client)
        screen.wait_for("[ATM] Insert card", timeout_s=10)

        # The screen dies while the customer enters the PIN: nobody can be told what to do, so
        # the session ends with the card given back, and no card is taken until the screen is back.
        client.show("uncovered", expect="uncovered")
        client.start_session(GOOD_PAN)
        screen.wait_for("[ATM] Enter PIN", timeout_s=10)
        screen.unplug()
        client.command(cmd="keys", keys=PIN[:2])
        decision = client.next_message("decision", timeout_s=15)
        assert (decision["outcome"], decision["reason"]) == ("deny", "out_of_service"), decision
        status = client.next_message("status", timeout_s=10)
        assert status["state"] == "out_of_service" and "display" in status["detail"], status
        client.take_card()
        client.wait_state(timeout_s=10, phase="out_of_service", faults=["display"], card_entry=False)
        display = query_status(rig.work_dir / "status.sock")["hardware"]["display"]
        assert display["ok"] is False and "cannot write to display" in display["detail"], display

        screen.plug_in()  # the daemon reopens the device on its own
        assert client.next_message("status", timeout_s=15)["state"] == "in_service"
        client.wait_state(timeout_s=10, phase="idle", faults=[], card_entry=True)
        screen.wait_for("[ATM] Insert card", timeout_s=10)
        assert query_status(rig.work_dir / "status.sock")["hardware"]["display"]["ok"] is True
        client.close()
        assert rig.stop() == 0, rig.log_text()[-3000:]
    finally:
        rig.close()
        screen.close()
