"""The pure session state machine: ``step(state, event, now) -> (state, actions)``.

Every fraud rule of a card session lives here and nowhere else. The machine does no I/O, reads
no clock (``now`` is the controller's monotonic time, which may jump: every deadline is checked
with ``now >= deadline`` at the start of each step, whatever the event) and keeps no mutable
state: a step returns a new frozen :class:`SessionState` and the actions, which the controller
carries out in list order. An event that makes no sense in the current phase is ignored.

Phases::

    IDLE --CardInserted--> SESSION --decision--> RETURNING --CardTaken--> IDLE / OUT_OF_SERVICE
                              |                      |  (card not taken in time)
                              +--fraud--> RETAINING <+ --CardRetained--> IDLE / OUT_OF_SERVICE
    IDLE <--FaultCleared / FaultRaised--> OUT_OF_SERVICE
    any --ShutdownRequested--> STOPPING (card still to be returned) --> STOPPED

A card the machine refuses at insertion (unreadable, invalid, expired) also opens a session: it
gets its decision at once and goes to RETURNING, so its ``Publish`` carries a session id.

**Answers without a session id.** The bank's answers (``CardStatusChecked``, ``PinVerified``,
``CentralUnavailable``) and the vision loop's ``SnapshotStored``/``SnapshotFailed`` do not say
which request they answer. The controller's bank worker and snapshot queue answer every request
exactly once, in order, so the machine counts its outstanding requests (``*_requests_s``, across
sessions): an answer belongs to the current session only once every older request has been
answered. A PIN verdict meant for the previous customer can therefore never approve the next one.
A new bank request waits until the older one is answered ("never while a VerifyPin is
outstanding"); requests of ended sessions older than ``session_timeout_s`` are forgotten, so a
lost answer cannot block the ATM for ever.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, replace

from atmguard.hardware.display import Prompt
from atmguard.session.actions import (
    Action,
    Alarm,
    CheckCardStatus,
    Decision,
    EjectCard,
    Outcome,
    Publish,
    Reason,
    Record,
    RetainCard,
    SetCardEntry,
    SetPinEntryPaused,
    SetVisionActive,
    Show,
    StartPinEntry,
    Stop,
    StopPinEntry,
    TakeSnapshot,
    VerifyFace,
    VerifyPin,
)
from atmguard.session.events import (
    CardCheck,
    CardEjected,
    CardInserted,
    CardRetained,
    CardStatusChecked,
    CardTaken,
    CentralUnavailable,
    Component,
    Event,
    FaceChanged,
    FaceVerified,
    FaultCleared,
    FaultRaised,
    IdentityVerdict,
    PinCancelled,
    PinEntryTimedOut,
    PinKeyed,
    PinSubmitted,
    PinVerified,
    PolicyChanged,
    ShutdownRequested,
    SnapshotFailed,
    SnapshotKind,
    SnapshotStored,
    Tick,
)
from atmguard.session.policy import Policy
from atmguard.store.central import CardStatus, PinResult
from atmguard.vision.tracker import FaceState

# The only reasons the actuator may ever fire for (covering a face never retains a card).
RETAIN_REASONS = frozenset(
    {Reason.HOT_LISTED, Reason.PIN_ATTEMPTS_EXHAUSTED, Reason.FORGOTTEN_CARD, Reason.FACE_MISMATCH}
)

# How many EVIDENCE snapshots may fail before the session is declined (one retry, then fail closed).
EVIDENCE_ATTEMPTS = 2

_TAKE_CARD = "Please take your card"


class Phase(enum.Enum):
    IDLE = "idle"
    SESSION = "session"  # a valid card is in; card status, PIN, face and evidence are being gathered
    RETURNING = "returning"  # decided: the card is being ejected or waits at the gate to be taken
    RETAINING = "retaining"  # decided: the card is being pulled in and retained
    OUT_OF_SERVICE = "out_of_service"
    STOPPING = "stopping"  # shutdown: waiting for the session's card to be ejected, taken or retained
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Session:
    """One card's session. ``policy`` is the one in force at insertion, kept for the whole session."""

    session_id: str
    masked_pan: str
    policy: Policy
    inserted_s: float
    card_status: CardStatus | None = None
    status_asked: bool = False  # our CheckCardStatus is outstanding
    status_wanted: bool = False  # CheckCardStatus waits for an earlier session's answer
    pin_entry_active: bool = False
    pin_digits: int = 0
    pin_submitted: bool = False  # submitted; VerifyPin waits for ACTIVE and a free bank line
    verifying: bool = False  # our VerifyPin is outstanding
    pin_ok: bool = False
    face_template: bool | None = None  # the bank holds a template for the card (None: not looked up)
    identity_asked: bool = False  # our VerifyFace is outstanding
    identity_unsure: int = 0  # UNSURE verdicts so far
    identity_ok: bool = False
    evidence_requested: bool = False
    evidence_outstanding: int = 0  # our EVIDENCE snapshots not answered yet
    evidence_stored: bool = False
    evidence_failures: int = 0
    evidence_retry_due: bool = False
    uncover_deadline_s: float | None = None
    several_faces: bool = False
    pin_paused: bool = False
    decision: Decision | None = None
    eject_sent: bool = False  # an EjectCard went out: only then can CardEjected be about our card
    eject_blocked: bool = False  # an eject is owed but the card reader is faulty
    card_at_gate: bool = False  # CardEjected seen
    take_deadline_s: float | None = None
    forgotten: bool = False  # take deadline passed and the card could not (or must not) be retained
    retain_reason: Reason | None = None
    retain_blocked: bool = False  # retention owed but the actuator (or reader) is faulty


