"""`atmguard diag`: the full table on simulated hardware, a real journal and a throwaway MariaDB.

Every check runs for real: the models are hashed and loaded, the sim camera streams, the card
reader emulator answers on a pty, the keypad is scanned on gpiozero mock pins, the journal's hash
chain is walked, the central server is a real MariaDB reached with the ATM's own login.
"""

from __future__ import annotations

import io
import json
import os
import pty
import shutil
import socket
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from mariadb_server import CentralTestDB
from sim_support import write_toml

from atmguard.cli.main import main
from atmguard.config import settings_from_mapping
from atmguard.diag.hardware_checks import check_display
from atmguard.diag.model import Check, CheckResult, Status, run_check
from atmguard.diag.system_checks import (
    ATM_PROCEDURES,
    check_central,
    check_clock,
    check_disk,
    expected_schema_version,
)
from atmguard.hardware.card.emulator import CardReaderEmulator
from atmguard.hardware.ownership import DAEMON_PURPOSE, HardwareLock, is_held
from atmguard.store.journal import JOURNAL_FILENAME, Journal
from atmguard.store.keys import generate_keypair

REPO = Path(__file__).resolve().parents[1]
HARDWARE_ROWS = ["camera frames", "camera face", "card reader", "keypad", "display", "bin sensor", "actuator"]


