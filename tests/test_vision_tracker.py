"""The temporal face tracker: what the customer would see (when the ATM admits, refuses or asks to
face the camera), and property tests that no sequence of frames breaks the hysteresis rules."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atmguard.vision.tracker import (
    DEFAULT_COVER_FRAMES,
    DEFAULT_NO_FACE_FRAMES,
    DEFAULT_UNCOVER_FRAMES,
    DEFAULT_WINDOW_FRAMES,
    FaceState,
    FaceTracker,
    TrackedState,
    Vote,
    vote_for,
)

FPS = 15.0
UNCOVERED, COVERED, NONE = 0.05, 0.95, None  # per-frame classifier outputs


@dataclass(frozen=True)
class Obs:
    t_monotonic_s: float
    covered_probability: float | None
    face_count: int = 1


def feed(tracker: FaceTracker, probabilities: list[float | None], *, t0: float = 0.0) -> list[TrackedState]:
    out = []
    for i, p in enumerate(probabilities):
        out.append(tracker.update(Obs(t0 + i / FPS, p, 0 if p is None else 1)))
    return out


def states(results: list[TrackedState]) -> list[FaceState]:
    return [r.state for r in results]


# --- behaviour a customer notices -----------------------------------------------------------------


def test_uncovered_customer_is_admitted_after_exactly_uncover_frames():
    results = feed(FaceTracker(), [UNCOVERED] * 12)
    first = states(results).index(FaceState.UNCOVERED)
    assert first == DEFAULT_UNCOVER_FRAMES - 1
    assert all(s is FaceState.NO_FACE for s in states(results)[:first])  # no "remove covering" flash
    assert all(s is FaceState.UNCOVERED for s in states(results)[first:])
    assert results[first].changed and not results[first + 1].changed


def test_lucky_uncovered_frames_never_admit_a_covered_face():
    tracker = FaceTracker()
    # A masked customer whose every other frame or so fools the classifier: still fewer than 7 of 10.
    pattern = [COVERED, UNCOVERED, COVERED, UNCOVERED, UNCOVERED, COVERED] * 20
    results = feed(tracker, pattern)
    assert FaceState.UNCOVERED not in states(results)
    assert results[-1].state is FaceState.COVERED


def test_putting_on_a_mask_refuses_within_cover_frames_but_one_bad_frame_does_not():
    c = DEFAULT_COVER_FRAMES
    tracker = FaceTracker()
    feed(tracker, [UNCOVERED] * 10)
    assert tracker.state is FaceState.UNCOVERED
    one_bad = feed(tracker, [COVERED] + [UNCOVERED] * 10, t0=10 / FPS)
    assert states(one_bad) == [FaceState.UNCOVERED] * 11  # one bad frame does not flicker the prompt
    masked = feed(tracker, [COVERED] * c, t0=21 / FPS)
    assert states(masked) == [FaceState.UNCOVERED] * (c - 1) + [FaceState.COVERED]
    # covered frames spread over the window refuse too: security bias
    tracker.reset()
    feed(tracker, [UNCOVERED] * 10)
    spaced = feed(tracker, ([COVERED] + [UNCOVERED] * 2) * (c - 1) + [COVERED], t0=10 / FPS)
    assert states(spaced) == [FaceState.UNCOVERED] * (len(spaced) - 1) + [FaceState.COVERED]


def test_removing_the_mask_is_admitted_only_after_the_covered_frames_leave_the_window():
    tracker = FaceTracker()
    feed(tracker, [COVERED] * 10)
    assert tracker.state is FaceState.COVERED
    results = feed(tracker, [UNCOVERED] * 12, t0=10 / FPS)
    # covered votes must drop below cover_frames (8 frames push 8 of 10 out) and 7 uncovered be seen
    first = states(results).index(FaceState.UNCOVERED)
    assert first + 1 == max(DEFAULT_WINDOW_FRAMES - DEFAULT_COVER_FRAMES + 1, DEFAULT_UNCOVER_FRAMES)
    assert set(states(results)[:first]) == {FaceState.COVERED}


def test_a_missed_frame_keeps_the_state_and_a_walk_away_goes_to_no_face():
    tracker = FaceTracker()
    feed(tracker, [UNCOVERED] * 10)
    assert states(feed(tracker, [NONE, UNCOVERED], t0=10 / FPS)) == [FaceState.UNCOVERED] * 2
    away = feed(tracker, [NONE] * DEFAULT_NO_FACE_FRAMES, t0=12 / FPS)
    # uncovered evidence fades first (4 non-uncovered of 10), then the no-face rule holds it
    assert away[-1].state is FaceState.NO_FACE
    assert FaceState.COVERED not in states(away)


def test_a_covered_customer_whose_face_is_missed_now_and_then_stays_refused():
    tracker = FaceTracker()
    # masked faces are often missed by the detector: 3 of every 8 frames judged here
    pattern = [COVERED, NONE, NONE, COVERED, NONE, COVERED, NONE, NONE] * 5
    results = feed(tracker, pattern)
    assert states(results)[:5] == [FaceState.NO_FACE] * 5  # one or two covered frames are not yet a verdict
    assert states(results)[5:] == [FaceState.COVERED] * (len(pattern) - 5)


def test_stale_gap_resets_to_no_face_and_admission_must_be_earned_again():
    tracker = FaceTracker(stale_after_s=1.0)
    feed(tracker, [UNCOVERED] * 10)
    after = tracker.update(Obs(10 / FPS + 1.5, UNCOVERED))
    assert after.reset and after.previous is FaceState.UNCOVERED and after.changed
    assert after.state is FaceState.NO_FACE and after.window_votes == 1
    results = feed(tracker, [UNCOVERED] * 10, t0=10 / FPS + 1.5 + 1 / FPS)
    assert states(results).index(FaceState.UNCOVERED) == DEFAULT_UNCOVER_FRAMES - 2


def test_time_going_backwards_resets():
    tracker = FaceTracker()
    feed(tracker, [UNCOVERED] * 10, t0=100.0)
    back = tracker.update(Obs(50.0, UNCOVERED))
    assert back.reset and back.state is FaceState.NO_FACE


def test_a_face_too_small_to_judge_counts_as_no_face():
    tracker = FaceTracker()
    feed(tracker, [UNCOVERED] * 10)
    # the pipeline reports a face it cannot judge as face_count >= 1 with probability None
    results = [tracker.update(Obs(1.0 + i / FPS, None, 1)) for i in range(DEFAULT_NO_FACE_FRAMES)]
    assert results[0].vote is Vote.NONE
    assert results[-1].state is FaceState.NO_FACE


def test_nan_probability_fails_closed():
    assert vote_for(math.nan, covered_threshold=0.5) is Vote.COVERED
    assert vote_for(0.5, covered_threshold=0.5) is Vote.COVERED
    assert vote_for(0.4999, covered_threshold=0.5) is Vote.UNCOVERED
    tracker = FaceTracker()
    feed(tracker, [UNCOVERED] * 10)
    feed(tracker, [math.nan] * DEFAULT_COVER_FRAMES, t0=1.0)
    assert tracker.state is FaceState.COVERED


def test_smoothed_face_count_ignores_one_spurious_face_but_sees_a_shoulder_surfer():
    tracker = FaceTracker(face_count_frames=3)
    counts = [1, 1, 1, 2] + [1] * 10
    results = [tracker.update(Obs(i / FPS, UNCOVERED, n)) for i, n in enumerate(counts)]
    assert [r.face_count for r in results[:2]] == [0, 0]  # not enough frames yet to say
    assert max(r.face_count for r in results) == 1
    surfer = [tracker.update(Obs(1.0 + i / FPS, UNCOVERED, 2)) for i in range(3)]
    assert [r.face_count for r in surfer] == [1, 1, 2]


def test_reported_probability_is_the_window_median():
    tracker = FaceTracker()
    results = feed(tracker, [0.1, 0.9, 0.2, NONE, 0.3])
    assert results[-1].covered_probability == pytest.approx(0.25)
    assert feed(FaceTracker(), [NONE])[0].covered_probability is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"uncover_frames": 1},  # one lucky frame would admit
        {"window_frames": 8, "uncover_frames": 8},  # one bad frame would drop UNCOVERED
        {"cover_frames": 1},  # one bad frame would refuse
        {"no_face_frames": 1},  # one missed frame would flicker to NO_FACE
        {"covered_threshold": 0.0},
        {"covered_threshold": 1.0},
        {"stale_after_s": 0},
        {"window_frames": True},
    ],
)
def test_rejects_settings_that_break_the_guarantees(kwargs):
    with pytest.raises(ValueError):
        FaceTracker(**kwargs)


# --- properties ------------------------------------------------------------------------------------

params = st.integers(3, 12).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.integers(2, n - 1),
        st.integers(2, n),
        st.integers(2, 6),
        st.sampled_from([0.3, 0.5, 0.7]),
    )
)
step = st.tuples(
    st.sampled_from([1 / 15, 1 / 15, 1 / 15, 0.2, 0.0, 1.5, -0.5]),  # mostly regular, some stalls/jumps
    st.one_of(st.none(), st.floats(0.0, 1.0), st.just(math.nan)),
    st.integers(0, 3),
)


def _run(p: tuple[int, int, int, int, float], steps: list[tuple[float, float | None, int]]):
    n, k, c, m, threshold = p
    tracker = FaceTracker(
        threshold, window_frames=n, uncover_frames=k, cover_frames=c, no_face_frames=m, stale_after_s=1.0
    )
    t = 0.0
    history: list[Vote] = []  # votes since the last reset, computed here independently
    for dt, prob, faces in steps:
        t_prev, t = t, t + dt
        if history and not 0.0 <= t - t_prev <= 1.0:
            history = []
        if prob is None:
            expected_vote = Vote.NONE
        else:
            expected_vote = Vote.COVERED if math.isnan(prob) or prob >= threshold else Vote.UNCOVERED
        history.append(expected_vote)
        result = tracker.update(Obs(t, prob, faces if prob is None else max(1, faces)))
        window = history[-n:]
        none_run = len(history) - max((i + 1 for i, v in enumerate(history) if v is not Vote.NONE), default=0)
        yield result, window, none_run


@settings(max_examples=300, deadline=None)
@given(params, st.lists(step, max_size=80))
def test_fewer_than_k_uncovered_of_the_last_n_never_yields_uncovered(p, steps):
    _, k, c, m, _ = p
    for result, window, none_run in _run(p, steps):
        assert result.uncovered_votes == window.count(Vote.UNCOVERED)
        assert result.covered_votes == window.count(Vote.COVERED)
        if result.state is FaceState.UNCOVERED:
            assert window.count(Vote.UNCOVERED) >= k
            assert window.count(Vote.COVERED) < c
            assert none_run < m


@settings(max_examples=300, deadline=None)
@given(params, st.lists(step, max_size=80))
def test_state_changes_only_per_the_rules(p, steps):
    _, k, c, m, _ = p
    for result, window, none_run in _run(p, steps):
        before = FaceState.NO_FACE if result.reset else result.previous
        u, cv = window.count(Vote.UNCOVERED), window.count(Vote.COVERED)
        if none_run >= m:
            expected = FaceState.NO_FACE
        elif cv >= c:
            expected = FaceState.COVERED
        elif u >= k and (before is FaceState.UNCOVERED or result.vote is Vote.UNCOVERED):
            expected = FaceState.UNCOVERED
        elif before is FaceState.UNCOVERED:
            expected = FaceState.NO_FACE
        else:
            expected = before
        assert result.state is expected
        # the guarantees the rules exist for
        if before is not FaceState.UNCOVERED and result.state is FaceState.UNCOVERED:
            assert result.vote is Vote.UNCOVERED  # admitted only on a frame that itself shows the face
        if before is FaceState.COVERED and result.state is FaceState.NO_FACE:
            assert none_run >= m
        if before is FaceState.NO_FACE and result.state is FaceState.COVERED:
            assert cv >= c


@settings(max_examples=200, deadline=None)
@given(
    params,
    st.lists(step, max_size=60),
    st.sampled_from([None, UNCOVERED, COVERED]),
    st.lists(step, max_size=20),
)
def test_one_bad_frame_never_drops_a_confirmed_uncovered_state(p, prefix, bad, suffix):
    n, *_ = p
    tracker = FaceTracker(p[4], window_frames=n, uncover_frames=p[1], cover_frames=p[2], no_face_frames=p[3])
    t = 0.0
    for dt, prob, _faces in prefix:  # arbitrary history, then a fully confirmed uncovered window
        t += abs(dt) if abs(dt) <= 1.0 else 0.5
        tracker.update(Obs(t, prob))
    for _ in range(n):
        t += 1 / FPS
        tracker.update(Obs(t, 0.0))
    assert tracker.state is FaceState.UNCOVERED
    t += 1 / FPS
    assert tracker.update(Obs(t, 1.0 if bad == COVERED else bad)).state is FaceState.UNCOVERED


@settings(max_examples=100, deadline=None)
@given(params, st.lists(step, max_size=60))
def test_deterministic(p, steps):
    first = [r for r, _, _ in _run(p, steps)]
    second = [r for r, _, _ in _run(p, steps)]
    assert [(r.state, r.face_count, r.reset) for r in first] == [
        (r.state, r.face_count, r.reset) for r in second
    ]
