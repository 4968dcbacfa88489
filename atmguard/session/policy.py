"""The bank's choices for one card session, as plain frozen data the pure machine can hold.

The machine never sees :class:`~atmguard.config.Settings`: it gets a :class:`Policy`, so a
SIGHUP reload can hand it a new one (``PolicyChanged``) that applies from the next session on,
and tests can build one in a line. ``camera_timeout_s`` is not here: the controller's vision
loop watches the camera, the machine only hears the fault it raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from atmguard.config import Settings


@dataclass(frozen=True, slots=True)
class Policy:
    """Fraud rules and customer-facing timeouts; defaults match ``[session]`` in the config."""

    uncover_timeout_s: float = 30.0
    """A face covered (or absent) this long in a session: incident snapshot, deny, eject."""
    card_take_timeout_s: float = 30.0
    """An ejected card not taken within this time counts as forgotten."""
    session_timeout_s: float = 180.0
    """Insertion to decision, at most."""
    retain_hot_listed: bool = True
    retain_pin_exhausted: bool = True
    retain_forgotten_card: bool = True
    pause_pin_on_multiple_faces: bool = False
    verify_face: bool = True
    """Compare the face with the account holder's enrolled template (``[verification] enabled``)."""
    require_face_template: bool = False
    """An account without a template: False serves it on card, PIN and an uncovered face; True declines."""
    retain_face_mismatch: bool = True
    face_verify_attempts: int = 3
    """UNSURE verdicts before the session is declined (never retained) as ``face_unverified``."""

    def __post_init__(self) -> None:
        # A zero or NaN timeout would make every deadline comparison meaningless: refuse it here
        # rather than run a session that times out at once (or never).
        for name in ("uncover_timeout_s", "card_take_timeout_s", "session_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.face_verify_attempts, int) and self.face_verify_attempts >= 1):
            raise ValueError(
                f"face_verify_attempts must be an integer >= 1, got {self.face_verify_attempts!r}"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        session, verification = settings.session, settings.verification
        return cls(
            uncover_timeout_s=session.uncover_timeout_s,
            card_take_timeout_s=session.card_take_timeout_s,
            session_timeout_s=session.session_timeout_s,
            retain_hot_listed=session.retain_hot_listed,
            retain_pin_exhausted=session.retain_pin_exhausted,
            retain_forgotten_card=session.retain_forgotten_card,
            pause_pin_on_multiple_faces=session.pause_pin_on_multiple_faces,
            verify_face=verification.enabled,
            require_face_template=verification.require_template,
            retain_face_mismatch=verification.retain_mismatch,
            face_verify_attempts=verification.attempts,
        )
