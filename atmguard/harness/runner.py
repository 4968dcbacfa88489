"""Run scenarios against the real daemon on simulated hardware and check their expectations.

One :class:`ScenarioRunner` owns a throwaway MariaDB (the bank's central server) and the daemons:
scenarios with the same ``[config]`` share one ``atmguard run`` process, which is restarted when a
scenario stopped it, took the bank away or left the ATM unable to serve. Before each scenario the
ATM must be idle, in service and looking at an empty scene, so one scenario cannot leak into the
next. Each card gets a PAN of its own, derived from the scenario file and card name, and is
(re)opened at the bank with its PIN and status before the scenario starts.

The timeline (what the harness did, what the display showed, what the host socket said) is
printed as it happens and kept in the :class:`ScenarioResult`, with the checks that failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from atmguard.datasets import shared_datasets_dir
from atmguard.hardware.card.testcards import add_months, luhn_complete
from atmguard.harness.rig import SimClient, SimRig
from atmguard.harness.scenario import Card, CardStatusAtBank, Scenario, Step
from atmguard.store.central import CardStatus
from atmguard.store.throwaway_mariadb import MariaDBUnavailable, ThrowawayMariaDB

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 20.0
"""How long the ATM may take to be idle and in service again before a scenario starts."""
SYNC_TIMEOUT_S = 30.0
CHECK_TIMEOUT_S = 15.0
"""How long what follows a decision (retention, the last journal records) may take to happen."""
DECISION_GRACE_S = 15.0
"""After the last step, how long the runner still waits for an expected decision."""
HARNESS_CONFIG: dict[str, dict[str, Any]] = {
    # Short timeouts so the library runs in minutes; each scenario may override them.
    "session": {"uncover_timeout_s": 4.0, "card_take_timeout_s": 5.0, "session_timeout_s": 60.0},
}
PAN_PREFIX = "476173"


@dataclass
class Evidence:
    """One sealed snapshot of the session, as the journal holds it."""

    uuid: str
    reason: str
    is_fraud_evidence: bool
    sealed_frame: bytes
    sealed_crop: bytes | None


@dataclass
class ScenarioResult:
    path: Path
    title: str
    rule: str
    status: str = "passed"  # passed | failed | skipped
    failures: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)
    session_id: str | None = None
    outcome: str | None = None
    reason: str | None = None
    session_s: float | None = None
    """From the card's insertion to the decision on the host socket."""
    decided_in_ms: float | None = None
    """The daemon's own measure: from the last input the decision needed to the decision."""
    evidence: list[Evidence] = field(default_factory=list)
    private_key_file: Path | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def card_pan(scenario_path: Path, card_name: str, card: Card) -> str:
    """A PAN of this card alone (stable across runs), with a wrong check digit if asked."""
    digest = hashlib.sha256(f"{scenario_path.stem}/{card_name}".encode()).hexdigest()
    pan = luhn_complete(PAN_PREFIX + str(int(digest, 16))[:9], length=16)
    if not card.luhn_valid:
        pan = pan[:-1] + str((int(pan[-1]) + 5) % 10)
    return pan


def masked(pan: str) -> str:
    return f"{pan[:6]}{'*' * (len(pan) - 10)}{pan[-4:]}"


class _Daemon:
    """One running ``atmguard run`` with its client, for scenarios of one configuration."""

    def __init__(self, rig: SimRig, client: SimClient, config_key: str) -> None:
        self.rig = rig
        self.client = client
        self.config_key = config_key

    @property
    def alive(self) -> bool:
        return self.rig.process is not None and self.rig.process.poll() is None

    def close(self) -> int:
        with contextlib.suppress(OSError):
            self.client.close()
        code = self.rig.stop()
        self.rig.close()
        return code


