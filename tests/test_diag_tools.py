"""The technician's hardware tools: `diag card` (reader emulator on a real pty, serial backend),
`diag keypad` (the real scanner on gpiozero mock pins wired as a key matrix), `diag camera --save`
(a PNG with the drawing), and their refusal while someone else holds the hardware.
"""

from __future__ import annotations

import io
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sim_support import write_toml

from atmguard.cli.main import main
from atmguard.diag.camera_picture import BAND_COLOUR, BAND_PX
from atmguard.diag.keypad_tool import run_keypad_test
from atmguard.hardware.card.emulator import CardReaderEmulator
from atmguard.hardware.card.testcards import TestCard, add_months, luhn_complete, valid_card
from atmguard.hardware.keypad.sim import SimKeypad
from atmguard.hardware.ownership import DAEMON_PURPOSE, HardwareLock
from atmguard.store.keys import generate_keypair

REPO = Path(__file__).resolve().parents[1]
GREEN = (0, 255, 0)
RIGHT_EYE = (255, 64, 64)
LEFT_EYE = (64, 128, 255)


def config_for(tmp_path: Path, scenes: Path, **overrides: dict[str, Any]) -> Path:
    keys = generate_keypair(tmp_path / "keys")
    sections: dict[str, dict[str, Any]] = {
        "paths": {"state_dir": str(tmp_path / "state"), "models_dir": str(REPO / "firmware_models")},
        "card_reader": {"backend": "sim"},
        "keypad": {"backend": "sim"},
        "actuator": {"backend": "sim"},
        "camera": {"backend": "sim"},
        "camera.sim": {"scene_dir": str(scenes), "initial_scene": "uncovered"},
        "display": {"backend": "recording"},
        "journal": {"bank_public_key_file": str(keys.public_key_file)},
        "central": {"enabled": False},
        "daemon": {"status_socket_path": ""},
    }
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    (tmp_path / "state").mkdir(exist_ok=True)
    return write_toml(tmp_path / "atmguard.toml", sections)


# --- diag card ---------------------------------------------------------------------------------------


def _run_in_thread(argv: list[str]) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(main(argv)), daemon=True)
    thread.start()
    return thread, result


def _wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "condition never became true"
        time.sleep(0.02)


def _card_session(emulator: CardReaderEmulator, config: Path, card: TestCard) -> int:
    thread, result = _run_in_thread(["--config", str(config), "diag", "card", "--timeout", "15"])
    _wait_until(lambda: emulator.entry_enabled)
    assert emulator.insert(card.track1, card.track2)
    _wait_until(lambda: emulator.card_state == "gate")  # read, reported and handed back
    emulator.take()
    thread.join(15)
    assert not thread.is_alive()
    return result[0]


