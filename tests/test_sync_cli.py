"""`atmguard sync --once` and `atmguard outbox` against the throwaway MariaDB; the sync bench."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mariadb_server import AtmLogin, CentralTestDB, free_port
from test_sync_worker import fill, foreign_event

from atmguard.cli import sync_cmd
from atmguard.cli.main import main
from atmguard.store.journal import Journal
from atmguard.store.sync import measure_sync


@pytest.fixture
def atm(central_db: CentralTestDB) -> AtmLogin:
    return central_db.add_atm()


def write_config(
    tmp_path: Path, central_db: CentralTestDB, atm: AtmLogin, *, port: int | None = None, enabled: bool = True
) -> str:
    password_file = tmp_path / "central.pw"
    password_file.write_text(atm.password + "\n")
    password_file.chmod(0o600)
    config = tmp_path / "atmguard.toml"
    config.write_text(
        f'[atm]\nid = "{atm.atm_id}"\n\n[paths]\nstate_dir = "state"\n\n'
        f'[central]\nenabled = {"true" if enabled else "false"}\nhost = "127.0.0.1"\n'
        f'port = {port or central_db.server.port}\ndatabase = "{central_db.database}"\n'
        f'user = "{atm.user}"\npassword_file = "{password_file}"\nconnect_timeout_s = 2.0\n\n'
        "[sync]\nbatch_size = 25\n"
    )
    return str(config)


def make_journal(tmp_path: Path, atm: AtmLogin, events: int, snapshots: int = 0) -> Path:
    path = tmp_path / "state" / "journal.sqlite3"
    with Journal(path, atm_id=atm.atm_id, fsync=False, reserve_bytes=0) as journal:
        fill(journal, events, snapshots)
    return path


def outbox_json(config: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["--config", config, "outbox", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_sync_once_drains_and_outbox_shows_before_and_after(tmp_path, central_db, atm, capsys):
    config = write_config(tmp_path, central_db, atm)
    make_journal(tmp_path, atm, 40, 2)

    before = outbox_json(config, capsys)
    assert (before["pending_events"], before["pending_snapshots"]) == (42, 2)
    assert before["oldest_pending_age_s"] is not None and before["oldest_pending_age_s"] >= 0
    assert before["dead_letters"] == [] and before["db_bytes"] > 0

    assert main(["--config", config, "sync", "--once"]) == 0
    out = capsys.readouterr().out
    assert "42 events and 2 snapshots synced" in out

    after = outbox_json(config, capsys)
    assert (after["pending_events"], after["pending_snapshots"], after["oldest_pending_age_s"]) == (
        0,
        0,
        None,
    )
    stored = central_db.server.execute(
        "SELECT COUNT(*) FROM events WHERE atm_id = %s", (atm.atm_id,), database=central_db.database
    )[0][0]
    assert stored == 42


def test_sync_once_exits_69_when_the_server_is_down_and_keeps_everything(tmp_path, central_db, atm, capsys):
    port = free_port()
    config = write_config(tmp_path, central_db, atm, port=port)
    make_journal(tmp_path, atm, 5)
    assert main(["--config", config, "sync", "--once"]) == 69
    assert f"127.0.0.1:{port}" in capsys.readouterr().err
    assert outbox_json(config, capsys)["pending_events"] == 5


def test_dead_letters_exit_1_are_listed_with_reasons_and_can_be_requeued(tmp_path, central_db, atm, capsys):
    config = write_config(tmp_path, central_db, atm)
    make_journal(tmp_path, atm, 6)
    with central_db.store(atm) as store:
        store.insert_events([foreign_event(atm.atm_id, 3)])

    assert main(["--config", config, "sync", "--once"]) == 1
    assert "dead letter" in capsys.readouterr().err

    assert main(["--config", config, "outbox"]) == 0
    text = capsys.readouterr().out
    assert "dead letters: 1 events, 0 snapshots" in text
    assert "seq 3" in text and "seq already holds another event" in text
    letter = outbox_json(config, capsys)["dead_letters"][0]
    assert letter["kind"] == "event" and letter["seq"] == 3

    assert main(["--config", config, "outbox", "--requeue", letter["uuid"]]) == 0
    after = outbox_json(config, capsys)
    assert after["dead_letters"] == [] and after["pending_events"] == 1
    assert main(["--config", config, "outbox", "--requeue", letter["uuid"]]) == 66  # not dead any more


def test_large_backlogs_show_progress_on_stderr(tmp_path, central_db, atm, capsys, monkeypatch):
    monkeypatch.setattr(sync_cmd, "PROGRESS_MIN_RECORDS", 50)
    monkeypatch.setattr(sync_cmd, "PROGRESS_PERIOD_S", 0.0)
    config = write_config(tmp_path, central_db, atm)
    make_journal(tmp_path, atm, 120)
    assert main(["--config", config, "sync", "--once", "--json"]) == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("sync: ")]
    # stderr is not a terminal here: one final line, not a flood of intermediate ones.
    assert len(progress) == 1 and progress[0].startswith("sync: 120/120 records (100%)"), progress
    result = json.loads(captured.out)
    assert result["events_synced"] == 120 and result["outbox"]["pending_events"] == 0


def test_missing_journal_and_disabled_central_are_clear_errors(tmp_path, central_db, atm, capsys):
    config = write_config(tmp_path, central_db, atm)
    assert main(["--config", config, "outbox"]) == 66
    assert main(["--config", config, "sync", "--once"]) == 66
    assert "no journal" in capsys.readouterr().err
    assert not (tmp_path / "state" / "journal.sqlite3").exists()  # sync did not create one
    disabled = write_config(tmp_path, central_db, atm, enabled=False)
    assert main(["--config", disabled, "sync", "--once"]) == 78
    make_journal(tmp_path, atm, 2)
    config = write_config(tmp_path, central_db, atm)
    (tmp_path / "central.pw").unlink()
    assert main(["--config", config, "sync", "--once"]) == 77
    assert "central.pw" in capsys.readouterr().err


def test_measure_sync_drains_a_backlog_and_reports_rates_and_memory(tmp_path, mariadb_server):
    result = measure_sync(tmp_path, events=300, snapshots=30, snapshot_bytes=20_000, server=mariadb_server)
    assert (result["stored_events"], result["stored_snapshots"], result["pending_after"]) == (330, 30, 0)
    assert result["seconds"] > 0 and result["events_per_s"] > 0 and result["snapshots_per_s"] > 0
    assert result["rss_peak_delta_mib"] >= 0 and not result["full_size"]
    # its database is gone afterwards
    assert not [row for row in mariadb_server.execute("SHOW DATABASES") if row[0].startswith("sync_bench_")]


def test_sync_without_once_keeps_syncing_and_stops_promptly_on_sigterm(tmp_path, central_db, atm):
    config = write_config(tmp_path, central_db, atm)
    path = make_journal(tmp_path, atm, 10)
    child = subprocess.Popen(
        [sys.executable, "-m", "atmguard", "--config", config, "sync"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        with Journal(path, atm_id=atm.atm_id, fsync=False, reserve_bytes=0) as journal:
            deadline = time.monotonic() + 20
            while journal.outbox_stats().pending_events and time.monotonic() < deadline:
                time.sleep(0.05)
            assert journal.outbox_stats().pending_events == 0
            journal.append_event("face_state", {"late": True})  # picked up at the next interval
            while journal.outbox_stats().pending_events and time.monotonic() < deadline:
                time.sleep(0.05)
            assert journal.outbox_stats().pending_events == 0
        started = time.monotonic()
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=5) == 0
        assert time.monotonic() - started < 2.0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
