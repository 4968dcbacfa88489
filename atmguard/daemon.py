"""`atmguard run`: the composition root.

Builds what the config chooses, starts it in order (journal, evidence key, models, bank, sync,
hardware, host socket, vision, controller), tells systemd READY=1 only when all of it is up, and
stops it in reverse. Anything that cannot start stops the start-up with a clear error: the unit
restarts us, and meanwhile no card is accepted (fail closed).

Signals: SIGTERM/SIGINT end the current session safely (card ejected) and exit 0; SIGHUP re-reads
the config and applies what can change without touching hardware (the session policy for the
next session, the log level).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from atmguard import __version__
from atmguard.config import Settings, load_settings, relative_to_config
from atmguard.errors import AtmguardError, ConfigError

logger = logging.getLogger(__name__)

STATUS_INTERVAL_S = 1.0


class StartupError(AtmguardError):
    """A part could not be started; the message says which and why."""


class _Stack:
    """Closes what was opened, in reverse order, even when a later start fails."""

    def __init__(self) -> None:
        self._closers: list[tuple[str, Callable[[], Any]]] = []

    def push(self, name: str, closer: Callable[[], Any]) -> None:
        self._closers.append((name, closer))

    def close(self) -> None:
        while self._closers:
            name, closer = self._closers.pop()
            try:
                closer()
            except Exception:
                logger.exception("stopping %s failed", name)


@contextlib.contextmanager
def _starting(what: str, notifier: Any) -> Iterator[None]:
    notifier.status(f"starting: {what}")
    logger.info("starting %s", what)
    try:
        yield
    except AtmguardError as exc:
        raise StartupError(f"{what}: {exc}") from exc
    except OSError as exc:
        raise StartupError(f"{what}: {exc}") from exc


def _identity(settings: Settings) -> dict[str, Any]:
    """What ran: version, config file digest, model digests (journaled at start, for the bank)."""
    from atmguard.vision.models import load_manifest

    config_sha = ""
    source = Path(settings.source)
    if source.is_file():
        config_sha = hashlib.sha256(source.read_bytes()).hexdigest()
    models = load_manifest(relative_to_config(settings, settings.paths.models_dir))
    return {
        "version": __version__,
        "config_file": settings.source,
        "config_sha256": config_sha,
        "models": {role: spec.sha256 for role, spec in sorted(models.items())},
        "backends": {
            role: getattr(settings, role).backend
            for role in ("card_reader", "keypad", "actuator", "camera", "display")
        },
    }


def _watchdog_pinger(notifier: Any, clock: Callable[[], float] = time.monotonic) -> Callable[[], None]:
    """WATCHDOG=1 at half of systemd's WatchdogSec, however often the controller loop calls it."""
    interval_s = notifier.watchdog_interval_s
    if not interval_s:
        return lambda: None
    half_s = interval_s / 2
    next_ping_s = clock()

    def ping() -> None:
        nonlocal next_ping_s
        now = clock()
        if now >= next_ping_s:
            next_ping_s = now + half_s
            notifier.watchdog()

    return ping


