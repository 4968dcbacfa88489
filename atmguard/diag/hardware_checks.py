"""Checks that open the ATM's devices themselves: camera, card reader, keypad, bin sensor, actuator.

Only ever run while this process holds the hardware lock (:mod:`atmguard.hardware.ownership`), i.e.
with the daemon stopped; while it runs, :mod:`atmguard.diag.daemon_checks` answers these rows from
the daemon's status socket instead. Each check opens its device, measures, and closes it again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from atmguard.config import Settings
from atmguard.diag.model import CheckResult, Status
from atmguard.errors import (
    ActuatorError,
    AtmguardError,
    CameraError,
    CardReaderError,
    DisplayError,
    KeypadError,
)

logger = logging.getLogger(__name__)

CAMERA_MEASURE_S = 1.0
"""How long frames are counted to measure the camera's rate."""
KEYPAD_MEASURE_S = 0.3
"""How long the keypad is scanned: a key reading pressed for this long is stuck (or shorted)."""
FACE_FRAMES = 5
"""The last frames of the rate measurement the face row looks at."""
FPS_PASS_FRACTION = 0.9
FPS_WARN_FRACTION = 0.5

_CAMERA_FIX = (
    "check the camera's ribbon cable (both ends, contacts facing the right way), camera.backend and "
    "camera.picamera2.camera_num; `rpicam-hello --list-cameras` must list it"
)
_CARD_FIX = (
    "check the reader's power and cable, card_reader.port (the udev rule's /dev/atmguard-cardreader), "
    "baudrate, parity and protocol"
)
_GPIO_FIX = (
    "check the wiring against the BCM pin numbers in the config and that this account is in group gpio"
)


# --- camera ----------------------------------------------------------------------------------------


def check_camera(settings: Settings) -> list[CheckResult]:
    """Frames at the configured rate, and a face found in the last one."""
    from atmguard.hardware.registry import build

    camera = build("camera", settings)
    timeout_s = settings.session.camera_timeout_s
    frames: list[Any] = []
    try:
        camera.open()
        end = time.monotonic() + CAMERA_MEASURE_S
        while time.monotonic() < end:
            frames.append(camera.read_lores(timeout_s=timeout_s))
    except CameraError as exc:
        got = f" after {len(frames)} frame(s)" if frames else ""
        return [
            CheckResult("camera frames", Status.FAIL, f"{exc}{got}", _CAMERA_FIX, "camera"),
            CheckResult("camera face", Status.SKIP, "no frame to look at", "", "camera"),
        ]
    finally:
        camera.close()
    return [_rate_row(settings, frames), _face_row(settings, frames)]


def measured_fps(frames: list[Any]) -> float | None:
    """The sensor's rate from sequence numbers and exposure times (a slow reader skips frames)."""
    if len(frames) < 2 or frames[-1].t_monotonic_s <= frames[0].t_monotonic_s:
        return None
    return (frames[-1].seq - frames[0].seq) / (frames[-1].t_monotonic_s - frames[0].t_monotonic_s)


def _rate_row(settings: Settings, frames: list[Any]) -> CheckResult:
    configured = settings.camera.fps
    fps = measured_fps(frames)
    width, height = frames[-1].size
    if fps is None:
        return CheckResult(
            "camera frames",
            Status.FAIL,
            f"only {len(frames)} frame(s) in {CAMERA_MEASURE_S:g} s",
            _CAMERA_FIX,
            "camera",
        )
    measured = f"{fps:.1f} fps (configured {configured:g}), {len(frames)} frames read, lores {width}x{height}"
    if fps >= FPS_PASS_FRACTION * configured:
        return CheckResult("camera frames", Status.PASS, measured, "", "camera")
    status = Status.WARN if fps >= FPS_WARN_FRACTION * configured else Status.FAIL
    return CheckResult(
        "camera frames",
        status,
        measured,
        "too slow: lower camera.fps or camera.main_size, check the exposure (a dark scene lengthens it)",
        "camera",
    )


