"""`atmguard demo`: every hardware role exercised on simulated hardware, with embedded defaults.

What runs is the real code: the serial card-reader client talks its framed protocol over a pty to
the reader emulator, the keypad scanner scans a gpiozero MockFactory matrix, the solenoid driver
fires a mock pin whose bin sensor reports the card, the camera simulator composes frames that the
real vision pipeline (BlazeFace + our covered-face classifier + the tracker) looks at. Only the customer is scripted. Until the session engine exists
(issue 5) the demo sequences the roles itself; it prints a timeline and writes the camera's view
with the detected faces drawn on it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from atmguard.config import Settings, settings_from_mapping
from atmguard.datasets import REPO_ROOT, scene_images, shared_datasets_dir
from atmguard.errors import AtmguardError, CameraError, CameraTimeout, CardReaderTimeout
from atmguard.hardware.actuator import SimSolenoid
from atmguard.hardware.camera.sim import SimCamera
from atmguard.hardware.card.base import CardInserted, CardReader, CardTaken
from atmguard.hardware.card.emulator import SimCardReader
from atmguard.hardware.card.testcards import TestCard, expired_card, luhn_failing_card, valid_card
from atmguard.hardware.display import Prompt, RecordingDisplay
from atmguard.hardware.keypad.pinbuffer import PinEntry, Submitted
from atmguard.hardware.keypad.sim import SimKeypad
from atmguard.hardware.registry import build
from atmguard.vision.detector import draw_faces
from atmguard.vision.pipeline import VisionPipeline
from atmguard.vision.tracker import FaceState, FaceTracker

DATASETS = shared_datasets_dir()

DEMO_CONFIG = {
    "atm": {"id": "DEMO-ATM"},
    "paths": {"models_dir": str(REPO_ROOT / "firmware_models")},
    "card_reader": {"backend": "sim", "poll_interval_s": 0.05, "response_timeout_s": 0.25},
    "keypad": {"backend": "sim"},
    "actuator": {"backend": "sim", "cooldown_s": 1.0},
    "camera": {"backend": "sim", "fps": 15.0},
    "display": {"backend": "recording"},
}


@dataclass
class Timeline:
    started_s: float = field(default_factory=time.monotonic)
    checks: list[tuple[str, bool]] = field(default_factory=list)

    def say(self, who: str, what: str) -> None:
        print(f"{time.monotonic() - self.started_s:7.3f}s  {who:<9} {what}", flush=True)

    def check(self, what: str, ok: bool) -> None:
        self.checks.append((what, ok))
        self.say("check", f"{'PASS' if ok else 'FAIL'}  {what}")


def _show(display: RecordingDisplay, timeline: Timeline, prompt: Prompt, **kwargs: object) -> None:
    shown = display.show(prompt, **kwargs)  # type: ignore[arg-type]
    timeline.say("display", repr(shown.text.replace("\n", " / ")))


def _wait_event(reader: CardReader, kind: type, *, timeout_s: float) -> object | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        event = reader.poll(timeout_s=max(0.0, deadline - time.monotonic()))
        if isinstance(event, kind):
            return event
    return None


def _insert(reader: SimCardReader, card: TestCard, timeline: Timeline, label: str) -> CardInserted | None:
    timeline.say("customer", f"inserts {label}")
    reader.emulator.insert(card.track1, card.track2)
    event = _wait_event(reader, CardInserted, timeout_s=5.0)
    assert event is None or isinstance(event, CardInserted)
    if event is not None:
        timeline.say(
            "reader", f"card in: {event.card!r}" if event.card else f"card in, unusable: {event.error_reason}"
        )
    return event


def _return_card(reader: SimCardReader, display: RecordingDisplay, timeline: Timeline) -> bool:
    reader.eject()
    _show(display, timeline, Prompt.TAKE_CARD)
    time.sleep(0.3)  # the customer reaches for the card
    timeline.say("customer", "takes the card")
    reader.emulator.take()
    return _wait_event(reader, CardTaken, timeout_s=3.0) is not None


def _camera_scenes(camera: SimCamera, timeline: Timeline) -> bool:
    uncovered, covered = scene_images("uncovered", DATASETS), scene_images("covered", DATASETS)
    if not uncovered:
        timeline.say("camera", f"no face images at {DATASETS}: only the built-in scenes are shown")
        return False
    camera.add_scene("uncovered", uncovered)
    if covered:
        camera.add_scene("covered", covered)
    return True


def _look(
    camera: SimCamera,
    vision: VisionPipeline,
    settings: Settings,
    scene: str,
    out_dir: Path,
    timeline: Timeline,
) -> FaceState:
    """Show ``scene`` to the camera and track it until the state has had time to settle."""
    camera.set_scene(scene)
    camera.read_lores(timeout_s=1.0)  # the frame exposed before the switch
    tracker = FaceTracker.from_settings(settings)
    for _ in range(settings.vision.tracker_window_frames + 2):
        frame = camera.read_lores(timeout_s=1.0)
        observation = vision.process_frame(frame)
        tracked = tracker.update(observation)
    path = out_dir / f"camera_{scene}.png"
    labels = [
        f"{judged.face.score:.2f} / {'-' if judged.covered_probability is None else f'{judged.covered_probability:.2f}'}"
        for judged in observation.faces
    ]
    draw_faces(frame.rgb, [judged.face for judged in observation.faces], labels=labels).save(path)
    timeline.say(
        "camera",
        f"scene {scene}: {observation.face_count} face(s), last frame detector/covering {labels or 'none'}, "
        f"tracker {tracked.state.name} -> {path}",
    )
    return tracked.state


def _type_pin(
    keypad: SimKeypad, entry: PinEntry, display: RecordingDisplay, timeline: Timeline
) -> Submitted | None:
    outcome = None
    entry.start()
    _show(display, timeline, Prompt.ENTER_PIN)
    timeline.say("customer", "types a 4-digit PIN and #")
    keypad.type_keys("4321#", interval_s=0.15, hold_s=0.06)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and entry.active:
        event = keypad.read_event(0.2)
        if event is None:
            continue
        outcome = entry.handle(event)
        if outcome is not None and not isinstance(outcome, Submitted):
            _show(display, timeline, Prompt.ENTER_PIN, pin_digits=outcome.length)
    if isinstance(outcome, Submitted):
        with entry.buffer.reveal() as digits:
            # The session engine hands these to the server's verification procedure (issue 5);
            # here only their count is used, and the buffer is wiped when the block ends.
            timeline.say("keypad", f"PIN submitted: {len(digits)} digits, buffer wiped after use")
        return outcome
    return None


def run_demo(*, out_dir: str = "out/demo") -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings: Settings = settings_from_mapping(DEMO_CONFIG, source="<embedded demo config>")
    timeline = Timeline()
    today = date.today()
    print("atmguard demo: every hardware role on simulated hardware (embedded default config)\n")
    try:
        with contextlib.ExitStack() as stack:
            display: RecordingDisplay = stack.enter_context(build("display", settings))
            reader: SimCardReader = stack.enter_context(build("card_reader", settings))
            keypad: SimKeypad = build("keypad", settings)
            keypad.open()
            stack.callback(keypad.close)
            actuator: SimSolenoid = stack.enter_context(build("actuator", settings))
            camera: SimCamera = build("camera", settings)
            have_faces = _camera_scenes(camera, timeline)
            stack.enter_context(camera)
            vision = stack.enter_context(VisionPipeline.from_settings(settings))
            timeline.say(
                "daemon", f"roles open: reader on {reader.emulator.port}, keypad, solenoid, camera, display"
            )
            _walkthrough(
                settings,
                reader,
                keypad,
                actuator,
                camera,
                vision,
                display,
                have_faces,
                out,
                today,
                timeline,
            )
    except AtmguardError as exc:
        timeline.say("demo", f"stopped: {exc}")
        timeline.check("demo ran to the end", False)
    return _summary(timeline)


def _walkthrough(
    settings: Settings,
    reader: SimCardReader,
    keypad: SimKeypad,
    actuator: SimSolenoid,
    camera: SimCamera,
    vision: VisionPipeline,
    display: RecordingDisplay,
    have_faces: bool,
    out: Path,
    today: date,
    timeline: Timeline,
) -> None:
    timeline.say("--", "1. a customer with a valid card, face visible")
    reader.set_entry_enabled(True)
    _show(display, timeline, Prompt.INSERT_CARD)
    inserted = _insert(reader, valid_card(today=today), timeline, "a valid card")
    timeline.check(
        "valid card read, PAN masked",
        inserted is not None and inserted.card is not None and "******" in repr(inserted.card),
    )
    if have_faces:
        state = _look(camera, vision, settings, "uncovered", out, timeline)
        timeline.check("uncovered face recognised as UNCOVERED", state is FaceState.UNCOVERED)
    timeline.check(
        "PIN entered, shown only as asterisks",
        _type_pin(keypad, PinEntry.from_settings(settings), display, timeline) is not None
        and all("4321" not in s.text for s in display.history),
    )
    timeline.check("card returned and taken", _return_card(reader, display, timeline))
    if inserted is not None and inserted.card is not None:
        inserted.card.wipe()

    timeline.say("--", "2. cards the ATM must refuse")
    for label, card, prompt in (
        ("an expired card", expired_card(today=today), Prompt.CARD_EXPIRED),
        ("a card failing Luhn", luhn_failing_card(today=today), Prompt.CARD_UNREADABLE),
    ):
        event = _insert(reader, card, timeline, label)
        _show(display, timeline, prompt)
        timeline.check(
            f"{label} refused ({event.error_reason if event else 'no event'})",
            event is not None and event.card is None,
        )
        timeline.check(f"{label} returned", _return_card(reader, display, timeline))

    if have_faces:
        timeline.say("--", "3. what the camera sees of a covered face and of nobody")
        state = _look(camera, vision, settings, "covered", out, timeline)
        _show(display, timeline, Prompt.REMOVE_COVERING)
        timeline.check("masked face recognised as COVERED", state is FaceState.COVERED)
        state = _look(camera, vision, settings, "nobody", out, timeline)
        _show(display, timeline, Prompt.FACE_CAMERA)
        timeline.check("empty scene seen as NO_FACE", state is FaceState.NO_FACE)

    timeline.say("--", "4. card retention: the reader carries the card to the rear, the solenoid diverts it")
    _insert(reader, valid_card(today=today, prefix="535310"), timeline, "a card to retain")
    reader.capture()
    result = actuator.retain()
    _show(display, timeline, Prompt.CARD_RETAINED)
    timeline.say(
        "actuator", f"solenoid on {result.on_s * 1000:.0f} ms, bin sensor confirmed: {result.confirmed}"
    )
    timeline.check("card captured by the reader", reader.emulator.captured_count == 1)
    timeline.check("capture confirmed by the bin sensor", result.confirmed is True)

    timeline.say("--", "5. faults: the ATM must notice, not hang")
    camera.set_scene("lost")
    try:
        camera.read_lores(timeout_s=0.5)
        lost = False
    except CameraTimeout:
        lost = False
    except CameraError as exc:
        lost = True
        timeline.say("camera", f"{type(exc).__name__}: {exc}")
    _show(display, timeline, Prompt.OUT_OF_SERVICE)
    timeline.check("camera loss detected", lost)
    reader.emulator.mute()
    started = time.monotonic()
    try:
        reader.status()
        muted = False
    except CardReaderTimeout as exc:
        muted = True
        timeline.say("reader", f"{type(exc).__name__} after {time.monotonic() - started:.1f}s: {exc}")
    timeline.check("silent card reader detected within the retry budget", muted)
    reader.emulator.unmute()


def _summary(timeline: Timeline) -> int:
    failed = [what for what, ok in timeline.checks if not ok]
    print(f"\ndemo: {len(timeline.checks) - len(failed)} of {len(timeline.checks)} checks passed")
    for what in failed:
        print(f"FAILED: {what}")
    return 1 if failed else 0
