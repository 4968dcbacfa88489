"""The pure session machine, rule by rule: what the customer sees, what the bank hears, what the
card does. Every test drives ``start``/``step`` with events and asserts on the actions."""

from __future__ import annotations

import dataclasses

import pytest

from atmguard.config import SessionSettings, Settings, VerificationSettings
from atmguard.hardware.display import Prompt
from atmguard.session import events as ev
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
from atmguard.session.events import CardCheck, Component, SnapshotKind
from atmguard.session.machine import Phase, SessionState, start, step
from atmguard.session.policy import Policy
from atmguard.store.central import CardStatus, PinResult
from atmguard.vision.tracker import FaceState

PAN = "476173******0010"
SID = "session-1"
UNCOVERED, COVERED, NO_FACE = FaceState.UNCOVERED, FaceState.COVERED, FaceState.NO_FACE


class Atm:
    """A machine plus a clock: ``send`` steps it and returns that step's actions."""

    def __init__(
        self, policy: Policy | None = None, *, face: FaceState | None = None, count: int = 1
    ) -> None:
        self.now = 100.0
        self.state, self.start_actions = start(policy or Policy(), now=self.now)
        if face is not None:
            self.send(ev.FaceChanged(face, count if face is not NO_FACE else 0))

    def send(self, event: ev.Event, *, after_s: float = 0.0) -> list[Action]:
        self.now += after_s
        self.state, actions = step(self.state, event, self.now)
        return actions

    def insert(self, check: CardCheck = CardCheck.VALID, *, sid: str = SID) -> list[Action]:
        return self.send(ev.CardInserted(sid, check, PAN if check is CardCheck.VALID else ""))

    def to_pin_ok(self) -> None:
        """A valid card, bank says ACTIVE, PIN typed and accepted."""
        self.insert()
        self.send(ev.CardStatusChecked(CardStatus.ACTIVE))
        self.send(ev.PinSubmitted(4))
        self.send(ev.PinVerified(PinResult.OK, 3))

    @property
    def phase(self) -> Phase:
        return self.state.phase


def publishes(actions: list[Action]) -> list[Decision]:
    return [a.decision for a in actions if isinstance(a, Publish)]


def shows(actions: list[Action]) -> list[Show]:
    return [a for a in actions if isinstance(a, Show)]


def approved_session(atm: Atm) -> list[Action]:
    """Drive a full approval with an uncovered face; returns the approving step's actions."""
    atm.to_pin_ok()
    return atm.send(ev.SnapshotStored(SnapshotKind.EVIDENCE, "snap-1"))


def deny(reason: Reason, sid: str = SID, pan: str = PAN) -> Publish:
    return Publish(Decision(sid, Outcome.DENY, reason, pan))


IDLE_ACTIONS = [SetCardEntry(True), Show(Prompt.INSERT_CARD), SetVisionActive(False)]

# --- policy ----------------------------------------------------------------------------------------


def test_policy_from_settings_copies_the_session_section() -> None:
    session = SessionSettings(
        uncover_timeout_s=12.0,
        card_take_timeout_s=7.0,
        session_timeout_s=99.0,
        retain_hot_listed=False,
        retain_pin_exhausted=False,
        retain_forgotten_card=False,
        pause_pin_on_multiple_faces=True,
    )
    policy = Policy.from_settings(Settings(session=session))
    assert policy == Policy(12.0, 7.0, 99.0, False, False, False, True)


def test_policy_from_settings_copies_the_verification_section() -> None:
    verification = VerificationSettings(
        enabled=False, require_template=True, retain_mismatch=False, attempts=5
    )
    policy = Policy.from_settings(Settings(verification=verification))
    assert (policy.verify_face, policy.require_face_template, policy.retain_face_mismatch) == (
        False,
        True,
        False,
    )
    assert policy.face_verify_attempts == 5


def test_policy_defaults_are_the_config_defaults() -> None:
    assert Policy() == Policy.from_settings(Settings())


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_policy_refuses_meaningless_timeouts(bad: float) -> None:
    with pytest.raises(ValueError, match="uncover_timeout_s"):
        Policy(uncover_timeout_s=bad)


# --- start and card insertion ----------------------------------------------------------------------


def test_start_is_idle_with_the_slot_open() -> None:
    atm = Atm()
    assert atm.phase is Phase.IDLE and not atm.state.in_session and not atm.state.out_of_service
    assert atm.start_actions == IDLE_ACTIONS


@pytest.mark.parametrize(
    ("check", "reason", "screen"),
    [
        (CardCheck.UNREADABLE, Reason.CARD_UNREADABLE, Show(Prompt.CARD_UNREADABLE)),
        (
            CardCheck.INVALID,
            Reason.CARD_INVALID,
            Show(Prompt.CARD_UNREADABLE, detail="This card is not valid"),
        ),
        (CardCheck.EXPIRED, Reason.CARD_EXPIRED, Show(Prompt.CARD_EXPIRED)),
    ],
)
def test_bad_card_is_denied_and_returned_without_asking_the_bank(
    check: CardCheck, reason: Reason, screen: Show
) -> None:
    atm = Atm(face=UNCOVERED)
    actions = atm.insert(check)
    assert actions == [deny(reason, pan=""), screen, StopPinEntry(), EjectCard()]
    assert atm.state.session_id == SID and atm.phase is Phase.RETURNING
    actions = atm.send(ev.CardTaken())
    assert actions == [Record("session_ended", {"session_id": SID, "how": "taken"}), *IDLE_ACTIONS]
    assert atm.phase is Phase.IDLE and atm.state.session_id is None


