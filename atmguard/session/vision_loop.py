"""The vision thread: camera -> detector + covering classifier -> tracker -> session events.

One thread owns the camera, the models and the tracker, so none of them needs a lock. It runs at
``daemon.idle_fps`` with nobody in a session and at ``camera.fps`` during one, reports the tracker's
stable state to the controller only when it changes, and takes the sealed evidence snapshots
between frames (the camera's full-resolution stream is only ever touched from this thread).

Faults are reported, never swallowed: no frame for ``session.camera_timeout_s`` raises a CAMERA
fault, a model that throws raises a VISION fault; both clear by themselves once frames (or
inferences) succeed again, which is how the ATM comes back into service without a technician.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from atmguard.errors import CameraError
from atmguard.hardware.camera.base import Camera, Frame
from atmguard.session.events import (
    Component,
    Event,
    FaceChanged,
    FaceVerified,
    FaultCleared,
    FaultRaised,
    IdentityVerdict,
    SnapshotFailed,
    SnapshotKind,
    SnapshotStored,
)
from atmguard.store.journal import Journal
from atmguard.store.snapshots import SnapshotSealer, seal_and_store
from atmguard.vision.detector import Face
from atmguard.vision.pipeline import FaceObservation, VisionPipeline
from atmguard.vision.tracker import FaceState, FaceTracker

if TYPE_CHECKING:
    from atmguard.session.identity import IdentityVerifier
    from atmguard.vision.embedder import FaceTemplate

logger = logging.getLogger(__name__)

FPS_WINDOW_FRAMES = 32
"""Recent frames the camera's measured rate is computed over (status socket, ``atmguard status``)."""
REOPEN_BACKOFF_S = 0.5
"""Pause between attempts to reopen a camera that failed, so a dead sensor does not spin a core."""
MAIN_CAPTURE_TIMEOUT_S = 1.0
_NOT_A_NAME = re.compile(r"[^a-z0-9_]+")


@dataclass(frozen=True, slots=True)
class VisionHealth:
    """A snapshot of the loop's health figures, safe to take from any thread."""

    heartbeat_age_s: float
    """Since the loop last started a round (it goes round at least once per camera timeout)."""
    last_frame_age_s: float | None
    """Since the last frame arrived; None before the first one."""
    camera_fps: float | None
    """The sensor's rate, from the sequence numbers and exposure times of recent frames (the loop
    reads only some of them while idle); None until two frames of one streaming run arrived."""
    analysed_fps: float | None
    """Frames the loop actually analysed per second, over the same recent frames."""
    faults: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    kind: SnapshotKind
    reason: str
    session_id: str | None


def snapshot_reason(kind: SnapshotKind, detail: str) -> str:
    """The journal's snapshot reason: ``<kind>`` or ``<kind>_<detail>`` as a [a-z0-9_] name."""
    cleaned = _NOT_A_NAME.sub("_", detail.lower()).strip("_")
    return f"{kind.value}_{cleaned}"[:64] if cleaned else kind.value


def scale_face(face: Face, *, sx: float, sy: float) -> Face:
    """The same face in another stream's pixels (lores -> main: same field of view, other size)."""
    x0, y0, x1, y1 = face.box
    keypoints = np.asarray(face.keypoints, dtype=np.float32) * np.array([sx, sy], dtype=np.float32)
    return Face(box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy), keypoints=keypoints, score=face.score)


