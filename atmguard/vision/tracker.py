"""Temporal face tracker: per-frame observations -> a stable NO_FACE / COVERED / UNCOVERED state.

One frame is never trusted on its own. Each observation casts one vote (NONE, COVERED or
UNCOVERED) into a window of the last ``window_frames`` votes, and the state follows these rules,
checked in this order after every vote:

1. the last ``no_face_frames`` votes were all NONE                        -> NO_FACE
2. at least ``cover_frames`` COVERED votes in the window                  -> COVERED
3. at least ``uncover_frames`` UNCOVERED votes in the window, and either
   the state already is UNCOVERED or this very vote is UNCOVERED         -> UNCOVERED
4. the state was UNCOVERED (its evidence faded, no covered evidence)      -> NO_FACE
5. otherwise                                                              -> unchanged

So admitting a face takes ``uncover_frames`` uncovered frames (a lucky frame, or a few, cannot
admit a covered face), while refusing it takes only ``cover_frames`` covered ones (security bias);
neither a single covered frame nor a single missed frame moves an UNCOVERED state (the
constructor enforces ``cover_frames >= 2``, ``no_face_frames >= 2`` and
``uncover_frames < window_frames``). Rule 4 fails closed without claiming a covering that was not
seen: a customer who turns away is asked to face the camera, not to remove a mask.

Votes: an observation without a judgeable face (none detected, or the primary face too small,
which the pipeline reports as ``covered_probability is None``) is NONE; a probability at or above
``covered_threshold`` (or NaN: fail closed) is COVERED; below it UNCOVERED.

Time comes only from the observations (``t_monotonic_s``), never from a clock: the tracker is
pure and deterministic. A gap longer than ``stale_after_s`` (camera stall, dropped frames) or a
timestamp going backwards empties the window and restarts from NO_FACE, because votes from before
the gap say nothing about who stands there now.

How the defaults were chosen (``atmguard model eval`` on the classifier's validation split of
faces-covered, 443 covered / 1092 uncovered images, one image = one frame, threshold 0.3): a
covered face is judged uncovered on 0.23% of frames (0.32% of those with a judged face), an
uncovered one judged covered on 0.46%, and 1.2% of uncovered frames show no judgeable face. If
frames erred independently, 7 of 10 would admit a covered face with probability ~4e-17 per window,
and 3 covered votes among 10 would refuse an uncovered customer with ~1e-5 per window (2 votes:
9e-4, i.e. ~0.4 false "remove your covering" prompts in a 30 s session at 15 fps; hence 3, which
still refuses within 0.2 s). Frames of one person are not independent: the window stops sporadic
errors, not a covering the classifier misjudges on every frame (that is the classifier's error
rate, per customer). The window (0.67 s) and the no-face run (0.33 s) are short enough that a
customer does not wait, long enough to ride over a blink of the detector.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Self

from atmguard.vision.covering import DEFAULT_COVERED_THRESHOLD

if TYPE_CHECKING:
    from atmguard.config import Settings

DEFAULT_WINDOW_FRAMES = 10
"""Votes remembered: 0.67 s at the camera's default 15 fps."""
DEFAULT_UNCOVER_FRAMES = 7
"""UNCOVERED votes in the window needed to admit a face (0.47 s of frames at 15 fps)."""
DEFAULT_COVER_FRAMES = 3
"""COVERED votes in the window that refuse a face: fast (0.2 s at 15 fps), but not on one bad frame."""
DEFAULT_NO_FACE_FRAMES = 5
"""Consecutive frames without a judgeable face before the state becomes NO_FACE (0.33 s)."""
DEFAULT_FACE_COUNT_FRAMES = 3
"""Frames in the window that must show at least n faces for the smoothed face count to be n."""
DEFAULT_STALE_AFTER_S = 1.0
"""A longer gap between observations resets the tracker to NO_FACE."""


class FaceState(enum.Enum):
    """What the session may rely on. Only UNCOVERED lets a transaction proceed."""

    NO_FACE = "no_face"
    COVERED = "covered"
    UNCOVERED = "uncovered"


class Vote(enum.Enum):
    """One frame's verdict on the primary face."""

    NONE = "none"
    COVERED = "covered"
    UNCOVERED = "uncovered"


class Observation(Protocol):
    """What the tracker needs from a frame; :class:`~atmguard.vision.pipeline.FaceObservation` has it."""

    @property
    def t_monotonic_s(self) -> float: ...

    @property
    def face_count(self) -> int: ...

    @property
    def covered_probability(self) -> float | None:
        """The primary face's covering probability; None when there is no face that can be judged."""
        ...


@dataclass(frozen=True)
class TrackedState:
    """The tracker's answer after one observation."""

    state: FaceState
    previous: FaceState
    vote: Vote
    t_monotonic_s: float
    face_count: int
    """Smoothed: the largest n seen in at least ``face_count_frames`` frames of the window."""
    uncovered_votes: int
    covered_votes: int
    window_votes: int
    """Votes in the window (fewer than ``window_frames`` right after a start or reset)."""
    covered_probability: float | None
    """Median of the window's probabilities (None without any judged frame), for display and logs."""
    reset: bool
    """The window was emptied before this observation (stale gap or time going backwards); the
    state was NO_FACE before this vote was counted, ``previous`` is the state before the gap."""

    @property
    def changed(self) -> bool:
        return self.state is not self.previous


