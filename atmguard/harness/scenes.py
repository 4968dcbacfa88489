"""What the simulated camera can be shown: one folder of images per scene, for ``camera.sim.scene_dir``.

Scenes come from ``../shared/datasets`` when it is there (read in place through symlinks: the
datasets' licences forbid copies) and otherwise from the one public-domain portrait an installed
package ships: Grace Hopper's US Navy photograph in matplotlib's sample data, with a face mask
drawn over it for the covered scene. Either way the harness gets the same scene names:

- ``uncovered``: one person, face visible;
- ``covered``: faces behind a mask;
- ``two_faces``: two people side by side (composited here, into the work directory only);
- ``nobody``, ``lost``, ``frozen``: built into the simulated camera (an empty wall, no frames, the
  same frame for ever).

A scenario may add its own scenes from dataset folders (``[scenes] impostor = "faces-identity/orl_s03"``).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from atmguard.datasets import REPO_ROOT, SCENE_IMAGES, scene_images, shared_datasets_dir

FALLBACK_PORTRAIT = "mpl-data/sample_data/grace_hopper.jpg"
"""In matplotlib's wheel: US Navy photograph of Grace Hopper, public domain."""
TWO_FACES_HEIGHT_PX = 480


class SceneError(Exception):
    """A scene cannot be built (missing images, unreadable file, no face to draw a covering on)."""


@dataclass(frozen=True)
class SceneSource:
    """Where the default scenes came from, said in the timeline and the report."""

    name: str
    detail: str


def fallback_portrait() -> Path:
    """The public-domain portrait inside the installed matplotlib package (not imported)."""
    try:
        files = importlib.metadata.files("matplotlib") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if str(file).replace("\\", "/").endswith(FALLBACK_PORTRAIT):
            return Path(str(file.locate()))
    raise SceneError(
        "no face images: ../shared/datasets is absent (set ATMGUARD_DATASETS) and matplotlib, whose "
        "sample data holds the fallback portrait, is not installed (pip install matplotlib)"
    )


def build_scene_dir(
    scene_dir: Path, *, datasets: Path | None = None, extra: Mapping[str, str] | None = None
) -> SceneSource:
    """Fill ``scene_dir`` with one sub-folder per scene; says where the images came from."""
    datasets = (datasets or shared_datasets_dir()).resolve()  # symlinks must not depend on the cwd
    scene_dir.mkdir(parents=True, exist_ok=True)
    uncovered, covered = scene_images("uncovered", datasets), scene_images("covered", datasets)
    if uncovered and covered:
        _link_all(scene_dir / "uncovered", uncovered)
        _link_all(scene_dir / "covered", covered)
        portraits = [_read_rgb(path) for path in uncovered[:2]]
        source = SceneSource("datasets", f"photos read in place from {datasets}")
    else:
        portrait_path = fallback_portrait()
        portrait = _read_rgb(portrait_path)
        _write(scene_dir / "uncovered" / "portrait.png", portrait)
        _write(scene_dir / "covered" / "portrait_masked.png", draw_face_mask(portrait))
        portraits = [portrait, np.ascontiguousarray(portrait[:, ::-1])]
        source = SceneSource(
            "fallback portrait",
            f"{datasets} is absent: Grace Hopper (public domain, {portrait_path.name} from matplotlib), "
            "with a face mask drawn on for the covered scene",
        )
    _write(scene_dir / "two_faces" / "side_by_side.png", side_by_side(portraits))
    for name, folder in (extra or {}).items():
        images = sorted((datasets / folder).glob("*.jpg"))[:SCENE_IMAGES]
        if not images:
            raise SceneError(f"scene {name!r}: no .jpg images in {datasets / folder}")
        _link_all(scene_dir / name, images)
    return source


def _link_all(folder: Path, images: list[Path]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        link = folder / image.name
        if not link.is_symlink():
            link.symlink_to(image)  # read in place: the datasets' licences forbid copies


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as exc:
        raise SceneError(f"{path}: cannot read the image: {exc}") from None


def _write(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def side_by_side(portraits: list[np.ndarray]) -> np.ndarray:
    """Two people next to each other, each scaled to the same height, on one frame."""
    scaled = []
    for rgb in portraits[:2] * (2 if len(portraits) == 1 else 1):
        image = Image.fromarray(rgb)
        width = round(image.width * TWO_FACES_HEIGHT_PX / image.height)
        scaled.append(np.asarray(image.resize((width, TWO_FACES_HEIGHT_PX), Image.Resampling.BILINEAR)))
    return np.concatenate(scaled, axis=1)


def draw_face_mask(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` with a pale blue surgical-style mask over the nose and mouth of its largest face.

    Placed from BlazeFace's keypoints, so it sits where a real mask would: from the bridge of the
    nose to below the chin, cheek to cheek, with pleats and soft edges.
    """
    from atmguard.config import settings_from_mapping
    from atmguard.vision.detector import FaceDetector

    settings = settings_from_mapping(
        {"paths": {"models_dir": str(REPO_ROOT / "firmware_models")}}, source="<scene builder>"
    )
    detector = FaceDetector.from_settings(settings)
    try:
        faces = detector.detect(rgb)
    finally:
        detector.close()
    if not faces:
        raise SceneError("no face found in the fallback portrait to draw a mask on")
    face = faces[0]
    right_eye, left_eye = face.keypoint("right_eye"), face.keypoint("left_eye")
    nose, mouth = face.keypoint("nose_tip"), face.keypoint("mouth")
    eye_distance = float(np.hypot(left_eye[0] - right_eye[0], left_eye[1] - right_eye[1]))
    eye_y = (right_eye[1] + left_eye[1]) / 2
    centre_x = (nose[0] + mouth[0]) / 2
    top = eye_y + 0.35 * (nose[1] - eye_y)
    bottom = mouth[1] + 1.0 * eye_distance
    half_width = 1.05 * eye_distance
    outline = [
        (centre_x - half_width, top + 0.15 * eye_distance),
        (centre_x, top),
        (centre_x + half_width, top + 0.15 * eye_distance),
        (centre_x + 0.95 * half_width, bottom - 0.35 * eye_distance),
        (centre_x, bottom),
        (centre_x - 0.95 * half_width, bottom - 0.35 * eye_distance),
    ]
    image = Image.fromarray(rgb).convert("RGB")
    alpha = Image.new("L", image.size, 0)
    ImageDraw.Draw(alpha).polygon(outline, fill=255)
    alpha = alpha.filter(ImageFilter.GaussianBlur(max(1.0, eye_distance / 40)))
    cloth = Image.new("RGB", image.size, (168, 206, 226))
    pleats = ImageDraw.Draw(cloth)
    for fraction in (0.3, 0.5, 0.7):  # horizontal folds, darker than the cloth
        y = top + fraction * (bottom - top)
        pleats.line(
            [(centre_x - half_width, y), (centre_x + half_width, y)],
            fill=(128, 166, 190),
            width=max(1, round(eye_distance / 25)),
        )
    return np.asarray(Image.composite(cloth, image, alpha))