class VisionLoop:
    """Runs the camera and the vision stack on its own thread and reports to ``emit``."""

    def __init__(
        self,
        camera: Camera,
        pipeline: VisionPipeline,
        tracker: FaceTracker,
        *,
        emit: Callable[[Event], None],
        journal: Journal,
        sealer: SnapshotSealer,
        jpeg_quality: int,
        idle_fps: float,
        active_fps: float,
        camera_timeout_s: float,
        identity: IdentityVerifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._camera = camera
        self._identity = identity
        # (session id, templates) to verify, or None to cancel; applied on the loop's thread.
        self._identity_requests: queue.SimpleQueue[tuple[str, list[FaceTemplate]] | None] = (
            queue.SimpleQueue()
        )
        self._pipeline = pipeline
        self._tracker = tracker
        self._emit = emit
        self._journal = journal
        self._sealer = sealer
        self._jpeg_quality = jpeg_quality
        self._idle_period_s = 1.0 / idle_fps
        self._active_period_s = 1.0 / active_fps
        self._camera_timeout_s = camera_timeout_s
        self._clock = clock
        self._active = False
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._snapshots: queue.SimpleQueue[SnapshotRequest] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._last_frame_s: float | None = None
        self._heartbeat_s = clock()
        self._last_observation: FaceObservation | None = None
        self._reported: tuple[FaceState, int] | None = None
        self._faults: set[Component] = set()
        # (seq, exposure time, arrival time) of recent frames; read by health() on other threads.
        self._frame_marks: deque[tuple[int, float, float]] = deque(maxlen=FPS_WINDOW_FRAMES)
        self._health_lock = threading.Lock()

    # --- control (any thread) -------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the vision loop is already running")
        self._last_frame_s = self._clock()  # the camera timeout counts from start-up
        self._thread = threading.Thread(target=self._run, name="atmguard-vision", daemon=True)
        self._thread.start()

    def stop(self, *, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.error("vision thread did not stop within %.1f s", timeout_s)
            self._thread = None

    def set_active(self, active: bool) -> None:
        """Full frame rate during a session; wakes the loop so the change applies at once."""
        self._active = active
        self._wake.set()

    def request_identity(self, session_id: str, templates: list[FaceTemplate]) -> None:
        """Verify the next uncovered frames against ``templates``; FaceVerified comes back via ``emit``."""
        if self._identity is None:
            self._emit(FaceVerified(session_id, IdentityVerdict.UNSURE))  # verification is off here
            return
        self._identity_requests.put((session_id, templates))
        self._wake.set()

    def cancel_identity(self) -> None:
        """The session ended: drop its verification (its templates go with it)."""
        if self._identity is not None:
            self._identity_requests.put(None)

    def request_snapshot(self, kind: SnapshotKind, reason: str, *, session_id: str | None) -> None:
        """Queue a sealed snapshot; SnapshotStored or SnapshotFailed comes back through ``emit``."""
        self._snapshots.put(SnapshotRequest(kind, reason, session_id))
        self._wake.set()

    @property
    def responsive(self) -> bool:
        """The thread runs and is not stuck (the watchdog's test). A camera that delivers no frames
        is a fault the loop reports and recovers from, not a hang: the loop still goes round, at
        least once per camera timeout + reopen back-off."""
        limit_s = 2 * (
            self._camera_timeout_s + REOPEN_BACKOFF_S + self._idle_period_s + MAIN_CAPTURE_TIMEOUT_S
        )
        return (
            self._thread is not None
            and self._thread.is_alive()
            and self._clock() - self._heartbeat_s < limit_s
        )

    def health(self) -> VisionHealth:
        """Heartbeat, last-frame age and measured rates, for the daemon's status socket."""
        now = self._clock()
        with self._health_lock:
            marks = list(self._frame_marks)
            faults = tuple(sorted(component.value for component in self._faults))
        last_frame = self._last_frame_s if marks else None
        camera_fps = analysed_fps = None
        if len(marks) >= 2:
            (seq0, exposed0, arrived0), (seq1, exposed1, arrived1) = marks[0], marks[-1]
            if exposed1 > exposed0:
                camera_fps = (seq1 - seq0) / (exposed1 - exposed0)
            if arrived1 > arrived0:
                analysed_fps = (len(marks) - 1) / (arrived1 - arrived0)
        return VisionHealth(
            heartbeat_age_s=max(0.0, now - self._heartbeat_s),
            last_frame_age_s=None if last_frame is None else max(0.0, now - last_frame),
            camera_fps=camera_fps,
            analysed_fps=analysed_fps,
            faults=faults,
        )

    # --- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            started = self._heartbeat_s = self._clock()
            self._take_identity_requests()
            self._take_pending_snapshots()
            frame = self._read_frame()
            if frame is not None:
                self._analyse(frame)
            period = self._active_period_s if self._active else self._idle_period_s
            pause = period - (self._clock() - started)
            if frame is None:
                pause = max(pause, REOPEN_BACKOFF_S)
            if pause > 0 and self._wake.wait(pause):
                self._wake.clear()

    def _read_frame(self) -> Frame | None:
        try:
            if not self._camera.is_open:
                self._camera.open()
            frame = self._camera.read_lores(timeout_s=self._camera_timeout_s)
        except CameraError as exc:
            self._camera_failed(str(exc))
            return None
        self._last_frame_s = self._clock()
        with self._health_lock:
            if self._frame_marks and frame.seq <= self._frame_marks[-1][0]:
                self._frame_marks.clear()  # the camera was reopened: its sequence starts again
            self._frame_marks.append((frame.seq, frame.t_monotonic_s, self._last_frame_s))
        self._clear(Component.CAMERA)
        return frame

    def _camera_failed(self, reason: str) -> None:
        last = self._last_frame_s
        if last is not None and self._clock() - last < self._camera_timeout_s:
            return  # one late frame is not an outage
        self._raise(Component.CAMERA, f"no camera frame for {self._camera_timeout_s:g} s: {reason}")
        # A camera that stopped delivering is reopened from scratch on the next round.
        try:
            self._camera.close()
        except CameraError as exc:
            logger.warning("closing the failed camera: %s", exc)
        self._tracker.reset()
        self._report(FaceState.NO_FACE, 0)

    def _analyse(self, frame: Frame) -> None:
        try:
            observation = self._pipeline.process_frame(frame)
        except Exception as exc:  # any model failure must fail closed, whatever its type
            logger.exception("vision pipeline failed")
            self._raise(Component.VISION, f"vision model failed: {type(exc).__name__}: {exc}")
            self._tracker.reset()
            self._report(FaceState.NO_FACE, 0)
            return
        self._clear(Component.VISION)
        self._last_observation = observation
        tracked = self._tracker.update(observation)
        self._report(tracked.state, tracked.face_count)
        if self._identity is not None and self._identity.busy:
            self._verify(frame, observation, uncovered=tracked.state is FaceState.UNCOVERED)

    # --- identity --------------------------------------------------------------------------------

    def _take_identity_requests(self) -> None:
        if self._identity is None:
            return
        while True:
            try:
                request = self._identity_requests.get_nowait()
            except queue.Empty:
                return
            if request is None:
                self._identity.cancel()
            else:
                self._identity.request(*request)

    def _verify(self, frame: Frame, observation: FaceObservation, *, uncovered: bool) -> None:
        assert self._identity is not None
        primary = observation.primary.face if observation.primary is not None else None
        try:
            answer = self._identity.observe(frame.rgb, primary, uncovered=uncovered)
        except Exception as exc:  # the embedder failed: fail closed, and say so
            logger.exception("face verification failed")
            answer = self._identity.abort()
            self._raise(Component.VISION, f"face embedder failed: {type(exc).__name__}: {exc}")
        if answer is not None:
            self._emit(answer)

    def _report(self, state: FaceState, face_count: int) -> None:
        if self._reported != (state, face_count):
            self._reported = (state, face_count)
            self._emit(FaceChanged(state, face_count))

    def _raise(self, component: Component, reason: str) -> None:
        if component not in self._faults:
            with self._health_lock:
                self._faults.add(component)
            logger.error("%s fault: %s", component.value, reason)
            self._emit(FaultRaised(component, reason))

    def _clear(self, component: Component) -> None:
        if component in self._faults:
            with self._health_lock:
                self._faults.discard(component)
            logger.info("%s recovered", component.value)
            self._emit(FaultCleared(component))

    # --- evidence --------------------------------------------------------------------------------

    def _take_pending_snapshots(self) -> None:
        while True:
            try:
                request = self._snapshots.get_nowait()
            except queue.Empty:
                return
            self._emit(self._take_snapshot(request))

    def _take_snapshot(self, request: SnapshotRequest) -> Event:
        try:
            main = self._camera.capture_main(timeout_s=MAIN_CAPTURE_TIMEOUT_S)
            crop = self._face_crop(main)
            record = seal_and_store(
                self._journal,
                self._sealer,
                main.rgb,
                crop,
                reason=snapshot_reason(request.kind, request.reason),
                is_fraud_evidence=request.kind is SnapshotKind.FRAUD,
                quality=self._jpeg_quality,
                session_id=request.session_id,
            )
        except Exception as exc:  # camera, sealing, a full disk: the session must hear of it
            logger.error("%s snapshot failed: %s: %s", request.kind.value, type(exc).__name__, exc)
            return SnapshotFailed(request.kind, f"{type(exc).__name__}: {exc}")
        logger.info(
            "%s snapshot stored: %s",
            request.kind.value,
            record.uuid,
            extra={"session_id": request.session_id, "event_type": "snapshot_taken"},
        )
        return SnapshotStored(request.kind, record.uuid)

    def _face_crop(self, main: Frame) -> np.ndarray | None:
        """The latest primary face, cut from the full-resolution frame (None without a face)."""
        observation = self._last_observation
        if observation is None or not observation.faces:
            return None
        face = (observation.primary or observation.faces[0]).face
        lores_w, lores_h = observation.frame_size
        main_w, main_h = main.size
        scaled = scale_face(face, sx=main_w / lores_w, sy=main_h / lores_h)
        return self._pipeline.evidence_crop(main.rgb, scaled)
