"""``GpioKeypad``: a matrix keypad scanned on gpiozero devices.

The driven lines (rows or columns, per ``drive``) are outputs idling high; each scan pulls them
low one at a time and reads the other lines, which are inputs with pull-ups: a low read line
means a key closes it to the driven line. Raw scans go through :class:`MatrixDebouncer`
(time-based debounce, ghosting guard — see ``debounce.py``).

Wiring note: with push-pull outputs, two keys held on the same read line connect a low and a
high output for the duration of one scan step; put a 1 kΩ resistor (or a diode) in series with
each driven line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Self

from atmguard.config import Settings
from atmguard.errors import KeypadError
from atmguard.hardware.gpio_factory import shared_pin_factory
from atmguard.hardware.keypad.base import EventHandler, Keypad
from atmguard.hardware.keypad.debounce import MatrixDebouncer

if TYPE_CHECKING:
    from gpiozero import InputDevice, OutputDevice
    from gpiozero.pins import Factory, Pin

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class ScanStats:
    """Scanner health and cost, measured on the scan thread."""

    scans: int
    mean_scan_us: float
    max_scan_us: float
    overruns: int
    """Scans that started late because the previous one (or the handler) took longer than a period."""
    ambiguous_scans: int
    handler_failures: int


class GpioKeypad(Keypad):
    """Matrix keypad on GPIO; see the module docstring for the electrical model."""

    def __init__(
        self,
        row_pins: Sequence[int],
        *,
        column_pins: Sequence[int],
        layout: str = "4x3",
        drive: Literal["rows", "columns"] = "rows",
        scan_hz: float = 100.0,
        debounce_ms: float = 30.0,
        settle_us: float = 0.0,
        pin_factory: Factory | None = None,
        pin_factory_name: str = "default",
        clock: Callable[[], float] = time.monotonic,
        on_event: EventHandler | None = None,
    ) -> None:
        super().__init__(layout=layout, on_event=on_event)
        rows = self.rows
        if len(row_pins) != len(rows) or len(column_pins) != len(rows[0]):
            raise ValueError(
                f"layout {layout} needs {len(rows)} row pins and {len(rows[0])} column pins,"
                f" got {len(row_pins)} and {len(column_pins)}"
            )
        if len(set(row_pins) | set(column_pins)) != len(row_pins) + len(column_pins):
            raise ValueError("keypad row and column pins must all be different")
        if drive not in ("rows", "columns"):
            raise ValueError(f"drive must be 'rows' or 'columns', not {drive!r}")
        if not 0 < scan_hz <= 5000:
            raise ValueError("scan_hz must be in (0, 5000]")
        if debounce_ms < 0 or settle_us < 0:
            raise ValueError("debounce_ms and settle_us must be >= 0")
        self._row_pins = tuple(row_pins)
        self._column_pins = tuple(column_pins)
        self._drive = drive
        self._scan_hz = float(scan_hz)
        self._debounce_ms = float(debounce_ms)
        # Optional wait between pulling a line low and reading: long ribbon cables plus the
        # Pi's ~50 kΩ pull-ups settle in a few µs, which Python's call overhead already covers.
        self._settle_s = settle_us / 1e6
        self._injected_factory = pin_factory
        self._factory_name = pin_factory_name
        self._clock = clock
        self._debouncer = MatrixDebouncer(rows, debounce_s=self._debounce_ms / 1000.0)
        self._driven: list[OutputDevice] = []
        self._read: list[InputDevice] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._failure: KeypadError | None = None
        self._scans = 0
        self._scan_total_s = 0.0
        self._scan_max_s = 0.0
        self._overruns = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(
            settings.keypad.row_pins,
            **cls._matrix_options(settings),
            pin_factory_name=settings.keypad.pin_factory,
        )

    @staticmethod
    def _matrix_options(settings: Settings) -> dict[str, Any]:
        """The keypad settings every scanner takes, whatever drives its pins."""
        k = settings.keypad
        return {
            "column_pins": k.column_pins,
            "layout": k.layout,
            "drive": k.drive,
            "scan_hz": k.scan_hz,
            "debounce_ms": k.debounce_ms,
        }

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"<{type(self).__name__} {self.layout} drive={self._drive} {self._scan_hz:g} Hz {state}>"

    @property
    def drive(self) -> str:
        return self._drive

    @property
    def scan_hz(self) -> float:
        return self._scan_hz

    @property
    def is_open(self) -> bool:
        return self._thread is not None

    @property
    def failure(self) -> KeypadError | None:
        """Set when the scan thread died (pins vanished, driver error); the keypad is then dead."""
        return self._failure

    def scan_stats(self) -> ScanStats:
        scans = self._scans
        return ScanStats(
            scans=scans,
            mean_scan_us=(self._scan_total_s / scans * 1e6) if scans else 0.0,
            max_scan_us=self._scan_max_s * 1e6,
            overruns=self._overruns,
            ambiguous_scans=self._debouncer.ambiguous_scans,
            handler_failures=self._handler_failures,
        )

    def _pin_factory(self) -> Factory:
        if self._injected_factory is not None:
            return self._injected_factory
        return shared_pin_factory(self._factory_name, error=KeypadError)

    def _driven_and_read_pins(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if self._drive == "rows":
            return self._row_pins, self._column_pins
        return self._column_pins, self._row_pins

    def open(self, on_event: EventHandler | None = None) -> None:
        from gpiozero import InputDevice, OutputDevice

        with self._lifecycle_lock:
            if self._thread is not None:
                raise KeypadError("keypad is already open")
            factory = self._pin_factory()
            driven_pins, read_pins = self._driven_and_read_pins()
            current = "?"
            try:
                for pin in driven_pins:
                    current = f"driven line GPIO{pin}"
                    # active_high=False: "on" = pulled low = line selected; starts off = high.
                    self._driven.append(
                        OutputDevice(pin, active_high=False, initial_value=False, pin_factory=factory)
                    )
                for pin in read_pins:
                    current = f"read line GPIO{pin}"
                    self._read.append(InputDevice(pin, pull_up=True, pin_factory=factory))
            except Exception as exc:
                self._release_devices()
                raise KeypadError(f"keypad: cannot set up {current}: {type(exc).__name__}: {exc}") from exc
            self._choose_handler(on_event)
            self._debouncer.reset()
            self._failure = None
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="keypad-scan", daemon=True)
            self._thread.start()
        logger.info(
            "keypad open: %s, driving %s on GPIO %s, reading GPIO %s, %g Hz, debounce %g ms",
            self.layout,
            self._drive,
            list(driven_pins),
            list(read_pins),
            self._scan_hz,
            self._debounce_ms,
        )

    def close(self) -> None:
        with self._lifecycle_lock:
            thread = self._thread
            if thread is None:
                return
            self._stop.set()
            if thread is not threading.current_thread():
                thread.join(JOIN_TIMEOUT_S)
                if thread.is_alive():
                    logger.warning(
                        "keypad scan thread did not stop within %.1f s (handler blocked?)", JOIN_TIMEOUT_S
                    )
            self._release_devices()
            self._thread = None
        logger.info("keypad closed")

    def _release_devices(self) -> None:
        for device in self._driven:
            try:
                device.off()  # leave every driven line high (inactive) before letting go of it
            except Exception as exc:
                logger.warning("keypad: could not set driven line high: %s", exc)
        for device in (*self._driven, *self._read):
            try:
                device.close()
            except Exception as exc:
                logger.warning("keypad: closing a GPIO device failed: %s", exc)
        self._driven = []
        self._read = []

    def _read_matrix(self, driven: Sequence[Pin], read: Sequence[Pin]) -> list[int]:
        """One full scan: per keypad row, a bitmask of the columns that read closed."""
        masks = [0] * len(self.rows)
        settle_s = self._settle_s
        by_rows = self._drive == "rows"
        for i, out in enumerate(driven):
            out.state = False
            if settle_s:
                deadline = time.perf_counter() + settle_s
                while time.perf_counter() < deadline:
                    pass
            for j, inp in enumerate(read):
                if not inp.state:  # pulled low through a closed key
                    if by_rows:
                        masks[i] |= 1 << j
                    else:
                        masks[j] |= 1 << i
            out.state = True
        return masks

    def _run(self) -> None:
        period_s = 1.0 / self._scan_hz
        # Pins, not devices, in the hot loop: a device property costs several extra calls.
        driven = [d.pin for d in self._driven]
        read = [d.pin for d in self._read]
        perf = time.perf_counter
        next_s = time.monotonic()
        try:
            while not self._stop.is_set():
                t0 = perf()
                masks = self._read_matrix(driven, read)
                # Stamp after the read, not before: a thread preempted between the two would
                # otherwise date an edge earlier than the contact actually changed.
                events = self._debouncer.update(masks, self._clock())
                dt = perf() - t0
                self._scans += 1
                self._scan_total_s += dt
                if dt > self._scan_max_s:
                    self._scan_max_s = dt
                for event in events:
                    self._dispatch(event)
                next_s += period_s
                delay_s = next_s - time.monotonic()
                if delay_s < 0:
                    # Late (slow handler, loaded CPU): skip the missed slots instead of bursting.
                    self._overruns += 1
                    next_s = time.monotonic()
                    delay_s = 0.0
                if self._stop.wait(delay_s):
                    break
        except Exception as exc:
            if self._stop.is_set():
                return  # close() released the pins under us: not a failure
            self._failure = KeypadError(f"keypad scan failed: {type(exc).__name__}: {exc}")
            logger.error("keypad scan thread stopped: %s", self._failure)
