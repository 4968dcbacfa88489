"""The exception hierarchy.

One root, :class:`AtmguardError`, so a caller can catch everything atmguard raises; each
subclass also inherits the builtin it resembles (``TimeoutError``, ``ValueError``, ``OSError``)
so generic code that catches those keeps working.

Messages must never contain a PIN, a full PAN or track data: build them from masked values.
"""

from __future__ import annotations


class AtmguardError(Exception):
    """Root of every exception atmguard raises on purpose."""


class ConfigError(AtmguardError, ValueError):
    """The configuration is unreadable or invalid; ``issues`` lists every problem found."""

    def __init__(self, path: str, issues: list[str]) -> None:
        self.path = path
        self.issues = list(issues)
        super().__init__(f"{path}: {len(self.issues)} configuration error(s):\n" + "\n".join(self.issues))


class BackendError(AtmguardError, LookupError):
    """A configured backend name is unknown, or its module cannot be imported on this machine."""


class HardwareError(AtmguardError, OSError):
    """A device failed, disappeared or answered in a way we cannot use."""


class HardwareTimeout(HardwareError, TimeoutError):
    """A device did not answer within its timeout."""


class CardReaderError(HardwareError):
    """The card reader failed or its link is broken."""


class CardReaderTimeout(CardReaderError, HardwareTimeout):
    """The card reader did not answer (after all retries)."""


class ProtocolError(CardReaderError, ValueError):
    """A frame from the card reader was malformed (bad framing, length or CRC) or negatively acknowledged."""


class CardDataError(AtmguardError, ValueError):
    """Track data could not be parsed or fails validation (sentinels, LRC, Luhn, expiry).

    ``reason`` is a short machine-readable code such as ``"luhn"`` or ``"expired"``.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class KeypadError(HardwareError):
    """The keypad matrix could not be set up or scanned."""


class ActuatorError(HardwareError):
    """The retention actuator refused to fire (safety interlock) or failed to confirm capture."""


class CameraError(HardwareError):
    """The camera could not be started or stopped delivering frames."""


class CameraTimeout(CameraError, HardwareTimeout):
    """No frame arrived within the timeout."""


class DisplayError(HardwareError):
    """The customer display could not be written."""
