"""Card reader role: interface, track parsing, Sankyo framing; backends load only when chosen.

Importing this package touches no serial port: ``serial_reader`` and ``emulator`` are imported
by the registry (``atmguard.hardware.registry``) only when a config selects them.
"""

from __future__ import annotations

from atmguard.hardware.card.base import (
    CardEvent,
    CardInserted,
    CardReader,
    CardTaken,
    ReaderFault,
    ReaderStatus,
    UnsupportedOperationError,
)
from atmguard.hardware.card.tracks import CardRead, parse_card, parse_swipe_line

__all__ = [
    "CardEvent",
    "CardInserted",
    "CardRead",
    "CardReader",
    "CardTaken",
    "ReaderFault",
    "ReaderStatus",
    "UnsupportedOperationError",
    "parse_card",
    "parse_swipe_line",
]