def test_valid_card_with_uncovered_face_starts_session_and_takes_evidence() -> None:
    atm = Atm(face=UNCOVERED)
    assert atm.insert() == [
        Record("session_started", {"masked_pan": PAN}),
        SetCardEntry(False),
        SetVisionActive(True),
        CheckCardStatus(),
        StartPinEntry(),
        Show(Prompt.ENTER_PIN),
        TakeSnapshot(SnapshotKind.EVIDENCE, "uncovered face at card insertion"),
    ]
    assert atm.phase is Phase.SESSION and atm.state.in_session and atm.state.session_id == SID


@pytest.mark.parametrize(
    ("face", "prompt"), [(COVERED, Prompt.REMOVE_COVERING), (NO_FACE, Prompt.FACE_CAMERA)]
)
def test_valid_card_with_face_not_visible_prompts_for_the_face_and_takes_no_evidence(
    face: FaceState, prompt: Prompt
) -> None:
    atm = Atm(face=face)
    actions = atm.insert()
    assert actions[-2:] == [StartPinEntry(), Show(prompt)]
    assert not [a for a in actions if isinstance(a, TakeSnapshot)]


# --- card status -----------------------------------------------------------------------------------


def test_hot_listed_card_is_retained_with_a_fraud_snapshot_even_when_covered() -> None:
    atm = Atm(face=COVERED)
    atm.insert()
    actions = atm.send(ev.CardStatusChecked(CardStatus.HOT_LISTED))
    assert actions == [
        TakeSnapshot(SnapshotKind.FRAUD, "hot_listed"),
        StopPinEntry(),
        RetainCard(Reason.HOT_LISTED),
        Publish(Decision(SID, Outcome.RETAIN, Reason.HOT_LISTED, PAN)),
        Show(Prompt.CARD_RETAINED),
    ]
    assert atm.phase is Phase.RETAINING
    # The card is never handed back, however long the customer waits.
    assert not [a for a in atm.send(ev.Tick(), after_s=1000.0) if isinstance(a, EjectCard)]
    actions = atm.send(ev.CardRetained(True))
    assert actions[0] == Record("card_retained", {"confirmed": True, "reason": "hot_listed"})
    assert actions[-3:] == IDLE_ACTIONS and atm.phase is Phase.IDLE


def test_hot_listed_card_is_ejected_when_the_bank_does_not_retain() -> None:
    atm = Atm(Policy(retain_hot_listed=False), face=UNCOVERED)
    atm.insert()
    actions = atm.send(ev.CardStatusChecked(CardStatus.HOT_LISTED))
    assert publishes(actions) == [Decision(SID, Outcome.DENY, Reason.HOT_LISTED, PAN)]
    assert actions[-2:] == [StopPinEntry(), EjectCard()]
    assert not [a for a in actions if isinstance(a, RetainCard)]


@pytest.mark.parametrize(
    ("status", "reason"), [(CardStatus.CLOSED, Reason.CARD_CLOSED), (CardStatus.UNKNOWN, Reason.UNKNOWN_CARD)]
)
def test_closed_or_unknown_card_is_denied_and_ejected(status: CardStatus, reason: Reason) -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    actions = atm.send(ev.CardStatusChecked(status))
    assert actions[0] == deny(reason)
    assert actions[1].prompt is Prompt.DENIED  # type: ignore[attr-defined]
    assert actions[2:] == [StopPinEntry(), EjectCard()]


# --- PIN -------------------------------------------------------------------------------------------


def test_pin_digits_show_only_to_an_uncovered_face() -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    assert atm.send(ev.PinKeyed(2)) == [Show(Prompt.ENTER_PIN, pin_digits=2)]
    assert atm.send(ev.FaceChanged(COVERED, 1)) == [Show(Prompt.REMOVE_COVERING)]
    assert atm.send(ev.PinKeyed(3)) == []  # the face prompt stays
    assert atm.send(ev.FaceChanged(UNCOVERED, 1)) == [Show(Prompt.ENTER_PIN, pin_digits=3)]


def test_pin_waits_for_the_card_status_and_is_verified_once() -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    assert atm.send(ev.PinSubmitted(4)) == [Show(Prompt.PLEASE_WAIT)]  # status not known yet
    assert atm.send(ev.PinSubmitted(4)) == []  # entry is over: a second submission is ignored
    assert atm.send(ev.CardStatusChecked(CardStatus.ACTIVE)) == [VerifyPin()]
    assert atm.send(ev.PinSubmitted(4)) == []  # never while a VerifyPin is outstanding
    assert atm.send(ev.CardStatusChecked(CardStatus.ACTIVE)) == []  # unsolicited


def test_wrong_pin_restarts_entry_with_the_attempts_left() -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    atm.send(ev.CardStatusChecked(CardStatus.ACTIVE))
    assert atm.send(ev.PinSubmitted(4)) == [VerifyPin(), Show(Prompt.PLEASE_WAIT)]
    assert atm.send(ev.PinVerified(PinResult.WRONG_PIN, 2)) == [
        Show(Prompt.ENTER_PIN, detail="Wrong PIN - 2 attempts left"),
        StartPinEntry(),
    ]
    assert atm.send(ev.PinSubmitted(4)) == [VerifyPin(), Show(Prompt.PLEASE_WAIT)]
    actions = atm.send(ev.PinVerified(PinResult.WRONG_PIN, None))
    assert actions[0] == Show(Prompt.ENTER_PIN, detail="Wrong PIN")


