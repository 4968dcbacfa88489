"""Keypad contract: the same behaviour from GpioKeypad on a mock key matrix and from SimKeypad.

"gpio" is the real scanner with keys made/broken directly in the matrix model (clean contacts);
"sim" is SimKeypad driven through its harness API (with contact bounce unless a test says not).
"""

from __future__ import annotations

import itertools
import logging
import queue
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from gpiozero import Device, OutputDevice
from gpiozero.pins.mock import MockFactory

from atmguard.config import settings_from_mapping
from atmguard.errors import KeypadError
from atmguard.hardware.keypad.base import LAYOUTS, KeyEvent
from atmguard.hardware.keypad.gpio import GpioKeypad
from atmguard.hardware.keypad.matrix_mock import MatrixMockFactory
from atmguard.hardware.keypad.pinbuffer import PinBuffer, PinEntry, Submitted, TimedOut
from atmguard.hardware.keypad.sim import SimKeypad
from atmguard.hardware.registry import build

ROW_PINS = (5, 6, 13, 19)
COLUMN_PINS = (12, 16, 20, 21)
WAIT_S = 2.0  # generous upper bound for an event to arrive; tests finish as soon as it does


class Recorder:
    def __init__(self) -> None:
        self.q: queue.Queue[KeyEvent] = queue.Queue()

    def __call__(self, event: KeyEvent) -> None:
        self.q.put(event)

    def next(self, timeout_s: float = WAIT_S) -> KeyEvent:
        try:
            return self.q.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no key event within {timeout_s} s") from None

    def quiet_for(self, duration_s: float) -> list[KeyEvent]:
        time.sleep(duration_s)
        return self.drain()

    def drain(self) -> list[KeyEvent]:
        out = []
        while not self.q.empty():
            out.append(self.q.get_nowait())
        return out


@dataclass
class Rig:
    keypad: GpioKeypad
    down: Callable[[str], None]
    up: Callable[[str], None]
    events: Recorder
    factory: MatrixMockFactory


KINDS = ["gpio", "sim"]


