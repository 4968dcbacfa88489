"""What the session asks of the bank: is this card usable, and is this PIN right.

Both questions go to the central server's procedures (attempts are counted there, so a thief
cannot reset them by walking to the next ATM). The card is identified only by its keyed hash;
the PIN leaves the keypad buffer only as the slow, salted, peppered derived value, and the
buffer is wiped when the call ends, whatever happens.

Any failure to get an answer becomes :class:`BankUnavailable`: the session fails closed on it.
"""

from __future__ import annotations

import logging
from typing import Protocol

from atmguard.config import Settings
from atmguard.errors import AtmguardError
from atmguard.hardware.card.tracks import CardRead
from atmguard.hardware.keypad.pinbuffer import PinBuffer
from atmguard.lifecycle import Managed
from atmguard.store.central import CardStatus, CentralError, CentralStore, PinCheck, pan_hmac
from atmguard.store.credentials import pan_key, pin_pepper

logger = logging.getLogger(__name__)


class BankUnavailable(AtmguardError, ConnectionError):
    """No trustworthy answer from the bank (server down, refused, or an unexpected reply)."""


class Bank(Protocol):
    def open(self) -> None: ...

    def close(self) -> None: ...

    def card_status(self, card: CardRead) -> CardStatus: ...

    def check_pin(self, card: CardRead, pin: PinBuffer) -> PinCheck: ...

    def face_templates(self, card: CardRead, model_id: str) -> list[bytes]: ...


class CentralBank(Managed):
    """:class:`Bank` over the central MySQL server (the production backend)."""

    def __init__(self, store: CentralStore, *, pan_key: bytes, pin_pepper: bytes) -> None:
        self._store = store
        self._pan_key = pan_key
        self._pin_pepper = pin_pepper

    @classmethod
    def from_settings(cls, settings: Settings) -> CentralBank:
        """Reads the PAN key and the PIN pepper now, so a missing secret stops start-up (fail closed)."""
        return cls(
            CentralStore.from_settings(settings),
            pan_key=pan_key(settings),
            pin_pepper=pin_pepper(settings),
        )

    def open(self) -> None:
        # Connecting lazily: an unreachable server at start-up is an outage the sessions report
        # (deny, "bank unavailable"), not a reason to refuse to start.
        pass

    def close(self) -> None:
        self._store.close()

    def _card_key(self, card: CardRead) -> bytes:
        pan = card.pan_bytes()
        try:
            return pan_hmac(pan, key=self._pan_key)
        finally:
            pan[:] = bytes(len(pan))

    def card_status(self, card: CardRead) -> CardStatus:
        try:
            return self._store.card_state(self._card_key(card)).status
        except CentralError as exc:
            raise BankUnavailable(f"card status: {exc}") from exc

    def check_pin(self, card: CardRead, pin: PinBuffer) -> PinCheck:
        try:
            with pin.reveal() as digits:
                return self._store.check_pin(self._card_key(card), digits, pepper=self._pin_pepper)
        except CentralError as exc:
            raise BankUnavailable(f"PIN verification: {exc}") from exc
        finally:
            pin.wipe()

    def face_templates(self, card: CardRead, model_id: str) -> list[bytes]:
        """The account holder's consented templates for this model (only the card held can be asked)."""
        try:
            return self._store.face_templates(self._card_key(card), model_id=model_id)
        except CentralError as exc:
            raise BankUnavailable(f"face template: {exc}") from exc


class OfflineBank:
    """``central.enabled = false``: there is no bank to ask, so every question fails closed."""

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def card_status(self, card: CardRead) -> CardStatus:
        raise BankUnavailable("no central server configured (central.enabled = false)")

    def check_pin(self, card: CardRead, pin: PinBuffer) -> PinCheck:
        pin.wipe()
        raise BankUnavailable("no central server configured (central.enabled = false)")

    def face_templates(self, card: CardRead, model_id: str) -> list[bytes]:
        raise BankUnavailable("no central server configured (central.enabled = false)")
