"""The ``CardReader`` interface and the typed events and status it reports.

Lifecycle: construct (no hardware touched) -> ``open()`` -> ``poll()`` in a loop on the reader's
own thread -> ``close()`` (idempotent). Readers are context managers.

Errors: every method raises only :class:`atmguard.errors.CardReaderError` subclasses
(``CardReaderTimeout`` when the reader stops answering, ``ProtocolError`` for refused commands)
or :class:`UnsupportedOperationError`. A card that cannot be read is *not* an error: it is a
``CardInserted`` with ``card=None`` and an ``error_reason``.

``holds_card`` tells the caller whether ``eject()``/``capture()`` mean anything: a motorized
reader holds the card (True); a swipe reader never does (False) - there ``eject()`` is a no-op
(the card never left the customer's hand) and ``capture()`` raises ``UnsupportedOperationError``,
because silently "capturing" nothing would let a fraud rule believe a card was retained.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass

from atmguard.errors import CardReaderError
from atmguard.hardware.card.tracks import CardRead
from atmguard.hardware.device import Device

logger = logging.getLogger(__name__)


class UnsupportedOperationError(CardReaderError):
    """The reader cannot do this (e.g. capture on a swipe reader)."""


@dataclass(frozen=True)
class ReaderStatus:
    card_present: bool
    """A card is inside the reader (transport / read position)."""
    card_at_gate: bool
    """A card sits in the entry gate, ready to be taken (or being inserted)."""
    entry_enabled: bool
    """The reader accepts a card (as last commanded)."""
    fault: str | None = None
    """Human-readable fault reported by the reader, None when healthy."""
    fault_reason: str | None = None
    """Machine-readable fault code (e.g. ``jam``), None when healthy."""


@dataclass(frozen=True)
class CardInserted:
    """A card entered the reader (or was swiped). ``card`` is None when it could not be read."""

    card: CardRead | None
    error_reason: str | None = None


@dataclass(frozen=True)
class CardTaken:
    """The customer took the card out of the gate."""


@dataclass(frozen=True)
class ReaderFault:
    """The reader reports a fault (``reason`` is a short code such as ``jam``)."""

    reason: str
    detail: str = ""


CardEvent = CardInserted | CardTaken | ReaderFault


class CardReader(Device):
    """One card reader. Not thread-safe for concurrent ``poll()`` calls; commands are serialised."""

    @property
    @abc.abstractmethod
    def holds_card(self) -> bool:
        """True for a motorized reader that keeps the card inside while a session runs."""

    @abc.abstractmethod
    def open(self) -> None:
        """Acquire the port and bring the reader to a known state (entry disabled)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the port; idempotent, never raises."""

    @abc.abstractmethod
    def status(self, *, timeout_s: float | None = None) -> ReaderStatus:
        """Ask the reader where the card is. ``timeout_s`` bounds the whole exchange (None: retry budget)."""

    @abc.abstractmethod
    def set_entry_enabled(self, enabled: bool, *, timeout_s: float | None = None) -> None:
        """Let a card in (True) or keep the entry shut (False)."""

    @abc.abstractmethod
    def poll(self, *, timeout_s: float) -> CardEvent | None:
        """Wait up to ``timeout_s`` for the next event; None on timeout."""

    @abc.abstractmethod
    def eject(self, *, timeout_s: float | None = None) -> None:
        """Carry the card to the gate for the customer to take."""

    @abc.abstractmethod
    def capture(self, *, timeout_s: float | None = None) -> None:
        """Carry the card out of the rear of the reader, towards the retention bin."""
