"""``atmguard diag camera --save FILE.png``: one annotated frame to aim and focus the camera by.

The picture is the inference (lores) frame exactly as the models see it, with every face's box,
keypoints, detector score and covering probability drawn on, and a band underneath with the
tracker's state, the measured frame rate and the sharpness of the face region (variance of the
Laplacian: it rises as the focus gets better, so the technician turns the lens for the highest
figure). The tracker is fed a short run of consecutive frames first, as in the daemon, so the state
shown is the one a customer standing there would get.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from atmguard.config import Settings
from atmguard.errors import CameraError

BAND_PX = 44
"""Height of the text band added under the frame."""
BAND_COLOUR = (24, 24, 24)
TEXT_COLOUR = (255, 255, 255)
EXTRA_FRAMES = 2
"""Frames read beyond the tracker's window, so its state has settled."""


@dataclass(frozen=True)
class CameraPicture:
    path: Path
    size: tuple[int, int]
    """(width, height) of the PNG: the lores frame plus the text band."""
    frames: int
    fps: float | None
    face_count: int
    tracker_state: str
    covered_probability: float | None
    sharpness: float | None
    lines: tuple[str, ...]
    """The band's text, also printed by the command."""


def sharpness(rgb: np.ndarray, box: tuple[int, int, int, int] | None = None) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image (in ``box`` if given)."""
    grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if box is not None:
        x0, y0, x1, y1 = box
        grey = grey[y0:y1, x0:x1]
    if grey.shape[0] < 3 or grey.shape[1] < 3:
        return 0.0
    lap = grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4 * grey[1:-1, 1:-1]
    return float(lap.var())


def _labels(observation: Any) -> list[str]:
    labels = []
    for judged in observation.faces:
        p = judged.covered_probability
        covering = "too small" if p is None else f"covered {p:.2f}"
        labels.append(f"score {judged.face.score:.2f} {covering}")
    return labels


def take_picture(settings: Settings, out_path: Path) -> CameraPicture:
    """Read frames, run the models and tracker, write the annotated PNG (atomically) to ``out_path``."""
    from atmguard.hardware.camera.base import Frame
    from atmguard.hardware.registry import build
    from atmguard.vision.detector import draw_faces
    from atmguard.vision.pipeline import FaceObservation, VisionPipeline
    from atmguard.vision.tracker import FaceTracker

    camera = build("camera", settings)
    pipeline = VisionPipeline.from_settings(settings)
    tracker = FaceTracker.from_settings(settings)
    wanted = settings.vision.tracker_window_frames + EXTRA_FRAMES
    frames: list[Frame] = []
    observation: FaceObservation | None = None
    tracked: Any = None
    pipeline.open()  # ModelError before the camera is touched
    try:
        camera.open()
        for _ in range(wanted):
            frame = camera.read_lores(timeout_s=settings.session.camera_timeout_s)
            observation = pipeline.process_frame(frame)
            tracked = tracker.update(observation)
            frames.append(frame)
    finally:
        camera.close()
        pipeline.close()
    if observation is None or tracked is None:
        raise CameraError("no frame read")
    last = frames[-1]
    image = draw_faces(last.rgb, [judged.face for judged in observation.faces], labels=_labels(observation))
    fps = None
    if frames[-1].t_monotonic_s > frames[0].t_monotonic_s:
        fps = (frames[-1].seq - frames[0].seq) / (frames[-1].t_monotonic_s - frames[0].t_monotonic_s)
    width, height = last.size
    focus_box = None
    if observation.faces:
        focus_box = observation.faces[0].face.clipped_box(width, height)
    focus = sharpness(last.rgb, focus_box)
    probability = tracked.covered_probability
    lines = (
        f"tracker {tracked.state.value.upper()}  faces {tracked.face_count}  covering p "
        f"{'-' if probability is None else f'{probability:.2f}'} (covered at >= {settings.vision.covered_threshold:g})",
        f"{'-' if fps is None else f'{fps:.1f}'} fps (configured {settings.camera.fps:g})  {width}x{height}  "
        f"sharpness {focus:.0f} ({'face' if focus_box else 'whole frame'})  {time.strftime('%Y-%m-%d %H:%M:%S')}",
    )
    canvas = Image.new("RGB", (width, height + BAND_PX), BAND_COLOUR)
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((6, height + 6 + 18 * i), line, fill=TEXT_COLOUR)
    _save_png(canvas, out_path)
    return CameraPicture(
        path=out_path,
        size=canvas.size,
        frames=len(frames),
        fps=fps,
        face_count=observation.face_count,
        tracker_state=tracked.state.value,
        covered_probability=probability,
        sharpness=focus,
        lines=lines,
    )


def _save_png(image: Image.Image, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
