"""Everything the session state machine asks the controller to do. Frozen data, no secrets."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from atmguard.hardware.display import Prompt
from atmguard.session.events import Component, SnapshotKind


class Outcome(enum.Enum):
    APPROVE = "approve"
    DENY = "deny"
    RETAIN = "retain"


class Reason(enum.Enum):
    """Why a session ended the way it did (journaled, shown, published to the host)."""

    APPROVED = "approved"
    CARD_UNREADABLE = "card_unreadable"
    CARD_INVALID = "card_invalid"
    CARD_EXPIRED = "card_expired"
    CARD_CLOSED = "card_closed"
    UNKNOWN_CARD = "unknown_card"
    HOT_LISTED = "hot_listed"
    PIN_ATTEMPTS_EXHAUSTED = "pin_attempts_exhausted"
    PIN_CANCELLED = "pin_cancelled"
    PIN_TIMEOUT = "pin_timeout"
    FACE_COVERED = "face_covered"
    NO_FACE = "no_face"
    BANK_UNAVAILABLE = "bank_unavailable"
    EVIDENCE_FAILED = "evidence_failed"  # the uncovered face could not be journaled: fail closed
    SESSION_TIMEOUT = "session_timeout"
    FORGOTTEN_CARD = "forgotten_card"
    OUT_OF_SERVICE = "out_of_service"
    SHUTDOWN = "shutdown"
    CARD_REMOVED = "card_removed"  # the card left the reader before a decision (pulled out, reader reset)
    FACE_MISMATCH = "face_mismatch"  # confidently not the account holder: fraud
    FACE_UNVERIFIED = "face_unverified"  # the face could not be confirmed in the attempts allowed
    NOT_ENROLLED = "not_enrolled"  # no face template, and the policy requires one


@dataclass(frozen=True, slots=True)
class Decision:
    session_id: str
    outcome: Outcome
    reason: Reason
    masked_pan: str = ""


@dataclass(frozen=True, slots=True)
class Action:
    """Base of all controller actions."""


@dataclass(frozen=True, slots=True)
class Show(Action):
    prompt: Prompt
    detail: str = ""
    pin_digits: int = 0


@dataclass(frozen=True, slots=True)
class SetCardEntry(Action):
    """Open or close the card slot's shutter (a motorized reader refuses cards when closed)."""

    enabled: bool


@dataclass(frozen=True, slots=True)
class CheckCardStatus(Action):
    """Ask the bank whether the session's card is active, hot-listed, closed or unknown."""


@dataclass(frozen=True, slots=True)
class StartPinEntry(Action):
    """Empty the PIN buffer and accept digits."""


@dataclass(frozen=True, slots=True)
class SetPinEntryPaused(Action):
    """Ignore keys (shoulder surfing) without losing the digits typed so far."""

    paused: bool


@dataclass(frozen=True, slots=True)
class StopPinEntry(Action):
    """Stop accepting digits and wipe the buffer."""


@dataclass(frozen=True, slots=True)
class VerifyPin(Action):
    """Send the buffered PIN's derived value to the bank; the buffer is wiped afterwards."""


@dataclass(frozen=True, slots=True)
class VerifyFace(Action):
    """Compare the next uncovered frames of ``session_id`` with the card's face template."""

    session_id: str


@dataclass(frozen=True, slots=True)
class TakeSnapshot(Action):
    """Full-resolution frame + face crop, sealed and journaled, linked to the session."""

    kind: SnapshotKind
    reason: str


@dataclass(frozen=True, slots=True)
class EjectCard(Action):
    pass


@dataclass(frozen=True, slots=True)
class RetainCard(Action):
    """Pull the card in and fire the retention actuator (the only action that may fire it)."""

    reason: Reason


@dataclass(frozen=True, slots=True)
class Record(Action):
    """Append an event to the local journal (session id added by the controller)."""

    event_type: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Publish(Action):
    """Tell the ATM host software (JSON line on its socket) and journal the decision."""

    decision: Decision


@dataclass(frozen=True, slots=True)
class SetVisionActive(Action):
    """Full frame rate during a session, the idle rate otherwise."""

    active: bool


@dataclass(frozen=True, slots=True)
class Alarm(Action):
    """Raise (or clear) the technician alarm for ``component``."""

    component: Component
    active: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Stop(Action):
    """The machine is done (after ShutdownRequested): the controller may exit."""
