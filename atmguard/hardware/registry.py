"""Maps config backend names to classes, imported only when chosen.

Each backend class offers ``from_settings(settings: Settings) -> instance``; constructing it
must not touch hardware yet (that happens in ``open()``), so a broken wiring is reported when
the daemon starts the role, with the role's name, not as an import-time crash.
"""

from __future__ import annotations

import importlib
from typing import Any

from atmguard.config import Settings
from atmguard.errors import BackendError

BACKENDS: dict[str, dict[str, str]] = {
    "card_reader": {
        "serial": "atmguard.hardware.card.serial_reader:SerialCardReader",
        "sim": "atmguard.hardware.card.emulator:SimCardReader",
    },
    "keypad": {
        "gpio": "atmguard.hardware.keypad.gpio:GpioKeypad",
        "sim": "atmguard.hardware.keypad.sim:SimKeypad",
    },
    "actuator": {
        "gpio": "atmguard.hardware.actuator:GpioSolenoid",
        "sim": "atmguard.hardware.actuator:SimSolenoid",
    },
    "camera": {
        "picamera2": "atmguard.hardware.camera.picamera2_backend:Picamera2Camera",
        "replay": "atmguard.hardware.camera.replay:ReplayCamera",
        "sim": "atmguard.hardware.camera.sim:SimCamera",
    },
    "display": {
        "terminal": "atmguard.hardware.display:TerminalDisplay",
        "recording": "atmguard.hardware.display:RecordingDisplay",
    },
}


def backend_class(role: str, name: str) -> type[Any]:
    """Import and return the class registered for ``role``/``name``."""
    try:
        target = BACKENDS[role][name]
    except KeyError:
        known = ", ".join(sorted(BACKENDS.get(role, {}))) or "none"
        raise BackendError(f"{role}: unknown backend {name!r} (known: {known})") from None
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendError(f"{role}: backend {name!r} cannot be imported here: {exc}") from exc
    return getattr(module, class_name)


def build(role: str, settings: Settings) -> Any:
    """Construct (without opening) the backend the settings choose for ``role``."""
    section = getattr(settings, role)
    return backend_class(role, section.backend).from_settings(settings)