def test_wrong_pin_behind_a_covered_face_keeps_the_face_prompt() -> None:
    atm = Atm(face=COVERED)
    atm.insert()
    atm.send(ev.CardStatusChecked(CardStatus.ACTIVE))
    assert atm.send(ev.PinSubmitted(4)) == [VerifyPin()]
    actions = atm.send(ev.PinVerified(PinResult.WRONG_PIN, 1))
    assert actions == [Show(Prompt.REMOVE_COVERING, detail="Wrong PIN - 1 attempt left"), StartPinEntry()]


def test_pin_attempts_exhausted_retains_the_card() -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    atm.send(ev.CardStatusChecked(CardStatus.ACTIVE))
    atm.send(ev.PinSubmitted(4))
    actions = atm.send(ev.PinVerified(PinResult.LOCKED, 0))
    assert actions == [
        TakeSnapshot(SnapshotKind.FRAUD, "pin_attempts_exhausted"),
        StopPinEntry(),
        RetainCard(Reason.PIN_ATTEMPTS_EXHAUSTED),
        Publish(Decision(SID, Outcome.RETAIN, Reason.PIN_ATTEMPTS_EXHAUSTED, PAN)),
        Show(Prompt.CARD_RETAINED),
    ]


def test_pin_attempts_exhausted_ejects_when_the_bank_does_not_retain() -> None:
    atm = Atm(Policy(retain_pin_exhausted=False), face=UNCOVERED)
    atm.insert()
    atm.send(ev.CardStatusChecked(CardStatus.ACTIVE))
    atm.send(ev.PinSubmitted(4))
    actions = atm.send(ev.PinVerified(PinResult.LOCKED, 0))
    assert actions[0] == deny(Reason.PIN_ATTEMPTS_EXHAUSTED) and actions[-1] == EjectCard()
    assert not [a for a in actions if isinstance(a, RetainCard)]


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (PinResult.HOT_LISTED, RetainCard(Reason.HOT_LISTED)),
        (PinResult.CLOSED, deny(Reason.CARD_CLOSED)),
        (PinResult.UNKNOWN_CARD, deny(Reason.UNKNOWN_CARD)),
    ],
)
def test_pin_verdicts_about_the_card(result: PinResult, expected: Action) -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    atm.send(ev.CardStatusChecked(CardStatus.ACTIVE))
    atm.send(ev.PinSubmitted(4))
    actions = atm.send(ev.PinVerified(result, None))
    assert expected in actions
    assert len(publishes(actions)) == 1


@pytest.mark.parametrize(
    ("event", "reason"),
    [(ev.PinCancelled(), Reason.PIN_CANCELLED), (ev.PinEntryTimedOut(), Reason.PIN_TIMEOUT)],
)
def test_cancel_and_pin_timeout_deny_and_eject(event: ev.Event, reason: Reason) -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    actions = atm.send(event)
    assert actions[0] == deny(reason)
    assert actions[-2:] == [StopPinEntry(), EjectCard()]


@pytest.mark.parametrize("during", ["card_status", "pin"])
def test_bank_unavailable_fails_closed(during: str) -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    if during == "pin":
        atm.send(ev.CardStatusChecked(CardStatus.ACTIVE))
        atm.send(ev.PinSubmitted(4))
    actions = atm.send(ev.CentralUnavailable(during, "timeout"))
    assert actions[0] == deny(Reason.BANK_UNAVAILABLE)
    assert actions[1].prompt is Prompt.DENIED and "bank" in actions[1].detail.lower()  # type: ignore[attr-defined]
    assert actions[2:] == [StopPinEntry(), EjectCard()]


# --- approval --------------------------------------------------------------------------------------


def test_approval_needs_all_four_and_comes_with_the_last() -> None:
    atm = Atm(face=UNCOVERED)
    actions = approved_session(atm)
    assert actions == [
        Publish(Decision(SID, Outcome.APPROVE, Reason.APPROVED, PAN)),
        Show(Prompt.APPROVED),
        StopPinEntry(),
        EjectCard(),
    ]
    assert atm.phase is Phase.RETURNING


def test_no_approval_without_the_evidence_snapshot() -> None:
    atm = Atm(face=UNCOVERED)
    atm.to_pin_ok()
    assert atm.phase is Phase.SESSION
    assert not publishes(atm.send(ev.Tick(), after_s=5.0))
    assert not publishes(atm.send(ev.SnapshotStored(SnapshotKind.INCIDENT, "other-kind")))
    assert publishes(atm.send(ev.SnapshotStored(SnapshotKind.EVIDENCE, "e")))[0].outcome is Outcome.APPROVE


def test_no_approval_while_the_face_is_covered_at_the_last_input() -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    atm.send(ev.SnapshotStored(SnapshotKind.EVIDENCE, "e"))
    atm.send(ev.CardStatusChecked(CardStatus.ACTIVE))
    atm.send(ev.PinSubmitted(4))
    atm.send(ev.FaceChanged(COVERED, 1))
    assert atm.send(ev.PinVerified(PinResult.OK, 3)) == []  # covered now: wait
    actions = atm.send(ev.FaceChanged(UNCOVERED, 1), after_s=2.0)
    assert publishes(actions) == [Decision(SID, Outcome.APPROVE, Reason.APPROVED, PAN)]


