"""The daemon's status socket, `atmguard status` and `atmguard diag` while the daemon runs.

One real daemon (SimRig: sim hardware, a throwaway MariaDB) for the whole module; the tests ask
it questions in order: idle, then after one approved session.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from atmguard.cli.main import main
from atmguard.hardware.card.testcards import luhn_complete
from atmguard.harness.rig import SimClient, SimRig
from atmguard.service.statuslink import StatusUnavailable, query_status
from atmguard.store.throwaway_mariadb import ThrowawayMariaDB

PIN = "482915"
PAN = luhn_complete("476173500", length=16)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, mariadb_server: ThrowawayMariaDB) -> Iterator[SimRig]:
    work = tmp_path_factory.mktemp("status-rig")
    rig = SimRig(
        work,
        server=mariadb_server,
        database="atm_status",
        atm_id="STATUS-ATM-1",
        overrides={"daemon": {"status_socket_path": str(work / "status.sock")}},
    )
    rig.prepare()
    rig.provision(PAN, PIN)
    rig.start()
    try:
        rig.wait_ready(timeout_s=90)
        yield rig
    finally:
        rig.stop()
        rig.close()


@pytest.fixture(scope="module")
def client(rig: SimRig) -> Iterator[SimClient]:
    client = rig.client()
    client.wait_state(timeout_s=15, phase="idle", faults=[])
    yield client
    client.close()


def ask(rig: SimRig) -> dict[str, Any]:
    return query_status(rig.work_dir / "status.sock")


def ask_until(rig: SimRig, predicate: Any, *, timeout_s: float = 10.0) -> dict[str, Any]:
    """The first answer that satisfies ``predicate`` (the idle vision loop reads 2 frames/s)."""
    end = time.monotonic() + timeout_s
    answer = ask(rig)
    while not predicate(answer) and time.monotonic() < end:
        time.sleep(0.2)
        answer = ask(rig)
    return answer


def test_an_idle_daemon_reports_its_state_hardware_and_outbox(rig: SimRig, client: SimClient) -> None:
    answer = ask_until(rig, lambda a: a["hardware"]["camera"]["fps_measured"] is not None)
    assert answer["v"] == 1 and answer["atm_id"] == "STATUS-ATM-1"
    assert answer["pid"] == rig.process.pid  # type: ignore[union-attr]
    assert answer["phase"] == "idle" and answer["in_service"] is True and answer["faults"] == {}
    assert answer["session"] is None
    camera = answer["hardware"]["camera"]
    assert camera["ok"] is True and camera["fps_configured"] == 15.0, camera
    assert camera["fps_measured"] is not None and 10.0 < camera["fps_measured"] < 20.0
    assert camera["last_frame_age_s"] < 2.0
    assert answer["hardware"]["card_reader"]["ok"] is True
    assert answer["hardware"]["keypad"]["ok"] is True and answer["hardware"]["keypad"]["scans"] > 0
    assert answer["hardware"]["actuator"]["bin_sensor"] is False
    assert answer["hardware"]["display"]["ok"] is True
    assert answer["hardware"]["display"]["detail"] == "last prompt written"
    assert answer["watchdog"]["enabled"] is True and answer["watchdog"]["last_ping_age_s"] < 1.0
    assert answer["outbox"]["dead_events"] == 0 and "pending_events" in answer["outbox"]
    assert answer["sync"]["enabled"] is True
    assert answer["events"][-1]["type"] == "status" and answer["events"][-1]["state"] == "in_service"


def test_after_a_session_the_decision_is_among_the_last_events_with_the_pan_masked(
    rig: SimRig, client: SimClient, capsys: pytest.CaptureFixture[str]
) -> None:
    client.show("uncovered", expect="uncovered")
    session_id = client.start_session(PAN)
    during = ask(rig)
    assert during["session"]["session_id"] == session_id
    assert during["session"]["masked_pan"] == f"{PAN[:6]}******{PAN[-4:]}"
    client.command(cmd="keys", keys=PIN + "#")
    decision = client.next_message("decision", timeout_s=15)
    assert decision["outcome"] == "approve"
    client.take_card()
    client.wait_state(timeout_s=10, phase="idle")

    answer = ask(rig)
    decisions = [e for e in answer["events"] if e["type"] == "decision"]
    assert decisions[-1]["session_id"] == session_id
    assert (decisions[-1]["outcome"], decisions[-1]["reason"]) == ("approve", "approved")
    assert decisions[-1]["journal_uuid"] == decision["journal_uuid"]
    text = json.dumps(answer)
    assert PAN not in text and PIN not in text

    assert main(["--config", str(rig.config_path), "status"]) == 0
    out = capsys.readouterr().out
    assert "service: IN SERVICE (idle)" in out
    assert f"decision approve (approved) card {PAN[:6]}******{PAN[-4:]} session {session_id}" in out
    assert "camera" in out and "fps" in out and "outbox:" in out and PAN not in out

    assert main(["--config", str(rig.config_path), "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["atm_id"] == "STATUS-ATM-1"


def test_diag_answers_the_hardware_rows_from_the_running_daemon(
    rig: SimRig, client: SimClient, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--config", str(rig.config_path), "diag", "--json"])
    report = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in report["checks"]}
    assert report["hardware_source"] == "daemon"
    assert rows["camera frames"]["status"] == "PASS"
    assert rows["camera frames"]["measured"].startswith("owned by the running daemon: camera ")
    assert "fps" in rows["camera frames"]["measured"]
    assert rows["card reader"]["status"] == "PASS" and rows["keypad"]["status"] == "PASS"
    assert rows["display"]["status"] == "PASS"
    assert rows["actuator"]["status"] == "SKIP"
    assert rows["daemon"]["status"] == "PASS" and "in service" in rows["daemon"]["measured"]
    assert rows["central connection"]["status"] == "PASS"
    failed = [name for name, row in rows.items() if row["status"] == "FAIL"]
    assert failed in ([], ["disk"]), rows  # a nearly full CI disk is not the daemon's doing
    assert code == (1 if failed else 0)
    assert client.command(cmd="state")["phase"] == "idle"  # the daemon kept serving throughout


def test_hardware_tools_refuse_while_the_daemon_runs(rig: SimRig, capsys: pytest.CaptureFixture[str]) -> None:
    out = rig.work_dir / "aim.png"
    assert main(["--config", str(rig.config_path), "diag", "camera", "--save", str(out)]) == 75
    err = capsys.readouterr().err
    assert f"atmguard run (pid {rig.process.pid}" in err and "systemctl stop atmguard" in err  # type: ignore[union-attr]
    assert not out.exists()
    assert main(["--config", str(rig.config_path), "diag", "--fire"]) == 75


def test_status_without_a_daemon_exits_69(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "atmguard.toml"
    config.write_text(f'[daemon]\nstatus_socket_path = "{tmp_path / "status.sock"}"\n')
    assert main(["--config", str(config), "status"]) == 69
    assert "is the daemon running?" in capsys.readouterr().err
    with pytest.raises(StatusUnavailable) as raised:
        query_status(tmp_path / "status.sock")
    assert raised.value.reason == "absent"
