"""Everything the session state machine reacts to. Frozen data, no behaviour, no secrets.

The PIN never appears here: the machine only learns how many digits were typed and what the
bank's server answered. The PAN appears only masked (first 6 / last 4).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from atmguard.session.policy import Policy
from atmguard.store.central import CardStatus, PinResult
from atmguard.vision.tracker import FaceState


class CardCheck(enum.Enum):
    """What the controller found on the card before anything is asked of the bank."""

    VALID = "valid"
    UNREADABLE = "unreadable"
    INVALID = "invalid"  # track data parsed but the PAN fails Luhn or the format is wrong
    EXPIRED = "expired"


class Component(enum.Enum):
    """Parts whose failure takes the ATM out of service until they recover."""

    CAMERA = "camera"
    VISION = "vision"
    ACTUATOR = "actuator"
    CARD_READER = "card_reader"
    KEYPAD = "keypad"
    JOURNAL = "journal"
    DISPLAY = "display"  # the customer cannot be told what to do: no session can be run


class SnapshotKind(enum.Enum):
    EVIDENCE = "evidence"  # the uncovered face of a customer in a session
    INCIDENT = "incident"  # a face still covered (or absent) when the session was declined for it
    FRAUD = "fraud"  # taken when a card is retained for fraud; kept above everything on a full disk


@dataclass(frozen=True, slots=True)
class Event:
    """Base of all session events."""


# --- card reader ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CardInserted(Event):
    """A card went in. ``session_id`` is minted by the controller (the machine has no randomness)."""

    session_id: str
    check: CardCheck
    masked_pan: str = ""
    reason: str = ""  # why the card is unreadable/invalid, for the journal; never track data


@dataclass(frozen=True, slots=True)
class CardEjected(Event):
    """The reader brought the card to the gate: the customer can take it."""


@dataclass(frozen=True, slots=True)
class CardTaken(Event):
    """The customer took the card from the gate (or it left the reader)."""


@dataclass(frozen=True, slots=True)
class CardRetained(Event):
    """The actuator fired; ``confirmed`` is the bin sensor's verdict (None: no sensor)."""

    confirmed: bool | None


# --- bank -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CardStatusChecked(Event):
    status: CardStatus
    face_template: bool | None = False
    """Whether the bank holds a consented face template for the card; None: unknown (verification
    is off, or the templates found were made by another model and cannot be compared)."""


@dataclass(frozen=True, slots=True)
class PinVerified(Event):
    """The server's verdict on the submitted PIN (attempts are counted there)."""

    result: PinResult
    attempts_left: int | None = None


@dataclass(frozen=True, slots=True)
class CentralUnavailable(Event):
    """The bank's server could not answer ``during`` ("card_status" or "pin")."""

    during: str
    reason: str


# --- keypad (lengths only) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PinKeyed(Event):
    """A digit was added or removed, or the entry cleared; ``digits`` is the count now buffered."""

    digits: int


@dataclass(frozen=True, slots=True)
class PinSubmitted(Event):
    digits: int


@dataclass(frozen=True, slots=True)
class PinCancelled(Event):
    pass


@dataclass(frozen=True, slots=True)
class PinEntryTimedOut(Event):
    pass


# --- vision -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FaceChanged(Event):
    """The tracker's stable state or the smoothed face count changed."""

    state: FaceState
    face_count: int


class IdentityVerdict(enum.Enum):
    """The face compared with the account holder's template (thresholds in ``[verification]``)."""

    MATCH = "match"
    MISMATCH = "mismatch"  # confident: fraud
    UNSURE = "unsure"  # between the thresholds, or no good frame in time: ask again


@dataclass(frozen=True, slots=True)
class FaceVerified(Event):
    """The answer to ``VerifyFace`` for ``session_id``; ``score`` is the cosine similarity."""

    session_id: str
    verdict: IdentityVerdict
    score: float | None = None


@dataclass(frozen=True, slots=True)
class SnapshotStored(Event):
    kind: SnapshotKind
    uuid: str


@dataclass(frozen=True, slots=True)
class SnapshotFailed(Event):
    kind: SnapshotKind
    reason: str


# --- health and lifecycle ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FaultRaised(Event):
    component: Component
    reason: str


@dataclass(frozen=True, slots=True)
class FaultCleared(Event):
    component: Component


@dataclass(frozen=True, slots=True)
class Tick(Event):
    """Time passed (the controller sends one every `daemon.tick_interval_s`): check timeouts."""


@dataclass(frozen=True, slots=True)
class ShutdownRequested(Event):
    """SIGTERM: refuse new cards, end the session safely, then stop."""


@dataclass(frozen=True, slots=True)
class PolicyChanged(Event):
    """SIGHUP reloaded the config: ``policy`` applies from the next session (the running one keeps its own)."""

    policy: Policy