def test_pin_ok_before_the_card_status_cannot_happen_and_status_last_approves() -> None:
    # The PIN is only sent once the status is ACTIVE, so a stray OK before that is not this session's.
    atm = Atm(face=UNCOVERED)
    atm.insert()
    atm.send(ev.SnapshotStored(SnapshotKind.EVIDENCE, "e"))
    atm.send(ev.PinSubmitted(4))
    assert atm.send(ev.PinVerified(PinResult.OK, 3)) == []
    assert atm.send(ev.CardStatusChecked(CardStatus.ACTIVE)) == [VerifyPin()]
    actions = atm.send(ev.PinVerified(PinResult.OK, 3))
    assert publishes(actions)[0].outcome is Outcome.APPROVE


# --- face ------------------------------------------------------------------------------------------


def test_face_prompts_follow_the_face_and_pin_entry_goes_on() -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    assert atm.send(ev.FaceChanged(COVERED, 1)) == [Show(Prompt.REMOVE_COVERING)]
    assert atm.send(ev.FaceChanged(NO_FACE, 0)) == [Show(Prompt.FACE_CAMERA)]
    atm.send(ev.PinKeyed(4))
    atm.send(ev.CardStatusChecked(CardStatus.ACTIVE))
    assert VerifyPin() in atm.send(ev.PinSubmitted(4))


def test_evidence_is_taken_once_per_session() -> None:
    atm = Atm(face=COVERED)
    atm.insert()
    first = atm.send(ev.FaceChanged(UNCOVERED, 1))
    assert first == [TakeSnapshot(SnapshotKind.EVIDENCE, "uncovered face"), Show(Prompt.ENTER_PIN)]
    atm.send(ev.FaceChanged(COVERED, 1))
    assert not [a for a in atm.send(ev.FaceChanged(UNCOVERED, 1)) if isinstance(a, TakeSnapshot)]


def test_evidence_failure_is_retried_once_then_fails_closed() -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    assert atm.send(ev.SnapshotFailed(SnapshotKind.EVIDENCE, "disk full")) == []
    assert atm.send(ev.Tick()) == [TakeSnapshot(SnapshotKind.EVIDENCE, "uncovered face (retry)")]
    assert atm.send(ev.Tick()) == []
    actions = atm.send(ev.SnapshotFailed(SnapshotKind.EVIDENCE, "disk full"))
    assert Publish(Decision(SID, Outcome.DENY, Reason.EVIDENCE_FAILED, PAN)) in actions
    assert actions[-1] == EjectCard()


def test_evidence_retry_waits_for_an_uncovered_face() -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    atm.send(ev.FaceChanged(COVERED, 1))
    atm.send(ev.SnapshotFailed(SnapshotKind.EVIDENCE, "camera"))
    assert atm.send(ev.Tick()) == []  # a retry now would photograph the covering
    assert TakeSnapshot(SnapshotKind.EVIDENCE, "uncovered face (retry)") in atm.send(
        ev.FaceChanged(UNCOVERED, 1)
    )


@pytest.mark.parametrize(("face", "reason"), [(COVERED, Reason.FACE_COVERED), (NO_FACE, Reason.NO_FACE)])
def test_face_not_shown_in_time_is_an_incident_and_never_retains(face: FaceState, reason: Reason) -> None:
    atm = Atm(Policy(uncover_timeout_s=30.0), face=face)
    atm.insert()
    assert atm.send(ev.Tick(), after_s=29.9) == []
    actions = atm.send(ev.Tick(), after_s=0.1)
    count = 1 if face is COVERED else 0
    assert actions == [
        TakeSnapshot(SnapshotKind.INCIDENT, reason.value),
        Record("face_incident", {"state": face.value, "face_count": count}),
        deny(reason),
        Show(Prompt.DENIED, detail=actions[3].detail),  # type: ignore[attr-defined]
        StopPinEntry(),
        EjectCard(),
    ]
    # Even a forgotten card after a covering incident is only retained as a forgotten card.
    atm.send(ev.CardEjected())
    retained = [a for a in atm.send(ev.Tick(), after_s=30.0) if isinstance(a, RetainCard)]
    assert retained == [RetainCard(Reason.FORGOTTEN_CARD)]


def test_uncover_deadline_restarts_after_the_face_was_uncovered() -> None:
    atm = Atm(Policy(uncover_timeout_s=30.0), face=COVERED)
    atm.insert()
    atm.send(ev.FaceChanged(UNCOVERED, 1), after_s=20.0)
    atm.send(ev.FaceChanged(COVERED, 1), after_s=5.0)
    assert not publishes(atm.send(ev.Tick(), after_s=29.0))  # 54 s after insertion, 29 s covered
    assert publishes(atm.send(ev.Tick(), after_s=1.0))[0].reason is Reason.FACE_COVERED


def test_a_time_jump_fires_the_deadline_on_any_event_and_is_not_undone() -> None:
    atm = Atm(Policy(uncover_timeout_s=30.0), face=COVERED)
    atm.insert()
    actions = atm.send(ev.FaceChanged(UNCOVERED, 1), after_s=500.0)
    assert publishes(actions) == [Decision(SID, Outcome.DENY, Reason.FACE_COVERED, PAN)]
    assert Record("face_incident", {"state": "covered", "face_count": 1}) in actions
    assert not [a for a in actions if isinstance(a, TakeSnapshot) and a.kind is SnapshotKind.EVIDENCE]


