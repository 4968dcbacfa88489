"""The base of every hardware role."""

from __future__ import annotations

from atmguard.lifecycle import Managed


class Device(Managed):
    """A role's hardware handle: constructing it touches nothing; ``open()`` acquires the hardware
    (raising the role's HardwareError subclass), ``close()`` releases it."""