@dataclass(frozen=True, slots=True)
class SessionState:
    """Everything the machine knows. ``policy`` is the latest one (it applies to the next session)."""

    phase: Phase
    session_id: str | None
    policy: Policy
    faults: frozenset[Component] = frozenset()
    face_state: FaceState = FaceState.NO_FACE
    face_count: int = 0
    session: Session | None = None
    fault_reasons: tuple[tuple[Component, str], ...] = ()
    # Issue times of requests not answered yet, oldest first, whichever session made them.
    status_requests_s: tuple[float, ...] = ()
    pin_requests_s: tuple[float, ...] = ()
    evidence_requests_s: tuple[float, ...] = ()

    @property
    def in_session(self) -> bool:
        """A card belongs to a session (from insertion until it is taken or retained)."""
        return self.session is not None

    @property
    def fault_names(self) -> list[str]:
        """The faulty components, sorted, for status lines and the host socket."""
        return sorted(component.value for component in self.faults)

    @property
    def out_of_service(self) -> bool:
        """No new card would be accepted: a component is faulty, or the machine is shutting down."""
        return bool(self.faults) or self.phase in (Phase.OUT_OF_SERVICE, Phase.STOPPING, Phase.STOPPED)


def start(policy: Policy, *, now: float) -> tuple[SessionState, list[Action]]:
    """The machine at daemon start: idle, card slot open, vision at the idle rate."""
    del now  # no deadline runs while idle; kept so the controller's call reads like step()
    state = SessionState(phase=Phase.IDLE, session_id=None, policy=policy)
    return state, [SetCardEntry(True), Show(Prompt.INSERT_CARD), SetVisionActive(False)]


def step(state: SessionState, event: Event, now: float) -> tuple[SessionState, list[Action]]:
    """React to one event at monotonic time ``now``; never raises for an event out of place."""
    run = _Step(state, now)
    run.handle(event)
    return run.state, run.actions


# --- internals -----------------------------------------------------------------------------------

_CARD_CHECK_DENIALS: dict[CardCheck, tuple[Reason, Show]] = {
    CardCheck.UNREADABLE: (Reason.CARD_UNREADABLE, Show(Prompt.CARD_UNREADABLE)),
    CardCheck.INVALID: (Reason.CARD_INVALID, Show(Prompt.CARD_UNREADABLE, detail="This card is not valid")),
    CardCheck.EXPIRED: (Reason.CARD_EXPIRED, Show(Prompt.CARD_EXPIRED)),
}

_DENIAL_SCREENS: dict[Reason, Show] = {
    Reason.CARD_CLOSED: Show(Prompt.DENIED, detail=f"Card not accepted - {_TAKE_CARD.lower()}"),
    Reason.UNKNOWN_CARD: Show(Prompt.DENIED, detail=f"Card not accepted - {_TAKE_CARD.lower()}"),
    Reason.HOT_LISTED: Show(Prompt.DENIED, detail=f"Card not accepted - {_TAKE_CARD.lower()}"),
    Reason.PIN_ATTEMPTS_EXHAUSTED: Show(Prompt.DENIED, detail="Too many wrong PINs - please take your card"),
    Reason.PIN_CANCELLED: Show(Prompt.TAKE_CARD, detail="Cancelled"),
    Reason.PIN_TIMEOUT: Show(Prompt.DENIED, detail="No PIN entered in time - please take your card"),
    Reason.FACE_COVERED: Show(Prompt.DENIED, detail="Face covering not removed - please take your card"),
    Reason.NO_FACE: Show(Prompt.DENIED, detail="No face at the camera - please take your card"),
    Reason.BANK_UNAVAILABLE: Show(Prompt.DENIED, detail="Your bank cannot be reached - please try later"),
    Reason.EVIDENCE_FAILED: Show(Prompt.SERVICE_UNAVAILABLE, detail=_TAKE_CARD),
    Reason.SESSION_TIMEOUT: Show(Prompt.DENIED, detail="Session timed out - please take your card"),
    Reason.OUT_OF_SERVICE: Show(Prompt.SERVICE_UNAVAILABLE, detail=_TAKE_CARD),
    Reason.SHUTDOWN: Show(Prompt.SERVICE_UNAVAILABLE, detail=_TAKE_CARD),
    Reason.FACE_MISMATCH: Show(Prompt.DENIED, detail=f"Face not recognised - {_TAKE_CARD.lower()}"),
    Reason.FACE_UNVERIFIED: Show(Prompt.DENIED, detail=f"Face could not be verified - {_TAKE_CARD.lower()}"),
    Reason.NOT_ENROLLED: Show(Prompt.DENIED, detail=f"Card not accepted - {_TAKE_CARD.lower()}"),
}