def test_several_faces_warn_once_without_pausing_by_default() -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    assert atm.send(ev.FaceChanged(UNCOVERED, 2)) == [Show(Prompt.ONE_PERSON_ONLY)]
    assert atm.send(ev.FaceChanged(UNCOVERED, 3)) == []
    assert atm.send(ev.PinKeyed(1)) == [Show(Prompt.ENTER_PIN, pin_digits=1)]
    assert atm.send(ev.FaceChanged(UNCOVERED, 1)) == [Show(Prompt.ENTER_PIN, pin_digits=1)]


def test_several_faces_pause_pin_entry_when_the_policy_says_so() -> None:
    atm = Atm(Policy(pause_pin_on_multiple_faces=True), face=UNCOVERED)
    atm.insert()
    atm.send(ev.CardStatusChecked(CardStatus.ACTIVE))
    assert atm.send(ev.FaceChanged(UNCOVERED, 2)) == [Show(Prompt.ONE_PERSON_ONLY), SetPinEntryPaused(True)]
    assert atm.send(ev.FaceChanged(UNCOVERED, 1)) == [SetPinEntryPaused(False), Show(Prompt.ENTER_PIN)]
    atm.send(ev.PinSubmitted(4))
    atm.send(ev.FaceChanged(UNCOVERED, 2))
    # A new PIN entry after a wrong PIN starts unpaused in the controller: pause it again.
    actions = atm.send(ev.PinVerified(PinResult.WRONG_PIN, 2))
    assert actions[-2:] == [StartPinEntry(), SetPinEntryPaused(True)]


def test_several_faces_at_insertion_warn_and_pause_at_once() -> None:
    atm = Atm(Policy(pause_pin_on_multiple_faces=True), face=UNCOVERED, count=2)
    actions = atm.insert()
    assert actions[-2:] == [Show(Prompt.ONE_PERSON_ONLY), SetPinEntryPaused(True)]


# --- timeouts and the card's way out ---------------------------------------------------------------


def test_session_timeout_denies() -> None:
    atm = Atm(Policy(session_timeout_s=60.0), face=UNCOVERED)
    atm.insert()
    assert atm.send(ev.Tick(), after_s=59.0) == []
    assert atm.send(ev.Tick(), after_s=1.0)[0] == deny(Reason.SESSION_TIMEOUT)


def test_forgotten_card_is_retained_counting_from_card_ejected() -> None:
    atm = Atm(Policy(card_take_timeout_s=30.0), face=UNCOVERED)
    approved_session(atm)
    atm.send(ev.CardEjected(), after_s=5.0)
    assert atm.send(ev.Tick(), after_s=29.9) == []  # 34.9 s after EjectCard, 29.9 s at the gate
    actions = atm.send(ev.Tick(), after_s=0.1)
    # The session already has its decision: no second Publish.
    assert actions == [
        Record("card_forgotten", {"retained": True}),
        RetainCard(Reason.FORGOTTEN_CARD),
        Show(Prompt.CARD_RETAINED),
    ]
    actions = atm.send(ev.CardRetained(None))
    assert actions[0] == Record("card_retained", {"confirmed": None, "reason": "forgotten_card"})
    assert atm.phase is Phase.IDLE


def test_forgotten_card_deadline_counts_from_eject_when_card_ejected_never_comes() -> None:
    atm = Atm(Policy(card_take_timeout_s=30.0), face=UNCOVERED)
    approved_session(atm)
    assert RetainCard(Reason.FORGOTTEN_CARD) in atm.send(ev.Tick(), after_s=30.0)


def test_forgotten_card_stays_when_the_policy_does_not_retain() -> None:
    atm = Atm(Policy(retain_forgotten_card=False), face=UNCOVERED)
    approved_session(atm)
    atm.send(ev.CardEjected())
    actions = atm.send(ev.Tick(), after_s=31.0)
    assert actions == [Record("card_forgotten", {"retained": False, "why": "policy"})]
    assert atm.send(ev.Tick(), after_s=100.0) == []
    assert atm.send(ev.CardTaken())[-3:] == IDLE_ACTIONS


def test_card_taken_before_the_decision_is_declined_once() -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    actions = atm.send(ev.CardTaken())
    assert publishes(actions) == [Decision(SID, Outcome.DENY, Reason.CARD_REMOVED, PAN)]
    assert actions[-3:] == IDLE_ACTIONS


# --- faults ----------------------------------------------------------------------------------------


def test_fault_while_idle_takes_the_atm_out_of_service_until_cleared() -> None:
    atm = Atm()
    actions = atm.send(ev.FaultRaised(Component.CAMERA, "no frames"))
    assert actions == [
        SetCardEntry(False),
        Show(Prompt.OUT_OF_SERVICE, detail="no frames"),
        Alarm(Component.CAMERA, True, "no frames"),
    ]
    assert atm.phase is Phase.OUT_OF_SERVICE and atm.state.out_of_service
    assert atm.send(ev.FaultRaised(Component.VISION, "model")) == [Alarm(Component.VISION, True, "model")]
    assert atm.send(ev.FaultCleared(Component.CAMERA)) == [Alarm(Component.CAMERA, False)]
    assert atm.phase is Phase.OUT_OF_SERVICE
    assert atm.send(ev.FaultCleared(Component.VISION)) == [
        Alarm(Component.VISION, False),
        SetCardEntry(True),
        Show(Prompt.INSERT_CARD),
    ]
    assert atm.phase is Phase.IDLE and not atm.state.faults


