from __future__ import annotations

import pytest

from atmguard.config import settings_from_mapping
from atmguard.errors import BackendError
from atmguard.hardware.device import Device
from atmguard.hardware.registry import BACKENDS, backend_class, build


@pytest.mark.parametrize(
    ("role", "name"), [(role, name) for role, names in BACKENDS.items() for name in names]
)
def test_every_registered_backend_imports_without_its_hardware(role: str, name: str):
    cls = backend_class(role, name)
    assert issubclass(cls, Device)
    assert callable(cls.from_settings)


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(
        BackendError, match=r"camera: unknown backend 'webcam' \(known: picamera2, replay, sim\)"
    ):
        backend_class("camera", "webcam")


def test_build_constructs_the_configured_simulators_without_opening_them():
    settings = settings_from_mapping(
        {
            "card_reader": {"backend": "sim"},
            "keypad": {"backend": "sim"},
            "actuator": {"backend": "sim"},
            "camera": {"backend": "sim"},
            "display": {"backend": "recording"},
        }
    )
    built = {role: build(role, settings) for role in BACKENDS}
    assert {role: type(obj).__name__ for role, obj in built.items()} == {
        "card_reader": "SimCardReader",
        "keypad": "SimKeypad",
        "actuator": "SimSolenoid",
        "camera": "SimCamera",
        "display": "RecordingDisplay",
    }
    for device in built.values():
        device.close()  # closing what was never opened is allowed


def test_picamera2_backend_fails_clearly_where_there_is_no_camera_stack():
    settings = settings_from_mapping({"camera": {"backend": "picamera2"}})
    camera = build("camera", settings)
    with pytest.raises(Exception, match="picamera2 is not available here"):
        camera.open()