class ScenarioRunner:
    """Runs scenario files; use as a context manager (it owns a MariaDB server and daemons)."""

    def __init__(
        self,
        work_dir: Path,
        *,
        central: bool = True,
        echo: Callable[[str], None] = print,
        datasets: Path | None = None,
    ) -> None:
        self.work_dir = work_dir
        self.want_central = central
        self.echo = echo
        self.datasets = datasets
        self.server: ThrowawayMariaDB | None = None
        self.central_note = ""
        self._daemon: _Daemon | None = None
        self._daemon_numbers = itertools.count(1)
        self._started_s = time.monotonic()

    # --- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> ScenarioRunner:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if not self.want_central:
            self.central_note = "no central server (--no-central): journal only"
            return self
        try:
            self.server = ThrowawayMariaDB().start()
            self.central_note = f"central server: throwaway MariaDB on {self.server.host}:{self.server.port}"
        except (MariaDBUnavailable, FileNotFoundError, OSError) as exc:
            self.server = None
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.central_note = f"no central server could be started ({first_line}): journal only"
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop_daemon()
        if self.server is not None:
            self.server.stop()

    @property
    def has_central(self) -> bool:
        return self.server is not None

    # --- running -------------------------------------------------------------------------------------

    def run_all(self, scenarios: Iterable[tuple[Path, Scenario]]) -> list[ScenarioResult]:
        return [self.run(path, scenario) for path, scenario in scenarios]

    def run(self, path: Path, scenario: Scenario) -> ScenarioResult:
        result = ScenarioResult(path=path, title=scenario.scenario.title, rule=scenario.scenario.rule)
        self.echo(f"\n== {path.stem}: {scenario.scenario.title}")
        if scenario.scenario.central and not self.has_central:
            return self._skip(result, "it needs the central server (bank), and none is running")
        datasets = self.datasets or shared_datasets_dir()
        if scenario.needs_datasets and not datasets.is_dir():
            return self._skip(result, f"its faces are photos from {datasets}, which is absent")
        try:
            daemon = self._daemon_for(path, scenario)
            _Run(self, daemon, path, scenario, result).execute()
        except Exception as exc:  # a harness or daemon failure fails this scenario, not the run
            logger.debug("scenario %s failed", path, exc_info=True)
            result.failures.append(f"{type(exc).__name__}: {exc}")
            self._stop_daemon()
        result.status = "passed" if not result.failures else "failed"
        self.echo(
            f"   {'PASS' if result.passed else 'FAIL'}" + "".join(f"\n   - {f}" for f in result.failures)
        )
        return result

    def _skip(self, result: ScenarioResult, why: str) -> ScenarioResult:
        result.status = "skipped"
        result.failures.append(why)
        self.echo(f"   skipped: {why}")
        return result

    def elapsed_s(self) -> float:
        return time.monotonic() - self._started_s

    def _daemon_for(self, path: Path, scenario: Scenario) -> _Daemon:
        """A healthy daemon with this scenario's configuration and scenes, started if need be."""
        key = scenario.config_key() + repr(sorted(scenario.scenes.items()))
        daemon = self._daemon
        if daemon is not None and (daemon.config_key != key or not daemon.alive or not self._settled(daemon)):
            self._stop_daemon()
            daemon = None
        if daemon is None:
            number = next(self._daemon_numbers)
            overrides: dict[str, dict[str, Any]] = {s: dict(v) for s, v in HARNESS_CONFIG.items()}
            for section, values in scenario.config.items():
                overrides.setdefault(section, {}).update(values)
            rig = SimRig(
                self.work_dir / f"atm-{number}",
                server=self.server,
                atm_id=f"SIM-ATM-{number:04d}",
                overrides=overrides,
                datasets=self.datasets,
                extra_scenes=dict(scenario.scenes),
                watchdog_usec=10_000_000,
            )
            rig.prepare()
            self.echo(
                f"   starting atmguard run ({rig.atm_id}; {rig.scene_source.detail if rig.scene_source else ''})"
            )
            rig.start()
            try:
                rig.wait_ready(timeout_s=READY_TIMEOUT_S)
                client = rig.client()
            except BaseException:
                self.echo(rig.log_text()[-2000:])
                rig.close()
                raise
            daemon = _Daemon(rig, client, key)
            self._daemon = daemon
            if not self._settled(daemon):
                raise RuntimeError(
                    f"the new daemon did not come into service: {daemon.rig.log_text()[-1500:]}"
                )
        return daemon

    def _settled(self, daemon: _Daemon) -> bool:
        """Idle, in service, slot open, nobody before the camera."""
        try:
            daemon.client.command(cmd="scene", name="nobody")
            daemon.client.wait_state(
                timeout_s=SETTLE_TIMEOUT_S, phase="idle", faults=[], card_entry=True, face_state="no_face"
            )
            return True
        except (AssertionError, OSError, RuntimeError):
            return False

    def _stop_daemon(self) -> None:
        if self._daemon is not None:
            self._daemon.close()
            self._daemon = None


