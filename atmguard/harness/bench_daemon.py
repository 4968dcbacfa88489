"""Measure the running daemon against issue 5's targets, on simulated hardware and a real MariaDB.

* idle: RSS and CPU share of the `atmguard run` process over ``idle_s`` with nobody at the ATM
  (vision at ``daemon.idle_fps``), read from /proc;
* sessions: ``sessions`` approved sessions driven through the sim control socket; the daemon
  reports, per decision, the time from the arrival of the last input the decision needed (the
  bank's PIN answer or the face confirmation) to the decision being published.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from atmguard.hardware.card.testcards import luhn_complete
from atmguard.harness.rig import SimRig
from atmguard.store.sync import rss_bytes
from atmguard.store.throwaway_mariadb import ThrowawayMariaDB

PIN = "246810"
TARGET_DECISION_MS = 50.0
TARGET_RSS_MB = 150.0
TARGET_IDLE_CPU_PERCENT = 15.0


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), after pid and comm
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def _proc_rss_mb(pid: int) -> float:
    return rss_bytes(pid) / (1024 * 1024)


def measure_daemon(*, idle_s: float = 20.0, sessions: int = 20) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="atmguard-bench-") as tmp, ThrowawayMariaDB() as server:
        rig = SimRig(Path(tmp), server=server, atm_id="BENCH-ATM-1")
        rig.prepare()
        pans = [luhn_complete(f"47617330{i:02d}", length=16) for i in range(sessions)]
        for pan in pans:
            rig.provision(pan, PIN)
        try:
            rig.start()
            rig.wait_ready()
            assert rig.process is not None
            pid = rig.process.pid
            client = rig.client()
            client.wait_state(timeout_s=10, phase="idle", faults=[], card_entry=True)
            time.sleep(2.0)  # let start-up work (first sync, imports) settle
            cpu0, t0 = _proc_cpu_s(pid), time.monotonic()
            rss_samples = []
            while time.monotonic() - t0 < idle_s:
                time.sleep(1.0)
                rss_samples.append(_proc_rss_mb(pid))
            idle_cpu_percent = 100 * (_proc_cpu_s(pid) - cpu0) / (time.monotonic() - t0)

            client.show("uncovered", expect="uncovered")
            outcomes = []
            for pan in pans:
                client.start_session(pan)
                client.command(cmd="keys", keys=PIN + "#", interval_s=0.12)
                outcomes.append(client.next_message("decision", timeout_s=15)["outcome"])
                client.take_card()
                client.wait_state(timeout_s=10, phase="idle", card_entry=True)
                rss_samples.append(_proc_rss_mb(pid))
            latencies_ms = client.command(cmd="state")["decision_latency_ms"]
            client.close()
            exit_code = rig.stop()
        finally:
            rig.close()
    return {
        "idle_cpu_percent_of_one_core": idle_cpu_percent,
        "rss_mb_max": max(rss_samples),
        "sessions": sessions,
        "approved": outcomes.count("approve"),
        "decision_ms_p50": statistics.median(latencies_ms),
        "decision_ms_max": max(latencies_ms),
        "decision_ms_p95": sorted(latencies_ms)[max(0, int(0.95 * len(latencies_ms)) - 1)],
        "exit_code": exit_code,
        "targets": {
            "decision_ms": TARGET_DECISION_MS,
            "rss_mb": TARGET_RSS_MB,
            "idle_cpu_percent": TARGET_IDLE_CPU_PERCENT,
        },
    }