def sim_sections(tmp_path: Path, scenes: Path, **overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every role on its simulator; the camera shows a person; central off unless overridden."""
    keys = generate_keypair(tmp_path / "keys")
    sections: dict[str, dict[str, Any]] = {
        "atm": {"id": "DIAG-ATM-1"},
        "paths": {"state_dir": str(tmp_path / "state"), "models_dir": str(REPO / "firmware_models")},
        "card_reader": {"backend": "sim", "response_timeout_s": 0.25},
        "keypad": {"backend": "sim"},
        "actuator": {"backend": "sim", "cooldown_s": 0.5},
        "camera": {"backend": "sim"},
        "camera.sim": {"scene_dir": str(scenes), "initial_scene": "uncovered"},
        "display": {"backend": "recording"},
        "journal": {"bank_public_key_file": str(keys.public_key_file)},
        "central": {"enabled": False},
        "daemon": {"host_socket_path": "", "status_socket_path": str(tmp_path / "status.sock")},
    }
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    (tmp_path / "state").mkdir(exist_ok=True)
    return sections


def make_journal(tmp_path: Path, events: int = 5) -> Path:
    path = tmp_path / "state" / JOURNAL_FILENAME
    with Journal(path, atm_id="DIAG-ATM-1", fsync=False, reserve_bytes=0) as journal:
        for i in range(events):
            journal.append_event("face_state", {"i": i})
    return path


def run_json(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = main(["--config", str(config), "diag", "--json", *args])
    out = capsys.readouterr().out
    return code, json.loads(out)


def rows_by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in report["checks"]}


@pytest.fixture
def central_sections(central_db: Any, tmp_path: Path) -> dict[str, Any]:
    login = central_db.add_atm("DIAG-ATM-1-" + os.urandom(3).hex())
    mapping = central_db.settings_mapping(login, tmp_path / "central-password")
    return mapping


def test_a_healthy_sim_atm_passes_every_check(
    tmp_path: Path, scenes: Path, central_sections: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    sections = sim_sections(
        tmp_path,
        scenes,
        central={**central_sections["central"], "enabled": True},
        atm=central_sections["atm"],
    )
    config = write_toml(tmp_path / "atmguard.toml", sections)
    make_journal(tmp_path)

    code, report = run_json(config, capsys)
    rows = rows_by_name(report)
    assert code == 0 and report["ok"] and report["hardware_source"] == "direct", report
    for name in (
        "config",
        "model face_detector",
        "model covering_classifier",
        "vision inference",
        *HARDWARE_ROWS[:-1],
    ):
        assert rows[name]["status"] == "PASS", rows[name]
    for name in ("journal", "outbox", "disk", "central connection", "central schema"):
        assert rows[name]["status"] == "PASS", rows[name]
    assert (
        "15.0 fps" in rows["camera frames"]["measured"]
        or "fps (configured 15)" in rows["camera frames"]["measured"]
    )
    assert "1 face(s)" in rows["camera face"]["measured"]
    assert "no card" in rows["card reader"]["measured"]
    assert "hash chain intact: 5 events" in rows["journal"]["measured"]
    schema = rows["central schema"]["measured"]
    assert f"server at migration {expected_schema_version():04d}, as this version expects" in schema
    assert rows["actuator"]["status"] == "SKIP"  # never fired without --fire
    # Not an ATM fault here: the daemon is not running (this command held the hardware), and a CI
    # container's clock may not be synchronised.
    assert rows["daemon"]["status"] == "WARN" and "not running" in rows["daemon"]["measured"]
    assert rows["clock"]["status"] in ("PASS", "WARN")
    assert report["summary"]["FAIL"] == 0

    # The same run as a table: one line per check, a summary, and the lock is free again.
    assert main(["--config", str(config), "diag", "--fire"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[1].split() == ["CHECK", "STATUS", "MEASURED", "/", "FIX"]
    actuator_line = next(line for line in table.splitlines() if line.startswith("actuator "))
    assert "PASS" in actuator_line and "fired: coil on" in actuator_line
    assert "bin sensor confirmed" in table
    assert "FAIL" not in table.splitlines()[-1]
    assert is_held(tmp_path / "state" / "hardware.lock") is None  # released: the daemon may start


def test_a_model_whose_sha256_differs_from_the_manifest_fails(
    tmp_path: Path, scenes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    shutil.copytree(
        REPO / "firmware_models", models, symlinks=True, ignore=shutil.ignore_patterns("training")
    )
    manifest = json.loads((models / "manifest.json").read_text())
    for entry in manifest["models"]:
        if entry["role"] == "face_detector":
            entry["sha256"] = "0" * 64
    (models / "manifest.json").write_text(json.dumps(manifest))
    sections = sim_sections(tmp_path, scenes, paths={"models_dir": str(models)})
    config = write_toml(tmp_path / "atmguard.toml", sections)

    code, report = run_json(config, capsys)
    rows = rows_by_name(report)
    assert code == 1 and not report["ok"]
    assert rows["model face_detector"]["status"] == "FAIL"
    assert "sha256 mismatch" in rows["model face_detector"]["measured"]
    assert "make models" in rows["model face_detector"]["fix"]
    assert rows["model covering_classifier"]["status"] == "PASS"
    assert rows["vision inference"]["status"] == "SKIP"


def test_an_unreachable_central_server_fails_without_hanging(
    tmp_path: Path, scenes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    password = tmp_path / "pw"
    password.write_text("x\n")
    password.chmod(0o600)
    central = {
        "enabled": True,
        "host": "127.0.0.1",
        "port": port,
        "password_file": str(password),
        "connect_timeout_s": 1.0,
    }
    config = write_toml(tmp_path / "atmguard.toml", sim_sections(tmp_path, scenes, central=central))

    code, report = run_json(config, capsys)
    row = rows_by_name(report)["central connection"]
    assert code == 1
    assert row["status"] == "FAIL" and f"127.0.0.1:{port}" in row["measured"]
    assert "journals locally" in row["fix"]


def test_a_broken_journal_chain_fails(
    tmp_path: Path, scenes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make_journal(tmp_path, events=10)
    db = sqlite3.connect(path)
    db.execute("""UPDATE events SET payload = '{"i": 99}' WHERE seq = 4""")  # evidence altered
    db.commit()
    db.close()
    config = write_toml(tmp_path / "atmguard.toml", sim_sections(tmp_path, scenes))

    code, report = run_json(config, capsys)
    row = rows_by_name(report)["journal"]
    assert code == 1
    assert row["status"] == "FAIL" and "BROKEN" in row["measured"] and "seq 4" in row["measured"]
    assert "do not delete" in row["fix"]


def test_a_disk_above_the_watermark_fails_and_one_close_to_it_warns(tmp_path: Path) -> None:
    # The file system's figures are given: a test cannot fill the disk it runs on to 50%.
    settings = settings_from_mapping(
        {"paths": {"state_dir": str(tmp_path)}, "journal": {"disk_high_watermark_percent": 50.0}}
    )
    gib = 2**30
    usage_type = type(shutil.disk_usage(tmp_path))

    def disk_row(free_gib: float) -> CheckResult:
        total = 100 * gib
        return check_disk(
            settings, disk_usage=lambda _path: usage_type(total, total - free_gib * gib, free_gib * gib)
        )

    full = disk_row(3)
    assert full.status is Status.FAIL and "above the watermark" in full.measured and "50%" in full.measured
    assert "never delete the journal" in full.fix
    close = disk_row(52)
    assert close.status is Status.WARN and "close to the watermark" in close.measured
    assert disk_row(90).status is Status.PASS


def test_an_invalid_config_is_reported_with_exit_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "atmguard.toml"
    config.write_text("[camera]\nfps = 500\n")
    assert main(["--config", str(config), "diag"]) == 78
    out = capsys.readouterr().out
    assert "config" in out and "FAIL" in out and "camera.fps" in out and "atmguard check-config" in out


def test_a_hung_card_reader_is_a_fail_row_not_a_hang(
    tmp_path: Path, scenes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with CardReaderEmulator() as emulator:
        emulator.mute()  # no ACK, no answer: as a reader whose firmware hangs
        reader = {
            "backend": "serial",
            "port": emulator.port,
            "response_timeout_s": 0.1,
            "retries": 1,
            "motion_timeout_s": 0.3,
        }
        config = write_toml(tmp_path / "atmguard.toml", sim_sections(tmp_path, scenes, card_reader=reader))
        code, report = run_json(config, capsys)
    row = rows_by_name(report)["card reader"]
    assert code == 1
    assert row["status"] == "FAIL" and emulator.port in row["measured"]
    assert "cable" in row["fix"]


def test_hardware_rows_are_not_checked_while_another_command_holds_the_devices(
    tmp_path: Path, scenes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_toml(tmp_path / "atmguard.toml", sim_sections(tmp_path, scenes))
    with HardwareLock(tmp_path / "state" / "hardware.lock", purpose="atmguard diag keypad"):
        code, report = run_json(config, capsys)
        rows = rows_by_name(report)
        assert code == 75 and report["hardware_source"] == "busy"
        for name in HARDWARE_ROWS:
            assert rows[name]["status"] == "WARN" and "atmguard diag keypad" in rows[name]["measured"]
        assert f"pid {os.getpid()}" in rows["camera frames"]["measured"]
        assert rows["config"]["status"] == "PASS"  # the rest of the table still runs

        # --fire needs the devices: refused outright, no table.
        assert main(["--config", str(config), "diag", "--fire"]) == 75
        captured = capsys.readouterr()
        assert captured.out == "" and "wait for it to finish" in captured.err


def test_a_daemon_holding_the_devices_is_named_with_what_to_do(
    tmp_path: Path, scenes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_toml(tmp_path / "atmguard.toml", sim_sections(tmp_path, scenes))
    with HardwareLock(tmp_path / "state" / "hardware.lock", purpose=DAEMON_PURPOSE):
        assert main(["--config", str(config), "diag", "--fire"]) == 75
    err = capsys.readouterr().err
    assert "atmguard run" in err and "systemctl stop atmguard" in err and f"pid {os.getpid()}" in err


def test_the_procedures_checked_are_those_an_atm_account_is_granted() -> None:
    grants = (REPO / "sql" / "grants" / "atm.sql").read_text()
    granted = sorted(
        line.split("`.`")[1].split("`")[0] for line in grants.splitlines() if "GRANT EXECUTE" in line
    )
    assert sorted(ATM_PROCEDURES) == granted


def test_the_schema_row_says_what_the_server_lacks_and_who_fixes_it(
    mariadb_server: Any, tmp_path: Path
) -> None:
    # A database of its own: this test takes the schema apart.
    db = CentralTestDB.create(mariadb_server, "atmguard_diag_schema")
    login = db.add_atm()
    settings = settings_from_mapping(db.settings_mapping(login, tmp_path / "password"))
    current = expected_schema_version()
    assert current is not None and current >= 5

    def schema_row() -> tuple[str, str, str]:
        row = {r.name: r for r in check_central(settings)}["central schema"]
        return row.status.value, row.measured, row.fix

    try:
        status, measured, _ = schema_row()
        assert status == "PASS", measured
        assert f"all {len(ATM_PROCEDURES)} procedures granted" in measured

        db.server.execute(f"DELETE FROM schema_migrations WHERE version = {current}", database=db.database)
        status, measured, fix = schema_row()
        assert (status, measured) == (
            "FAIL",
            f"server at migration {current - 1:04d}, this version needs {current:04d}",
        )
        assert "atmguard db migrate" in fix

        db.server.execute(
            "INSERT INTO schema_migrations VALUES"
            f" ({current}, 'x', REPEAT('0', 64), NOW()), ({current + 1}, 'y', REPEAT('0', 64), NOW())",
            database=db.database,
        )
        status, measured, fix = schema_row()
        assert status == "WARN" and "newer than this version knows" in measured
        assert fix == "update atmguard on this ATM"
        db.server.execute(f"DELETE FROM schema_migrations WHERE version > {current}", database=db.database)

        db.server.execute(
            f"REVOKE EXECUTE ON PROCEDURE `{db.database}`.`ingest_event` FROM '{login.user}'@'{login.host}'"
        )
        status, measured, fix = schema_row()
        assert status == "FAIL" and measured.endswith(
            "procedures missing or not granted to this account: ingest_event"
        )
        assert "db add-atm" in fix

        db.server.execute("DROP PROCEDURE schema_version", database=db.database)
        status, measured, fix = schema_row()
        assert status == "FAIL" and "the server predates migration 0005 or this ATM's grants" in measured
        assert "atmguard db migrate" in fix and "db add-atm" in fix
    finally:
        db.server.execute(f"DROP DATABASE `{db.database}`")


def test_the_display_row_writes_to_the_screen_or_says_why_it_cannot(tmp_path: Path) -> None:
    def row(device: str) -> CheckResult:
        return check_display(settings_from_mapping({"display": {"backend": "terminal", "device": device}}))

    controller, terminal = pty.openpty()
    tty = os.ttyname(terminal)
    try:
        screen = row(tty)
        shown = os.read(controller, 4096).decode()
    finally:
        os.close(controller)
        os.close(terminal)
    assert screen.status is Status.PASS and tty in screen.measured
    assert "[ATM] Temporarily out of service" in shown  # what the technician sees on the screen

    missing = row(str(tmp_path / "no-such-tty"))
    assert missing.status is Status.FAIL and "cannot open display device" in missing.measured
    assert "display.device" in missing.fix

    stdout = row("-")
    assert stdout.status is Status.SKIP and "standard output" in stdout.measured


def test_clock_state_from_timedatectl_and_the_kernel() -> None:
    def timedatectl(output: str, returncode: int = 0) -> Any:
        def run(*_args: Any, **_kwargs: Any) -> Any:
            import subprocess

            return subprocess.CompletedProcess([], returncode, stdout=output, stderr="")

        return run

    if shutil.which("timedatectl") is not None:
        synced = check_clock(run=timedatectl("NTP=yes\nNTPSynchronized=yes\n"))
        assert synced.status is Status.PASS and "NTPSynchronized=yes" in synced.measured
        drifting = check_clock(run=timedatectl("NTP=no\nNTPSynchronized=no\n"))
        assert drifting.status is Status.WARN and "chrony" in drifting.fix
    # No systemd answering (a container): the kernel's adjtimex state is what gets reported.
    fallback = check_clock(run=timedatectl("", returncode=1))
    assert fallback.measured.startswith("kernel adjtimex:")
    assert fallback.status in (Status.PASS, Status.WARN)


def test_a_check_that_hangs_is_cut_off_at_its_time_limit() -> None:
    release = threading.Event()

    def wedged() -> CheckResult:
        release.wait(30)
        return CheckResult("card reader", Status.PASS, "too late")

    try:
        rows = run_check(
            Check("card reader", "card reader", wedged, timeout_s=0.2, fix_on_timeout="power-cycle it")
        )
    finally:
        release.set()
    assert [(r.name, r.status) for r in rows] == [("card reader", Status.FAIL)]
    assert "no result within 0.2 s" in rows[0].measured and rows[0].fix == "power-cycle it"


def test_progress_redraws_a_line_on_a_terminal_and_writes_only_the_last_one_elsewhere() -> None:
    from atmguard.cli.progress import Progress

    now = [0.0]
    terminal = io.StringIO()
    progress = Progress(
        "verify", unit="events", stream=terminal, period_s=1.0, tty=True, clock=lambda: now[0]
    )
    for done in range(0, 5001, 100):
        now[0] = done / 1000  # 0.1 s per 100 events
        progress.update(done, 5000)
    progress.finish()
    drawn = terminal.getvalue().split("\r")[1:]
    assert 5 <= len(drawn) <= 7  # throttled to one redraw a second over 5 s, plus the final line
    assert drawn[-1].startswith("verify: 5000/5000 events (100%)") and drawn[-1].endswith("\n")

    log = io.StringIO()
    progress = Progress("verify", unit="events", stream=log, period_s=1.0, tty=False, clock=lambda: now[0])
    for done in range(0, 5001, 100):
        progress.update(done, 5000)
    progress.finish()
    progress.finish()
    assert log.getvalue().splitlines() == ["verify: 5000/5000 events (100%), 0.0 s"]