class _Run:
    """One scenario on one daemon: the steps, then the checks."""

    def __init__(
        self, runner: ScenarioRunner, daemon: _Daemon, path: Path, scenario: Scenario, result: ScenarioResult
    ) -> None:
        self.runner = runner
        self.daemon = daemon
        self.rig = daemon.rig
        self.client = daemon.client
        self.path = path
        self.scenario = scenario
        self.result = result
        self.started_s = time.monotonic()
        self.pans = {name: card_pan(path, name, card) for name, card in scenario.cards.items()}
        self.current_card: str | None = None
        self.inserted_s: float | None = None
        self.card_taken = False
        self.daemon_exit: int | None = None
        self.central_stopped = False
        self._display_offset = self.rig.display_path.stat().st_size if self.rig.display_path.exists() else 0
        before = self.client.command(cmd="state")
        self._captured_before = int(before["captured_cards"])
        self._latencies_before = list(before["decision_latency_ms"])
        self._watching = threading.Event()

    def say(self, who: str, what: str) -> None:
        line = f"{time.monotonic() - self.started_s:7.2f}s  {who:<8}  {what}"
        self.result.timeline.append(line)
        self.runner.echo("   " + line)

    # --- steps -----------------------------------------------------------------------------------------

    def execute(self) -> None:
        self.result.private_key_file = self.rig.private_key_path
        self._open_accounts()
        watcher = threading.Thread(target=self._watch, name="scenario-watch", daemon=True)
        self._watching.set()
        watcher.start()
        try:
            for number, step in enumerate(self.scenario.step, start=1):
                try:
                    self._do(step)
                except (AssertionError, TimeoutError) as exc:
                    self.result.failures.append(f"step {number} ({step.describe()}): {exc}")
                    return
        finally:
            self._finish()
            self._watching.clear()
            watcher.join(2.0)
        self._check()

    def _open_accounts(self) -> None:
        if self.runner.server is None:
            return  # journal only: no bank to open accounts at (such scenarios only use the reader's checks)
        for name, card in self.scenario.cards.items():
            if card.status is CardStatusAtBank.UNKNOWN:
                continue
            self.rig.provision(
                self.pans[name],
                card.pin,
                status=CardStatus(card.status.value),
                max_pin_attempts=card.max_pin_attempts,
            )
            if card.enrolled:
                self.rig.enroll(self.pans[name], self.rig.datasets.resolve() / card.enrolled)
                self.say("bank", f"enrolled card {name}'s holder from {card.enrolled} (with consent)")

    def _do(self, step: Step) -> None:
        client = self.client
        action = step.action
        if action == "show":
            self.say("customer", f"stands before the camera: {step.show}")
            client.command(cmd="scene", name=step.show)
        elif action == "cut_camera":
            self.say("harness", "cuts the camera (no more frames)")
            client.command(cmd="scene", name="lost")
        elif action == "insert":
            assert step.insert is not None
            card = self.scenario.cards[step.insert]
            pan = self.pans[step.insert]
            expiry = card.expiry or _default_expiry()
            self.say("customer", f"inserts card {step.insert} ({masked(pan)}, expires {expiry})")
            self.current_card = step.insert
            self.inserted_s = time.monotonic()
            self.result.session_id = client.start_session(pan, expiry=expiry, timeout_s=step.timeout_s)
            self.say("daemon", f"session {self.result.session_id}")
        elif action == "insert_raw":
            self.say("customer", "inserts a card whose stripe cannot be read")
            self.inserted_s = time.monotonic()
            self.result.session_id = client.start_session(
                track1=None, track2=step.insert_raw, timeout_s=step.timeout_s
            )
            self.say("daemon", f"session {self.result.session_id}")
        elif action == "keys":
            assert step.keys is not None
            keys = self._keys(step.keys)
            shown = step.keys.replace("{pin}", "<PIN>").replace("{wrong_pin}", "<wrong PIN>")
            self.say("customer", f"types {shown} ({step.interval_s:.2f} s per key)")
            client.command(cmd="keys", keys=keys, interval_s=step.interval_s)
        elif action == "take_card":
            client.take_card(timeout_s=step.timeout_s)
            self.card_taken = True
            self.say("customer", "takes the card")
        elif action == "wait_s":
            assert step.wait_s is not None
            self.say("harness", f"waits {step.wait_s:g} s")
            time.sleep(step.wait_s)
        elif action == "wait_prompt":
            assert step.wait_prompt is not None
            self._wait(
                lambda: any(step.wait_prompt in screen for screen in self._screens()),
                step,
                "the display never showed " + repr(step.wait_prompt),
            )
        elif action == "wait_decision":
            if self._wait_decision(step.timeout_s) is None:
                raise AssertionError(f"no decision within {step.timeout_s:g} s")
        elif action == "wait_face":
            client.wait_state(timeout_s=step.timeout_s, face_state=step.wait_face)
            self.say("camera", f"tracker reports {step.wait_face}")
        elif action == "wait_faces":
            client.wait_state(timeout_s=step.timeout_s, face_count=step.wait_faces)
            self.say("camera", f"{step.wait_faces} face(s) in view")
        elif action == "wait_in_service":
            client.wait_state(timeout_s=step.timeout_s, phase="idle", faults=[], card_entry=True)
            self.say("daemon", "in service, card slot open")
        elif action == "stop_central":
            assert self.runner.server is not None
            self.say("harness", "stops the central server")
            self.runner.server.stop(keep_data=True)
            self.central_stopped = True
        elif action == "start_central":
            assert self.runner.server is not None
            self.say("harness", "starts the central server again")
            self.runner.server.start()
            self.central_stopped = False
        elif action == "stop_daemon":
            self.say("harness", "stops the daemon (SIGTERM, as systemctl stop)")
            # The host feed stays connected: the session's last decision comes before the socket closes.
            self.daemon_exit = self.rig.stop(timeout_s=step.timeout_s)
            self.say("daemon", f"exited with status {self.daemon_exit}")

    def _keys(self, keys: str) -> str:
        if self.current_card is None and ("{pin}" in keys or "{wrong_pin}" in keys):
            raise AssertionError("{pin} needs a card inserted by an earlier step")
        pin = self.scenario.cards[self.current_card].pin if self.current_card else ""
        wrong = "".join(str((int(d) + 1) % 10) for d in pin)
        return keys.replace("{pin}", pin).replace("{wrong_pin}", wrong)

    def _wait(self, done: Callable[[], bool], step: Step, failure: str) -> None:
        end = time.monotonic() + step.timeout_s
        while not done():
            if time.monotonic() >= end:
                raise AssertionError(f"{failure} within {step.timeout_s:g} s")
            time.sleep(0.05)

    def _wait_decision(self, timeout_s: float) -> dict[str, Any] | None:
        found = self.client.host.wait(
            lambda m: m.get("type") == "decision", since_s=self.started_s, timeout_s=timeout_s
        )
        return None if found is None else found[1]

    # --- what the ATM does, printed as it happens ------------------------------------------------------

    def _watch(self) -> None:
        screens_seen = 0
        host_seen = 0
        while self._watching.is_set():
            screens = self._screens()
            for screen in screens[screens_seen:]:
                self.say("display", repr(screen.replace("\n", " / ")))
            screens_seen = len(screens)
            lines = self.client.host.lines(self.started_s)
            for _, line in lines[host_seen:]:
                if line.get("type") == "decision":
                    self.say(
                        "host", f"decision {line['outcome']} ({line['reason']}) {line.get('masked_pan', '')}"
                    )
                elif line.get("type") == "status":
                    self.say("host", f"status {line['state']} {line.get('detail', '')}".rstrip())
            host_seen = len(lines)
            time.sleep(0.05)

    def _screens(self) -> list[str]:
        try:
            with self.rig.display_path.open("rb") as display:
                display.seek(self._display_offset)
                text = display.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return []
        return [screen.strip() for screen in text.split("[ATM] ") if screen.strip()]

    # --- after the steps -------------------------------------------------------------------------------

    def _finish(self) -> None:
        """Wait for an expected decision that is still coming, then leave the ATM as found."""
        expect = self.scenario.expect
        if (expect.outcome or expect.reason) and self.daemon.alive and not self.result.failures:
            self._wait_decision(DECISION_GRACE_S)
        found = self.client.host.wait(
            lambda m: m.get("type") == "decision", since_s=self.started_s, timeout_s=0
        )
        if found is not None:
            t_decision, decision = found
            self.result.outcome, self.result.reason = decision["outcome"], decision["reason"]
            if self.inserted_s is not None:
                self.result.session_s = t_decision - self.inserted_s
            with contextlib.suppress(OSError, RuntimeError, ConnectionError):
                latencies = self.client.command(cmd="state")["decision_latency_ms"]
                if latencies and latencies != self._latencies_before:
                    self.result.decided_in_ms = float(latencies[-1])
        time.sleep(0.2)  # the last screens and host lines reach the timeline
        if self.central_stopped and self.runner.server is not None:
            self.say("harness", "starts the central server again (the scenario left it stopped)")
            self.runner.server.start()
            self.central_stopped = False

    def _check(self) -> None:
        expect, result = self.scenario.expect, self.result
        failures = result.failures
        if expect.outcome and result.outcome != expect.outcome:
            failures.append(f"outcome: expected {expect.outcome}, got {result.outcome or 'no decision'}")
        if expect.reason and result.reason != expect.reason:
            failures.append(f"reason: expected {expect.reason}, got {result.reason or 'no decision'}")
        if expect.daemon_exit is not None and self.daemon_exit != expect.daemon_exit:
            failures.append(f"daemon exit status: expected {expect.daemon_exit}, got {self.daemon_exit}")
        if expect.card is not None:
            failures += self._check_card(expect.card)
        screens = self._screens()
        position = 0
        for prompt in expect.prompts:
            index = next((i for i in range(position, len(screens)) if prompt in screens[i]), None)
            if index is None:
                failures.append(f"prompt {prompt!r} not shown (in this order); display showed {screens}")
                break
            position = index + 1
        for prompt in expect.never_prompts:
            if any(prompt in screen for screen in screens):
                failures.append(f"prompt {prompt!r} was shown, and must not be")
        statuses = [
            line for _, line in self.client.host.lines(self.started_s) if line.get("type") == "status"
        ]
        went_out = any(line["state"] == "out_of_service" for line in statuses)
        if expect.out_of_service is not None and went_out != expect.out_of_service:
            failures.append(f"out of service: expected {expect.out_of_service}, the host saw {statuses}")
        if expect.journaled or expect.evidence is not None or expect.synced:
            failures += self._check_journal()

    def _check_card(self, expected: str) -> list[str]:
        if not self.daemon.alive:
            if expected == "returned" and self.card_taken:
                return []
            return [f"card: expected {expected}, but the daemon stopped"]
        end = time.monotonic() + CHECK_TIMEOUT_S  # retention follows the decision: give it time
        while True:
            state = self.client.command(cmd="state")
            captured = int(state["captured_cards"]) - self._captured_before
            if expected != "retained" or captured or time.monotonic() >= end:
                break
            time.sleep(0.1)
        if expected == "retained" and captured != 1:
            return [f"card: expected retained, {captured} card(s) captured (card {state['card']})"]
        if expected == "returned" and (captured != 0 or not self.card_taken):
            return [
                f"card: expected returned to the customer; taken: {self.card_taken}, captured: {captured}"
            ]
        return []

    def _check_journal(self) -> list[str]:
        expect, session_id = self.scenario.expect, self.result.session_id
        if session_id is None:
            return ["journal: no session was opened, so nothing can be looked up"]
        end = time.monotonic() + CHECK_TIMEOUT_S  # the session's last records follow its decision
        while True:
            with _read_only(self.rig.journal_path) as journal:
                rows = journal.execute(
                    "SELECT uuid, kind FROM events WHERE session_id = ?", (session_id,)
                ).fetchall()
                snapshots = journal.execute(
                    "SELECT s.uuid, s.reason, s.is_fraud_evidence, b.sealed_frame, b.sealed_crop"
                    " FROM snapshots AS s JOIN snapshot_blobs AS b ON b.seq = s.seq"
                    " WHERE s.session_id = ? ORDER BY s.seq",
                    (session_id,),
                ).fetchall()
            kinds = {kind for _, kind in rows}
            missing = [kind for kind in expect.journaled if kind not in kinds]
            if not missing or time.monotonic() >= end:
                break
            time.sleep(0.1)
        self.result.evidence = [
            Evidence(uuid, reason, bool(fraud), bytes(frame), None if crop is None else bytes(crop))
            for uuid, reason, fraud, frame, crop in snapshots
        ]
        failures = []
        if missing:
            failures.append(f"journal: no {', '.join(missing)} event for the session; it has {sorted(kinds)}")
        if expect.evidence is not None and bool(snapshots) != expect.evidence:
            failures.append(
                f"evidence: expected {'a' if expect.evidence else 'no'} snapshot, found {len(snapshots)}"
            )
        if expect.synced:
            failures += self._check_synced({uuid for uuid, _ in rows}, {row[0] for row in snapshots})
        return failures

    def _check_synced(self, event_uuids: set[str], snapshot_uuids: set[str]) -> list[str]:
        server = self.runner.server
        if server is None:
            return ["synced: there is no central server"]
        end = time.monotonic() + SYNC_TIMEOUT_S
        missing_events, missing_snapshots = event_uuids, snapshot_uuids
        while True:
            events = {
                row[0]
                for row in server.execute(
                    "SELECT uuid FROM events WHERE session_id = %s",
                    (self.result.session_id,),
                    database=self.rig.database,
                )
            }
            snapshots = {
                row[0]
                for row in server.execute(
                    "SELECT uuid FROM snapshots WHERE session_id = %s",
                    (self.result.session_id,),
                    database=self.rig.database,
                )
            }
            missing_events, missing_snapshots = event_uuids - events, snapshot_uuids - snapshots
            if not missing_events and not missing_snapshots:
                self.say(
                    "central",
                    f"{len(events)} event(s) and {len(snapshots)} snapshot(s) of the session synced",
                )
                return []
            if time.monotonic() >= end:
                return [
                    f"synced: after {SYNC_TIMEOUT_S:g} s, {len(missing_events)} event(s) and {len(missing_snapshots)} snapshot(s) not at the central server"
                ]
            time.sleep(0.25)


@contextlib.contextmanager
def _read_only(path: Path) -> Any:
    """The daemon's journal, opened read-only beside the running daemon (SQLite WAL allows it)."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        yield connection
    finally:
        connection.close()


def _default_expiry() -> str:
    expiry = add_months(date.today(), 24)
    return f"{expiry.year:04d}-{expiry.month:02d}"
