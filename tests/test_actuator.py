"""Actuator contract on mock pins: GpioSolenoid on a plain MockFactory and SimSolenoid.

For "gpio" the card is played by the test (a thread that drives the bin-sensor pin once the coil
pin goes active); for "sim" the simulated gate/bin does it. Assertions are on the coil pin's
recorded history: what the solenoid driver would really have seen.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from gpiozero import Device, OutputDevice
from gpiozero.pins.mock import MockFactory, MockPin

from atmguard.config import settings_from_mapping
from atmguard.errors import ActuatorError
from atmguard.hardware.actuator import (
    ActuatorBusyError,
    ActuatorClosedError,
    ActuatorEvent,
    CaptureConfirmed,
    CaptureNotConfirmed,
    CaptureUnconfirmed,
    CoolingDownError,
    GpioSolenoid,
    SimSolenoid,
    SolenoidFired,
    SolenoidReleased,
)
from atmguard.hardware.registry import build

COIL, SENSOR = 17, 27
TOL_S = 0.03  # scheduling slack allowed on timings


@dataclass
class Rig:
    act: GpioSolenoid
    coil: MockPin
    sensor: MockPin | None
    jam: Callable[[], None]
    events: list[ActuatorEvent]

    def pulses(self) -> list[float]:
        """Durations of completed energised intervals in the coil pin history."""
        active = self.act._active_high
        out, on = [], False
        for delta, state in list(self.coil.states)[1:]:
            if on:
                out.append(delta)
            on = bool(state) == active
        return out


class CardOnMockPins:
    """Plays the card for the plain-MockFactory backend: falls past the sensor after the coil opens."""

    def __init__(
        self, coil: MockPin, sensor: MockPin, *, coil_active_high: bool, sensor_active_high: bool
    ) -> None:
        self.coil, self.sensor = coil, sensor
        self.coil_active_high, self.sensor_active_high = coil_active_high, sensor_active_high
        self.jammed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        was_on = False
        while not self._stop.wait(0.002):
            on = self.coil.state == self.coil_active_high and self.coil.function == "output"
            if on and not was_on and not self.jammed:
                time.sleep(0.1)
                self.sensor.drive_high() if self.sensor_active_high else self.sensor.drive_low()
                time.sleep(0.05)
                self.sensor.drive_low() if self.sensor_active_high else self.sensor.drive_high()
            was_on = on

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


KINDS = ["gpio", "sim"]


@pytest.fixture
def make_rig() -> Iterator[Callable[..., Rig]]:
    cleanups: list[Callable[[], None]] = []

    def make(kind: str, *, sensor: bool = True, open_it: bool = True, **kwargs: object) -> Rig:
        params: dict = {
            "pulse_s": 0.08,
            "max_on_s": 0.5,
            "cooldown_s": 0.0,
            "confirm_timeout_s": 0.4,
            "bin_sensor_pin": SENSOR if sensor else None,
            **kwargs,
        }
        events: list[ActuatorEvent] = []
        if kind == "sim":
            act: GpioSolenoid = SimSolenoid(COIL, on_event=events.append, **params)
            assert isinstance(act, SimSolenoid)
            rig = Rig(act, act.solenoid_pin, act.bin_sensor_pin, act.jam, events)
        else:
            factory = MockFactory()
            act = GpioSolenoid(COIL, pin_factory=factory, on_event=events.append, **params)
            coil = factory.pin(COIL)
            sensor_pin = factory.pin(SENSOR) if sensor else None
            jam: Callable[[], None] = lambda: None  # noqa: E731
            if sensor_pin is not None:
                card = CardOnMockPins(
                    coil,
                    sensor_pin,
                    coil_active_high=bool(params.get("active_high", True)),
                    sensor_active_high=bool(params.get("bin_sensor_active_high", False)),
                )
                cleanups.append(card.stop)

                def jam() -> None:
                    card.jammed = True

            rig = Rig(act, coil, sensor_pin, jam, events)
        cleanups.append(act.close)
        if open_it:
            act.open()
        return rig

    yield make
    for cleanup in reversed(cleanups):
        cleanup()


@pytest.mark.parametrize("active_high", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_off_at_start_and_at_close(make_rig, kind, active_high):
    rig = make_rig(kind, active_high=active_high, open_it=False)
    rig.act.open()
    assert rig.coil.function == "output"
    assert rig.coil.state == (not active_high)  # inactive level
    assert all(s.state != active_high for s in rig.coil.states[1:])  # never active on the way
    rig.act.close()
    rig.act.close()  # idempotent
    assert rig.pulses() == [] and rig.coil.state == (not active_high)
    assert not rig.act.is_open


@pytest.mark.parametrize("kind", KINDS)
def test_pulse_history_and_confirmed_capture(make_rig, kind):
    rig = make_rig(kind, pulse_s=0.1)
    t0 = time.monotonic()
    result = rig.act.retain()
    assert result.confirmed is True
    assert result.on_s == pytest.approx(0.1, abs=TOL_S) and not result.cut_by_watchdog
    assert result.confirmed_at_s is not None and result.confirmed_at_s > result.fired_at_s
    assert rig.pulses() == [pytest.approx(0.1, abs=TOL_S)]
    rig.coil.assert_states_and_times([(0.0, False), (result.fired_at_s - t0, True), (0.1, False)])
    assert [type(e) for e in rig.events] == [SolenoidFired, SolenoidReleased, CaptureConfirmed]
    time.sleep(0.12)
    assert rig.act.bin_sensor_active() is False  # the card has gone past


@pytest.mark.parametrize("kind", KINDS)
def test_capture_not_confirmed_when_the_card_never_arrives(make_rig, kind):
    rig = make_rig(kind, confirm_timeout_s=0.25)
    rig.jam()
    t0 = time.monotonic()
    with pytest.raises(CaptureNotConfirmed) as err:
        rig.act.retain()
    result = err.value.result
    assert result.confirmed is False and result.confirmed_at_s is None
    assert isinstance(err.value, ActuatorError)
    assert time.monotonic() - t0 == pytest.approx(0.08 + 0.25, abs=TOL_S * 2)  # pulse + confirm timeout
    assert rig.pulses() == [pytest.approx(0.08, abs=TOL_S)]
    assert [type(e) for e in rig.events] == [SolenoidFired, SolenoidReleased, CaptureUnconfirmed]


@pytest.mark.parametrize("kind", KINDS)
def test_no_sensor_means_confirmed_none_and_no_wait(make_rig, kind):
    rig = make_rig(kind, sensor=False, confirm_timeout_s=5.0)
    t0 = time.monotonic()
    result = rig.act.retain()
    assert result.confirmed is None and time.monotonic() - t0 < 0.08 + TOL_S * 2
    assert not rig.act.has_bin_sensor and rig.act.bin_sensor_active() is None
    assert [type(e) for e in rig.events] == [SolenoidFired, SolenoidReleased]


@pytest.mark.parametrize("kind", KINDS)
def test_requested_pulse_longer_than_max_on_is_capped(make_rig, kind):
    rig = make_rig(kind, max_on_s=0.12)
    result = rig.act.retain(pulse_s=2.0)
    assert result.requested_pulse_s == 2.0
    assert result.on_s == pytest.approx(0.12, abs=TOL_S)
    assert rig.pulses() == [pytest.approx(0.12, abs=TOL_S)]


@pytest.mark.parametrize("kind", KINDS)
def test_watchdog_cuts_the_coil_even_when_the_firing_thread_is_stuck(make_rig, kind):
    rig = make_rig(kind, sensor=False, pulse_s=0.1, max_on_s=0.15)

    def slow_journal(event: ActuatorEvent) -> None:
        rig.events.append(event)
        if isinstance(event, SolenoidFired):
            time.sleep(0.5)  # the firing thread is stuck well past max_on_s

    rig.act._on_event = slow_journal
    result = rig.act.retain()
    assert result.cut_by_watchdog
    assert rig.pulses() == [pytest.approx(0.15, abs=TOL_S)]
    assert result.on_s <= 0.15 + TOL_S


@pytest.mark.parametrize("kind", KINDS)
def test_refires_are_refused_during_cooldown(make_rig, kind):
    rig = make_rig(kind, sensor=False, cooldown_s=0.3)
    first = rig.act.retain()
    with pytest.raises(CoolingDownError) as err:
        rig.act.retain()
    assert err.value.retry_after_s == pytest.approx(0.3 - (time.monotonic() - first.released_at_s), abs=TOL_S)
    assert "retry in" in str(err.value)
    assert len(rig.pulses()) == 1
    time.sleep(err.value.retry_after_s + 0.01)
    rig.act.retain()
    assert len(rig.pulses()) == 2
    gap = rig.coil.states[3].timestamp  # off -> on again
    assert gap >= 0.3


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_retains_fire_once(make_rig, kind):
    rig = make_rig(kind, sensor=False, cooldown_s=1.0)
    barrier = threading.Barrier(8)
    outcomes: list[object] = []

    def worker() -> None:
        barrier.wait()
        try:
            outcomes.append(rig.act.retain())
        except ActuatorError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(not isinstance(o, Exception) for o in outcomes) == 1
    assert all(
        isinstance(o, (ActuatorBusyError, CoolingDownError)) for o in outcomes if isinstance(o, Exception)
    )
    assert len(rig.pulses()) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_close_during_a_pulse_switches_off_at_once(make_rig, kind):
    rig = make_rig(kind, pulse_s=0.4, max_on_s=0.5, confirm_timeout_s=2.0)
    rig.jam()
    errors: list[BaseException] = []

    def fire() -> None:
        try:
            rig.act.retain()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=fire)
    t.start()
    time.sleep(0.05)
    rig.act.close()
    t.join(1.0)
    assert not t.is_alive()
    assert rig.pulses() == [pytest.approx(0.05, abs=TOL_S)]
    assert isinstance(errors[0], CaptureNotConfirmed) and "closed" in str(errors[0])
    with pytest.raises(ActuatorClosedError):
        rig.act.retain()


def test_a_pulse_too_short_to_swing_the_gate_is_not_confirmed(make_rig):
    rig = make_rig("sim", pulse_s=0.01, confirm_timeout_s=0.25, divert_ms=40.0)
    with pytest.raises(CaptureNotConfirmed):
        rig.act.retain()
    assert rig.act.cards_captured == 0
    rig.act.unjam()
    assert rig.act.retain(pulse_s=0.06).confirmed is True and rig.act.cards_captured == 1


def test_sim_travel_time_sets_confirmation_time(make_rig):
    rig = make_rig("sim", pulse_s=0.05, travel_ms=200.0, divert_ms=30.0)
    result = rig.act.retain()
    assert result.confirmed_at_s is not None
    assert result.confirmed_at_s - result.fired_at_s == pytest.approx(0.23, abs=TOL_S)
    event = rig.events[-1]
    assert isinstance(event, CaptureConfirmed) and event.after_fire_s == pytest.approx(0.23, abs=TOL_S)


def test_sensor_already_active_before_firing_does_not_confirm(make_rig):
    rig = make_rig("gpio", confirm_timeout_s=0.2)
    rig.jam()
    assert rig.sensor is not None
    rig.sensor.drive_low()  # something already blocks the sensor (active low)
    assert rig.act.bin_sensor_active() is True
    with pytest.raises(CaptureNotConfirmed):
        rig.act.retain()


@pytest.mark.parametrize("kind", KINDS)
def test_busy_pin_is_an_actuator_error_and_nothing_stays_reserved(kind):
    factory = MockFactory()
    squatter = OutputDevice(SENSOR, pin_factory=factory)
    act = GpioSolenoid(COIL, bin_sensor_pin=SENSOR, pin_factory=factory)
    with pytest.raises(ActuatorError, match=f"GPIO{SENSOR}"):
        act.open()
    squatter.close()
    OutputDevice(COIL, pin_factory=factory).close()
    assert factory.pin(COIL).state is False


def test_off_at_interpreter_exit_even_mid_pulse():
    script = textwrap.dedent(
        """
        import atexit, sys, threading, time
        from atmguard.hardware.actuator import SimSolenoid
        sim = SimSolenoid(pulse_s=1.0, max_on_s=1.0, bin_sensor_pin=None)
        # registered first, so it runs after the actuator's own exit hook
        atexit.register(lambda: print("coil", sim.solenoid_pin.state, sim.solenoid_pin.function, flush=True))
        sim.open()
        threading.Thread(target=sim.retain, daemon=True).start()
        time.sleep(0.1)
        print("during", sim.solenoid_pin.state, flush=True)
        sys.exit(0)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.split() == ["during", "True", "coil", "False", "input"]
    assert "still open at interpreter exit" in out.stderr