def _face_row(settings: Settings, frames: list[Any]) -> CheckResult:
    from atmguard.vision.pipeline import VisionPipeline
    from atmguard.vision.runtime import ModelError

    pipeline = VisionPipeline.from_settings(settings)
    try:
        pipeline.open()
        # Several frames, as the tracker would: one frame with a missed detection is not a verdict.
        observations = [pipeline.process_frame(frame) for frame in frames[-FACE_FRAMES:]]
    except ModelError as exc:
        return CheckResult(
            "camera face", Status.SKIP, f"models unavailable: {exc}", "see the model rows", "camera"
        )
    finally:
        pipeline.close()
    with_face = [observation for observation in observations if observation.faces]
    if not with_face:
        return CheckResult(
            "camera face",
            Status.WARN,
            f"no face in view ({len(observations)} frames analysed)",
            "stand in front of the ATM and run again; `atmguard diag camera --save FILE.png` shows what the camera sees",
            "camera",
        )
    observation = with_face[-1]
    face = observation.faces[0]
    probability = face.covered_probability
    verdict = "too small to judge" if probability is None else f"covering probability {probability:.2f}"
    return CheckResult(
        "camera face",
        Status.PASS,
        f"{observation.face_count} face(s) in {len(with_face)} of {len(observations)} frames; largest"
        f" {face.face.height:.0f} px high, score {face.face.score:.2f}, {verdict} ({observation.total_ms:.0f} ms)",
        "",
        "camera",
    )


# --- card reader -----------------------------------------------------------------------------------


def check_card_reader(settings: Settings) -> CheckResult:
    """Open (initialise) the reader and ask for its status."""
    from atmguard.hardware.registry import build

    reader = build("card_reader", settings)
    section = settings.card_reader
    where = f"{section.protocol} reader on {getattr(reader, 'port_name', section.port)}"
    try:
        reader.open()
        where = f"{section.protocol} reader on {getattr(reader, 'port_name', section.port)}"
        started = time.monotonic()
        status = reader.status(timeout_s=section.response_timeout_s * (section.retries + 1) * 2)
        answer_ms = (time.monotonic() - started) * 1e3
    except CardReaderError as exc:
        return CheckResult("card reader", Status.FAIL, f"{where}: {exc}", _CARD_FIX, "card reader")
    finally:
        reader.close()
    if status.fault is not None:
        return CheckResult(
            "card reader",
            Status.FAIL,
            f"{where}: reports a fault: {status.fault}",
            "clear the card path (jam) and check the reader; it must answer without a fault",
            "card reader",
        )
    card = (
        "a card inside" if status.card_present else "a card at the gate" if status.card_at_gate else "no card"
    )
    return CheckResult(
        "card reader",
        Status.PASS if not (status.card_present or status.card_at_gate) else Status.WARN,
        f"{where}: answered the status command in {answer_ms:.0f} ms: {card}",
        "" if card == "no card" else "remove the card left in the reader",
        "card reader",
    )


# --- keypad ----------------------------------------------------------------------------------------


def check_keypad(settings: Settings) -> CheckResult:
    """Scan the matrix briefly: the scanner runs at its rate and no key reads pressed at rest."""
    from atmguard.hardware.registry import build

    keypad = build("keypad", settings)
    held: set[str] = set()
    try:
        keypad.open()
        started = time.monotonic()
        end = started + KEYPAD_MEASURE_S
        while (left := end - time.monotonic()) > 0:
            event = keypad.read_event(left)
            if event is not None:
                (held.add if event.pressed else held.discard)(event.key)
        elapsed = time.monotonic() - started
        stats = keypad.scan_stats()
        failure = keypad.failure
    except KeypadError as exc:
        return CheckResult("keypad", Status.FAIL, str(exc), _GPIO_FIX, "keypad")
    finally:
        keypad.close()
    if failure is not None:
        return CheckResult("keypad", Status.FAIL, str(failure), _GPIO_FIX, "keypad")
    if stats.scans == 0:
        return CheckResult("keypad", Status.FAIL, f"no scan in {elapsed:.1f} s", _GPIO_FIX, "keypad")
    measured = (
        f"{settings.keypad.layout} matrix scanned at {stats.scans / elapsed:.0f} Hz (configured"
        f" {settings.keypad.scan_hz:g}), {stats.mean_scan_us:.0f} us per scan"
    )
    if held:
        # No session can run (the daemon is stopped), so naming the key gives nothing away.
        return CheckResult(
            "keypad",
            Status.WARN,
            f"{measured}; key(s) {' '.join(sorted(held))} read pressed at rest",
            "a stuck key or a short between a row and a column line: check the keypad and its cable",
            "keypad",
        )
    return CheckResult("keypad", Status.PASS, measured + "; no key held", "", "keypad")


# --- display ---------------------------------------------------------------------------------------