def test_card_inserted_while_out_of_service_is_ejected_without_a_session() -> None:
    atm = Atm(face=UNCOVERED)
    atm.send(ev.FaultRaised(Component.JOURNAL, "disk full"))
    actions = atm.insert()
    assert EjectCard() in actions and Show(Prompt.OUT_OF_SERVICE, detail="disk full") in actions
    assert not publishes(actions) and not atm.state.in_session and atm.phase is Phase.OUT_OF_SERVICE


def test_fault_in_a_session_denies_and_goes_out_of_service_after_the_take() -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    actions = atm.send(ev.FaultRaised(Component.CAMERA, "no frames"))
    assert actions[0] == Alarm(Component.CAMERA, True, "no frames")
    assert actions[1] == deny(Reason.OUT_OF_SERVICE)
    assert actions[-1] == EjectCard()
    actions = atm.send(ev.CardTaken())
    assert actions[-3:] == [
        SetCardEntry(False),
        Show(Prompt.OUT_OF_SERVICE, detail="no frames"),
        SetVisionActive(False),
    ]
    assert atm.phase is Phase.OUT_OF_SERVICE


def test_card_reader_fault_holds_the_card_until_the_reader_recovers() -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    actions = atm.send(ev.FaultRaised(Component.CARD_READER, "jammed"))
    assert deny(Reason.OUT_OF_SERVICE) in actions and EjectCard() not in actions
    assert Record("card_held", {"why": "card reader fault"}) in actions
    assert Alarm(Component.CARD_READER, True, "card held in the reader: cannot eject") in actions
    assert atm.send(ev.Tick(), after_s=1000.0) == []  # no forgotten-card retention of a held card
    assert atm.send(ev.FaultCleared(Component.CARD_READER)) == [
        Alarm(Component.CARD_READER, False),
        EjectCard(),
    ]


def test_card_ejected_without_an_eject_sent_does_not_start_the_take_clock() -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    atm.send(ev.FaultRaised(Component.CARD_READER, "jammed"))  # card held, no EjectCard sent
    atm.send(ev.CardEjected())  # not about our card
    assert atm.send(ev.Tick(), after_s=1000.0) == []
    assert atm.send(ev.FaultCleared(Component.CARD_READER)) == [
        Alarm(Component.CARD_READER, False),
        EjectCard(),
    ]


def test_failed_eject_is_retried_when_the_reader_recovers() -> None:
    atm = Atm(face=UNCOVERED)
    approved_session(atm)
    actions = atm.send(ev.FaultRaised(Component.CARD_READER, "eject failed"))  # how the controller says it
    assert Record("card_held", {"why": "card reader fault"}) in actions
    assert atm.send(ev.Tick(), after_s=1000.0) == []
    assert EjectCard() in atm.send(ev.FaultCleared(Component.CARD_READER))


def test_forgotten_card_is_not_retained_with_a_faulty_actuator() -> None:
    atm = Atm(face=UNCOVERED)
    approved_session(atm)
    atm.send(ev.CardEjected())
    atm.send(ev.FaultRaised(Component.ACTUATOR, "coil open"))
    actions = atm.send(ev.Tick(), after_s=31.0)
    assert actions == [Record("card_forgotten", {"retained": False, "why": "actuator fault"})]
    assert atm.phase is Phase.RETURNING
    assert atm.send(ev.CardTaken())[-2] == Show(Prompt.OUT_OF_SERVICE, detail="coil open")


def test_failed_retention_is_repeated_after_the_actuator_recovers_and_never_ejects() -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    atm.send(ev.CardStatusChecked(CardStatus.HOT_LISTED))
    actions = atm.send(ev.FaultRaised(Component.ACTUATOR, "retention failed"))
    assert Record("retention_failed", {"reason": "hot_listed"}) in actions and EjectCard() not in actions
    assert atm.send(ev.FaultCleared(Component.ACTUATOR)) == [
        Alarm(Component.ACTUATOR, False),
        RetainCard(Reason.HOT_LISTED),
    ]


# --- shutdown and policy reload -------------------------------------------------------------------


@pytest.mark.parametrize("faulty", [False, True])
def test_shutdown_without_a_session_stops_at_once(faulty: bool) -> None:
    atm = Atm()
    if faulty:
        atm.send(ev.FaultRaised(Component.KEYPAD, "dead"))
    assert atm.send(ev.ShutdownRequested()) == [SetCardEntry(False), Show(Prompt.OUT_OF_SERVICE), Stop()]
    assert atm.phase is Phase.STOPPED
    assert atm.insert() == [] and not atm.state.in_session


def test_shutdown_in_a_session_returns_the_card_then_stops() -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    actions = atm.send(ev.ShutdownRequested())
    assert (
        actions[0] == SetCardEntry(False)
        and actions[1] == deny(Reason.SHUTDOWN)
        and actions[-1] == EjectCard()
    )
    assert atm.phase is Phase.STOPPING and atm.state.out_of_service
    assert atm.state.session_id is not None
    assert atm.insert(sid="another") == [Record("card_inserted_ignored", {"phase": "stopping"})]
    actions = atm.send(ev.CardEjected())
    assert actions[-1] == Stop() and atm.phase is Phase.STOPPED


def test_shutdown_after_approval_with_the_card_at_the_gate_stops_at_once() -> None:
    atm = Atm(face=UNCOVERED)
    approved_session(atm)
    atm.send(ev.CardEjected())
    actions = atm.send(ev.ShutdownRequested())
    assert not publishes(actions) and actions[-1] == Stop() and atm.phase is Phase.STOPPED