def test_diag_card_shows_what_was_read_with_the_pan_masked(
    tmp_path: Path, scenes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = valid_card(today=date.today())
    pan = card.track2[1:].split("=")[0]
    with CardReaderEmulator() as emulator:
        reader = {"backend": "serial", "port": emulator.port, "poll_interval_s": 0.05}
        config = config_for(tmp_path, scenes, card_reader=reader)
        assert _card_session(emulator, config, card) == 0
    out = capsys.readouterr().out
    expiry = add_months(date.today(), 24)
    assert f"card:         {pan[:6]}******{pan[-4:]}" in out
    assert "tracks:       1+2" in out
    assert f"expiry:       {expiry.year:04d}-{expiry.month:02d} (valid)" in out
    assert "luhn:         ok" in out
    assert pan not in out and "TEST/CARDHOLDER" not in out


def test_diag_card_names_a_luhn_failure(
    tmp_path: Path, scenes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = luhn_complete("476173900")
    bad = good[:-1] + str((int(good[-1]) + 1) % 10)
    card = TestCard.build(bad, expiry=add_months(date.today(), 12))
    with CardReaderEmulator() as emulator:
        reader = {"backend": "serial", "port": emulator.port, "poll_interval_s": 0.05}
        config = config_for(tmp_path, scenes, card_reader=reader)
        assert _card_session(emulator, config, card) == 0
    out = capsys.readouterr().out
    assert "NOT usable: luhn" in out and bad not in out


# --- diag keypad -------------------------------------------------------------------------------------


def test_keypad_tool_shows_each_key_live_until_every_key_was_pressed() -> None:
    keypad = SimKeypad(layout="4x3", bounce_ms=1.0)
    out = io.StringIO()
    done: list[Any] = []
    tool = threading.Thread(target=lambda: done.append(run_keypad_test(keypad, duration_s=20, out=out)))
    tool.start()
    _wait_until(lambda: keypad.is_open)
    keypad.type_keys(keypad.keys, interval_s=0.12, hold_s=0.06)
    tool.join(10)
    assert not tool.is_alive(), out.getvalue()
    report = done[0]
    assert report.pressed == list("123456789*0#") and report.missing == []
    lines = out.getvalue().splitlines()
    assert "key 5 down" in lines and any(line.startswith("key 5 up (") for line in lines)
    assert lines[-1] == "every key works"
    assert not keypad.is_open  # the GPIO lines are released at the end


def test_diag_keypad_lists_the_keys_never_pressed(
    tmp_path: Path, scenes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_for(tmp_path, scenes)
    assert main(["--config", str(config), "diag", "keypad", "--duration", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "not pressed: 1 2 3 4 5 6 7 8 9 * 0 #" in out


# --- diag camera -------------------------------------------------------------------------------------


def test_diag_camera_saves_a_picture_with_faces_and_tracker_state(
    tmp_path: Path, scenes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_for(tmp_path, scenes, camera={"lores_size": [640, 360]})
    out_path = tmp_path / "aim.png"
    assert main(["--config", str(config), "diag", "camera", "--save", str(out_path)]) == 0
    printed = capsys.readouterr().out
    assert "tracker UNCOVERED" in printed and "faces 1" in printed and f"saved {out_path}" in printed

    with Image.open(out_path) as image:
        assert image.format == "PNG" and image.size == (640, 360 + BAND_PX)
        rgb = np.asarray(image.convert("RGB"))
    frame, band = rgb[:360], rgb[360:]
    green = np.all(frame == GREEN, axis=2)
    rows, cols = np.nonzero(green)
    # A face box: green lines enclosing a face-sized area near the middle of the frame.
    assert green.sum() > 200
    assert 60 < cols.max() - cols.min() < 400 and 60 < rows.max() - rows.min() < 330
    # Keypoints (draw_faces' colours): the right eye red, the left eye blue, both inside the box.
    for colour in (RIGHT_EYE, LEFT_EYE):
        eye_rows, eye_cols = np.nonzero(np.all(frame == colour, axis=2))
        assert eye_rows.size > 0, colour
        assert cols.min() < eye_cols.mean() < cols.max() and rows.min() < eye_rows.mean() < rows.max()
    # The band under the frame: dark, with light text on it.
    assert np.mean(np.all(band == BAND_COLOUR, axis=2)) > 0.8
    assert np.count_nonzero(band.min(axis=2) > 200) > 100  # text pixels (anti-aliased, near white)


def test_diag_camera_without_a_face_says_so(
    tmp_path: Path, scenes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_for(tmp_path, scenes, **{"camera.sim": {"initial_scene": "nobody"}})
    out_path = tmp_path / "empty.png"
    assert main(["--config", str(config), "diag", "camera", "--save", str(out_path)]) == 0
    assert "tracker NO_FACE  faces 0" in capsys.readouterr().out
    with Image.open(out_path) as image:
        frame = np.asarray(image.convert("RGB"))[: image.size[1] - BAND_PX]
    assert not np.any(np.all(frame == GREEN, axis=2))  # no box drawn where there is nobody


# --- refusal -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", [["camera", "--save", "x.png"], ["card", "--timeout", "1"], ["keypad"]])
def test_tools_refuse_while_the_daemon_owns_the_hardware(
    tmp_path: Path, scenes: Path, capsys: pytest.CaptureFixture[str], tool: list[str]
) -> None:
    config = config_for(tmp_path, scenes)
    argv = ["--config", str(config), "diag", *[str(tmp_path / a) if a == "x.png" else a for a in tool]]
    with HardwareLock(tmp_path / "state" / "hardware.lock", purpose=DAEMON_PURPOSE):
        assert main(argv) == 75
    err = capsys.readouterr().err
    assert "in use by atmguard run" in err and "systemctl stop atmguard" in err
    assert not (tmp_path / "x.png").exists()