def check_display(settings: Settings) -> CheckResult:
    """Open the customer display and put "Temporarily out of service" on it, as the ATM is."""
    from atmguard.hardware.display import Prompt
    from atmguard.hardware.registry import build

    display_settings = settings.display
    if display_settings.backend == "terminal" and display_settings.device == "-":
        # Written here it would land in this command's own table, not on a screen.
        return CheckResult(
            "display",
            Status.SKIP,
            "display.device = -: the daemon writes prompts to its standard output (the journal)",
            "set display.device to the screen's TTY (e.g. /dev/tty1) on an ATM",
            "display",
        )
    where = display_settings.device if display_settings.backend == "terminal" else "memory (simulated)"
    display = build("display", settings)
    try:
        display.open()
        shown = display.show(Prompt.SERVICE_UNAVAILABLE)
    except DisplayError as exc:
        fix = (
            "check the screen, its cable and display.device; a TTY needs the unit's drop-in"
            " (DeviceAllow= and SupplementaryGroups=tty, deploy/README.md)"
        )
        return CheckResult("display", Status.FAIL, str(exc), fix, "display")
    finally:
        display.close()
    return CheckResult("display", Status.PASS, f"{where}: showed {shown.text!r}", "", "display")


# --- actuator and bin sensor -----------------------------------------------------------------------


def check_actuator(settings: Settings, *, fire: bool) -> list[CheckResult]:
    """Bin sensor reading at rest; one solenoid pulse only when ``fire`` (``--fire``)."""
    from atmguard.hardware.registry import build

    actuator = build("actuator", settings)
    try:
        actuator.open()
        sensor = _bin_sensor_row(settings, actuator)
        fired = _fire_row(settings, actuator) if fire else _not_fired_row()
    except ActuatorError as exc:
        return [
            CheckResult("bin sensor", Status.FAIL, f"cannot open the actuator: {exc}", _GPIO_FIX, "actuator"),
            CheckResult(
                "actuator", Status.FAIL if fire else Status.SKIP, f"cannot open: {exc}", _GPIO_FIX, "actuator"
            ),
        ]
    finally:
        actuator.close()  # SAFETY: the coil is off whatever happened above
    return [sensor, fired]


def _bin_sensor_row(settings: Settings, actuator: Any) -> CheckResult:
    if not actuator.has_bin_sensor:
        return CheckResult("bin sensor", Status.SKIP, "actuator.has_bin_sensor = false", "", "actuator")
    active = actuator.bin_sensor_active()
    pin = f"GPIO{settings.actuator.bin_sensor_pin}"
    if active:
        return CheckResult(
            "bin sensor",
            Status.WARN,
            f"{pin} reads active at rest: something blocks the sensor",
            "empty the capture bin / clear the sensor; check actuator.bin_sensor_active_high",
            "actuator",
        )
    return CheckResult("bin sensor", Status.PASS, f"{pin} readable, clear at rest", "", "actuator")


def _not_fired_row() -> CheckResult:
    return CheckResult(
        "actuator",
        Status.SKIP,
        "not fired (`atmguard diag --fire` pulses the solenoid once)",
        "",
        "actuator",
    )


def _fire_row(settings: Settings, actuator: Any) -> CheckResult:
    from atmguard.hardware.actuator import CaptureNotConfirmed, CoolingDownError

    try:
        result = actuator.retain()
    except CaptureNotConfirmed as exc:
        r = exc.result
        return CheckResult(
            "actuator",
            Status.WARN,
            f"fired: coil on {r.on_s * 1e3:.0f} ms, but the bin sensor saw nothing within"
            f" {settings.actuator.confirm_timeout_s:g} s",
            "fire again with a test card in the path to test the sensor; else check its wiring and the bin path",
            "actuator",
        )
    except CoolingDownError as exc:
        return CheckResult(
            "actuator", Status.WARN, str(exc), "wait for the cool-down and fire again", "actuator"
        )
    except AtmguardError as exc:
        return CheckResult("actuator", Status.FAIL, f"did not fire: {exc}", _GPIO_FIX, "actuator")
    cut = " (cut by the max-on watchdog)" if result.cut_by_watchdog else ""
    if result.confirmed is None:
        sensor = "no bin sensor to confirm"
    else:
        sensor = f"bin sensor confirmed after {(result.confirmed_at_s - result.fired_at_s) * 1e3:.0f} ms"
    status = Status.WARN if result.cut_by_watchdog else Status.PASS
    return CheckResult(
        "actuator",
        status,
        f"fired: coil on {result.on_s * 1e3:.0f} ms{cut} (pulse {settings.actuator.pulse_s:g} s); {sensor}",
        "actuator.pulse_s exceeds what the coil may take: lower it" if cut else "",
        "actuator",
    )
