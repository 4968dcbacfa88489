"""PinBuffer and PinEntry: the clear PIN stays in one wipeable buffer; outcomes carry lengths only."""

from __future__ import annotations

import copy
import pickle

import pytest

from atmguard.config import settings_from_mapping
from atmguard.hardware.keypad.base import KeyEvent
from atmguard.hardware.keypad.pinbuffer import (
    Cancelled,
    Cleared,
    DigitAdded,
    DigitIgnored,
    PinBuffer,
    PinBufferError,
    PinEntry,
    Submitted,
    TimedOut,
    TooShort,
)


def filled(pin: str, **kwargs: object) -> PinBuffer:
    buf = PinBuffer(**kwargs)  # type: ignore[arg-type]
    for d in pin:
        buf.append(d, now_s=0.0)
    return buf


def test_append_backspace_clear_and_masking():
    buf = filled("1234")
    assert len(buf) == 4 and buf.masked() == "****" and buf.is_complete
    assert buf.backspace() == 3 and buf.masked() == "***" and not buf.is_complete
    buf.clear()
    assert len(buf) == 0 and buf.masked() == ""
    assert buf.backspace() == 0


def test_refuses_non_digits_and_overflow_without_quoting_the_input():
    buf = filled("123456", max_digits=6)
    with pytest.raises(PinBufferError) as full:
        buf.append("7")
    assert "7" not in str(full.value).replace("6 digits", "")
    with pytest.raises(PinBufferError):
        PinBuffer().append("#")
    with pytest.raises(PinBufferError):
        PinBuffer().append("12")


def test_reveal_gives_readonly_ascii_view_then_wipes_and_releases():
    buf = filled("4711")
    with buf.reveal() as view:
        assert isinstance(view, memoryview) and view.readonly
        assert view.tobytes() == b"4711"
        kept = view
    with pytest.raises(ValueError):
        kept.tobytes()  # released: the verifier cannot keep a handle on the digits
    assert len(buf) == 0
    assert bytes(buf._digits) == bytes(len(buf._digits))  # overwritten, not just forgotten


def test_reveal_wipes_even_when_the_verifier_raises():
    buf = filled("4711")
    with pytest.raises(RuntimeError), buf.reveal():
        raise RuntimeError("verifier failed")
    assert len(buf) == 0 and not any(buf._digits)


def test_reveal_refuses_a_pin_of_the_wrong_length():
    with pytest.raises(PinBufferError), filled("12").reveal():
        pass


def test_wipe_and_backspace_overwrite_the_storage():
    buf = filled("98765")
    buf.backspace()
    assert buf._digits[4] == 0
    buf.wipe()
    assert not any(buf._digits) and len(buf) == 0 and not buf.expired(1e9)


def test_repr_and_str_do_not_depend_on_the_digits():
    a, b = filled("1357"), filled("2468")
    assert repr(a) == repr(b) == str(a) == "<PinBuffer 4 digit(s), 4-6 allowed>"


@pytest.mark.parametrize("attempt", [pickle.dumps, copy.copy, copy.deepcopy, bytes, list])
def test_cannot_be_pickled_copied_or_converted(attempt):
    with pytest.raises(TypeError):
        attempt(filled("1234"))


def test_inter_key_timeout():
    buf = PinBuffer(inter_key_timeout_s=5.0)
    assert not buf.expired(1e9)  # not started
    buf.touch(10.0)
    assert not buf.expired(14.9)
    assert buf.expired(15.0)
    buf.append("1", now_s=14.0)
    assert not buf.expired(18.9)


def test_from_settings_uses_keypad_section():
    settings = settings_from_mapping(
        {"keypad": {"pin_min_digits": 5, "pin_max_digits": 8, "inter_key_timeout_s": 3.0}}
    )
    buf = PinBuffer.from_settings(settings)
    assert (buf.min_digits, buf.max_digits, buf.inter_key_timeout_s) == (5, 8, 3.0)


# --- PinEntry -------------------------------------------------------------------------


def press(key: str, t: float) -> KeyEvent:
    return KeyEvent(key, True, t)


def run(entry: PinEntry, keys: str, *, t0: float = 0.0, step: float = 0.5) -> list[object]:
    outcomes = []
    for i, key in enumerate(keys):
        outcomes.append(entry.handle(press(key, t0 + (i + 1) * step)))
        outcomes.append(entry.handle(KeyEvent(key, False, t0 + (i + 1) * step + 0.1)))
    return [o for o in outcomes if o is not None]


def entry(**kwargs: object) -> PinEntry:
    e = PinEntry(PinBuffer(**kwargs))  # type: ignore[arg-type]
    e.start(0.0)
    return e


def test_submit_flow_keeps_digits_for_the_verifier():
    e = entry()
    assert run(e, "1234#") == [DigitAdded(1), DigitAdded(2), DigitAdded(3), DigitAdded(4), Submitted(4)]
    assert not e.active
    assert run(e, "5") == []  # finished: further keys are not added
    with e.buffer.reveal() as view:
        assert view.tobytes() == b"1234"


def test_star_clears_then_cancels():
    e = entry()
    assert run(e, "12*") == [DigitAdded(1), DigitAdded(2), Cleared(0)]
    assert e.active and len(e.buffer) == 0
    assert run(e, "9*", t0=5) == [DigitAdded(1), Cleared(0)]
    assert run(e, "*", t0=10) == [Cancelled(0)]
    assert not e.active


def test_enter_too_short_keeps_digits_and_entry_goes_on():
    e = entry(min_digits=4)
    assert run(e, "123#") == [DigitAdded(1), DigitAdded(2), DigitAdded(3), TooShort(3, 4)]
    assert e.active
    assert run(e, "4#", t0=5) == [DigitAdded(4), Submitted(4)]


def test_digits_beyond_max_are_ignored():
    e = entry(min_digits=4, max_digits=5)
    out = run(e, "1234567#")
    assert out[4:] == [DigitAdded(5), DigitIgnored(5), DigitIgnored(5), Submitted(5)]
    with e.buffer.reveal() as view:
        assert view.tobytes() == b"12345"


def test_timeout_wipes_and_a_late_key_does_not_revive_the_entry():
    e = entry(inter_key_timeout_s=2.0)
    run(e, "12", step=1.0)  # last key at t=2
    assert e.check_timeout(3.9) is None
    assert e.check_timeout(4.0) == TimedOut(2)
    assert not e.active and len(e.buffer) == 0 and not any(e.buffer._digits)
    e2 = entry(inter_key_timeout_s=2.0)
    run(e2, "12", step=1.0)
    assert e2.handle(press("3", 10.0)) == TimedOut(2)
    assert len(e2.buffer) == 0


def test_function_keys_and_releases_are_not_pin_operations():
    e = entry()
    assert e.handle(press("A", 1.0)) is None
    assert e.handle(KeyEvent("1", False, 1.0)) is None
    assert len(e.buffer) == 0


def test_outcomes_and_entry_repr_do_not_depend_on_the_digits():
    a, b = entry(), entry()
    out_a, out_b = run(a, "13579#"), run(b, "24680#")
    assert out_a == out_b
    assert [repr(o) for o in out_a] == [repr(o) for o in out_b]
    assert repr(a) == repr(b)