def test_policy_change_applies_to_the_next_session_only() -> None:
    atm = Atm(Policy(uncover_timeout_s=30.0), face=COVERED)
    atm.insert()
    actions = atm.send(ev.PolicyChanged(Policy(uncover_timeout_s=5.0)))
    assert actions == [Record("policy_changed", dataclasses.asdict(Policy(uncover_timeout_s=5.0)))]
    assert not publishes(atm.send(ev.Tick(), after_s=10.0))  # still the session's 30 s
    atm.send(ev.CardTaken())
    atm.insert(sid="session-2")
    assert publishes(atm.send(ev.Tick(), after_s=5.0))[0].reason is Reason.FACE_COVERED


# --- answers that belong to an earlier session ------------------------------------------------------


def test_a_pin_verdict_for_the_previous_customer_never_approves_the_next() -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    atm.send(ev.CardStatusChecked(CardStatus.ACTIVE))
    atm.send(ev.PinSubmitted(4))  # VerifyPin out for session 1 ...
    atm.send(ev.PinCancelled())  # ... but the customer cancels and leaves
    atm.send(ev.CardTaken())
    atm.insert(sid="session-2")
    atm.send(ev.SnapshotStored(SnapshotKind.EVIDENCE, "stale: session 1's"))
    atm.send(ev.SnapshotStored(SnapshotKind.EVIDENCE, "session 2's"))
    atm.send(ev.CardStatusChecked(CardStatus.ACTIVE))
    assert atm.send(ev.PinSubmitted(4)) == [Show(Prompt.PLEASE_WAIT)]  # no second VerifyPin in flight
    assert atm.send(ev.PinVerified(PinResult.OK, 3)) == [VerifyPin()]  # session 1's answer: now ours goes
    actions = atm.send(ev.PinVerified(PinResult.WRONG_PIN, 2))
    assert StartPinEntry() in actions and not publishes(actions)


def test_an_evidence_snapshot_of_the_previous_customer_does_not_count() -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()
    atm.send(ev.CardStatusChecked(CardStatus.ACTIVE))
    atm.send(ev.PinCancelled())
    atm.send(ev.CardTaken())
    atm.to_pin_ok()  # session 2 also asked for evidence: two answers are due
    assert atm.send(ev.SnapshotStored(SnapshotKind.EVIDENCE, "session 1's")) == []
    assert (
        publishes(atm.send(ev.SnapshotStored(SnapshotKind.EVIDENCE, "session 2's")))[0].outcome
        is Outcome.APPROVE
    )


def test_a_lost_answer_of_an_ended_session_is_forgotten_after_the_session_timeout() -> None:
    atm = Atm(Policy(session_timeout_s=60.0), face=UNCOVERED)
    atm.insert()
    atm.send(ev.CardStatusChecked(CardStatus.ACTIVE))
    atm.send(ev.PinSubmitted(4))
    atm.send(ev.PinCancelled())
    atm.send(ev.CardTaken(), after_s=10.0)
    atm.insert(sid="session-2")
    atm.send(ev.CardStatusChecked(CardStatus.ACTIVE))
    assert VerifyPin() not in atm.send(ev.PinSubmitted(4))
    assert atm.send(ev.Tick(), after_s=49.9) == []
    assert atm.send(ev.Tick(), after_s=0.1) == [VerifyPin()]  # 60 s after session 1's request


def test_a_card_status_for_the_previous_customer_is_not_taken_for_the_next_card() -> None:
    atm = Atm(face=UNCOVERED)
    atm.insert()  # CheckCardStatus out for session 1, which is cancelled at once
    atm.send(ev.PinCancelled())
    atm.send(ev.CardTaken())
    actions = atm.insert(sid="session-2")
    assert CheckCardStatus() not in actions  # waits for session 1's answer
    assert atm.send(ev.CardStatusChecked(CardStatus.ACTIVE)) == [CheckCardStatus()]
    assert RetainCard(Reason.HOT_LISTED) in atm.send(ev.CardStatusChecked(CardStatus.HOT_LISTED))


# --- unexpected events ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        ev.CardEjected(),
        ev.CardTaken(),
        ev.CardRetained(True),
        ev.CardStatusChecked(CardStatus.ACTIVE),
        ev.PinVerified(PinResult.OK, 3),
        ev.CentralUnavailable("pin", "down"),
        ev.PinKeyed(3),
        ev.PinSubmitted(4),
        ev.PinCancelled(),
        ev.PinEntryTimedOut(),
        ev.SnapshotStored(SnapshotKind.EVIDENCE, "u"),
        ev.SnapshotFailed(SnapshotKind.EVIDENCE, "r"),
        ev.FaultCleared(Component.CAMERA),
        ev.Tick(),
    ],
)
def test_events_out_of_place_while_idle_are_ignored(event: ev.Event) -> None:
    atm = Atm()
    before: SessionState = atm.state
    assert atm.send(event, after_s=10_000.0) == []
    assert atm.state == before


# --- identity: the face against the account holder's template (issue 7) ---------------------------

VERIFY = Policy(verify_face=True)


def identity_session(atm: Atm, *, template: bool | None = True) -> list[Action]:
    """Card ACTIVE (with or without a template), PIN accepted, evidence stored; the last step's actions."""
    atm.insert()
    actions = atm.send(ev.CardStatusChecked(CardStatus.ACTIVE, face_template=template))
    atm.send(ev.PinSubmitted(4))
    actions += atm.send(ev.PinVerified(PinResult.OK, 3))
    return actions + atm.send(ev.SnapshotStored(SnapshotKind.EVIDENCE, "snap-1"))


