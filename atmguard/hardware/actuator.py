"""The card-retention actuator: a solenoid that diverts the card into the capture bin.

``Actuator`` is the interface; ``GpioSolenoid`` drives the coil through a gpiozero output and
reads an optional bin sensor; ``SimSolenoid`` is the same class on mock pins whose bin sensor
sees a card fall past shortly after the gate opens (or never, when jammed).

A coil left energised overheats, so the on-time limit does not trust the caller: a watchdog
timer on its own thread switches the coil off at ``max_on_s`` even if the thread that fired it
is stuck (slow event handler, debugger, exception). Lines that uphold a safety invariant are
marked ``# SAFETY:``.
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
from abc import abstractmethod
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from atmguard.config import Settings
from atmguard.errors import ActuatorError
from atmguard.hardware.device import Device
from atmguard.hardware.gpio_factory import shared_pin_factory

if TYPE_CHECKING:
    from gpiozero import DigitalInputDevice, DigitalOutputDevice
    from gpiozero.pins import Factory
    from gpiozero.pins.mock import MockPin

logger = logging.getLogger(__name__)


# --- events and results ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActuatorEvent:
    """Base of the events the actuator reports (for the journal)."""

    t_monotonic_s: float


@dataclass(frozen=True, slots=True)
class SolenoidFired(ActuatorEvent):
    planned_on_s: float
    """How long the coil is meant to stay on (the pulse, capped at max_on_s)."""


@dataclass(frozen=True, slots=True)
class SolenoidReleased(ActuatorEvent):
    on_s: float
    cut_by_watchdog: bool
    """True when the max-on watchdog, not the normal end of the pulse, switched the coil off."""


@dataclass(frozen=True, slots=True)
class CaptureConfirmed(ActuatorEvent):
    after_fire_s: float


@dataclass(frozen=True, slots=True)
class CaptureUnconfirmed(ActuatorEvent):
    waited_s: float
    """How long after the coil was released the sensor was watched."""


ActuatorEventHandler = Callable[[ActuatorEvent], None]


@dataclass(frozen=True, slots=True)
class RetentionResult:
    """What one ``retain()`` did. Times are ``time.monotonic()`` seconds (or the injected clock)."""

    confirmed: bool | None
    """True: the bin sensor saw the card; False: it did not; None: there is no sensor."""
    on_s: float
    requested_pulse_s: float
    fired_at_s: float
    released_at_s: float
    confirmed_at_s: float | None
    cut_by_watchdog: bool


# --- errors ---------------------------------------------------------------------------


class ActuatorBusyError(ActuatorError):
    """Another ``retain()`` is in progress; this call did not fire."""


class CoolingDownError(ActuatorError):
    """Refused: the coil is cooling down after the previous pulse."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"solenoid is cooling down: retry in {retry_after_s:.2f} s")


class ActuatorClosedError(ActuatorError):
    """The actuator is not open."""


class CaptureNotConfirmed(ActuatorError):
    """The solenoid fired but the bin sensor did not see the card; ``result`` has the details."""

    def __init__(self, result: RetentionResult, message: str) -> None:
        self.result = result
        super().__init__(message)


# --- interface ------------------------------------------------------------------------


class Actuator(Device):
    """Retains a card on command."""

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Coil off, hardware released; safe to call twice."""

    @property
    @abstractmethod
    def has_bin_sensor(self) -> bool: ...

    @abstractmethod
    def retain(self, *, pulse_s: float | None = None) -> RetentionResult:
        """Fire once and wait for the bin sensor; raise CaptureNotConfirmed if it stays quiet."""

    @abstractmethod
    def bin_sensor_active(self) -> bool | None:
        """The sensor's current reading, or None without a sensor."""


# --- GPIO backend ---------------------------------------------------------------------


