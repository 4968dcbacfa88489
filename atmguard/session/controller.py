"""The controller: the one thread that owns the session.

Hardware threads (card reader poll, keypad scan, vision loop) and the two workers that run slow
calls (bank, card mechanics) only ``post()`` to one queue. This thread takes each item, turns it
into a session event, feeds :func:`~atmguard.session.machine.step` and carries out the actions
in order. Nothing else changes session state, so every rule lives in the pure machine.

The PIN lives only in the keypad's :class:`~atmguard.hardware.keypad.pinbuffer.PinBuffer`: key
events go from the scan thread to this thread (their repr masks the key), into the buffer, and
the machine only hears lengths. The bank worker reveals the buffer once for the derivation and
wipes it. The PAN lives only in the card read object, wiped when the session ends.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from atmguard.errors import AtmguardError, DisplayError
from atmguard.hardware.actuator import Actuator
from atmguard.hardware.card import base as card_base
from atmguard.hardware.card.base import CardReader
from atmguard.hardware.card.tracks import CardRead
from atmguard.hardware.display import Display
from atmguard.hardware.keypad.base import KeyEvent, Keypad
from atmguard.hardware.keypad.pinbuffer import (
    Cancelled,
    Cleared,
    DigitAdded,
    PinEntry,
    Submitted,
    TimedOut,
)
from atmguard.session import actions as act
from atmguard.session import events as ev
from atmguard.session.bank import Bank, BankUnavailable
from atmguard.session.machine import Phase, SessionState, start, step
from atmguard.session.policy import Policy
from atmguard.session.vision_loop import VisionLoop
from atmguard.store.central import CardStatus
from atmguard.store.journal import Journal, JournalError

if TYPE_CHECKING:
    from atmguard.session.identity import IdentityVerifier
    from atmguard.vision.embedder import FaceTemplate

logger = logging.getLogger(__name__)

CARD_POLL_S = 0.2
LATENCY_HISTORY = 1000
"""Decision latencies kept for the bench (bounded: the daemon runs for months)."""
READER_RETRY_S = 1.0
DISPLAY_RETRY_S = 2.0
"""How often a failed display is reopened to see whether it is back."""
_INVALID_CARD_REASONS = frozenset({"bad_pan", "luhn", "bad_format", "bad_expiry", "bad_service_code"})


class _Stall:
    """Posted by the sim harness to wedge the controller (proves the watchdog stops pinging)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


@dataclass(frozen=True, slots=True)
class _CardArrived:
    """A card read, handed from the reader thread to the controller (which alone keeps it)."""

    session_id: str
    card: CardRead | None
    event: ev.CardInserted


def card_check(event: card_base.CardInserted) -> tuple[ev.CardCheck, str]:
    """Classify a reader's CardInserted for the machine: valid, invalid (Luhn, format), expired, unreadable."""
    if event.card is not None:
        return ev.CardCheck.VALID, ""
    reason = event.error_reason or "unreadable"
    if reason == "expired":
        return ev.CardCheck.EXPIRED, reason
    if reason in _INVALID_CARD_REASONS:
        return ev.CardCheck.INVALID, reason
    return ev.CardCheck.UNREADABLE, reason


