"""The PIN keypad role.

Light to import: only the interface, the event type and the PIN buffer are re-exported here;
the GPIO scanner and the simulator (which import gpiozero) are loaded by the backend registry.
"""

from atmguard.hardware.keypad.base import LAYOUTS, KeyEvent, Keypad, layout_rows
from atmguard.hardware.keypad.pinbuffer import (
    Cancelled,
    Cleared,
    DigitAdded,
    DigitIgnored,
    PinBuffer,
    PinBufferError,
    PinEntry,
    PinOutcome,
    Submitted,
    TimedOut,
    TooShort,
)

__all__ = [
    "LAYOUTS",
    "Cancelled",
    "Cleared",
    "DigitAdded",
    "DigitIgnored",
    "KeyEvent",
    "Keypad",
    "PinBuffer",
    "PinBufferError",
    "PinEntry",
    "PinOutcome",
    "Submitted",
    "TimedOut",
    "TooShort",
    "layout_rows",
]
