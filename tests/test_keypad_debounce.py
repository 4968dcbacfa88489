"""MatrixDebouncer: time-based debounce and the ghosting guard, on a fake clock (no threads)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atmguard.hardware.keypad.base import LAYOUTS
from atmguard.hardware.keypad.debounce import MatrixDebouncer

ROWS = LAYOUTS["4x3"]
POS = {key: (r, c) for r, row in enumerate(ROWS) for c, key in enumerate(row)}
PERIOD_S = 0.01  # 100 Hz


def masks(*keys: str) -> list[int]:
    out = [0] * len(ROWS)
    for key in keys:
        r, c = POS[key]
        out[r] |= 1 << c
    return out


def feed(
    deb: MatrixDebouncer, frames: list[tuple[str, ...]], *, t0: float = 100.0
) -> list[tuple[str, bool, float]]:
    events = []
    for i, held in enumerate(frames):
        events += [
            (e.key, e.pressed, round(e.t_monotonic_s - t0, 6))
            for e in deb.update(masks(*held), t0 + i * PERIOD_S)
        ]
    return events


def test_press_reported_after_debounce_and_stamped_when_first_seen():
    deb = MatrixDebouncer(ROWS, debounce_s=0.03)
    frames = [()] * 2 + [("5",)] * 3
    assert feed(deb, frames) == []  # seen at 20 ms, only 20 ms stable by the last frame
    assert [(e.key, e.pressed) for e in deb.update(masks("5"), 100.05)] == [("5", True)]
    deb2 = MatrixDebouncer(ROWS, debounce_s=0.03)
    events = feed(deb2, [()] * 2 + [("5",)] * 5)
    assert events == [("5", True, 0.02)]


def test_release_is_debounced_too():
    deb = MatrixDebouncer(ROWS, debounce_s=0.03)
    events = feed(deb, [("8",)] * 5 + [()] * 2 + [("8",)] + [()] * 5)
    # the 20 ms gap is chatter, the final release is real and stamped at its first frame (80 ms)
    assert events == [("8", True, 0.0), ("8", False, 0.08)]


def test_zero_debounce_reports_immediately():
    deb = MatrixDebouncer(ROWS, debounce_s=0.0)
    assert feed(deb, [(), ("#",), ()]) == [("#", True, 0.01), ("#", False, 0.02)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=2), min_size=1, max_size=30))
def test_chatter_shorter_than_debounce_is_never_reported(runs: list[int]):
    # alternating closed/open runs of 1-2 frames (10-20 ms) against a 30 ms debounce
    deb = MatrixDebouncer(ROWS, debounce_s=0.03)
    frames: list[tuple[str, ...]] = [()]
    closed = True
    for n in runs:
        frames += [("0",) if closed else ()] * n
        closed = not closed
    frames += [()] * 10
    assert feed(deb, frames) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["", "1", "5", "1,5", "9", "*", "#"]), min_size=1, max_size=60))
def test_events_alternate_and_end_released(script: list[str]):
    deb = MatrixDebouncer(ROWS, debounce_s=0.02)
    frames = [tuple(k for k in s.split(",") if k) for s in script] + [()] * 5
    held: set[str] = set()
    for key, pressed, _ in feed(deb, frames):
        assert (key in held) != pressed  # never two presses (or releases) in a row
        (held.add if pressed else held.discard)(key)
    assert held == set() and deb.pressed_count == 0


def test_two_keys_in_one_row_are_both_reported():
    deb = MatrixDebouncer(ROWS, debounce_s=0.02)
    events = feed(deb, [("4",)] * 4 + [("4", "6")] * 4 + [("6",)] * 4 + [()] * 4)
    assert [(k, p) for k, p, _ in events] == [("4", True), ("6", True), ("4", False), ("6", False)]


def test_ghost_fourth_corner_is_never_invented():
    # 1, 2 and 4 held: on a diode-less matrix 5 reads closed too (row 1 - col 1 - row 0 - col 1).
    deb = MatrixDebouncer(ROWS, debounce_s=0.02)
    frames = [("1",)] * 4 + [("1", "2")] * 4 + [("1", "2", "4", "5")] * 10 + [("2",)] * 4 + [()] * 4
    events = feed(deb, frames)
    assert "5" not in {k for k, _, _ in events}
    # 4 is real but indistinguishable from 5 while the rectangle stands: never reported here
    assert [(k, p) for k, p, _ in events] == [("1", True), ("2", True), ("1", False), ("2", False)]
    assert deb.ambiguous_scans == 10


def test_rectangle_breaking_up_lets_the_real_third_key_through():
    deb = MatrixDebouncer(ROWS, debounce_s=0.02)
    frames = [("1", "2")] * 4 + [("1", "2", "4", "5")] * 5 + [("2", "4")] * 4
    events = [(k, p) for k, p, _ in feed(deb, frames)]
    assert events == [("1", True), ("2", True), ("1", False), ("4", True)]


def test_ambiguous_keys_keep_their_state_and_restart_pending_changes():
    deb = MatrixDebouncer(ROWS, debounce_s=0.02)
    # 5 starts to be pressed, then a rectangle appears before its debounce completes
    frames = [("5",)] * 2 + [("1", "2", "4", "5")] * 3 + [("5",)] * 2
    events = feed(deb, frames)
    assert events == []  # the 20 ms wait restarted when the rectangle cleared (at 50 ms)
    assert deb.update(masks("5"), 100.0 + 6.9 * PERIOD_S) == []
    assert [e.key for e in deb.update(masks("5"), 100.0 + 7.1 * PERIOD_S)] == ["5"]


def test_repr_shows_counts_only():
    one = MatrixDebouncer(ROWS, debounce_s=0.0)
    two = MatrixDebouncer(ROWS, debounce_s=0.0)
    one.update(masks("1"), 1.0)
    two.update(masks("7"), 1.0)
    assert repr(one) == repr(two) == "<MatrixDebouncer 4x3 pressed=1>"


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        MatrixDebouncer(ROWS, debounce_s=-1)
    with pytest.raises(ValueError):
        MatrixDebouncer(("123", "45"), debounce_s=0)