def test_with_a_template_approval_waits_for_a_match() -> None:
    atm = Atm(VERIFY, face=UNCOVERED)
    actions = identity_session(atm)
    assert ev_verify(actions) == [SID] and publishes(actions) == []  # everything else is there
    actions = atm.send(ev.FaceVerified(SID, ev.IdentityVerdict.MATCH, 0.71))
    assert publishes(actions) == [Decision(SID, Outcome.APPROVE, Reason.APPROVED, PAN)]


def ev_verify(actions: list[Action]) -> list[str]:
    return [a.session_id for a in actions if isinstance(a, VerifyFace)]


def test_verification_is_asked_only_once_the_face_is_uncovered() -> None:
    atm = Atm(VERIFY, face=COVERED)
    atm.insert()
    assert ev_verify(atm.send(ev.CardStatusChecked(CardStatus.ACTIVE, face_template=True))) == []
    assert ev_verify(atm.send(ev.FaceChanged(UNCOVERED, 1))) == [SID]
    # Asked once: flickering back and forth does not queue more requests.
    atm.send(ev.FaceChanged(COVERED, 1))
    assert ev_verify(atm.send(ev.FaceChanged(UNCOVERED, 1))) == []


def test_a_confident_mismatch_retains_the_card_with_fraud_evidence() -> None:
    atm = Atm(VERIFY, face=UNCOVERED)
    identity_session(atm)
    actions = atm.send(ev.FaceVerified(SID, ev.IdentityVerdict.MISMATCH, -0.2))
    assert publishes(actions) == [Decision(SID, Outcome.RETAIN, Reason.FACE_MISMATCH, PAN)]
    assert TakeSnapshot(SnapshotKind.FRAUD, "face_mismatch") in actions
    assert RetainCard(Reason.FACE_MISMATCH) in actions and atm.phase is Phase.RETAINING


def test_a_mismatch_only_declines_when_the_bank_turned_retention_off() -> None:
    atm = Atm(Policy(verify_face=True, retain_face_mismatch=False), face=UNCOVERED)
    identity_session(atm)
    actions = atm.send(ev.FaceVerified(SID, ev.IdentityVerdict.MISMATCH, -0.2))
    assert deny(Reason.FACE_MISMATCH) in actions and EjectCard() in actions
    assert not any(isinstance(a, RetainCard) for a in actions)
    assert TakeSnapshot(SnapshotKind.FRAUD, "face_mismatch") in actions


def test_unsure_asks_to_look_at_the_camera_then_declines_without_retaining() -> None:
    atm = Atm(Policy(verify_face=True, face_verify_attempts=2), face=UNCOVERED)
    identity_session(atm)
    actions = atm.send(ev.FaceVerified(SID, ev.IdentityVerdict.UNSURE, 0.2))
    assert Show(Prompt.LOOK_AT_CAMERA) in actions and ev_verify(actions) == [SID] and publishes(actions) == []
    actions = atm.send(ev.FaceVerified(SID, ev.IdentityVerdict.UNSURE, 0.25))
    assert deny(Reason.FACE_UNVERIFIED) in actions and EjectCard() in actions
    assert not any(isinstance(a, RetainCard) for a in actions)


def test_unsure_then_match_approves() -> None:
    atm = Atm(VERIFY, face=UNCOVERED)
    identity_session(atm)
    atm.send(ev.FaceVerified(SID, ev.IdentityVerdict.UNSURE, 0.3))
    actions = atm.send(ev.FaceVerified(SID, ev.IdentityVerdict.MATCH, 0.6))
    assert publishes(actions)[0].outcome is Outcome.APPROVE


def test_an_answer_for_another_session_or_unasked_is_ignored() -> None:
    atm = Atm(VERIFY, face=UNCOVERED)
    identity_session(atm)
    assert atm.send(ev.FaceVerified("previous-session", ev.IdentityVerdict.MATCH, 0.9)) == []
    atm.send(ev.FaceVerified(SID, ev.IdentityVerdict.UNSURE, 0.3))  # answers ours; asks again
    atm.send(ev.FaceVerified(SID, ev.IdentityVerdict.MATCH, 0.8))  # approved
    later = Atm(VERIFY, face=UNCOVERED)
    later.insert()
    assert later.send(ev.FaceVerified(SID, ev.IdentityVerdict.MATCH, 0.9)) == []  # never asked


@pytest.mark.parametrize(("require", "outcome"), [(False, Outcome.APPROVE), (True, Outcome.DENY)])
def test_an_account_without_a_template_follows_the_policy(require: bool, outcome: Outcome) -> None:
    atm = Atm(Policy(verify_face=True, require_face_template=require), face=UNCOVERED)
    actions = identity_session(atm, template=False)
    assert ev_verify(actions) == []
    decisions = publishes(actions)
    assert decisions[0].outcome is outcome
    if require:
        assert decisions[0].reason is Reason.NOT_ENROLLED


def test_verification_on_but_template_unknown_fails_closed() -> None:
    atm = Atm(VERIFY, face=UNCOVERED)
    atm.insert()
    actions = atm.send(ev.CardStatusChecked(CardStatus.ACTIVE, face_template=None))
    assert deny(Reason.FACE_UNVERIFIED) in actions


def test_with_verification_off_a_template_changes_nothing() -> None:
    atm = Atm(Policy(verify_face=False), face=UNCOVERED)
    actions = identity_session(atm, template=True)
    assert ev_verify(actions) == [] and publishes(actions)[0].outcome is Outcome.APPROVE
