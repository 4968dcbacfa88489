"""`atmguard journal verify`, `snapshot keygen` and `snapshot open`, through a parser built with register()."""

from __future__ import annotations

import argparse
import io
import json
import sqlite3
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atmguard.cli import journal_cmd
from atmguard.store.journal import JOURNAL_FILENAME, Journal
from atmguard.store.keys import PRIVATE_KEY_FILENAME, PUBLIC_KEY_FILENAME
from atmguard.store.snapshots import SnapshotSealer


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atmguard")
    parser.add_argument("--config")
    journal_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.fixture(autouse=True)
def no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATMGUARD_CONFIG", raising=False)


@pytest.fixture
def bank(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert run(["snapshot", "keygen", "--out-dir", str(tmp_path / "bank")]) == 0
    capsys.readouterr()
    return tmp_path / "bank"


def face_frame(value: int) -> np.ndarray:
    frame = np.full((240, 320, 3), value, np.uint8)
    frame[60:180, 100:220] = 255 - value  # something a JPEG keeps
    return frame


@pytest.fixture
def state(tmp_path: Path, bank: Path) -> dict:
    """A journal with three sealed snapshots: two in session s-1 (one with a crop), one in s-2."""
    state_dir = tmp_path / "state"
    sealer = SnapshotSealer.from_file(bank / PUBLIC_KEY_FILENAME)
    with Journal(state_dir / JOURNAL_FILENAME, atm_id="ATM-0042", reserve_bytes=0) as j:
        j.append_event("card_inserted", {"masked_pan": "411111******1111"}, session_id="s-1")
        snaps = []
        for value, session, with_crop in ((30, "s-1", True), (90, "s-1", False), (150, "s-2", False)):
            frame = face_frame(value)
            sealed, crop = sealer.seal_frame(frame, frame[60:180, 100:220] if with_crop else None, quality=85)
            snaps.append(
                j.add_snapshot(
                    sealed,
                    sealed_crop=crop,
                    reason="uncovered",
                    is_fraud_evidence=True,
                    session_id=session,
                    key_id=sealer.key_id,
                )
            )
    return {"dir": state_dir, "snaps": snaps}


def test_keygen_prints_where_each_key_goes_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "keys"
    assert run(["snapshot", "keygen", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / PRIVATE_KEY_FILENAME) in printed and "journal.bank_public_key_file" in printed
    assert stat.S_IMODE((out / PRIVATE_KEY_FILENAME).stat().st_mode) == 0o600
    before = (out / PRIVATE_KEY_FILENAME).read_bytes()

    assert run(["snapshot", "keygen", "--out-dir", str(out)]) == journal_cmd.EX_CANTCREAT
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (out / PRIVATE_KEY_FILENAME).read_bytes() == before


def test_snapshot_open_by_uuid_writes_the_decrypted_jpegs(
    tmp_path: Path, bank: Path, state: dict, capsys: pytest.CaptureFixture[str]
):
    snap = state["snaps"][0]
    out = tmp_path / "opened"
    argv = ["snapshot", "open", "--private-key", str(bank / PRIVATE_KEY_FILENAME)]
    argv += ["--state-dir", str(state["dir"]), "--uuid", snap.uuid, "--out", str(out)]

    assert run(argv) == 0

    assert sorted(p.name for p in out.iterdir()) == [f"{snap.uuid}-crop.jpg", f"{snap.uuid}.jpg"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    picture = np.asarray(Image.open(io.BytesIO((out / f"{snap.uuid}.jpg").read_bytes())))
    assert picture.shape == (240, 320, 3)
    assert abs(int(picture[10, 10, 0]) - 30) < 8 and abs(int(picture[120, 160, 0]) - 225) < 8
    assert stat.S_IMODE((out / f"{snap.uuid}.jpg").stat().st_mode) == 0o600
    assert f"{snap.uuid}.jpg" in capsys.readouterr().out

    # Opening again never overwrites evidence already on the bank's disk.
    assert run(argv) == journal_cmd.EX_CANTCREAT


def test_snapshot_open_by_session_opens_only_that_session(tmp_path: Path, bank: Path, state: dict):
    out = tmp_path / "opened"
    argv = ["snapshot", "open", "--private-key", str(bank / PRIVATE_KEY_FILENAME)]
    assert run([*argv, "--state-dir", str(state["dir"]), "--session", "s-1", "--out", str(out)]) == 0
    first, second, _other = state["snaps"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{first.uuid}.jpg", f"{first.uuid}-crop.jpg", f"{second.uuid}.jpg"]
    )


def test_snapshot_open_with_the_wrong_key_writes_nothing(
    tmp_path: Path, state: dict, capsys: pytest.CaptureFixture[str]
):
    assert run(["snapshot", "keygen", "--out-dir", str(tmp_path / "other")]) == 0
    out = tmp_path / "opened"
    argv = ["snapshot", "open", "--private-key", str(tmp_path / "other" / PRIVATE_KEY_FILENAME)]
    argv += ["--state-dir", str(state["dir"]), "--uuid", state["snaps"][1].uuid, "--out", str(out)]

    assert run(argv) == journal_cmd.EX_DATAERR
    assert "wrong private key" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_snapshot_open_reports_unknown_snapshots_and_missing_keys(
    tmp_path: Path, bank: Path, state: dict, capsys: pytest.CaptureFixture[str]
):
    argv = ["snapshot", "open", "--state-dir", str(state["dir"]), "--out", str(tmp_path / "o")]
    assert (
        run([*argv, "--private-key", str(bank / PRIVATE_KEY_FILENAME), "--uuid", "nope"])
        == journal_cmd.EX_NOINPUT
    )
    assert "no snapshot with uuid nope" in capsys.readouterr().err
    code = run([*argv, "--private-key", str(tmp_path / "absent.key"), "--uuid", "nope"])
    assert code == journal_cmd.EX_CONFIG
    assert "--private-key" in capsys.readouterr().err


def test_journal_verify_passes_an_intact_journal(state: dict, capsys: pytest.CaptureFixture[str]):
    assert run(["journal", "verify", "--state-dir", str(state["dir"])]) == 0
    assert "OK: 4 events (seq 1..4), 3 snapshots" in capsys.readouterr().out

    assert run(["journal", "verify", "--state-dir", str(state["dir"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["events_checked"] == 4 and report["problems"] == []


def test_journal_verify_exits_non_zero_and_names_the_broken_record(
    state: dict, capsys: pytest.CaptureFixture[str]
):
    conn = sqlite3.connect(state["dir"] / JOURNAL_FILENAME)
    with conn:
        conn.execute('UPDATE events SET payload = \'{"masked_pan":"000000******0000"}\' WHERE seq = 1')
    conn.close()

    assert run(["journal", "verify", "--state-dir", str(state["dir"])]) == journal_cmd.EX_DATAERR
    out = capsys.readouterr().out
    assert "seq 1: hash does not match its contents (altered)" in out and "BROKEN" in out


def test_journal_verify_without_a_journal(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert run(["journal", "verify", "--state-dir", str(tmp_path)]) == journal_cmd.EX_NOINPUT
    assert "no journal here" in capsys.readouterr().err
    assert not (tmp_path / JOURNAL_FILENAME).exists()  # verify never creates one


def test_journal_verify_finds_the_state_dir_in_the_config(tmp_path: Path, state: dict):
    config = tmp_path / "atmguard.toml"
    config.write_text(f'[paths]\nstate_dir = "{state["dir"]}"\n')
    assert run(["--config", str(config), "journal", "verify"]) == 0
    config.write_text("[paths]\nstate_dir = 5\n")
    assert run(["--config", str(config), "journal", "verify"]) == journal_cmd.EX_CONFIG


def test_journal_verify_shows_progress_on_stderr_for_large_journals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setattr(journal_cmd, "_PROGRESS_MIN_EVENTS", 50)
    with Journal(tmp_path / JOURNAL_FILENAME, atm_id="ATM-0042", fsync=False, reserve_bytes=0) as j:
        for i in range(1500):
            j.append_event("face_state", {"i": i})
    assert run(["journal", "verify", "--state-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "verify: 1500/1500 events" in captured.err
    assert "verify:" not in captured.out


def test_bare_group_commands_print_usage(capsys: pytest.CaptureFixture[str]):
    assert run(["journal"]) == journal_cmd.EX_USAGE
    assert run(["snapshot"]) == journal_cmd.EX_USAGE
    assert "verify" in capsys.readouterr().err
