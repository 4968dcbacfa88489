from __future__ import annotations

import os
import pty

import pytest

from atmguard.config import settings_from_mapping
from atmguard.errors import DisplayError
from atmguard.hardware.display import Prompt, RecordingDisplay, TerminalDisplay, render
from atmguard.hardware.registry import build


def test_pin_is_shown_only_as_asterisks():
    assert render(Prompt.ENTER_PIN, pin_digits=4) == "Enter PIN: ****"
    assert render(Prompt.ENTER_PIN) == "Enter PIN: "
    with pytest.raises(ValueError):
        render(Prompt.ENTER_PIN, pin_digits=-1)


def test_recording_display_keeps_history_in_order():
    ticks = iter([1.0, 2.0, 3.0])
    with RecordingDisplay(clock=lambda: next(ticks)) as display:
        display.show(Prompt.INSERT_CARD)
        display.show(Prompt.ENTER_PIN, pin_digits=2)
        display.show(Prompt.CARD_RETAINED, detail="PIN tries exhausted")
    assert display.prompts() == [Prompt.INSERT_CARD, Prompt.ENTER_PIN, Prompt.CARD_RETAINED]
    assert [s.t_monotonic_s for s in display.history] == [1.0, 2.0, 3.0]
    assert display.current is not None
    assert display.current.text == "Card retained - contact your bank\nPIN tries exhausted"


def test_display_must_be_open():
    display = RecordingDisplay()
    with pytest.raises(DisplayError):
        display.show(Prompt.INSERT_CARD)
    display.open()
    display.close()
    display.close()  # idempotent
    with pytest.raises(DisplayError):
        display.show(Prompt.INSERT_CARD)
    with pytest.raises(DisplayError):
        display.open()


def test_terminal_display_writes_to_a_tty_with_clear_screen():
    controller, terminal = pty.openpty()
    try:
        with TerminalDisplay(device=os.ttyname(terminal)) as display:
            display.show(Prompt.REMOVE_COVERING)
        output = os.read(controller, 4096).decode()
    finally:
        os.close(controller)
        os.close(terminal)
    assert output.startswith("\x1b[2J\x1b[H")
    assert "[ATM] Please remove your face covering" in output


def test_terminal_display_to_stdout_has_no_escape_codes(capsys):
    with TerminalDisplay(device="-") as display:
        display.show(Prompt.INSERT_CARD)
    assert capsys.readouterr().out == "[ATM] Insert card\n"


def test_unopenable_device_is_a_display_error(tmp_path):
    with pytest.raises(DisplayError, match="cannot open display device"):
        TerminalDisplay(device=str(tmp_path / "no" / "tty")).open()


def test_registry_builds_the_configured_display():
    settings = settings_from_mapping({"display": {"backend": "recording"}})
    assert isinstance(build("display", settings), RecordingDisplay)


def _new_screen(link: str) -> tuple[int, int]:
    """A pty standing in for the screen, reached through ``link`` as udev's symlink would be."""
    controller, terminal = pty.openpty()
    tmp = link + ".new"
    os.symlink(os.ttyname(terminal), tmp)
    os.replace(tmp, link)
    return controller, terminal


def test_a_screen_that_hangs_up_fails_the_write_and_reopen_finds_it_plugged_back(tmp_path):
    link = str(tmp_path / "atm-display")
    old_controller, old_terminal = _new_screen(link)
    display = TerminalDisplay(device=link)
    display.open()
    display.show(Prompt.INSERT_CARD)
    assert "[ATM] Insert card" in os.read(old_controller, 4096).decode()

    os.close(old_controller)  # the screen is unplugged: its side of the line is gone
    os.close(old_terminal)
    with pytest.raises(DisplayError, match="cannot write to display"):
        display.show(Prompt.ENTER_PIN, pin_digits=1)
    with pytest.raises(DisplayError, match="cannot write to display"):
        display.show(Prompt.ENTER_PIN, pin_digits=1)  # and it stays so until reopened

    controller, terminal = _new_screen(link)
    try:
        display.reopen()
        assert display.is_open
        display.show(Prompt.OUT_OF_SERVICE)
        assert "[ATM] Out of service" in os.read(controller, 4096).decode()
        display.close()
        with pytest.raises(DisplayError, match="closed"):
            display.reopen()
    finally:
        os.close(controller)
        os.close(terminal)