@pytest.fixture
def make_rig(request: pytest.FixtureRequest) -> Iterator[Callable[..., Rig]]:
    opened: list[GpioKeypad] = []

    def make(
        kind: str,
        *,
        layout: str = "4x3",
        drive: str = "rows",
        scan_hz: float = 1000.0,
        debounce_ms: float = 5.0,
        bounce_ms: float = 1.0,
        on_event: Callable[[KeyEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Rig:
        rows = LAYOUTS[layout]
        cols = COLUMN_PINS[: len(rows[0])]
        rec = Recorder()
        if kind == "gpio":
            factory = MatrixMockFactory(ROW_PINS, cols)
            kp: GpioKeypad = GpioKeypad(
                ROW_PINS,
                column_pins=cols,
                layout=layout,
                drive=drive,  # type: ignore[arg-type]
                scan_hz=scan_hz,
                debounce_ms=debounce_ms,
                pin_factory=factory,
                clock=clock,
            )
            pos = {key: (r, c) for r, row in enumerate(rows) for c, key in enumerate(row)}

            def down(key: str) -> None:
                factory.matrix.set_contact(*pos[key], True)

            def up(key: str) -> None:
                factory.matrix.set_contact(*pos[key], False)
        else:
            sim = SimKeypad(
                ROW_PINS,
                column_pins=cols,
                layout=layout,
                drive=drive,  # type: ignore[arg-type]
                scan_hz=scan_hz,
                debounce_ms=debounce_ms,
                bounce_ms=bounce_ms,
                seed=7,
                clock=clock,
            )
            kp, factory, down, up = sim, sim.pin_factory, sim.key_down, sim.key_up
        kp.open(on_event or rec)
        opened.append(kp)
        return Rig(kp, down, up, rec, factory)

    yield make
    for kp in opened:
        kp.close()


def hold_until_event(rig: Rig, key: str) -> tuple[KeyEvent, KeyEvent]:
    rig.down(key)
    pressed = rig.events.next()
    rig.up(key)
    released = rig.events.next()
    return pressed, released


@pytest.mark.parametrize("drive", ["rows", "columns"])
@pytest.mark.parametrize("layout", ["4x3", "4x4"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_key_reports_one_press_and_one_release(make_rig, kind, layout, drive):
    rig = make_rig(kind, layout=layout, drive=drive)
    assert rig.keypad.keys == "".join(LAYOUTS[layout])
    for key in rig.keypad.keys:
        pressed, released = hold_until_event(rig, key)
        assert (pressed.key, pressed.pressed) == (key, True)
        assert (released.key, released.pressed) == (key, False)
        assert released.t_monotonic_s > pressed.t_monotonic_s
    assert rig.events.quiet_for(0.02) == []
    assert rig.keypad.scan_stats().handler_failures == 0


@pytest.mark.parametrize("kind", KINDS)
def test_chatter_shorter_than_debounce_is_ignored(make_rig, kind):
    rig = make_rig(kind, debounce_ms=40.0, bounce_ms=0.0)
    deadline = time.monotonic() + 0.015  # 15 ms of 1 ms make/break chatter, well under 40 ms
    while time.monotonic() < deadline:
        rig.down("7")
        time.sleep(0.001)
        rig.up("7")
        time.sleep(0.001)
    assert rig.events.quiet_for(0.1) == []
    # the same key held past the debounce time is reported: the scanner did see the line
    rig.down("7")
    assert (rig.events.next().key, rig.events.quiet_for(0.0)) == ("7", [])
    rig.up("7")


@pytest.mark.parametrize("kind", KINDS)
def test_press_is_not_reported_before_debounce_and_is_stamped_when_first_seen(make_rig, kind):
    rig = make_rig(kind, scan_hz=500.0, debounce_ms=30.0, bounce_ms=0.0)
    t_down = time.monotonic()
    rig.down("#")
    event = rig.events.next()
    t_reported = time.monotonic()
    rig.up("#")
    rig.events.next()
    assert t_reported - t_down >= 0.030
    # stamped when the scan first saw the contact, a full debounce before it was reported
    assert t_down <= event.t_monotonic_s <= t_reported - 0.030


@pytest.mark.parametrize("kind", KINDS)
def test_key_up_comes_after_the_hold_time(make_rig, kind):
    rig = make_rig(kind, bounce_ms=0.0)
    t_down = time.monotonic()
    rig.down("0")
    pressed = rig.events.next()
    t_pressed_delivered = time.monotonic()
    time.sleep(0.1)
    t_up = time.monotonic()
    rig.up("0")
    released = rig.events.next()
    t_released_delivered = time.monotonic()
    # Each edge is stamped when the scan first saw it: after the contact changed and before the
    # event arrived. Bounds, not a fixed hold, because a loaded machine can starve the scan thread.
    assert t_down <= pressed.t_monotonic_s <= t_pressed_delivered
    assert t_up <= released.t_monotonic_s <= t_released_delivered
    assert released.t_monotonic_s - pressed.t_monotonic_s >= 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_an_edge_is_never_dated_before_the_contact_changed(make_rig, kind):
    def preempted_clock() -> float:
        # Reads the time, then loses the CPU: what a loaded machine does to the scan thread.
        now_s = time.monotonic()
        time.sleep(0.02)
        return now_s

    rig = make_rig(kind, bounce_ms=0.0, debounce_ms=0.0, clock=preempted_clock)
    for _ in range(5):
        t_down = time.monotonic()
        rig.down("5")
        pressed = rig.events.next()
        t_up = time.monotonic()
        rig.up("5")
        released = rig.events.next()
        assert (pressed.pressed, released.pressed) == (True, False)
        assert t_down <= pressed.t_monotonic_s
        assert t_up <= released.t_monotonic_s


@pytest.mark.parametrize("drive", ["rows", "columns"])
@pytest.mark.parametrize("kind", KINDS)
def test_two_keys_held_are_both_reported_and_released_independently(make_rig, kind, drive):
    rig = make_rig(kind, drive=drive)
    rig.down("1")
    assert rig.events.next().key == "1"
    rig.down("9")
    assert (rig.events.next().key, rig.events.quiet_for(0.03)) == ("9", [])
    rig.up("1")
    assert (rig.events.next().key, rig.events.quiet_for(0.03)) == ("1", [])  # 9 is still held
    rig.up("9")
    event = rig.events.next()
    assert (event.key, event.pressed) == ("9", False)


@pytest.mark.parametrize("drive", ["rows", "columns"])
@pytest.mark.parametrize("kind", KINDS)
def test_three_keys_in_a_rectangle_never_invent_the_fourth(make_rig, kind, drive):
    rig = make_rig(kind, drive=drive)
    for key in ("1", "2"):
        rig.down(key)
        assert rig.events.next().key == key
    rig.down("4")  # the matrix now also reads 5 closed (ghost)
    assert rig.events.quiet_for(0.08) == []
    assert rig.keypad.scan_stats().ambiguous_scans > 0
    rig.up("1")  # rectangle broken: 4 is unambiguous now, 5 disappears
    got = {(e.key, e.pressed) for e in [rig.events.next(), rig.events.next()]}
    assert got == {("1", False), ("4", True)}
    assert rig.events.quiet_for(0.03) == []


def test_sim_contact_bounce_is_real_and_debounce_absorbs_it(make_rig):
    rig = make_rig("sim", debounce_ms=20.0, bounce_ms=8.0)
    sim = rig.keypad
    assert isinstance(sim, SimKeypad)
    before = sim.matrix.contact_changes
    sim.type_keys("2580", interval_s=0.06, hold_s=0.04)
    events = [rig.events.next() for _ in range(8)]
    assert [(e.key, e.pressed) for e in events] == [(k, p) for k in "2580" for p in (True, False)]
    assert rig.events.quiet_for(0.05) == []
    assert sim.matrix.contact_changes - before > 16  # chatter: more than one make + one break per key

    raw = make_rig("sim", debounce_ms=0.0, bounce_ms=8.0, scan_hz=1000.0)
    raw.keypad.type_keys("2580", interval_s=0.06, hold_s=0.04)
    assert len(raw.events.quiet_for(0.05)) > 8  # without debounce, the chatter shows up as events


def test_sim_types_at_human_speed_with_default_timing(make_rig):
    rig = make_rig("sim", scan_hz=100.0, debounce_ms=30.0, bounce_ms=3.0)
    t0 = time.monotonic()
    rig.keypad.type_keys("1234#", interval_s=0.1, hold_s=0.05)
    took = time.monotonic() - t0
    presses = [e for e in [rig.events.next() for _ in range(10)] if e.pressed]
    assert "".join(e.key for e in presses) == "1234#"
    # Never faster than asked; the upper bounds leave room for a busy machine's scheduler.
    assert 0.44 <= took < 1.0
    gaps = [b.t_monotonic_s - a.t_monotonic_s for a, b in itertools.pairwise(presses)]
    assert all(0.05 < g < 0.3 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(0.1, abs=0.03)


@pytest.mark.parametrize("kind", KINDS)
def test_pin_entry_on_the_keypad(make_rig, kind):
    rig = make_rig(kind)
    entry = PinEntry(PinBuffer(min_digits=4, max_digits=6, inter_key_timeout_s=0.3))
    entry.start(time.monotonic())

    def type_and_collect(keys: str) -> list[object]:
        out = []
        for key in keys:
            pressed, released = hold_until_event(rig, key)
            out += [o for o in (entry.handle(pressed), entry.handle(released)) if o is not None]
        return out

    outcomes = type_and_collect("12*3456#")
    assert [type(o).__name__ for o in outcomes] == ["DigitAdded"] * 2 + ["Cleared"] + ["DigitAdded"] * 4 + [
        "Submitted"
    ]
    assert outcomes[-1] == Submitted(4)
    with entry.buffer.reveal() as view:
        assert view.tobytes() == b"3456"

    entry.start(time.monotonic())
    type_and_collect("98")
    time.sleep(0.35)
    assert entry.check_timeout(time.monotonic()) == TimedOut(2)
    assert len(entry.buffer) == 0


def test_nothing_shows_a_digit_in_repr_str_or_logs(make_rig, caplog):
    caplog.set_level(logging.DEBUG, logger="atmguard")
    pin = "8642"

    rec = Recorder()

    def exploding_handler(event: KeyEvent) -> None:
        if event.pressed and not rec.q.qsize() and not exploded:
            exploded.append(event)
            raise ValueError(f"handler choked on {event.key}")  # a careless handler quoting the key
        rec(event)

    exploded: list[KeyEvent] = []
    rig = make_rig("sim", on_event=exploding_handler)
    rig.events = rec
    entry = PinEntry(PinBuffer())
    entry.start()
    rig.down("8")
    time.sleep(0.03)
    rig.up("8")
    assert rec.next().pressed is False and exploded
    texts = [repr(rig.keypad), str(rig.keypad), repr(rig.keypad.matrix), repr(entry)]
    for key in pin[1:] + "8#":
        pressed, released = hold_until_event(rig, key)
        texts += [repr(pressed), str(released), repr(entry.handle(pressed)), repr(entry)]
    texts += [repr(entry.buffer), str(entry.buffer), repr(rig.keypad.scan_stats())]
    rig.keypad.close()
    logs = [r.getMessage() for r in caplog.records]
    assert any("handler raised ValueError" in m for m in logs)  # the failure was logged ...
    for text in texts + logs:
        assert pin not in text
        for digit in set(pin):
            assert f"'{digit}'" not in text and f"on {digit}" not in text, text
    assert all(
        isinstance(a, (int, float)) or len(str(a)) != 1 for r in caplog.records for a in (r.args or ())
    )


@pytest.mark.parametrize("kind", KINDS)
def test_close_leaves_driven_lines_high_and_releases_every_pin(make_rig, kind):
    rig = make_rig(kind, drive="columns")
    hold_until_event(rig, "5")
    kp = rig.keypad
    kp.close()
    kp.close()  # idempotent
    assert not kp.is_open
    for pin_no in COLUMN_PINS[:3]:
        pin = rig.factory.pin(pin_no)
        assert pin.state is True and pin.function == "input"
        assert any(s.state is False for s in pin.states)  # it was really scanned (pulled low)
    for pin_no in ROW_PINS + COLUMN_PINS[:3]:
        OutputDevice(pin_no, pin_factory=rig.factory).close()  # not reserved any more


def test_open_twice_is_refused_and_reopen_after_close_works(make_rig):
    rig = make_rig("gpio")
    with pytest.raises(KeypadError):
        rig.keypad.open()
    rig.keypad.close()
    rig.keypad.open(rig.events)
    assert hold_until_event(rig, "3")[0].key == "3"


def test_context_manager_without_handler_queues_events():
    with SimKeypad(scan_hz=500.0, debounce_ms=5.0, bounce_ms=0.0) as kp:
        assert kp.read_event(0.01) is None
        kp.press("6", hold_s=0.03)
        first, second = kp.read_event(WAIT_S), kp.read_event(WAIT_S)
    assert first is not None and second is not None
    assert [(first.key, first.pressed), (second.key, second.pressed)] == [("6", True), ("6", False)]
    assert not kp.is_open


def test_handler_exception_does_not_stop_scanning(make_rig):
    calls: list[KeyEvent] = []

    def bad(event: KeyEvent) -> None:
        calls.append(event)
        raise RuntimeError("boom")

    rig = make_rig("gpio", on_event=bad)
    rig.down("2")
    time.sleep(0.03)
    rig.up("2")
    deadline = time.monotonic() + WAIT_S
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert [(e.key, e.pressed) for e in calls] == [("2", True), ("2", False)]
    assert rig.keypad.scan_stats().handler_failures == 2 and rig.keypad.failure is None


def test_busy_pin_is_a_keypad_error_naming_the_gpio():
    factory = MatrixMockFactory(ROW_PINS, COLUMN_PINS[:3])
    squatter = OutputDevice(16, pin_factory=factory)
    kp = GpioKeypad(ROW_PINS, column_pins=COLUMN_PINS[:3], pin_factory=factory)
    with pytest.raises(KeypadError, match="GPIO16"):
        kp.open(lambda e: None)
    assert not kp.is_open
    squatter.close()
    OutputDevice(5, pin_factory=factory).close()  # the rows it had taken were given back


def test_scan_failure_is_reported_not_hidden():
    factory = MockFactory()
    kp = GpioKeypad(ROW_PINS, column_pins=COLUMN_PINS[:3], pin_factory=factory, scan_hz=500.0)
    kp.open(lambda e: None)
    try:
        broken = factory.pin(12)
        broken._get_state = lambda: (_ for _ in ()).throw(OSError("gpiochip gone"))  # type: ignore[method-assign]
        deadline = time.monotonic() + WAIT_S
        while kp.failure is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert isinstance(kp.failure, KeypadError) and "gpiochip gone" in str(kp.failure)
    finally:
        kp.close()


def test_plain_mock_factory_scans_and_sees_no_keys():
    factory = MockFactory()
    seen: list[KeyEvent] = []
    with GpioKeypad(
        ROW_PINS, column_pins=COLUMN_PINS[:3], pin_factory=factory, scan_hz=500.0, on_event=seen.append
    ):
        time.sleep(0.05)
    assert seen == []
    assert len(factory.pin(5).states) > 10  # row 0 toggled on every scan


def test_from_settings_and_registry_build_without_touching_pins():
    before = Device.pin_factory
    settings = settings_from_mapping(
        {
            "keypad": {
                "backend": "sim",
                "layout": "4x4",
                "column_pins": [12, 16, 20, 21],
                "drive": "columns",
                "scan_hz": 200.0,
                "debounce_ms": 10.0,
            }
        }
    )
    kp = build("keypad", settings)
    assert isinstance(kp, SimKeypad) and not kp.is_open
    assert (kp.layout, kp.drive, kp.scan_hz) == ("4x4", "columns", 200.0)
    assert kp.pin_factory.pins == {}  # constructing touched no pin
    gpio = GpioKeypad.from_settings(settings)
    assert not gpio.is_open and gpio.drive == "columns"
    with kp:
        kp.press("D", hold_s=0.03)
        event = kp.read_event(WAIT_S)
    assert event is not None and event.key == "D"
    assert Device.pin_factory is before  # the global factory was never set


def test_harness_methods_validate_keys_without_quoting_digits():
    sim = SimKeypad()
    with pytest.raises(ValueError, match="'A'"):
        sim.key_down("A")  # not on a 4x3 keypad
    with pytest.raises(ValueError):
        sim.type_keys("12", interval_s=0.01, hold_s=0.05)


def test_keypad_threads_do_not_leak(make_rig):
    before = {t.name for t in threading.enumerate()}
    rig = make_rig("sim")
    assert "keypad-scan" in {t.name for t in threading.enumerate()}
    rig.keypad.close()
    after = [t for t in threading.enumerate() if t.name == "keypad-scan" and t.name not in before]
    assert after == []
