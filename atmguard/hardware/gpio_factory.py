"""gpiozero pin factories by config name, shared by every GPIO role of the process.

Why shared and never closed by a role: gpiozero's local factories (lgpio, rpigpio, native) keep
their pins and reservations in *class-level* dicts, so two instances see each other's pins and
closing one would reset the pins of every other role. One factory per name per process, built
on first use (never at import), left for gpiozero/the OS to release at exit.

Why not ``Device.pin_factory``: tests and the harness run several (mock) factories side by side,
so devices always get an explicit ``pin_factory=`` and the global is never read or set.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import TYPE_CHECKING

from atmguard.errors import HardwareError

if TYPE_CHECKING:
    from gpiozero.pins import Factory

logger = logging.getLogger(__name__)

FACTORY_CLASSES: dict[str, str] = {
    "lgpio": "gpiozero.pins.lgpio:LGPIOFactory",
    "rpigpio": "gpiozero.pins.rpigpio:RPiGPIOFactory",
    "native": "gpiozero.pins.native:NativeFactory",
}

_lock = threading.Lock()
_shared: dict[str, Factory] = {}


def shared_pin_factory(name: str, *, error: type[HardwareError] = HardwareError) -> Factory:
    """The process-wide factory for ``name`` ("default" = gpiozero's own choice); raise ``error``."""
    with _lock:
        factory = _shared.get(name)
        if factory is not None:
            return factory
        try:
            if name == "default":
                from gpiozero import Device

                # The same selection gpiozero makes (honours $GPIOZERO_PIN_FACTORY), without
                # storing the result in the global Device.pin_factory.
                factory = Device._default_pin_factory()
            elif name in FACTORY_CLASSES:
                module_name, _, class_name = FACTORY_CLASSES[name].partition(":")
                factory = getattr(importlib.import_module(module_name), class_name)()
            else:
                raise ValueError(
                    f"unknown pin factory {name!r} (known: default, {', '.join(FACTORY_CLASSES)})"
                )
        except ValueError:
            raise
        except Exception as exc:
            raise error(f"GPIO pin factory {name!r} unavailable: {type(exc).__name__}: {exc}") from exc
        logger.info("GPIO pin factory %r -> %s", name, type(factory).__name__)
        _shared[name] = factory
        return factory