class Daemon:
    """One run of the service. ``run()`` returns the exit code."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stack = _Stack()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self.controller: Any = None
        self._controller_crashed = False

    def run(self) -> int:
        from atmguard.service.logsetup import configure_logging
        from atmguard.service.notify import Notifier

        settings = self._settings
        configure_logging(settings)
        notifier = Notifier.from_environment()
        self._install_signal_handlers()
        try:
            controller_thread = self._start(notifier)
        except StartupError as exc:
            logger.error("start-up failed, refusing service: %s", exc)
            notifier.status(f"start-up failed: {exc}")
            self._stack.close()
            return 1
        notifier.ready()
        logger.info("atmguard %s in service (ATM %s)", __version__, settings.atm.id)
        try:
            self._supervise(notifier, controller_thread)
        finally:
            notifier.stopping()
            notifier.status("stopping")
            self._stack.close()
            logger.info("stopped")
        return 1 if self._controller_crashed else 0

    # --- start-up, in order; closers pushed as each part comes up ----------------------------

    def _start(self, notifier: Any) -> threading.Thread:
        from atmguard.hardware.keypad.pinbuffer import PinEntry
        from atmguard.hardware.registry import build
        from atmguard.session.controller import Controller
        from atmguard.session.policy import Policy
        from atmguard.session.vision_loop import VisionLoop
        from atmguard.store.journal import Journal
        from atmguard.store.snapshots import SnapshotSealer
        from atmguard.vision.pipeline import VisionPipeline
        from atmguard.vision.runtime import runtime_info
        from atmguard.vision.tracker import FaceTracker

        settings = self._settings
        stack = self._stack

        with _starting("hardware lock", notifier):
            # First of all: while a technician's hardware test runs (or another daemon on this
            # state directory), this one must not get half-way up and fight it for the devices.
            from atmguard.hardware.ownership import DAEMON_PURPOSE, HardwareLock

            hardware_lock = HardwareLock.for_settings(settings, purpose=DAEMON_PURPOSE, create_dir=True)
            hardware_lock.acquire()
            stack.push("hardware lock", hardware_lock.release)
        with _starting("journal", notifier):
            journal = Journal.from_settings(settings)
            journal.open()
            stack.push("journal", journal.close)
            self._journal = journal
        with _starting("evidence key", notifier):
            sealer = SnapshotSealer.from_settings(settings)
        with _starting("vision models", notifier):
            pipeline = VisionPipeline.from_settings(settings)
            pipeline.open()  # loads both models and checks their sha256 against the manifest
            stack.push("vision models", pipeline.close)
            verifier = self._identity_verifier()
            identity = _identity(settings)
            identity["runtime"] = str(runtime_info())
            journal.append_event("daemon_started", identity)
        with _starting("bank connection", notifier):
            bank = self._bank()
            stack.push("bank connection", bank.close)
        sync: Any = None
        if settings.central.enabled:
            with _starting("sync worker", notifier):
                from atmguard.store.sync import SyncWorker

                sync = SyncWorker.from_settings(settings, journal=journal)
                sync.open()
                sync.start()
                stack.push("sync worker", sync.close)
        hardware: dict[str, Any] = {}
        for role in ("display", "actuator", "card_reader", "keypad", "camera"):
            with _starting(role.replace("_", " "), notifier):
                device = build(role, settings)
                if role != "keypad":  # the controller opens the keypad with its event handler
                    device.open()
                stack.push(role, device.close)
                hardware[role] = device
        with _starting("host socket", notifier):
            from atmguard.service.hostlink import HostLink

            host = HostLink.from_settings(settings)
            host.open()
            stack.push("host socket", host.close)

        controller_box: list[Controller] = []

        def emit(event: Any) -> None:
            controller_box[0].post(event)

        vision = VisionLoop(
            hardware["camera"],
            pipeline,
            FaceTracker.from_settings(settings),
            emit=emit,
            journal=journal,
            sealer=sealer,
            jpeg_quality=settings.journal.snapshot_jpeg_quality,
            idle_fps=min(settings.daemon.idle_fps, settings.camera.fps),
            active_fps=settings.camera.fps,
            camera_timeout_s=settings.session.camera_timeout_s,
            identity=verifier,
        )

        from atmguard.service.statuslink import Heartbeat, RecentEvents

        recent = RecentEvents(settings.daemon.status_recent_events)
        heartbeat = Heartbeat()

        def publish_decision(decision: Any, journal_uuid: str | None) -> None:
            host.publish_decision(decision, t_wall_s=time.time(), journal_uuid=journal_uuid)
            recent.add_decision(decision, journal_uuid)

        def publish_status(in_service: bool, detail: str) -> None:
            host.publish_status("in_service" if in_service else "out_of_service", detail)
            recent.add_status(in_service, detail)

        controller = Controller(
            policy=Policy.from_settings(settings),
            card_reader=hardware["card_reader"],
            keypad=hardware["keypad"],
            actuator=hardware["actuator"],
            display=hardware["display"],
            vision=vision,
            journal=journal,
            bank=bank,
            pin_entry=PinEntry.from_settings(settings),
            publish_decision=publish_decision,
            publish_status=publish_status,
            watchdog=heartbeat.wrap(_watchdog_pinger(notifier)),
            tick_interval_s=settings.daemon.tick_interval_s,
            shutdown_timeout_s=settings.daemon.shutdown_timeout_s,
            identity=verifier,
        )
        controller_box.append(controller)
        self.controller = controller

        with _starting("status socket", notifier):
            from atmguard.service.statuslink import StatusSources

            self._start_status_link(
                StatusSources(
                    settings=settings,
                    controller=controller,
                    vision=vision,
                    hardware=hardware,
                    journal_path=journal.path,
                    events=recent,
                    heartbeat=heartbeat,
                    sync=sync,
                    watchdog_interval_s=notifier.watchdog_interval_s,
                )
            )

        if settings.daemon.sim_control_socket:
            with _starting("sim control socket", notifier):
                self._start_sim_control(hardware, controller)

        with _starting("vision loop", notifier):
            vision.start()
            stack.push("vision loop", vision.stop)
        thread = threading.Thread(target=self._run_controller, name="atmguard-controller", daemon=True)
        thread.start()
        return thread

    def _identity_verifier(self) -> Any:
        """The face embedder and its verifier when ``[verification] enabled`` (sha256-checked like
        the other models: a missing or altered embedder stops the start-up, it is never skipped)."""
        settings = self._settings
        if not settings.verification.enabled:
            logger.warning("verification.enabled = false: faces are not compared with the account holder's")
            return None
        from atmguard.session.identity import IdentityVerifier
        from atmguard.vision.embedder import FaceEmbedder

        embedder = FaceEmbedder.from_settings(settings)
        embedder.open()
        self._stack.push("face embedder", embedder.close)
        verification = settings.verification
        return IdentityVerifier(
            embedder,
            match_threshold=verification.match_threshold,
            mismatch_threshold=verification.mismatch_threshold,
            frames_needed=verification.frames,
            timeout_s=verification.timeout_s,
        )

    def _bank(self) -> Any:
        settings = self._settings
        if not settings.central.enabled:
            from atmguard.session.bank import OfflineBank

            logger.warning("central.enabled = false: every transaction is declined (bank unavailable)")
            return OfflineBank()
        from atmguard.session.bank import CentralBank

        return CentralBank.from_settings(settings)

    def _start_status_link(self, sources: Any) -> None:
        from atmguard.service.statuslink import StatusLink, StatusLinkError

        link = StatusLink.for_daemon(sources)
        try:
            link.open()
        except StatusLinkError as exc:
            # Diagnostics only: a technician's window must not take the ATM out of service.
            logger.error("status socket unavailable (atmguard status / diag cannot ask the daemon): %s", exc)
            return
        self._stack.push("status socket", link.close)

    def _start_sim_control(self, hardware: dict[str, Any], controller: Any) -> None:
        from atmguard.harness.simcontrol import SimControl, require_simulated_hardware

        settings = self._settings
        require_simulated_hardware(settings)

        def describe_state() -> dict[str, Any]:
            state = controller.state
            if state is None:
                return {"phase": "starting"}
            return {
                "phase": state.phase.name.lower(),
                "session_id": state.session_id,
                "faults": state.fault_names,
                "face_state": state.face_state.value,
                "face_count": state.face_count,
                "decision_latency_ms": [round(s * 1e3, 3) for s in controller.decision_latencies_s],
            }

        control = SimControl(
            relative_to_config(settings, settings.daemon.sim_control_socket),
            card_reader=hardware["card_reader"],
            keypad=hardware["keypad"],
            camera=hardware["camera"],
            describe_state=describe_state,
            stall=controller.stall,
        )
        control.open()
        self._stack.push("sim control socket", control.close)

    def _run_controller(self) -> None:
        try:
            self.controller.run()
        except Exception:
            logger.exception("controller crashed")
            self._controller_crashed = True
        finally:
            self._stop.set()

    # --- running ---------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        def on_stop(signum: int, _frame: object) -> None:
            logger.info("%s received: stopping", signal.Signals(signum).name)
            self._stop.set()

        def on_reload(_signum: int, _frame: object) -> None:
            self._reload.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)

    def _supervise(self, notifier: Any, controller_thread: threading.Thread) -> None:
        settings = self._settings
        controller = self.controller
        next_purge = time.monotonic() + settings.daemon.purge_interval_s
        last_status = ""
        stop_requested = False
        while controller_thread.is_alive():
            self._stop.wait(STATUS_INTERVAL_S)
            if self._stop.is_set() and not stop_requested and controller_thread.is_alive():
                stop_requested = True
                notifier.stopping()
                controller.request_stop()
            if self._reload.is_set():
                self._reload.clear()
                self._reload_config(notifier)
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + settings.daemon.purge_interval_s
                self._purge()
            status = self._status_line()
            if status != last_status:
                notifier.status(status)
                last_status = status
            if stop_requested:
                controller_thread.join(settings.daemon.shutdown_timeout_s + 2.0)
                break

    def _status_line(self) -> str:
        state = self.controller.state
        if state is None:
            return "starting"
        if state.faults:
            return "OUT OF SERVICE: " + ", ".join(state.fault_names)
        if state.in_session:
            return f"in service: session {state.session_id} ({state.phase.name.lower()})"
        return f"in service: {state.phase.name.lower()}"

    def _purge(self) -> None:
        from atmguard.session.events import Component, FaultCleared

        try:
            report = self._journal.purge()
        except AtmguardError as exc:
            logger.error("journal purge failed: %s", exc)
            return
        logger.info("journal purge: %s", report)
        if self._journal.pressure is None:
            state = self.controller.state
            if state is not None and Component.JOURNAL in state.faults:
                self.controller.post(FaultCleared(Component.JOURNAL))

    def _reload_config(self, notifier: Any) -> None:
        from atmguard.session.events import PolicyChanged
        from atmguard.session.policy import Policy

        notifier.reloading()
        try:
            fresh = load_settings(self._settings.source)
        except ConfigError as exc:
            logger.error("SIGHUP: config not reloaded, keeping the running one: %s", exc)
            notifier.ready()
            return
        logging.getLogger().setLevel(fresh.logging.level)
        self.controller.post(PolicyChanged(Policy.from_settings(fresh)))
        hardware_changed = [
            role
            for role in ("card_reader", "keypad", "actuator", "camera", "display", "vision", "central")
            if getattr(fresh, role) != getattr(self._settings, role)
        ]
        if hardware_changed:
            logger.warning(
                "SIGHUP: changes to %s need a restart (systemctl restart atmguard)",
                ", ".join(hardware_changed),
            )
        logger.info("SIGHUP: session policy and log level reloaded from %s", fresh.source)
        notifier.ready()


def run_daemon(config_path: Path) -> int:
    """Load the config (exit 78 with every error if it is invalid) and run until stopped."""
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr, flush=True)
        return 78
    return Daemon(settings).run()