class GpioSolenoid(Actuator):
    """Solenoid on a gpiozero ``DigitalOutputDevice``; optional bin sensor on a ``DigitalInputDevice``."""

    def __init__(
        self,
        solenoid_pin: int,
        *,
        active_high: bool = True,
        pulse_s: float = 0.4,
        max_on_s: float = 1.0,
        cooldown_s: float = 5.0,
        bin_sensor_pin: int | None = None,
        bin_sensor_active_high: bool = False,
        confirm_timeout_s: float = 2.0,
        pin_factory: Factory | None = None,
        pin_factory_name: str = "default",
        clock: Callable[[], float] = time.monotonic,
        on_event: ActuatorEventHandler | None = None,
    ) -> None:
        if not 0 < pulse_s <= max_on_s:
            raise ValueError("need 0 < pulse_s <= max_on_s")
        if cooldown_s < 0 or confirm_timeout_s <= 0:
            raise ValueError("need cooldown_s >= 0 and confirm_timeout_s > 0")
        if bin_sensor_pin == solenoid_pin:
            raise ValueError("the bin sensor and the solenoid need different pins")
        self._solenoid_pin = solenoid_pin
        self._active_high = active_high
        self._pulse_s = pulse_s
        self._max_on_s = max_on_s
        self._cooldown_s = cooldown_s
        self._bin_sensor_pin = bin_sensor_pin
        self._bin_sensor_active_high = bin_sensor_active_high
        self._confirm_timeout_s = confirm_timeout_s
        self._injected_factory = pin_factory
        self._factory_name = pin_factory_name
        self._clock = clock
        self._on_event = on_event

        self._fire_lock = threading.Lock()  # one retain() at a time
        self._out_lock = threading.RLock()  # the output and the on/off bookkeeping
        self._output: DigitalOutputDevice | None = None
        self._sensor: DigitalInputDevice | None = None
        self._closing = False
        self._pulse_id = 0
        self._on_since_s: float | None = None
        self._watchdog: threading.Timer | None = None
        self._released = threading.Event()
        self._last_release: tuple[float, float, bool] = (0.0, 0.0, False)  # off_at, on_s, by watchdog
        self._ready_at_s = -math.inf
        self._capture = threading.Event()
        self._capture_at_s: float | None = None
        self._armed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        a = settings.actuator
        return cls(
            a.solenoid_pin,
            active_high=a.active_high,
            pulse_s=a.pulse_s,
            max_on_s=a.max_on_s,
            cooldown_s=a.cooldown_s,
            bin_sensor_pin=a.bin_sensor_pin if a.has_bin_sensor else None,
            bin_sensor_active_high=a.bin_sensor_active_high,
            confirm_timeout_s=a.confirm_timeout_s,
            pin_factory_name=a.pin_factory,
        )

    def __repr__(self) -> str:
        state = "open" if self._output is not None else "closed"
        sensor = f"GPIO{self._bin_sensor_pin}" if self._bin_sensor_pin is not None else "none"
        return f"<{type(self).__name__} GPIO{self._solenoid_pin} sensor={sensor} {state}>"

    @property
    def has_bin_sensor(self) -> bool:
        return self._bin_sensor_pin is not None

    @property
    def is_open(self) -> bool:
        return self._output is not None

    @property
    def is_energised(self) -> bool:
        return self._on_since_s is not None

    @property
    def cooldown_remaining_s(self) -> float:
        return max(0.0, self._ready_at_s - self._clock())

    def _pin_factory(self) -> Factory:
        if self._injected_factory is not None:
            return self._injected_factory
        return shared_pin_factory(self._factory_name, error=ActuatorError)

    # --- lifecycle ---

    def open(self) -> None:
        from gpiozero import DigitalInputDevice, DigitalOutputDevice

        with self._out_lock:
            if self._output is not None:
                raise ActuatorError("actuator is already open")
            factory = self._pin_factory()
            current = f"solenoid GPIO{self._solenoid_pin}"
            try:
                # SAFETY: off at start — initial_value=False sets the inactive level as the pin
                # becomes an output (output_with_state), with no on-glitch in between.
                self._output = DigitalOutputDevice(
                    self._solenoid_pin,
                    active_high=self._active_high,
                    initial_value=False,
                    pin_factory=factory,
                )
                if self._bin_sensor_pin is not None:
                    current = f"bin sensor GPIO{self._bin_sensor_pin}"
                    self._sensor = DigitalInputDevice(
                        self._bin_sensor_pin, pull_up=not self._bin_sensor_active_high, pin_factory=factory
                    )
                    self._sensor.when_activated = self._on_sensor_activated
            except Exception as exc:
                self._release_devices()
                raise ActuatorError(
                    f"actuator: cannot set up {current}: {type(exc).__name__}: {exc}"
                ) from exc
            self._closing = False
            # SAFETY: off at interpreter exit if the daemon forgets to close (runs before
            # gpiozero's own exit hook, which was registered earlier).
            atexit.register(self._close_at_exit)
        logger.info(
            "actuator open: solenoid GPIO%d (active %s), bin sensor %s, pulse %.3f s, max on %.3f s",
            self._solenoid_pin,
            "high" if self._active_high else "low",
            f"GPIO{self._bin_sensor_pin}" if self._bin_sensor_pin is not None else "none",
            self._pulse_s,
            self._max_on_s,
        )

    def close(self) -> None:
        with self._out_lock:
            if self._output is None:
                return
            self._closing = True
            # SAFETY: off at close, whatever a retain() in progress on another thread is doing.
            self._switch_off(pulse_id=None, by_watchdog=False)
            self._released.set()  # wake a retain() waiting out its pulse
            self._capture.set()  # ... or waiting for the bin sensor
            self._release_devices()
            atexit.unregister(self._close_at_exit)
        logger.info("actuator closed")

    def _close_at_exit(self) -> None:
        if self._output is not None:
            logger.warning("actuator still open at interpreter exit: switching the solenoid off")
            self.close()

    def _release_devices(self) -> None:
        if self._output is not None:
            try:
                self._output.off()
            except Exception as exc:
                logger.critical("actuator: could not switch the solenoid off: %s", exc)
        for device in (self._sensor, self._output):
            if device is not None:
                try:
                    device.close()
                except Exception as exc:
                    logger.warning("actuator: closing a GPIO device failed: %s", exc)
        self._sensor = None
        self._output = None

    # --- sensor ---

    def bin_sensor_active(self) -> bool | None:
        if self._bin_sensor_pin is None:
            return None
        sensor = self._sensor
        if sensor is None:
            raise ActuatorClosedError("actuator is not open")
        return bool(sensor.is_active)

    def _on_sensor_activated(self) -> None:
        # gpiozero's event thread: latch the first activation of this retention, so a card that
        # falls past while the coil is still on is not missed.
        if self._armed and self._capture_at_s is None:
            self._capture_at_s = self._clock()
            self._capture.set()

    # --- firing ---

    def _switch_off(self, *, pulse_id: int | None, by_watchdog: bool) -> bool:
        """Coil off if it is on (and, given ``pulse_id``, still on for that pulse)."""
        with self._out_lock:
            if self._on_since_s is None or (pulse_id is not None and pulse_id != self._pulse_id):
                return False
            output = self._output
            if output is not None:
                try:
                    output.off()
                except Exception as exc:
                    # Nothing left to try from software: say so as loudly as possible.
                    logger.critical("solenoid GPIO%d could NOT be switched off: %s", self._solenoid_pin, exc)
                    raise ActuatorError(f"solenoid GPIO{self._solenoid_pin}: switching off failed") from exc
            off_at = self._clock()
            on_s = off_at - self._on_since_s
            self._on_since_s = None
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            # SAFETY: no re-fire before cool-down — measured from when the coil went off.
            self._ready_at_s = off_at + self._cooldown_s
            self._last_release = (off_at, on_s, by_watchdog)
            self._released.set()
        if by_watchdog:
            logger.warning(
                "solenoid switched off by the watchdog after %.3f s (max_on_s %.3f)", on_s, self._max_on_s
            )
        return True

    def _emit(self, event: ActuatorEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception as exc:
            logger.error("actuator event handler raised %s: %s", type(exc).__name__, exc)

    def retain(self, *, pulse_s: float | None = None) -> RetentionResult:
        requested_s = self._pulse_s if pulse_s is None else float(pulse_s)
        if not requested_s > 0:
            raise ValueError("pulse_s must be > 0")
        # SAFETY: thread-safe — a second concurrent retain() is refused, never queued to fire.
        if not self._fire_lock.acquire(blocking=False):
            raise ActuatorBusyError("another card retention is in progress")
        try:
            return self._retain(requested_s)
        finally:
            self._fire_lock.release()

    def _retain(self, requested_s: float) -> RetentionResult:
        with self._out_lock:
            output = self._output
            if output is None or self._closing:
                raise ActuatorClosedError("actuator is not open")
            wait_s = self._ready_at_s - self._clock()
            if wait_s > 0:
                # SAFETY: no re-fire before cool-down.
                raise CoolingDownError(wait_s)
            # SAFETY: hard max on-time — the pulse itself is capped ...
            planned_s = min(requested_s, self._max_on_s)
            if requested_s > self._max_on_s:
                logger.warning(
                    "requested pulse %.3f s capped at max_on_s %.3f s", requested_s, self._max_on_s
                )
            has_sensor = self._sensor is not None
            if has_sensor and self.bin_sensor_active():
                logger.warning("bin sensor already active before firing: only a new activation confirms")
            self._capture.clear()
            self._capture_at_s = None
            self._armed = True
            self._released.clear()
            self._pulse_id += 1
            pulse_id = self._pulse_id
            # SAFETY: hard max on-time — ... and a watchdog on its own thread, armed *before*
            # the coil is energised, switches it off at max_on_s whatever this thread does.
            watchdog = threading.Timer(
                self._max_on_s, self._switch_off, kwargs={"pulse_id": pulse_id, "by_watchdog": True}
            )
            watchdog.daemon = True
            watchdog.name = "solenoid-watchdog"
            self._watchdog = watchdog
            watchdog.start()
            try:
                output.on()
            except Exception as exc:
                watchdog.cancel()
                self._armed = False
                with suppress(Exception):
                    output.off()
                raise ActuatorError(
                    f"solenoid GPIO{self._solenoid_pin} could not be energised: {exc}"
                ) from exc
            fired_at_s = self._clock()
            self._on_since_s = fired_at_s
        logger.info("solenoid fired for %.3f s", planned_s)
        try:
            self._emit(SolenoidFired(fired_at_s, planned_s))
            remaining_s = planned_s - (self._clock() - fired_at_s)
            if remaining_s > 0:
                self._released.wait(remaining_s)  # returns early if the watchdog or close() fired
        finally:
            # SAFETY: off on every way out of the pulse, exceptions included.
            self._switch_off(pulse_id=pulse_id, by_watchdog=False)
        released_at_s, on_s, cut = self._last_release
        self._emit(SolenoidReleased(released_at_s, on_s, cut))

        if not has_sensor:
            self._armed = False
            return RetentionResult(None, on_s, requested_s, fired_at_s, released_at_s, None, cut)
        self._capture.wait(max(0.0, released_at_s + self._confirm_timeout_s - self._clock()))
        self._armed = False
        confirmed_at_s = self._capture_at_s
        result = RetentionResult(
            confirmed_at_s is not None, on_s, requested_s, fired_at_s, released_at_s, confirmed_at_s, cut
        )
        if confirmed_at_s is not None:
            logger.info("card capture confirmed %.3f s after firing", confirmed_at_s - fired_at_s)
            self._emit(CaptureConfirmed(confirmed_at_s, confirmed_at_s - fired_at_s))
            return result
        waited_s = self._clock() - released_at_s
        logger.warning("card capture NOT confirmed: bin sensor quiet for %.3f s after release", waited_s)
        self._emit(CaptureUnconfirmed(self._clock(), waited_s))
        if self._closing:
            raise CaptureNotConfirmed(result, "actuator closed before the bin sensor confirmed the capture")
        raise CaptureNotConfirmed(
            result, f"bin sensor did not see the card within {self._confirm_timeout_s:.2f} s of release"
        )


# --- simulator ------------------------------------------------------------------------


class _CaptureMechanism:
    """The gate and the bin: what the coil does to the card and when the bin sensor sees it.

    The gate needs ``divert_ms`` of coil on-time to swing; a shorter pulse leaves the card in the
    transport. A diverted card reaches the sensor ``travel_ms`` later and covers it for ``pass_ms``.
    """

    def __init__(
        self,
        *,
        coil_active_high: bool,
        sensor_active_high: bool,
        divert_ms: float,
        travel_ms: float,
        pass_ms: float,
    ) -> None:
        self.coil_active_high = coil_active_high
        self.sensor_active_high = sensor_active_high
        self.divert_s = divert_ms / 1000.0
        self.travel_s = travel_ms / 1000.0
        self.pass_s = pass_ms / 1000.0
        self.sensor_pin: MockPin | None = None
        self.jammed = False
        self.cards_captured = 0
        self._lock = threading.Lock()
        self._generation = 0

    def coil_level(self, level: bool) -> None:
        energised = level == self.coil_active_high
        with self._lock:
            self._generation += 1
            generation = self._generation
        if energised:
            self._start(self.divert_s, self._gate_swung, generation)

    @staticmethod
    def _start(delay_s: float, fn: Callable[..., None], *args: Any) -> None:
        timer = threading.Timer(delay_s, fn, args=args)
        timer.daemon = True
        timer.name = "sim-capture"
        timer.start()

    def _gate_swung(self, generation: int) -> None:
        with self._lock:
            if generation != self._generation or self.jammed:
                return  # coil released before the gate swung, or the card is stuck
            self.cards_captured += 1
        self._start(self.travel_s, self._card_at_sensor)

    def _card_at_sensor(self) -> None:
        pin = self.sensor_pin
        if pin is None or pin.function != "input":
            return
        self._drive(pin, self.sensor_active_high)
        time.sleep(self.pass_s)
        self._drive(pin, not self.sensor_active_high)

    @staticmethod
    def _drive(pin: MockPin, high: bool) -> None:
        if high:
            pin.drive_high()
        else:
            pin.drive_low()


def _solenoid_mock_pin_class() -> type[MockPin]:
    """A mock output that tells the capture mechanism when the coil level changes.

    Built on first use so that importing this module does not import gpiozero.
    """
    global _SOLENOID_PIN_CLASS
    if _SOLENOID_PIN_CLASS is None:
        from gpiozero.pins.mock import MockPin

        class SolenoidMockPin(MockPin):
            def __init__(self, factory: Any, info: Any, mechanism: _CaptureMechanism | None = None) -> None:
                super().__init__(factory, info)
                self.mechanism = mechanism

            def _change_state(self, value: bool) -> bool:
                changed = super()._change_state(value)
                if changed and self.mechanism is not None and self._function == "output":
                    self.mechanism.coil_level(bool(value))
                return changed

        _SOLENOID_PIN_CLASS = SolenoidMockPin
    return _SOLENOID_PIN_CLASS


_SOLENOID_PIN_CLASS: type[MockPin] | None = None


class SimSolenoid(GpioSolenoid):
    """``GpioSolenoid`` on a private MockFactory with a simulated gate, bin and sensor."""

    def __init__(
        self,
        solenoid_pin: int = 17,
        *,
        active_high: bool = True,
        pulse_s: float = 0.4,
        max_on_s: float = 1.0,
        cooldown_s: float = 5.0,
        bin_sensor_pin: int | None = 27,
        bin_sensor_active_high: bool = False,
        confirm_timeout_s: float = 2.0,
        divert_ms: float = 40.0,
        travel_ms: float = 120.0,
        pass_ms: float = 50.0,
        clock: Callable[[], float] = time.monotonic,
        on_event: ActuatorEventHandler | None = None,
    ) -> None:
        if min(divert_ms, travel_ms, pass_ms) < 0:
            raise ValueError("divert_ms, travel_ms and pass_ms must be >= 0")
        from gpiozero.pins.mock import MockFactory

        factory = MockFactory()
        self.mechanism = _CaptureMechanism(
            coil_active_high=active_high,
            sensor_active_high=bin_sensor_active_high,
            divert_ms=divert_ms,
            travel_ms=travel_ms,
            pass_ms=pass_ms,
        )
        self._solenoid_mock = factory.pin(
            solenoid_pin, pin_class=_solenoid_mock_pin_class(), mechanism=self.mechanism
        )
        self._sensor_mock: MockPin | None = None
        if bin_sensor_pin is not None:
            self._sensor_mock = factory.pin(bin_sensor_pin)
            self.mechanism.sensor_pin = self._sensor_mock
        super().__init__(
            solenoid_pin,
            active_high=active_high,
            pulse_s=pulse_s,
            max_on_s=max_on_s,
            cooldown_s=cooldown_s,
            bin_sensor_pin=bin_sensor_pin,
            bin_sensor_active_high=bin_sensor_active_high,
            confirm_timeout_s=confirm_timeout_s,
            pin_factory=factory,
            clock=clock,
            on_event=on_event,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        a = settings.actuator
        return cls(
            a.solenoid_pin,
            active_high=a.active_high,
            pulse_s=a.pulse_s,
            max_on_s=a.max_on_s,
            cooldown_s=a.cooldown_s,
            bin_sensor_pin=a.bin_sensor_pin if a.has_bin_sensor else None,
            bin_sensor_active_high=a.bin_sensor_active_high,
            confirm_timeout_s=a.confirm_timeout_s,
        )

    @property
    def solenoid_pin(self) -> MockPin:
        """The coil's mock pin: ``states`` history, ``assert_states_and_times``."""
        return self._solenoid_mock

    @property
    def bin_sensor_pin(self) -> MockPin | None:
        return self._sensor_mock

    @property
    def cards_captured(self) -> int:
        return self.mechanism.cards_captured

    def jam(self) -> None:
        """From now on a diverted card gets stuck before the bin: the sensor stays quiet."""
        self.mechanism.jammed = True

    def unjam(self) -> None:
        self.mechanism.jammed = False

    def coil_on_durations(self) -> list[float]:
        """Durations (s) of each completed energised interval in the coil pin's history."""
        durations: list[float] = []
        on = False
        for delta_s, state in self._solenoid_mock.states[1:]:
            if on:
                durations.append(delta_s)
            on = bool(state) == self._active_high
        return durations