_CARD_STATUS_DENIALS = {CardStatus.CLOSED: Reason.CARD_CLOSED, CardStatus.UNKNOWN: Reason.UNKNOWN_CARD}
_PIN_RESULT_DENIALS = {PinResult.CLOSED: Reason.CARD_CLOSED, PinResult.UNKNOWN_CARD: Reason.UNKNOWN_CARD}

# Without the reader the card cannot be ejected or captured; without the actuator it cannot be retained.
_RETAIN_BLOCKERS = frozenset({Component.ACTUATOR, Component.CARD_READER})


def _face_prompt(face_state: FaceState) -> Prompt | None:
    if face_state is FaceState.COVERED:
        return Prompt.REMOVE_COVERING
    if face_state is FaceState.NO_FACE:
        return Prompt.FACE_CAMERA
    return None


def _wrong_pin_detail(attempts_left: int | None) -> str:
    if attempts_left is None:
        return "Wrong PIN"
    return f"Wrong PIN - {attempts_left} attempt{'' if attempts_left == 1 else 's'} left"


class _Step:
    """One step's working copy: handlers replace ``state`` and append to ``actions``."""

    def __init__(self, state: SessionState, now: float) -> None:
        self.state = state
        self.now = now
        self.actions: list[Action] = []
        self.previous_face = state.face_state

    # --- small helpers ------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self.state.phase

    @property
    def s(self) -> Session:
        session = self.state.session
        assert session is not None  # callers check the phase first
        return session

    def emit(self, *actions: Action) -> None:
        self.actions.extend(actions)

    def set(self, **changes: object) -> None:
        self.state = replace(self.state, **changes)  # type: ignore[arg-type]

    def set_session(self, **changes: object) -> None:
        self.state = replace(self.state, session=replace(self.s, **changes))  # type: ignore[arg-type]

    def fault_detail(self) -> str:
        return self.state.fault_reasons[0][1] if self.state.fault_reasons else ""

    def current_screen(self) -> Show:
        """What a customer in the SESSION phase should see now; the face prompt comes first."""
        prompt = _face_prompt(self.state.face_state)
        if prompt is not None:
            return Show(prompt)
        s = self.s
        if s.pin_submitted or s.verifying or s.pin_ok:
            return Show(Prompt.PLEASE_WAIT)
        return Show(Prompt.ENTER_PIN, pin_digits=s.pin_digits)

    # --- dispatch -------------------------------------------------------------------------------

    def handle(self, event: Event) -> None:
        if self.phase is not Phase.STOPPED:
            self.prune_stale_requests()
            # Deadlines first, judged on the state before this event: a face uncovered after its
            # deadline does not undo the incident (fail closed when time jumped).
            self.check_deadlines()
        if isinstance(event, FaceChanged):
            self.set(face_state=event.state, face_count=event.face_count)
        if self.phase is Phase.STOPPED:
            return
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, event)
        # Last: a request sent in this step cannot be what this step's event answers.
        self.send_deferred_requests()

    # --- deadlines ------------------------------------------------------------------------------

    def check_deadlines(self) -> None:
        if self.phase is Phase.SESSION:
            s = self.s
            session_deadline_s = s.inserted_s + s.policy.session_timeout_s
            uncover = s.uncover_deadline_s
            if uncover is not None and self.now >= uncover and uncover <= session_deadline_s:
                self.face_incident()
            elif self.now >= session_deadline_s:
                self.deny(Reason.SESSION_TIMEOUT)
        elif self.phase is Phase.RETURNING:
            s = self.s
            if s.take_deadline_s is not None and self.now >= s.take_deadline_s:
                self.card_forgotten()

    def prune_stale_requests(self) -> None:
        """Forget requests of ended sessions never answered in ``session_timeout_s`` (module docstring)."""
        s = self.state.session
        own = {
            "status_requests_s": int(s is not None and s.status_asked),
            "pin_requests_s": int(s is not None and s.verifying),
            "evidence_requests_s": s.evidence_outstanding if s is not None else 0,
        }
        limit_s = self.state.policy.session_timeout_s
        for name, mine in own.items():
            requests: tuple[float, ...] = getattr(self.state, name)
            stale = len(requests) - mine  # the oldest ones (answers come in order)
            expired = 0
            while expired < stale and self.now >= requests[expired] + limit_s:
                expired += 1
            if expired:
                self.set(**{name: requests[expired:]})

    # --- requests and their answers --------------------------------------------------------------

    def ask_card_status(self) -> None:
        if self.state.status_requests_s:
            self.set_session(status_wanted=True)
            return
        self.emit(CheckCardStatus())
        self.set(status_requests_s=(self.now,))
        self.set_session(status_asked=True, status_wanted=False)

    def verify_pin_if_ready(self) -> None:
        s = self.s
        if not s.pin_submitted or s.card_status is not CardStatus.ACTIVE or self.state.pin_requests_s:
            return
        self.emit(VerifyPin())
        self.set(pin_requests_s=(self.now,))
        self.set_session(verifying=True, pin_submitted=False)

    def send_deferred_requests(self) -> None:
        if self.phase is not Phase.SESSION:
            return
        if self.s.status_wanted:
            self.ask_card_status()
        self.verify_pin_if_ready()

    def status_answer_is_ours(self) -> bool:
        requests = self.state.status_requests_s
        if not requests:
            return False  # unsolicited
        self.set(status_requests_s=requests[1:])
        s = self.state.session
        if s is not None and s.status_asked and len(requests) == 1:
            self.set_session(status_asked=False)
            return True
        return False

    def pin_answer_is_ours(self) -> bool:
        requests = self.state.pin_requests_s
        if not requests:
            return False
        self.set(pin_requests_s=requests[1:])
        s = self.state.session
        if s is not None and s.verifying and len(requests) == 1:
            self.set_session(verifying=False)
            return True
        return False

    def evidence_answer_is_ours(self) -> bool:
        requests = self.state.evidence_requests_s
        if not requests:
            return False
        self.set(evidence_requests_s=requests[1:])
        s = self.state.session
        # Ours once every older request (of an earlier session) has been answered.
        if s is not None and s.evidence_outstanding > 0 and len(requests) <= s.evidence_outstanding:
            self.set_session(evidence_outstanding=s.evidence_outstanding - 1)
            return True
        return False

    def take_evidence(self, reason: str) -> None:
        self.emit(TakeSnapshot(SnapshotKind.EVIDENCE, reason))
        self.set(evidence_requests_s=(*self.state.evidence_requests_s, self.now))
        s = self.s
        self.set_session(
            evidence_requested=True, evidence_outstanding=s.evidence_outstanding + 1, evidence_retry_due=False
        )

    # --- decisions ------------------------------------------------------------------------------

    def decide(self, outcome: Outcome, reason: Reason) -> None:
        s = self.s
        decision = Decision(s.session_id, outcome, reason, s.masked_pan)
        self.emit(Publish(decision))
        # Whatever was still to be sent to the bank is no longer wanted.
        self.set_session(
            decision=decision,
            pin_entry_active=False,
            pin_submitted=False,
            status_wanted=False,
            pin_paused=False,
            uncover_deadline_s=None,
        )

    def deny(self, reason: Reason, screen: Show | None = None) -> None:
        self.decide(Outcome.DENY, reason)
        self.emit(screen or _DENIAL_SCREENS[reason], StopPinEntry())
        self.eject()

    def approve_if_ready(self) -> None:
        """Approve the moment the last of the four conditions holds, in the same step."""
        if self.phase is not Phase.SESSION:
            return
        s = self.s
        if (
            s.card_status is CardStatus.ACTIVE
            and s.pin_ok
            and s.evidence_stored
            and self.state.face_state is FaceState.UNCOVERED
            and (s.identity_ok or not self.identity_needed())
        ):
            self.decide(Outcome.APPROVE, Reason.APPROVED)
            self.emit(Show(Prompt.APPROVED), StopPinEntry())
            self.eject()

    def retain_for_fraud(self, reason: Reason) -> None:
        # The fraud snapshot is taken whatever the face shows: it is evidence for the bank.
        self.emit(TakeSnapshot(SnapshotKind.FRAUD, reason.value), StopPinEntry())
        self.fire_retention(reason)
        self.decide(Outcome.RETAIN, reason)
        self.emit(Show(Prompt.CARD_RETAINED))

    def fire_retention(self, reason: Reason) -> None:
        assert reason in RETAIN_REASONS
        phase = Phase.STOPPING if self.phase is Phase.STOPPING else Phase.RETAINING
        self.set(phase=phase)
        if self.state.faults & _RETAIN_BLOCKERS:
            self.emit(Record("retention_blocked", {"reason": reason.value}))
            self.set_session(retain_reason=reason, retain_blocked=True, take_deadline_s=None)
            return
        self.emit(RetainCard(reason))
        self.set_session(retain_reason=reason, retain_blocked=False, take_deadline_s=None)

    def eject(self) -> None:
        if self.phase is not Phase.STOPPING:
            self.set(phase=Phase.RETURNING)
        if Component.CARD_READER in self.state.faults:
            # The reader cannot move the card: keep it, say so, and eject once the reader recovers.
            self.emit(
                Record("card_held", {"why": "card reader fault"}),
                Alarm(Component.CARD_READER, True, "card held in the reader: cannot eject"),
            )
            self.set_session(eject_blocked=True, take_deadline_s=None, card_at_gate=False)
            return
        self.emit(EjectCard())
        # Counted from EjectCard until CardEjected says the card is at the gate, then from there.
        self.set_session(
            eject_sent=True,
            eject_blocked=False,
            card_at_gate=False,
            take_deadline_s=self.now + self.s.policy.card_take_timeout_s,
        )

    def face_incident(self) -> None:
        face_state = self.state.face_state
        reason = Reason.FACE_COVERED if face_state is FaceState.COVERED else Reason.NO_FACE
        self.emit(
            TakeSnapshot(SnapshotKind.INCIDENT, reason.value),
            Record("face_incident", {"state": face_state.value, "face_count": self.state.face_count}),
        )
        self.deny(reason)

    def card_forgotten(self) -> None:
        s = self.s
        self.set_session(take_deadline_s=None)
        blockers = self.state.faults & _RETAIN_BLOCKERS
        if not s.policy.retain_forgotten_card or blockers:
            why = (
                "policy" if not s.policy.retain_forgotten_card else f"{min(c.value for c in blockers)} fault"
            )
            self.emit(Record("card_forgotten", {"retained": False, "why": why}))
            self.set_session(forgotten=True)
            return
        if s.decision is not None:
            self.emit(Record("card_forgotten", {"retained": True}))
        self.fire_retention(Reason.FORGOTTEN_CARD)
        if s.decision is None:
            self.decide(Outcome.RETAIN, Reason.FORGOTTEN_CARD)
        self.emit(Show(Prompt.CARD_RETAINED))
        self.set_session(forgotten=False)

    def end_session(self, how: str) -> None:
        s = self.s
        self.emit(Record("session_ended", {"session_id": s.session_id, "how": how}))
        self.set(session=None, session_id=None)
        if self.phase is Phase.STOPPING:
            self.emit(Stop())
            self.set(phase=Phase.STOPPED)
        elif self.state.faults:
            self.emit(
                SetCardEntry(False),
                Show(Prompt.OUT_OF_SERVICE, detail=self.fault_detail()),
                SetVisionActive(False),
            )
            self.set(phase=Phase.OUT_OF_SERVICE)
        else:
            self.emit(SetCardEntry(True), Show(Prompt.INSERT_CARD), SetVisionActive(False))
            self.set(phase=Phase.IDLE)

    # --- card reader ------------------------------------------------------------------------------

    def on_card_inserted(self, event: CardInserted) -> None:
        if self.phase is Phase.IDLE:
            self.start_session(event)
        elif self.phase is Phase.OUT_OF_SERVICE:
            # No session while out of service: give the card straight back.
            self.emit(Record("card_refused", {"masked_pan": event.masked_pan, "why": "out_of_service"}))
            if Component.CARD_READER not in self.state.faults:
                self.emit(EjectCard())
            self.emit(Show(Prompt.OUT_OF_SERVICE, detail=self.fault_detail()))
        else:
            # A second card cannot be ejected without ejecting (or releasing) the session's own.
            self.emit(Record("card_inserted_ignored", {"phase": self.phase.value}))

    def start_session(self, event: CardInserted) -> None:
        session = Session(
            session_id=event.session_id,
            masked_pan=event.masked_pan,
            policy=self.state.policy,
            inserted_s=self.now,
        )
        self.set(phase=Phase.SESSION, session_id=event.session_id, session=session)
        if event.check is not CardCheck.VALID:
            reason, screen = _CARD_CHECK_DENIALS[event.check]
            self.deny(reason, screen)
            return
        self.emit(
            Record("session_started", {"masked_pan": event.masked_pan}),
            SetCardEntry(False),
            SetVisionActive(True),
        )
        self.ask_card_status()
        self.emit(StartPinEntry())
        self.set_session(pin_entry_active=True)
        self.emit(self.current_screen())
        if self.state.face_state is FaceState.UNCOVERED:
            self.take_evidence("uncovered face at card insertion")
        else:
            self.set_session(uncover_deadline_s=self.now + session.policy.uncover_timeout_s)
        if self.state.face_count > 1:
            self.several_faces_started()

    def on_card_ejected(self, event: CardEjected) -> None:
        s = self.state.session
        if s is None or not s.eject_sent:
            return  # not an answer to an EjectCard of ours: the card is still held
        if self.phase is Phase.RETURNING:
            s = self.s
            deadline_s = None if s.forgotten else self.now + s.policy.card_take_timeout_s
            self.set_session(card_at_gate=True, eject_blocked=False, take_deadline_s=deadline_s)
        elif self.phase is Phase.STOPPING:
            self.end_session("ejected at shutdown")

    def on_card_taken(self, event: CardTaken) -> None:
        if self.state.session is None:
            return
        retain_reason = self.s.retain_reason
        if self.phase is Phase.SESSION:
            # The card left before a decision (pulled out, reader reset): decline, nothing to eject.
            self.decide(Outcome.DENY, Reason.CARD_REMOVED)
            self.emit(StopPinEntry())
        elif retain_reason is not None:
            self.emit(Record("card_taken_before_retention", {"reason": retain_reason.value}))
        self.end_session("taken")

    def on_card_retained(self, event: CardRetained) -> None:
        s = self.state.session
        if s is None or self.phase not in (Phase.RETAINING, Phase.STOPPING):
            return
        reason = s.retain_reason.value if s.retain_reason is not None else ""
        self.emit(Record("card_retained", {"confirmed": event.confirmed, "reason": reason}))
        self.end_session("retained")

    # --- bank -------------------------------------------------------------------------------------

    def on_card_status(self, event: CardStatusChecked) -> None:
        if not self.status_answer_is_ours() or self.phase is not Phase.SESSION:
            return
        status = event.status
        self.set_session(card_status=status, face_template=event.face_template)
        if status is CardStatus.ACTIVE:
            policy = self.s.policy
            if policy.verify_face and event.face_template is None:
                # Verification is on, but nobody could say whether a template exists: fail closed.
                self.deny(Reason.FACE_UNVERIFIED)
                return
            if policy.verify_face and not event.face_template and policy.require_face_template:
                self.deny(Reason.NOT_ENROLLED)
                return
            self.verify_pin_if_ready()
            self.verify_face_if_ready()
            self.approve_if_ready()
        elif status is CardStatus.HOT_LISTED:
            self.hot_listed()
        else:
            self.deny(_CARD_STATUS_DENIALS.get(status, Reason.UNKNOWN_CARD))

    def hot_listed(self) -> None:
        if self.s.policy.retain_hot_listed:
            self.retain_for_fraud(Reason.HOT_LISTED)
        else:
            self.deny(Reason.HOT_LISTED)

    def on_pin_verified(self, event: PinVerified) -> None:
        if not self.pin_answer_is_ours() or self.phase is not Phase.SESSION:
            return
        result = event.result
        if result is PinResult.OK:
            self.set_session(pin_ok=True)
            self.approve_if_ready()
        elif result is PinResult.WRONG_PIN:
            detail = _wrong_pin_detail(event.attempts_left)
            prompt = _face_prompt(self.state.face_state) or Prompt.ENTER_PIN
            self.emit(Show(prompt, detail=detail), StartPinEntry())
            self.set_session(pin_entry_active=True, pin_digits=0, pin_paused=False)
            self.pause_pin_if_crowded()
        elif result is PinResult.LOCKED:
            if self.s.policy.retain_pin_exhausted:
                self.retain_for_fraud(Reason.PIN_ATTEMPTS_EXHAUSTED)
            else:
                self.deny(Reason.PIN_ATTEMPTS_EXHAUSTED)
        elif result is PinResult.HOT_LISTED:
            self.hot_listed()
        else:
            self.deny(_PIN_RESULT_DENIALS.get(result, Reason.UNKNOWN_CARD))

    def on_central_unavailable(self, event: CentralUnavailable) -> None:
        if event.during == "card_status":
            ours = self.status_answer_is_ours()
        elif event.during == "pin":
            ours = self.pin_answer_is_ours()
        else:
            ours = True  # not an answer we counted, but the bank is down: fail closed all the same
        if ours and self.phase is Phase.SESSION:
            self.deny(Reason.BANK_UNAVAILABLE)

    # --- keypad -----------------------------------------------------------------------------------

    def on_pin_keyed(self, event: PinKeyed) -> None:
        if self.phase is not Phase.SESSION or not self.s.pin_entry_active:
            return
        self.set_session(pin_digits=max(0, event.digits))
        # A face prompt stays on screen: the asterisks show only to an uncovered face.
        if self.state.face_state is FaceState.UNCOVERED:
            self.emit(Show(Prompt.ENTER_PIN, pin_digits=self.s.pin_digits))

    def on_pin_submitted(self, event: PinSubmitted) -> None:
        if self.phase is not Phase.SESSION or not self.s.pin_entry_active:
            return
        self.set_session(pin_entry_active=False, pin_submitted=True, pin_digits=0, pin_paused=False)
        self.verify_pin_if_ready()
        if self.state.face_state is FaceState.UNCOVERED:
            self.emit(Show(Prompt.PLEASE_WAIT))

    def on_pin_cancelled(self, event: PinCancelled) -> None:
        if self.phase is Phase.SESSION:
            self.deny(Reason.PIN_CANCELLED)

    def on_pin_timed_out(self, event: PinEntryTimedOut) -> None:
        if self.phase is Phase.SESSION:
            self.deny(Reason.PIN_TIMEOUT)

    # --- vision -----------------------------------------------------------------------------------

    def on_face_changed(self, event: FaceChanged) -> None:
        # face_state / face_count were updated in handle(); here only what a session does with them.
        if self.phase is not Phase.SESSION:
            return
        s = self.s
        changed = event.state is not self.previous_face
        if event.state is FaceState.UNCOVERED:
            self.set_session(uncover_deadline_s=None)
            if not s.evidence_requested:
                self.take_evidence("uncovered face")
            elif s.evidence_retry_due:
                self.take_evidence("uncovered face (retry)")
            self.verify_face_if_ready()
        elif s.uncover_deadline_s is None:
            # The first moment of this stretch without an uncovered face starts the clock.
            self.set_session(uncover_deadline_s=self.now + s.policy.uncover_timeout_s)
        self.approve_if_ready()
        if self.phase is not Phase.SESSION:
            return
        showed = changed
        if changed:
            self.emit(self.current_screen())
        if event.face_count > 1 and not self.s.several_faces and not self.s.pin_ok:
            self.several_faces_started()
        elif event.face_count <= 1 and self.s.several_faces:
            self.set_session(several_faces=False)
            if self.s.pin_paused:
                self.emit(SetPinEntryPaused(False))
                self.set_session(pin_paused=False)
            if not showed:
                self.emit(self.current_screen())

    def several_faces_started(self) -> None:
        self.emit(Show(Prompt.ONE_PERSON_ONLY))
        self.set_session(several_faces=True)
        self.pause_pin_if_crowded()

    def pause_pin_if_crowded(self) -> None:
        s = self.s
        if (
            s.several_faces
            and s.policy.pause_pin_on_multiple_faces
            and s.pin_entry_active
            and not s.pin_paused
        ):
            self.emit(SetPinEntryPaused(True))
            self.set_session(pin_paused=True)

    # --- identity -----------------------------------------------------------------------------------

    def identity_needed(self) -> bool:
        """Whether this session must match the account holder's face before approval."""
        s = self.s
        return s.policy.verify_face and s.face_template is not False

    def verify_face_if_ready(self) -> None:
        """Ask once the card is known to have a template and the face is uncovered."""
        s = self.s
        if (
            self.phase is Phase.SESSION
            and s.policy.verify_face
            and s.face_template is True
            and s.card_status is CardStatus.ACTIVE
            and not s.identity_asked
            and not s.identity_ok
            and self.state.face_state is FaceState.UNCOVERED
        ):
            self.emit(VerifyFace(s.session_id))
            self.set_session(identity_asked=True)

    def on_face_verified(self, event: FaceVerified) -> None:
        if (
            self.phase is not Phase.SESSION
            or event.session_id != self.s.session_id
            or not self.s.identity_asked
        ):
            return  # an answer for another session, or one nobody asked for
        self.set_session(identity_asked=False)
        if event.verdict is IdentityVerdict.MATCH:
            self.set_session(identity_ok=True)
            self.approve_if_ready()
        elif event.verdict is IdentityVerdict.MISMATCH:
            if self.s.policy.retain_face_mismatch:
                self.retain_for_fraud(Reason.FACE_MISMATCH)
            else:
                self.emit(TakeSnapshot(SnapshotKind.FRAUD, Reason.FACE_MISMATCH.value))
                self.deny(Reason.FACE_MISMATCH)
        else:
            unsure = self.s.identity_unsure + 1
            self.set_session(identity_unsure=unsure)
            if unsure >= self.s.policy.face_verify_attempts:
                self.deny(Reason.FACE_UNVERIFIED)  # never retained: the face may well be the holder's
                return
            self.emit(Show(Prompt.LOOK_AT_CAMERA))
            self.verify_face_if_ready()

    def on_snapshot_stored(self, event: SnapshotStored) -> None:
        if event.kind is not SnapshotKind.EVIDENCE or not self.evidence_answer_is_ours():
            return
        if self.phase is Phase.SESSION:
            self.set_session(evidence_stored=True)
            self.approve_if_ready()

    def on_snapshot_failed(self, event: SnapshotFailed) -> None:
        if event.kind is not SnapshotKind.EVIDENCE or not self.evidence_answer_is_ours():
            return
        if self.phase is not Phase.SESSION or self.s.evidence_stored:
            return
        failures = self.s.evidence_failures + 1
        self.set_session(evidence_failures=failures)
        if failures >= EVIDENCE_ATTEMPTS:
            # The uncovered face cannot be journaled: no approval without evidence (fail closed).
            self.emit(Record("evidence_failed", {"attempts": failures, "reason": event.reason}))
            self.deny(Reason.EVIDENCE_FAILED)
        else:
            self.set_session(evidence_retry_due=True)

    # --- time -------------------------------------------------------------------------------------

    def on_tick(self, event: Tick) -> None:
        if self.phase is not Phase.SESSION:
            return
        if self.s.evidence_retry_due and self.state.face_state is FaceState.UNCOVERED:
            self.take_evidence("uncovered face (retry)")

    # --- health and lifecycle ---------------------------------------------------------------------

    def on_policy_changed(self, event: PolicyChanged) -> None:
        # Applies from the next session; a running session keeps the policy it started with.
        self.set(policy=event.policy)
        self.emit(Record("policy_changed", asdict(event.policy)))

    def on_fault_raised(self, event: FaultRaised) -> None:
        component = event.component
        if component in self.state.faults:
            return  # already known and alarmed
        self.set(
            faults=self.state.faults | {component},
            fault_reasons=(*self.state.fault_reasons, (component, event.reason)),
        )
        phase = self.phase
        if phase is Phase.IDLE:
            self.emit(
                SetCardEntry(False),
                Show(Prompt.OUT_OF_SERVICE, detail=event.reason),
                Alarm(component, True, event.reason),
            )
            self.set(phase=Phase.OUT_OF_SERVICE)
            return
        self.emit(Alarm(component, True, event.reason))
        if phase is Phase.SESSION:
            self.deny(Reason.OUT_OF_SERVICE)
            return
        s = self.state.session
        if s is None:
            return
        if component is Component.CARD_READER and s.retain_reason is None and not s.card_at_gate:
            # Our eject failed (the controller reports that as a reader fault): the card is held.
            self.emit(Record("card_held", {"why": "card reader fault"}))
            self.set_session(eject_blocked=True, take_deadline_s=None)
        elif component in _RETAIN_BLOCKERS and s.retain_reason is not None and not s.retain_blocked:
            self.emit(Record("retention_failed", {"reason": s.retain_reason.value}))
            self.set_session(retain_blocked=True)

    def on_fault_cleared(self, event: FaultCleared) -> None:
        component = event.component
        if component not in self.state.faults:
            return
        self.set(
            faults=self.state.faults - {component},
            fault_reasons=tuple(item for item in self.state.fault_reasons if item[0] is not component),
        )
        self.emit(Alarm(component, False))
        phase = self.phase
        if phase is Phase.OUT_OF_SERVICE:
            if not self.state.faults:
                self.emit(SetCardEntry(True), Show(Prompt.INSERT_CARD))
                self.set(phase=Phase.IDLE)
            return
        s = self.state.session
        if s is None or phase not in (Phase.RETURNING, Phase.RETAINING, Phase.STOPPING):
            return
        if s.eject_blocked and Component.CARD_READER not in self.state.faults:
            self.eject()
        elif s.retain_blocked and not self.state.faults & _RETAIN_BLOCKERS:
            assert s.retain_reason is not None
            self.emit(RetainCard(s.retain_reason))
            self.set_session(retain_blocked=False)
        elif s.forgotten and s.policy.retain_forgotten_card and phase is Phase.RETURNING:
            self.card_forgotten()  # retains now if the policy wants it and nothing blocks it

    def on_shutdown(self, event: ShutdownRequested) -> None:
        phase = self.phase
        if phase is Phase.STOPPING:
            return
        self.emit(SetCardEntry(False))
        if phase in (Phase.IDLE, Phase.OUT_OF_SERVICE):
            self.emit(Show(Prompt.OUT_OF_SERVICE), Stop())
            self.set(phase=Phase.STOPPED)
            return
        self.set(phase=Phase.STOPPING)
        if phase is Phase.SESSION:
            self.deny(Reason.SHUTDOWN)
        elif phase is Phase.RETURNING and self.s.card_at_gate:
            self.end_session("left at the gate at shutdown")


_HANDLERS = {
    CardInserted: _Step.on_card_inserted,
    CardEjected: _Step.on_card_ejected,
    CardTaken: _Step.on_card_taken,
    CardRetained: _Step.on_card_retained,
    CardStatusChecked: _Step.on_card_status,
    PinVerified: _Step.on_pin_verified,
    FaceVerified: _Step.on_face_verified,
    CentralUnavailable: _Step.on_central_unavailable,
    PinKeyed: _Step.on_pin_keyed,
    PinSubmitted: _Step.on_pin_submitted,
    PinCancelled: _Step.on_pin_cancelled,
    PinEntryTimedOut: _Step.on_pin_timed_out,
    FaceChanged: _Step.on_face_changed,
    SnapshotStored: _Step.on_snapshot_stored,
    SnapshotFailed: _Step.on_snapshot_failed,
    Tick: _Step.on_tick,
    FaultRaised: _Step.on_fault_raised,
    FaultCleared: _Step.on_fault_cleared,
    ShutdownRequested: _Step.on_shutdown,
    PolicyChanged: _Step.on_policy_changed,
}
