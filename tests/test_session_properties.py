"""Random event sequences against the pure session machine (hypothesis stateful testing).

Events arrive in any order, with any time steps including big jumps. The test keeps its own
model of which session each bank / snapshot answer belongs to: the controller answers every
request exactly once and in order (one bank worker, one snapshot queue), so an answer belongs to
the oldest request still open. The one assumption on timing, as in production: an answer for a
session that has already ended comes within ``session_timeout_s`` of its request or never.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from atmguard.session import events as ev
from atmguard.session.actions import (
    Action,
    CheckCardStatus,
    EjectCard,
    Outcome,
    Publish,
    Reason,
    Record,
    RetainCard,
    SetCardEntry,
    Stop,
    TakeSnapshot,
    VerifyFace,
    VerifyPin,
)
from atmguard.session.events import CardCheck, Component, SnapshotKind
from atmguard.session.machine import RETAIN_REASONS, Phase, SessionState, start, step
from atmguard.session.policy import Policy
from atmguard.store.central import CardStatus, PinResult
from atmguard.vision.tracker import FaceState

PAN_RUN = re.compile(r"\d{13,19}")
policies = st.builds(
    Policy,
    uncover_timeout_s=st.sampled_from([5.0, 30.0, 60.0]),
    card_take_timeout_s=st.sampled_from([1.0, 30.0]),
    session_timeout_s=st.sampled_from([60.0, 180.0]),
    retain_hot_listed=st.booleans(),
    retain_pin_exhausted=st.booleans(),
    retain_forgotten_card=st.booleans(),
    pause_pin_on_multiple_faces=st.booleans(),
    verify_face=st.booleans(),
    require_face_template=st.booleans(),
    retain_face_mismatch=st.booleans(),
    face_verify_attempts=st.integers(1, 3),
)
# Mostly small steps, sometimes exactly a timeout, sometimes a jump far past every deadline.
delays = st.sampled_from([0.0] * 8 + [0.05, 0.5, 1.0, 1.0, 5.0, 30.0, 61.0, 200.0, 10_000.0]) | st.floats(
    0.0, 2.0
)
masked_pans = st.from_regex(r"[0-9]{6}\*{2,9}[0-9]{4}", fullmatch=True)
faces = st.sampled_from(list(FaceState))
components = st.sampled_from(list(Component))
any_event: st.SearchStrategy[ev.Event] = st.one_of(
    st.builds(ev.CardInserted, st.just("placeholder"), st.sampled_from(list(CardCheck)), masked_pans),
    st.just(ev.CardEjected()),
    st.just(ev.CardTaken()),
    st.builds(ev.CardRetained, st.sampled_from([True, False, None])),
    st.builds(ev.CardStatusChecked, st.sampled_from(list(CardStatus)), st.sampled_from([None, True, False])),
    st.builds(
        ev.FaceVerified,
        st.sampled_from(["s-1", "s-2", "s-3", "other"]),
        st.sampled_from(list(ev.IdentityVerdict)),
        st.floats(-1, 1),
    ),
    st.builds(ev.PinVerified, st.sampled_from(list(PinResult)), st.none() | st.integers(0, 3)),
    st.builds(ev.CentralUnavailable, st.sampled_from(["card_status", "pin", "other"]), st.just("refused")),
    st.builds(ev.PinKeyed, st.integers(0, 12)),
    st.builds(ev.PinSubmitted, st.integers(4, 12)),
    st.just(ev.PinCancelled()),
    st.just(ev.PinEntryTimedOut()),
    st.builds(ev.FaceChanged, st.sampled_from(list(FaceState)), st.integers(0, 3)),
    st.builds(ev.SnapshotStored, st.sampled_from(list(SnapshotKind)), st.just("uuid-r")),
    st.builds(ev.SnapshotFailed, st.sampled_from(list(SnapshotKind)), st.just("camera busy")),
    st.builds(ev.FaultRaised, components, st.just("component failed")),
    st.builds(ev.FaultCleared, components),
    st.just(ev.Tick()),
    st.just(ev.ShutdownRequested()),
    st.builds(ev.PolicyChanged, policies),
)


class SessionMachineModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.state: SessionState | None = None
        self.next_session = 0
        self.face = FaceState.NO_FACE
        # Open requests, oldest first: (session id, issue time).
        self.status_q: list[tuple[str, float]] = []
        self.pin_q: list[tuple[str, float]] = []
        self.evidence_q: list[tuple[str, float]] = []
        # What each session was told, as attributed by the model.
        self.status: dict[str, CardStatus] = {}
        self.pin: dict[str, PinResult] = {}
        self.evidence: set[str] = set()
        self.templates: dict[str, bool | None] = {}
        self.identity_asked: set[str] = set()
        self.identity: dict[str, ev.IdentityVerdict] = {}
        self.publishes: Counter[str] = Counter()
        self.ejected: set[str] = set()
        self.fraud_retained: set[str] = set()
        self.started: set[str] = set()
        self.stops = 0
        self.approvals = 0

    @initialize(policy=policies)
    def begin(self, policy: Policy) -> None:
        self.state, actions = start(policy, now=self.now)
        assert actions[0] == SetCardEntry(True)

    # --- feeding and checking ----------------------------------------------------------------

    def prune(self, before: SessionState) -> None:
        """Answers of ended sessions older than session_timeout_s are lost (the timing assumption)."""
        limit_s = before.policy.session_timeout_s
        for queue in (self.status_q, self.pin_q, self.evidence_q):
            while queue and queue[0][0] != before.session_id and self.now >= queue[0][1] + limit_s:
                queue.pop(0)

    def answer(self, queue: list[tuple[str, float]]) -> str | None:
        return queue.pop(0)[0] if queue else None

    def feed(self, event: ev.Event, delay_s: float) -> list[Action]:
        assert self.state is not None
        self.now += delay_s
        before = self.state
        self.prune(before)
        # Attribute the answer before the step: the step may approve on it.
        if isinstance(event, ev.CardStatusChecked) and (sid := self.answer(self.status_q)):
            self.status[sid] = event.status
            self.templates[sid] = event.face_template
        elif isinstance(event, ev.FaceVerified) and event.session_id in self.identity_asked:
            self.identity_asked.discard(event.session_id)
            self.identity[event.session_id] = event.verdict
        elif isinstance(event, ev.PinVerified) and (sid := self.answer(self.pin_q)):
            self.pin[sid] = event.result
        elif isinstance(event, ev.CentralUnavailable) and event.during in ("card_status", "pin"):
            self.answer(self.status_q if event.during == "card_status" else self.pin_q)
        elif isinstance(event, ev.SnapshotStored | ev.SnapshotFailed) and event.kind is SnapshotKind.EVIDENCE:
            sid = self.answer(self.evidence_q)
            if sid and isinstance(event, ev.SnapshotStored):
                self.evidence.add(sid)
        if isinstance(event, ev.FaceChanged):
            self.face = event.state

        after, actions = step(before, event, self.now)
        self.state = after
        self.check(before, event, after, actions)
        return actions

    def check(
        self, before: SessionState, event: ev.Event, after: SessionState, actions: list[Action]
    ) -> None:
        if before.phase is Phase.STOPPED:
            assert actions == [] and after.phase is Phase.STOPPED
        # Invariant 4: nothing that looks like a PIN or a full PAN leaves the machine.
        assert not PAN_RUN.search(repr(actions)), actions
        sid = after.session_id or before.session_id
        if isinstance(event, ev.CardInserted) and after.session_id == event.session_id:
            # Invariant 5: sessions start only from an idle, healthy machine.
            assert before.phase is Phase.IDLE and not before.faults and before.session_id is None
            self.started.add(event.session_id)
        for action in actions:
            if isinstance(action, Publish):
                decision = action.decision
                assert decision.session_id == sid
                self.publishes[sid] += 1
                assert self.publishes[sid] == 1, f"second Publish in {sid}"  # invariant 3
                if decision.outcome is Outcome.APPROVE:  # invariant 1
                    self.approvals += 1
                    assert self.face is FaceState.UNCOVERED
                    assert self.status.get(sid) is CardStatus.ACTIVE
                    assert self.pin.get(sid) is PinResult.OK
                    assert sid in self.evidence
                    policy = before.session.policy if before.session else before.policy
                    if policy.verify_face:  # invariant 1b: the face is the account holder's
                        assert self.templates.get(sid) is not None
                        assert (
                            self.templates[sid] is False or self.identity.get(sid) is ev.IdentityVerdict.MATCH
                        )
                        assert self.templates[sid] or not policy.require_face_template
            elif isinstance(action, RetainCard):  # invariant 2
                assert action.reason in RETAIN_REASONS
                if action.reason is Reason.FACE_MISMATCH:
                    assert self.identity.get(sid) is ev.IdentityVerdict.MISMATCH
                    self.fraud_retained.add(sid)
                elif action.reason is Reason.HOT_LISTED:
                    assert (
                        self.status.get(sid) is CardStatus.HOT_LISTED
                        or self.pin.get(sid) is PinResult.HOT_LISTED
                    )
                    self.fraud_retained.add(sid)
                elif action.reason is Reason.PIN_ATTEMPTS_EXHAUSTED:
                    assert self.pin.get(sid) is PinResult.LOCKED
                    self.fraud_retained.add(sid)
                else:
                    assert sid in self.ejected, "a card never ejected cannot be forgotten"
            elif isinstance(action, EjectCard):
                # A card retained for fraud is never handed back; a refused card has no session.
                assert sid not in self.fraud_retained
                if after.session_id is not None:
                    self.ejected.add(sid)
            elif isinstance(action, VerifyFace):
                assert action.session_id == sid and self.templates.get(sid) is True
                assert self.status.get(sid) is CardStatus.ACTIVE and self.face is FaceState.UNCOVERED
                self.identity_asked.add(sid)
            elif isinstance(action, VerifyPin):
                assert not self.pin_q, "VerifyPin while another is outstanding"
                assert self.status.get(sid) is CardStatus.ACTIVE
                self.pin_q.append((sid, self.now))
            elif isinstance(action, CheckCardStatus):
                assert not self.status_q
                self.status_q.append((sid, self.now))
            elif isinstance(action, TakeSnapshot) and action.kind is SnapshotKind.EVIDENCE:
                self.evidence_q.append((sid, self.now))
            elif isinstance(action, SetCardEntry) and action.enabled:
                assert after.phase is Phase.IDLE and not after.faults
            elif isinstance(action, Stop):
                self.stops += 1
                assert self.stops == 1 and after.phase is Phase.STOPPED
            elif isinstance(action, Record) and action.event_type == "session_started":
                assert after.session_id in self.started
        ended = before.session_id is not None and after.session_id != before.session_id
        if ended:
            # Invariant 3: a session ends only when its card is gone (or at shutdown), decided once.
            assert isinstance(event, ev.CardTaken | ev.CardRetained) or after.phase is Phase.STOPPED, event
            assert self.publishes[before.session_id] == 1
        # The approval comes the moment the last condition holds: never left waiting.
        if after.phase is Phase.SESSION:
            current = after.session_id
            assert current is not None
            ready = (
                self.status.get(current) is CardStatus.ACTIVE
                and self.pin.get(current) is PinResult.OK
                and current in self.evidence
                and self.face is FaceState.UNCOVERED
            )
            session = after.session
            assert session is not None
            if session.policy.verify_face and self.templates.get(current) is not False:
                ready = ready and self.identity.get(current) is ev.IdentityVerdict.MATCH
            assert not ready, "every condition holds but no decision"

    @invariant()
    def phases_are_consistent(self) -> None:
        state = self.state
        if state is None:
            return
        assert state.in_session == (state.session_id is not None)
        assert state.face_state is self.face
        if state.phase is Phase.IDLE:
            assert not state.faults and not state.in_session
        if state.phase is Phase.OUT_OF_SERVICE:
            assert state.faults and not state.in_session and state.out_of_service
        if state.phase in (Phase.SESSION, Phase.RETURNING, Phase.RETAINING, Phase.STOPPING):
            assert state.in_session

    @invariant()
    def answers_belong_to_their_session(self) -> None:
        # What the machine believes about this session, the model attributed to this session:
        # an answer meant for an earlier customer is caught here, before it could approve anyone.
        session = self.state.session if self.state is not None else None
        if session is None:
            return
        sid = session.session_id
        if session.card_status is not None:
            assert self.status.get(sid) is session.card_status
        if session.pin_ok:
            assert self.pin.get(sid) is PinResult.OK
        if session.evidence_stored:
            assert sid in self.evidence
        assert session.verifying == any(owner == sid for owner, _ in self.pin_q)
        assert session.status_asked == any(owner == sid for owner, _ in self.status_q)

    def teardown(self) -> None:
        # Invariant 3, liveness: enough time and the customer taking the card end any session.
        if self.state is None or self.state.phase is Phase.STOPPED:
            return
        stopping = self.state.phase is Phase.STOPPING
        self.feed(ev.Tick(), 10_000.0)
        self.feed(ev.CardTaken(), 0.0)
        assert not self.state.in_session
        assert self.state.phase in ((Phase.STOPPED,) if stopping else (Phase.IDLE, Phase.OUT_OF_SERVICE))
        assert all(self.publishes[sid] == 1 for sid in self.started)

    # --- rules ---------------------------------------------------------------------------------------

    @rule(event=any_event, delay=delays)
    def random_event(self, event: ev.Event, delay: float) -> None:
        """Any event at all, whether or not it makes sense now."""
        if isinstance(event, ev.CardInserted):
            self.next_session += 1
            event = dataclasses.replace(event, session_id=f"s-{self.next_session}")
        self.feed(event, delay)

    def normal_day(self, pick: int | None, delay: float) -> None:
        """What a normal day does next: answer an open request favourably, uncover (or cover) the
        face, type the PIN, walk away, take the card, clear a fault, insert a good card.
        ``pick=None`` takes the first that applies (quick progress to an approval); otherwise
        hypothesis chooses, so stale answers reach the next session and faces turn at the worst
        moment. Interleaved with random events, every invariant is tested on real approvals."""
        state = self.state
        assert state is not None
        options: list[ev.Event] = []
        current = state.session_id
        good_answers = [
            (self.status_q, ev.CardStatusChecked(CardStatus.ACTIVE, face_template=True)),
            (self.pin_q, ev.PinVerified(PinResult.OK, 3)),
            (self.evidence_q, ev.SnapshotStored(SnapshotKind.EVIDENCE, "uuid-e")),
        ]
        # Answers for this session first; an earlier session's answer is the slow one, it comes last.
        options += [answer for queue, answer in good_answers if queue and queue[0][0] == current]
        if current in self.identity_asked:
            options.append(ev.FaceVerified(current, ev.IdentityVerdict.MATCH, 0.7))
            if pick is not None:
                options += [
                    ev.FaceVerified(current, ev.IdentityVerdict.UNSURE, 0.3),
                    ev.FaceVerified(current, ev.IdentityVerdict.MISMATCH, -0.2),
                ]
        if pick is not None and self.status_q:
            options.append(ev.CardStatusChecked(CardStatus.ACTIVE, face_template=False))
        if pick is not None:  # the bank and the camera also have bad days
            if self.status_q:
                options.append(ev.CardStatusChecked(CardStatus.HOT_LISTED))
            if self.pin_q:
                options += [ev.PinVerified(PinResult.WRONG_PIN, 2), ev.PinVerified(PinResult.LOCKED, 0)]
            if self.evidence_q:
                options.append(ev.SnapshotFailed(SnapshotKind.EVIDENCE, "camera busy"))
        session = state.session
        if state.phase is Phase.SESSION:
            if state.face_state is not FaceState.UNCOVERED:
                options.append(ev.FaceChanged(FaceState.UNCOVERED, 1))
            options.append(ev.PinSubmitted(4))
            if pick is not None:
                options += [ev.FaceChanged(FaceState.COVERED, 1), ev.PinCancelled(), ev.CardTaken()]
        elif state.phase is Phase.RETURNING and session is not None:
            options.append(
                ev.CardEjected() if session.eject_sent and not session.card_at_gate else ev.CardTaken()
            )
        elif state.phase is Phase.OUT_OF_SERVICE:
            options.append(ev.FaultCleared(min(state.faults, key=lambda c: c.value)))
        elif state.phase is Phase.IDLE:
            self.next_session += 1
            options.append(ev.CardInserted(f"s-{self.next_session}", CardCheck.VALID, "476173******0010"))
        options += [answer for queue, answer in good_answers if queue and queue[0][0] != current]
        if options:
            self.feed(options[(pick or 0) % len(options)], delay)

    # Repeated so that about one step in six is a random event and the rest a (shuffled) normal day.
    @rule(delay=delays)
    def normal_progress_1(self, delay: float) -> None:
        self.normal_day(None, delay)

    @rule(delay=delays)
    def normal_progress_2(self, delay: float) -> None:
        self.normal_day(None, delay)

    @rule(delay=delays)
    def normal_progress_3(self, delay: float) -> None:
        self.normal_day(None, delay)

    @rule(pick=st.integers(0, 11), delay=delays)
    def normal_shuffled_1(self, pick: int, delay: float) -> None:
        self.normal_day(pick, delay)

    @rule(pick=st.integers(0, 11), delay=delays)
    def normal_shuffled_2(self, pick: int, delay: float) -> None:
        self.normal_day(pick, delay)


SessionMachineModel.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSessionMachine = SessionMachineModel.TestCase
