"""Speed figures of the hardware layer, for `atmguard bench` (numbers to report, not to assert).

Measured on the simulators, which run the real drivers: the keypad scanner on a gpiozero mock
matrix (the scan loop is the same code a Pi runs; on a Pi the pin calls go to lgpio instead), and
the Sankyo client over a pty to the reader emulator at the configured baud rate.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from atmguard.config import Settings, settings_from_mapping


def keypad_scan_cost(settings: Settings, *, duration_s: float = 2.0) -> dict[str, Any]:
    """CPU cost of scanning the matrix at ``keypad.scan_hz``, idle (no key held)."""
    from atmguard.hardware.keypad.sim import SimKeypad

    keypad = SimKeypad.from_settings(settings)
    keypad.open(lambda _event: None)
    try:
        time.sleep(0.2)  # let the scan thread settle into its period
        before = keypad.scan_stats()
        # process_time() covers the scan thread too; the main thread only sleeps meanwhile.
        process_before, wall_before = time.process_time(), time.monotonic()
        time.sleep(duration_s)
        process_after, wall_after = time.process_time(), time.monotonic()
        after = keypad.scan_stats()
    finally:
        keypad.close()
    scans = after.scans - before.scans
    scan_us = (after.mean_scan_us * after.scans - before.mean_scan_us * before.scans) / max(scans, 1)
    elapsed_s = wall_after - wall_before
    return {
        "keypad_scan_hz_configured": settings.keypad.scan_hz,
        "keypad_scans_per_s": round(scans / elapsed_s, 1),
        "keypad_scan_us_mean": round(scan_us, 1),
        "keypad_cpu_percent_of_core": round(100 * (process_after - process_before) / elapsed_s, 2),
        "keypad_overruns": after.overruns - before.overruns,
    }


def card_reader_round_trip(settings: Settings, *, count: int = 100) -> dict[str, Any]:
    """Status command round trip (frame, ACK, response) over a pty at the configured baud rate."""
    from atmguard.hardware.card.emulator import CardReaderEmulator, SimCardReader

    section = settings.card_reader
    emulator = CardReaderEmulator(protocol="sankyo", baudrate=section.baudrate, latency_s=0.0)
    reader = SimCardReader(protocol="sankyo", emulator=emulator, baudrate=section.baudrate)
    samples_ms: list[float] = []
    with reader:
        for _ in range(count):
            started = time.perf_counter()
            reader.status()
            samples_ms.append((time.perf_counter() - started) * 1000)
    samples_ms.sort()
    return {
        "card_status_baudrate": section.baudrate,
        "card_status_ms_p50": round(statistics.median(samples_ms), 2),
        "card_status_ms_p95": round(samples_ms[int(0.95 * (len(samples_ms) - 1))], 2),
    }


def measure_hardware(settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or settings_from_mapping({}, source="<defaults>")
    return {**keypad_scan_cost(settings), **card_reader_round_trip(settings)}