class Controller:
    """Runs sessions on the given hardware. ``run()`` blocks; ``post()`` and ``request_stop()`` are thread-safe."""

    def __init__(
        self,
        *,
        policy: Policy,
        card_reader: CardReader,
        keypad: Keypad,
        actuator: Actuator,
        display: Display,
        vision: VisionLoop,
        journal: Journal,
        bank: Bank,
        pin_entry: PinEntry,
        publish_decision: Callable[[act.Decision, str | None], None],
        publish_status: Callable[[bool, str], None],
        watchdog: Callable[[], None],
        tick_interval_s: float,
        shutdown_timeout_s: float,
        identity: IdentityVerifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policy = policy
        self._identity = identity
        self._reader = card_reader
        self._keypad = keypad
        self._actuator = actuator
        self._display = display
        self._vision = vision
        self._journal = journal
        self._bank = bank
        self._pin = pin_entry
        self._publish_decision = publish_decision
        self._publish_status = publish_status
        self._watchdog = watchdog
        self._tick_interval_s = tick_interval_s
        self._shutdown_timeout_s = shutdown_timeout_s
        self._clock = clock

        self._queue: queue.Queue[tuple[float, object]] = queue.Queue()
        self._state: SessionState | None = None
        self._card: CardRead | None = None
        self._templates: list[FaceTemplate] = []  # the session card's face templates, never journaled
        self._pin_accepting = False
        self._pin_paused = False
        self._verifying = False
        self._stopping = threading.Event()
        self._stop_deadline: float | None = None
        self._threads: list[threading.Thread] = []
        self._bank_worker = ThreadPoolExecutor(1, thread_name_prefix="atmguard-bank")
        self._mechanics_worker = ThreadPoolExecutor(1, thread_name_prefix="atmguard-mechanics")
        self._reader_fault = False
        self._display_fault: str | None = None
        self._display_retry_at_s = 0.0
        self._last_show: act.Show | None = None
        self.decision_latencies_s: deque[float] = deque(maxlen=LATENCY_HISTORY)
        """Seconds from the last input a decision needed to the decision's Publish (for make bench)."""

    # --- thread-safe entry points ------------------------------------------------------------------

    def post(self, item: object) -> None:
        # Stamped on arrival: decision latency counts from when the last needed input arrived.
        self._queue.put((self._clock(), item))

    def request_stop(self) -> None:
        """SIGTERM: refuse new cards, end the session safely, then return from run()."""
        self.post(ev.ShutdownRequested())

    def stall(self, seconds: float) -> None:
        """Block the controller thread (sim harness only): the watchdog pings must stop."""
        self.post(_Stall(seconds))

    @property
    def state(self) -> SessionState | None:
        return self._state

    @property
    def display_fault(self) -> str | None:
        """Why the last write to the customer display failed, until a retry succeeds."""
        return self._display_fault

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        """Start the input threads, run sessions until a shutdown completes, stop the threads."""
        self._keypad.open(on_event=self.post)
        reader_thread = threading.Thread(target=self._read_cards, name="atmguard-cardreader", daemon=True)
        reader_thread.start()
        self._threads.append(reader_thread)
        now = self._clock()
        self._state, actions = start(self._policy, now=now)
        self._execute(actions, now, received_s=now, session_id=None)
        self._publish_service_status()
        next_tick = now + self._tick_interval_s
        try:
            while self._state.phase is not Phase.STOPPED:
                now = self._clock()
                if self._vision.responsive:
                    self._watchdog()
                if self._stop_deadline is not None and now >= self._stop_deadline:
                    logger.error(
                        "shutdown: card not ejected within %.1f s; stopping anyway", self._shutdown_timeout_s
                    )
                    break
                try:
                    received_s, item = self._queue.get(timeout=max(0.0, next_tick - now))
                except queue.Empty:
                    received_s, item = now, None
                now = self._clock()
                if item is None or now >= next_tick:
                    next_tick = now + self._tick_interval_s
                    self._feed(self._tick_inputs(now), now, received_s=now)
                if item is not None:
                    self._feed(self._translate(item, now), now, received_s=received_s)
        finally:
            self._shutdown_threads()

    def _tick_inputs(self, now: float) -> list[ev.Event]:
        events: list[ev.Event] = []
        if self._pin_accepting and self._pin.check_timeout(now) is not None:
            self._pin_accepting = False
            events.append(ev.PinEntryTimedOut())
        if self._display_fault is not None and now >= self._display_retry_at_s:
            events.extend(self._retry_display(now))
        events.append(ev.Tick())
        return events

    def _retry_display(self, now: float) -> list[ev.Event]:
        """Reopen the display and put the latest prompt back; cleared when that works."""
        try:
            self._display.reopen()
            if self._last_show is not None:
                self._write_prompt(self._last_show, session_id=None)
        except DisplayError as exc:
            self._display_retry_at_s = now + DISPLAY_RETRY_S
            logger.debug("display still failing: %s", exc)
            return []
        logger.info("display recovered")
        self._display_fault = None
        return [ev.FaultCleared(ev.Component.DISPLAY)]

    def _feed(self, events: list[ev.Event], now: float, *, received_s: float) -> None:
        for event in events:
            assert self._state is not None
            before = self._state
            self._journal_input(event, before)
            self._state, actions = step(before, event, now)
            # A session's last actions (its end record) still belong to it.
            session_id = self._state.session_id or before.session_id
            self._execute(actions, now, received_s=received_s, session_id=session_id)
            if not self._state.in_session and self._card is not None:
                self._card.wipe()
                self._card = None
                self._templates = []
                self._vision.cancel_identity()

    # --- inputs -> events ------------------------------------------------------------------------

    def _translate(self, item: object, now: float) -> list[ev.Event]:
        if isinstance(item, ev.Event):
            if isinstance(item, ev.ShutdownRequested) and self._stop_deadline is None:
                self._stop_deadline = now + self._shutdown_timeout_s
            return [item]
        if isinstance(item, KeyEvent):
            return self._key(item)
        if isinstance(item, _VerifyDone):
            self._verifying = False
            return [item.event]
        if isinstance(item, _StatusDone):
            self._templates = item.templates
            return [item.event]
        if isinstance(item, _CardArrived):
            self._take_card_read(item)
            return [item.event]
        if isinstance(item, _Stall):
            logger.warning("controller stalled for %.1f s on request (sim harness)", item.seconds)
            time.sleep(item.seconds)
            return []
        logger.error("controller: unknown input %s dropped", type(item).__name__)
        return []

    def _take_card_read(self, item: _CardArrived) -> None:
        """Keep the PAN only of a card that starts a session; the machine refuses any other."""
        if item.card is None:
            return
        state = self._state
        if state is not None and state.phase is Phase.IDLE and not state.out_of_service:
            if self._card is not None:
                self._card.wipe()
            self._card = item.card
        else:
            item.card.wipe()

    def _key(self, key: KeyEvent) -> list[ev.Event]:
        if not key.pressed or not self._pin_accepting or self._pin_paused:
            return []
        outcome = self._pin.handle(key)
        if outcome is None:
            return []
        if isinstance(outcome, Submitted):
            self._pin_accepting = False
            return [ev.PinSubmitted(outcome.length)]
        if isinstance(outcome, Cancelled):
            self._pin_accepting = False
            return [ev.PinCancelled()]
        if isinstance(outcome, TimedOut):
            self._pin_accepting = False
            return [ev.PinEntryTimedOut()]
        if isinstance(outcome, DigitAdded | Cleared):
            return [ev.PinKeyed(outcome.length)]
        return []  # DigitIgnored / TooShort: nothing changed for the customer's screen

    def _journal_input(self, event: ev.Event, state: SessionState) -> None:
        """The inputs a bank investigator needs, journaled before the machine reacts to them."""
        session_id = state.session_id
        if isinstance(event, ev.CardInserted):
            self._record(
                "card_inserted",
                {"check": event.check.value, "masked_pan": event.masked_pan, "reason": event.reason},
                session_id=event.session_id,
            )
        elif isinstance(event, ev.CardTaken):
            self._record("card_removed", {}, session_id=session_id)
        elif isinstance(event, ev.CardStatusChecked):
            self._record("card_status", {"status": event.status.value}, session_id=session_id)
        elif isinstance(event, ev.PinVerified):
            payload: dict[str, Any] = {"result": event.result.value, "attempts_left": event.attempts_left}
            self._record("pin_result", payload, session_id=session_id)
        elif isinstance(event, ev.CentralUnavailable):
            self._record(
                "bank_unavailable", {"during": event.during, "reason": event.reason}, session_id=session_id
            )
        elif isinstance(event, ev.FaceChanged) and state.in_session:
            self._record(
                "face_state",
                {"state": event.state.value, "face_count": event.face_count},
                session_id=session_id,
            )
        elif isinstance(event, ev.FaultRaised):
            self._record(
                "hardware_fault",
                {"component": event.component.value, "reason": event.reason},
                session_id=session_id,
            )
        elif isinstance(event, ev.FaultCleared):
            self._record("hardware_recovered", {"component": event.component.value}, session_id=session_id)
        elif isinstance(event, ev.FaceVerified):
            self._record(
                "face_verified",
                {"verdict": event.verdict.value, "score": event.score},
                session_id=event.session_id,
            )

    # --- actions -------------------------------------------------------------------------------

    def _execute(
        self, actions: list[act.Action], now: float, *, received_s: float, session_id: str | None
    ) -> None:
        for action in actions:
            try:
                self._do(action, now, received_s=received_s, session_id=session_id)
            except Exception:
                # An action that throws must not take the controller down with it; the faults
                # it causes arrive as events (the workers report their own).
                logger.exception("action %s failed", type(action).__name__)

    def _do(self, action: act.Action, now: float, *, received_s: float, session_id: str | None) -> None:
        if isinstance(action, act.Show):
            self._show(action, session_id=session_id)
        elif isinstance(action, act.SetCardEntry):
            self._mechanics(self._set_entry, action.enabled)
        elif isinstance(action, act.CheckCardStatus):
            self._ask_bank_card_status()
        elif isinstance(action, act.StartPinEntry):
            if not self._verifying:
                self._pin.start(now)
            self._pin_accepting = True
            self._pin_paused = False
        elif isinstance(action, act.SetPinEntryPaused):
            self._pin_paused = action.paused
        elif isinstance(action, act.StopPinEntry):
            self._pin_accepting = False
            self._pin_paused = False
            if not self._verifying:  # else the bank worker is reading it and wipes it when done
                self._pin.buffer.wipe()
        elif isinstance(action, act.VerifyPin):
            self._ask_bank_pin()
        elif isinstance(action, act.VerifyFace):
            if self._templates:
                self._vision.request_identity(action.session_id, self._templates)
            else:  # cannot happen unless the machine and the bank disagree: never a match
                self.post(ev.FaceVerified(action.session_id, ev.IdentityVerdict.UNSURE))
        elif isinstance(action, act.TakeSnapshot):
            self._vision.request_snapshot(action.kind, action.reason, session_id=session_id)
        elif isinstance(action, act.EjectCard):
            self._mechanics(self._eject)
        elif isinstance(action, act.RetainCard):
            self._mechanics(self._retain, action.reason)
        elif isinstance(action, act.Record):
            self._record(action.event_type, action.payload, session_id=session_id)
        elif isinstance(action, act.Publish):
            self._publish(action.decision, received_s=received_s)
        elif isinstance(action, act.SetVisionActive):
            self._vision.set_active(action.active)
        elif isinstance(action, act.Alarm):
            self._alarm(action, session_id=session_id)
        elif isinstance(action, act.Stop):
            logger.info("session machine stopped")
        else:
            logger.error("unknown action %s ignored", type(action).__name__)

    def _show(self, action: act.Show, *, session_id: str | None) -> None:
        self._last_show = action
        if self._display_fault is not None:
            return  # a dead screen: the tick retries it and puts this prompt up when it is back
        try:
            self._write_prompt(action, session_id=session_id)
        except DisplayError as exc:
            # Fail closed: a customer who cannot be told to uncover or to take the card cannot be
            # served. Out of service (the machine ends a running session) until the retry works.
            self._display_fault = str(exc)
            self._display_retry_at_s = self._clock() + DISPLAY_RETRY_S
            logger.error("display failed: %s", exc)
            self.post(ev.FaultRaised(ev.Component.DISPLAY, f"display: {exc}"))

    def _write_prompt(self, action: act.Show, *, session_id: str | None) -> None:
        shown = self._display.show(action.prompt, pin_digits=action.pin_digits, detail=action.detail)
        # The text holds only asterisks for the PIN: safe to journal.
        self._record(
            "prompt_shown", {"prompt": action.prompt.name, "text": shown.text}, session_id=session_id
        )

    def _record(self, event_type: str, payload: dict[str, Any], *, session_id: str | None) -> str | None:
        try:
            return self._journal.append_event(event_type, payload, session_id=session_id).uuid
        except JournalError as exc:
            # Evidence cannot be written: fail closed until space comes back (purge frees it).
            logger.error("journal append %s failed: %s", event_type, exc)
            self.post(ev.FaultRaised(ev.Component.JOURNAL, f"journal: {exc}"))
            return None

    def _publish(self, decision: act.Decision, *, received_s: float) -> None:
        journal_uuid = self._record(
            "decision",
            {
                "outcome": decision.outcome.value,
                "reason": decision.reason.value,
                "masked_pan": decision.masked_pan,
            },
            session_id=decision.session_id,
        )
        self.decision_latencies_s.append(self._clock() - received_s)
        logger.info(
            "decision %s (%s) for %s",
            decision.outcome.value,
            decision.reason.value,
            decision.masked_pan or "no card",
            extra={
                "session_id": decision.session_id,
                "event_type": "decision",
                "masked_pan": decision.masked_pan,
            },
        )
        self._publish_decision(decision, journal_uuid)

    def _alarm(self, action: act.Alarm, *, session_id: str | None) -> None:
        if action.active:
            logger.error("ALARM %s: %s", action.component.value, action.reason)
        else:
            logger.info("alarm %s cleared", action.component.value)
        self._record(
            "alarm",
            {"component": action.component.value, "active": action.active, "reason": action.reason},
            session_id=session_id,
        )
        self._publish_service_status()

    def _publish_service_status(self) -> None:
        state = self._state
        faults = state.fault_names if state is not None else []
        self._publish_status(not faults, "faults: " + ", ".join(faults) if faults else "")

    # --- slow calls on workers ----------------------------------------------------------------------

    def _ask_bank_card_status(self) -> None:
        card = self._card
        if card is None:
            self.post(ev.CentralUnavailable("card_status", "no card read in this session"))
            return

        identity = self._identity

        def ask() -> None:
            try:
                status = self._bank.card_status(card)
                templates: list[FaceTemplate] | None = []
                if identity is not None and status is CardStatus.ACTIVE:
                    templates = identity.usable(self._bank.face_templates(card, identity.model_id))
                # None: verification off, or only templates of another model (the machine fails closed).
                has_template = None if identity is None or templates is None else bool(templates)
                self.post(_StatusDone(ev.CardStatusChecked(status, has_template), templates or []))
            except BankUnavailable as exc:
                self.post(ev.CentralUnavailable("card_status", str(exc)))
            except Exception as exc:
                logger.exception("card status check failed")
                self.post(ev.CentralUnavailable("card_status", f"{type(exc).__name__}"))

        self._bank_worker.submit(ask)

    def _ask_bank_pin(self) -> None:
        card = self._card
        if card is None or self._verifying:
            self.post(ev.CentralUnavailable("pin", "no card read in this session"))
            return
        self._verifying = True

        def ask() -> None:
            try:
                check = self._bank.check_pin(card, self._pin.buffer)
                event: ev.Event = ev.PinVerified(check.result, check.attempts_left)
            except BankUnavailable as exc:
                event = ev.CentralUnavailable("pin", str(exc))
            except Exception as exc:
                # Only the type: an exception raised while the PIN was revealed must not be echoed.
                logger.error("PIN verification failed: %s", type(exc).__name__)
                event = ev.CentralUnavailable("pin", type(exc).__name__)
            finally:
                self._pin.buffer.wipe()
            self.post(_VerifyDone(event))

        self._bank_worker.submit(ask)

    def _mechanics(self, function: Callable[..., None], *args: Any) -> None:
        self._mechanics_worker.submit(function, *args)

    def _set_entry(self, enabled: bool) -> None:
        try:
            self._reader.set_entry_enabled(enabled)
        except AtmguardError as exc:
            logger.error("card reader: cannot %s card entry: %s", "enable" if enabled else "disable", exc)
            self.post(ev.FaultRaised(ev.Component.CARD_READER, f"card entry: {exc}"))

    def _eject(self) -> None:
        try:
            self._reader.eject()
        except AtmguardError as exc:
            logger.error("card reader: eject failed: %s", exc)
            self.post(ev.FaultRaised(ev.Component.CARD_READER, f"eject failed: {exc}"))
            return
        self.post(ev.CardEjected())
        if not self._reader.holds_card:
            # A swipe reader never held the card: it is already in the customer's hand.
            self.post(ev.CardTaken())

    def _retain(self, reason: act.Reason) -> None:
        try:
            # SAFETY: the only path that fires the actuator; the machine asks for it only to retain.
            self._reader.capture()
            result = self._actuator.retain()
        except AtmguardError as exc:
            logger.error("retention (%s) failed: %s", reason.value, exc)
            self.post(ev.FaultRaised(ev.Component.ACTUATOR, f"retention failed: {exc}"))
            return
        self.post(ev.CardRetained(result.confirmed))

    # --- the card reader thread -------------------------------------------------------------------

    def _read_cards(self) -> None:
        while not self._stopping.is_set():
            try:
                if not self._reader.is_open:
                    self._reader.open()
                event = self._reader.poll(timeout_s=CARD_POLL_S)
                if self._reader_fault:
                    self._reader_recovered()
            except AtmguardError as exc:
                self._reader_failed(str(exc))
                self._stopping.wait(READER_RETRY_S)
                continue
            if event is None:
                continue
            if isinstance(event, card_base.CardInserted):
                session_id = str(uuid.uuid4())
                check, reason = card_check(event)
                masked = event.card.masked_pan if event.card is not None else ""
                self.post(
                    _CardArrived(session_id, event.card, ev.CardInserted(session_id, check, masked, reason))
                )
            elif isinstance(event, card_base.CardTaken):
                self.post(ev.CardTaken())
            elif isinstance(event, card_base.ReaderFault):
                self._reader_failed(f"{event.reason}: {event.detail}")

    def _reader_failed(self, reason: str) -> None:
        if not self._reader_fault:
            self._reader_fault = True
            self.post(ev.FaultRaised(ev.Component.CARD_READER, reason))

    def _reader_recovered(self) -> None:
        try:
            status = self._reader.status()
        except AtmguardError:
            return
        if status.fault is None:
            self._reader_fault = False
            self.post(ev.FaultCleared(ev.Component.CARD_READER))

    def _shutdown_threads(self) -> None:
        self._stopping.set()
        self._bank_worker.shutdown(wait=True, cancel_futures=True)
        self._mechanics_worker.shutdown(wait=True, cancel_futures=False)
        for thread in self._threads:
            thread.join(2.0)
        if self._card is not None:
            self._card.wipe()
            self._card = None
        self._pin.buffer.wipe()


@dataclass(frozen=True, slots=True)
class _VerifyDone:
    event: ev.Event


@dataclass(frozen=True, slots=True)
class _StatusDone:
    """The card status, with the account's usable face templates for the controller to keep."""

    event: ev.CardStatusChecked
    templates: list[FaceTemplate]