def test_from_settings_and_registry_build_touch_no_pin():
    before = Device.pin_factory
    settings = settings_from_mapping(
        {
            "actuator": {
                "backend": "sim",
                "pulse_s": 0.05,
                "max_on_s": 0.1,
                "cooldown_s": 0.0,
                "bin_sensor_pin": 22,
            }
        }
    )
    act = build("actuator", settings)
    assert isinstance(act, SimSolenoid) and not act.is_open
    assert act.solenoid_pin.function == "input" and act.bin_sensor_pin is not None
    gpio = GpioSolenoid.from_settings(settings)
    assert not gpio.is_open and gpio.has_bin_sensor
    with act:
        assert act.retain().confirmed is True
    assert Device.pin_factory is before


def test_reprs_and_errors_are_plain(make_rig):
    rig = make_rig("sim")
    assert repr(rig.act) == "<SimSolenoid GPIO17 sensor=GPIO27 open>"
    with pytest.raises(ValueError):
        GpioSolenoid(COIL, pulse_s=2.0, max_on_s=1.0)
    with pytest.raises(ValueError):
        rig.act.retain(pulse_s=0)


def test_config_without_bin_sensor_builds_an_actuator_without_one():
    from atmguard.config import settings_from_mapping
    from atmguard.hardware.registry import build

    settings = settings_from_mapping({"actuator": {"backend": "sim", "has_bin_sensor": False}})
    actuator = build("actuator", settings)
    assert actuator.has_bin_sensor is False
    with actuator:
        assert actuator.retain().confirmed is None