def vote_for(covered_probability: float | None, *, covered_threshold: float) -> Vote:
    """One frame's vote: NONE without a judgeable face, COVERED at/above the threshold or NaN."""
    if covered_probability is None:
        return Vote.NONE
    p = float(covered_probability)
    if math.isnan(p) or p >= covered_threshold:
        return Vote.COVERED
    return Vote.UNCOVERED


def _check_int(name: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return value


class FaceTracker:
    """Hysteresis over the last N frames; see the module docstring for the exact rules.

    Not thread-safe on purpose: one vision loop feeds it, and its output goes on the event queue.
    """

    def __init__(
        self,
        covered_threshold: float = DEFAULT_COVERED_THRESHOLD,
        *,
        window_frames: int = DEFAULT_WINDOW_FRAMES,
        uncover_frames: int = DEFAULT_UNCOVER_FRAMES,
        cover_frames: int = DEFAULT_COVER_FRAMES,
        no_face_frames: int = DEFAULT_NO_FACE_FRAMES,
        face_count_frames: int = DEFAULT_FACE_COUNT_FRAMES,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
    ) -> None:
        if not (isinstance(covered_threshold, int | float) and 0.0 < covered_threshold < 1.0):
            raise ValueError(f"covered_threshold must be in (0, 1), got {covered_threshold!r}")
        if not (
            isinstance(stale_after_s, int | float) and math.isfinite(stale_after_s) and stale_after_s > 0
        ):
            raise ValueError(f"stale_after_s must be a positive number of seconds, got {stale_after_s!r}")
        self.window_frames = _check_int("window_frames", window_frames, 3, 256)
        # < window: a single non-uncovered frame must not drop a fully confirmed UNCOVERED state.
        self.uncover_frames = _check_int("uncover_frames", uncover_frames, 2, window_frames - 1)
        self.cover_frames = _check_int("cover_frames", cover_frames, 2, window_frames)
        self.no_face_frames = _check_int("no_face_frames", no_face_frames, 2, 1000)
        self.face_count_frames = _check_int("face_count_frames", face_count_frames, 1, window_frames)
        self.covered_threshold = float(covered_threshold)
        self.stale_after_s = float(stale_after_s)
        self._votes: deque[Vote] = deque(maxlen=window_frames)
        self._face_counts: deque[int] = deque(maxlen=window_frames)
        self._probabilities: deque[float | None] = deque(maxlen=window_frames)
        self._none_run = 0
        self._state = FaceState.NO_FACE
        self._last_t: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        vision = settings.vision
        return cls(
            vision.covered_threshold,
            window_frames=vision.tracker_window_frames,
            uncover_frames=vision.tracker_uncover_frames,
            cover_frames=vision.tracker_cover_frames,
            no_face_frames=vision.tracker_no_face_frames,
            face_count_frames=vision.tracker_face_count_frames,
            stale_after_s=vision.tracker_stale_after_s,
        )

    @property
    def state(self) -> FaceState:
        return self._state

    def reset(self) -> None:
        """Forget every vote and go back to NO_FACE (e.g. at the start of a session)."""
        self._votes.clear()
        self._face_counts.clear()
        self._probabilities.clear()
        self._none_run = 0
        self._state = FaceState.NO_FACE
        self._last_t = None

    def update(self, observation: Observation) -> TrackedState:
        """Add one frame's observation; return the new state."""
        t = float(observation.t_monotonic_s)
        if not math.isfinite(t):
            raise ValueError(f"observation t_monotonic_s must be finite, got {t!r}")
        previous = self._state
        reset = self._last_t is not None and not 0.0 <= t - self._last_t <= self.stale_after_s
        if reset:
            self.reset()
        self._last_t = t

        vote = vote_for(observation.covered_probability, covered_threshold=self.covered_threshold)
        self._votes.append(vote)
        self._face_counts.append(max(0, int(observation.face_count)))
        p = observation.covered_probability
        self._probabilities.append(None if p is None or math.isnan(p) else float(p))
        self._none_run = self._none_run + 1 if vote is Vote.NONE else 0

        uncovered = sum(1 for v in self._votes if v is Vote.UNCOVERED)
        covered = sum(1 for v in self._votes if v is Vote.COVERED)
        self._state = self._next_state(self._state, vote, uncovered=uncovered, covered=covered)
        judged = [q for q in self._probabilities if q is not None]
        return TrackedState(
            state=self._state,
            previous=previous,
            vote=vote,
            t_monotonic_s=t,
            face_count=self._smoothed_face_count(),
            uncovered_votes=uncovered,
            covered_votes=covered,
            window_votes=len(self._votes),
            covered_probability=statistics.median(judged) if judged else None,
            reset=reset,
        )

    def _next_state(self, state: FaceState, vote: Vote, *, uncovered: int, covered: int) -> FaceState:
        if self._none_run >= self.no_face_frames:
            return FaceState.NO_FACE
        if covered >= self.cover_frames:
            return FaceState.COVERED
        if uncovered >= self.uncover_frames and (state is FaceState.UNCOVERED or vote is Vote.UNCOVERED):
            return FaceState.UNCOVERED
        if state is FaceState.UNCOVERED:
            return FaceState.NO_FACE
        return state

    def _smoothed_face_count(self) -> int:
        # The face_count_frames-th largest count: one spurious extra detection does not count as a
        # second person, but a shoulder surfer seen in a few frames of the window does.
        counts = sorted(self._face_counts, reverse=True)
        if len(counts) < self.face_count_frames:
            return 0
        return counts[self.face_count_frames - 1]
