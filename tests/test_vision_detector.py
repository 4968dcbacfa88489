"""BlazeFace face detector on real face images (read in place from the shared datasets) and on
generated non-face images; letterbox geometry; decoding and NMS.

Detection rates per source are printed (``pytest -s``) and asserted against the measured figures
with a small margin, so a regression in preprocessing or decoding shows up as a failure.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atmguard.config import settings_from_mapping
from atmguard.datasets import shared_datasets_dir
from atmguard.vision.detector import (
    DEFAULT_SCORE_THRESHOLD,
    KEYPOINT_NAMES,
    Face,
    FaceDetector,
    draw_faces,
    generate_anchors,
    weighted_nms,
)
from atmguard.vision.imageops import letterbox, letterbox_geometry, load_rgb, resize_rgb
from atmguard.vision.models import resolve_model, verify_model
from atmguard.vision.runtime import ModelError

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "firmware_models"
IDENTITY_DIR = shared_datasets_dir() / "faces-identity"
SOURCES = ("orl", "yale", "rmfd")

needs_dataset = pytest.mark.skipif(not IDENTITY_DIR.is_dir(), reason=f"{IDENTITY_DIR} not available")


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The BlazeFace model, fetched (and verified) by firmware_models/fetch.py if absent."""
    spec = resolve_model(MODELS_DIR, "face_detector", verify=False)
    if not spec.path.is_file():
        subprocess.run([sys.executable, str(MODELS_DIR / "fetch.py")], check=True, timeout=600)
    return verify_model(spec)


@pytest.fixture(scope="module")
def detector(model_path: Path) -> Iterator[FaceDetector]:
    with FaceDetector(model_path) as det:
        yield det


@pytest.fixture(scope="session")
def identity_images() -> dict[str, list[np.ndarray]]:
    """Every faces-identity image, decoded once, by source (orl / yale / rmfd)."""
    images: dict[str, list[np.ndarray]] = {source: [] for source in SOURCES}
    for path in sorted(IDENTITY_DIR.glob("*/*.jpg")):
        images[path.parent.name.split("_", 1)[0]].append(load_rgb(path))
    return images


def pad_crop(rgb: np.ndarray, fraction: float = 0.25) -> np.ndarray:
    """Give a tight face crop some context by replicating its border (the model expects a margin)."""
    dy, dx = int(rgb.shape[0] * fraction), int(rgb.shape[1] * fraction)
    return np.pad(rgb, ((dy, dy), (dx, dx), (0, 0)), mode="edge")


def place(
    rgb: np.ndarray, *, canvas_wh: tuple[int, int], scale: float, offset_xy: tuple[int, int]
) -> np.ndarray:
    """``rgb`` resized by ``scale`` and pasted at ``offset_xy`` on a plain grey canvas."""
    width, height = round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)
    canvas = np.full((canvas_wh[1], canvas_wh[0], 3), 110, np.uint8)
    x, y = offset_xy
    canvas[y : y + height, x : x + width] = resize_rgb(rgb, width, height)
    return canvas


# --- pure parts: anchors, NMS, letterbox ---------------------------------------------------------


def test_anchors_follow_mediapipe_layout():
    anchors = generate_anchors()
    assert anchors.shape == (896, 2)
    # stride 8: 16x16 cells x 2 anchors, both at the cell centre, row-major
    assert np.allclose(anchors[0], anchors[1]) and np.allclose(anchors[0], (0.5 / 16, 0.5 / 16))
    assert np.allclose(anchors[2], (1.5 / 16, 0.5 / 16))
    # strides 16/16/16 share one 8x8 grid with 6 anchors per cell
    assert np.allclose(anchors[512:518], (0.5 / 8, 0.5 / 8)) and not np.allclose(anchors[518], anchors[517])
    assert np.allclose(anchors[-1], (7.5 / 8, 7.5 / 8))


def test_weighted_nms_blends_overlapping_boxes_by_score_and_keeps_separate_ones():
    boxes = np.array([[0, 0, 10, 10], [2, 0, 12, 10], [50, 50, 60, 60]], dtype=np.float64)
    keypoints = np.stack([np.full((6, 2), v, dtype=np.float64) for v in (0.0, 6.0, 55.0)])
    scores = np.array([0.9, 0.6, 0.7])
    merged = weighted_nms(boxes, keypoints, scores, iou_threshold=0.3)
    assert len(merged) == 2
    (box, kps, score), (box2, _, score2) = merged
    assert score == 0.9 and score2 == 0.7  # highest first; a cluster keeps its best score
    assert np.allclose(box, [2 * 0.6 / 1.5, 0, 10 + 2 * 0.6 / 1.5, 10])  # pulled 40% of the way to the other
    assert np.allclose(kps, 6.0 * 0.6 / 1.5)
    assert np.allclose(box2, boxes[2])


def test_letterbox_keeps_aspect_ratio_and_maps_points_back():
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[100:200, 300:340] = 255  # a 40x100 white bar
    image, box = letterbox(frame, width=128, height=128)
    assert (box.content_width, box.content_height, box.pad_x, box.pad_y) == (128, 96, 0, 16)
    assert image[:16].max() == 0 and image[112:].max() == 0  # black padding above and below
    ys, xs = np.nonzero(image[:, :, 0] > 127)
    assert (xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) == (8, 20)  # 40x100 / 5: not stretched
    corners = np.array([[xs.min(), ys.min()], [xs.max() + 1, ys.max() + 1]], dtype=np.float64)
    assert np.allclose(box.to_source(corners), [[300, 100], [340, 200]])
    tall = letterbox_geometry(480, 640, 128, 128)
    assert (tall.content_width, tall.content_height, tall.pad_x, tall.pad_y) == (96, 128, 16, 0)
    assert np.allclose(tall.to_source(np.array([16.0, 0.0])), [0, 0])
    assert np.allclose(tall.to_source(np.array([112.0, 128.0])), [480, 640])


# --- real faces ----------------------------------------------------------------------------------

# Measured with the default threshold (0.6): detection rate on tight crops / on crops padded by 25%.
# ORL 100% / 100%, Yale 100% / 100%, RMFD 88.3% / 98.2% (low-resolution web crops cut at the chin:
# the model needs some margin around the face, as a camera frame has).
MIN_RATE = {"orl": (0.99, 0.99), "yale": (0.99, 0.99), "rmfd": (0.86, 0.97)}


@needs_dataset
@pytest.mark.parametrize("source", SOURCES)
def test_detection_rate_per_source(detector, identity_images, source):
    images = identity_images[source]
    assert len(images) > 50
    tight = [detector.detect(rgb) for rgb in images]
    padded = [detector.detect(pad_crop(rgb)) for rgb in images]
    rate_tight = np.mean([len(faces) >= 1 for faces in tight])
    rate_padded = np.mean([len(faces) >= 1 for faces in padded])
    print(f"\n{source}: {len(images)} images, face found on {rate_tight:.1%} tight, {rate_padded:.1%} padded")
    assert rate_tight >= MIN_RATE[source][0]
    assert rate_padded >= MIN_RATE[source][1]
    # one person per picture: a second face would make the ATM ask "one person only"
    assert max(len(faces) for faces in padded) == 1
    assert all(face.score >= DEFAULT_SCORE_THRESHOLD for faces in padded for face in faces)


@needs_dataset
def test_keypoints_fall_inside_the_face_in_anatomical_order(detector, identity_images):
    faces = [
        f for images in identity_images.values() for rgb in images for f in detector.detect(pad_crop(rgb))
    ]
    assert len(faces) >= 820
    pose_dependent = 0
    for face in faces:
        x0, y0, x1, y1 = face.box
        right_eye, left_eye, nose, mouth, right_ear, left_ear = face.keypoints
        for x, y in (right_eye, left_eye, nose, mouth):
            assert x0 <= x <= x1 and y0 <= y <= y1
        # MediaPipe's order is the person's right first: on an unmirrored photo it is on the image's left.
        assert right_eye[0] < left_eye[0]
        assert max(right_eye[1], left_eye[1]) < nose[1] < mouth[1] < y1
        # On a turned head the nose passes an eye and the far ear hides behind the face: rare here.
        pose_dependent += not (
            right_eye[0] < nose[0] < left_eye[0] and right_ear[0] < right_eye[0] < left_eye[0] < left_ear[0]
        )
    assert pose_dependent <= 0.1 * len(faces)
    assert face.keypoint("mouth") == tuple(float(v) for v in face.keypoints[KEYPOINT_NAMES.index("mouth")])


class _ScriptedInterpreter:
    """Stands in for the model: one detection at anchor ``anchor`` with the given raw regressors."""

    def __init__(self, anchor: int, raw: list[float], logit: float = 3.0) -> None:
        self.regressors = np.zeros((1, 896, 16), np.float32)
        self.regressors[0, anchor] = raw
        self.scores = np.full((1, 896, 1), -10.0, np.float32)
        self.scores[0, anchor] = logit
        self.inputs: list[np.ndarray] = []

    def get_input_details(self) -> list[dict]:
        return [{"index": 0, "shape": np.array([1, 128, 128, 3]), "dtype": np.float32}]

    def get_output_details(self) -> list[dict]:
        return [
            {
                "index": 2,
                "shape": np.array([1, 896, 1]),
                "dtype": np.float32,
            },  # scores first: order must not matter
            {"index": 1, "shape": np.array([1, 896, 16]), "dtype": np.float32},
        ]

    def set_tensor(self, index: int, value: np.ndarray) -> None:
        self.inputs.append(value.copy())

    def invoke(self) -> None:
        pass

    def get_tensor(self, index: int) -> np.ndarray:
        return self.regressors if index == 1 else self.scores


@pytest.mark.parametrize("frame_wh", [(640, 480), (480, 640), (128, 128), (1920, 1080), (92, 112)])
def test_decoded_boxes_map_back_to_frame_pixels(model_path, frame_wh):
    # Anchor 600 is in the 8x8 grid (cell 600-512 = 88 // 6 = 14 -> x 6, y 1): centre (104, 24) input px.
    raw = [4.0, 8.0, 40.0, 48.0] + [float(v) for v in np.arange(12) - 6]
    fake = _ScriptedInterpreter(600, raw)
    det = FaceDetector(model_path, interpreter_factory=lambda path, num_threads: fake)
    width, height = frame_wh
    frame = np.full((height, width, 3), 255, np.uint8)
    # The contract: the frame is scaled by 128 / its long side, centred, and mapped back exactly.
    content_w, content_h = round(width * 128 / max(frame_wh)), round(height * 128 / max(frame_wh))
    pad = np.array([(128 - content_w) // 2, (128 - content_h) // 2], dtype=np.float64)
    to_frame = np.array([width / content_w, height / content_h])
    (face,) = det.detect(frame)
    centre = np.array([104.0 + 4.0, 24.0 + 8.0])
    half = np.array([20.0, 24.0])
    corners = np.stack([centre - half, centre + half])
    assert np.allclose(face.box, ((corners - pad) * to_frame).ravel(), atol=1e-3)
    expected_kps = (np.array([104.0, 24.0]) + np.reshape(raw[4:], (6, 2)) - pad) * to_frame
    assert np.allclose(face.keypoints, expected_kps, atol=1e-3)
    assert face.score == pytest.approx(1 / (1 + np.exp(-3.0)))
    (sent,) = fake.inputs
    assert sent.min() >= -1.0 and sent.max() == 1.0  # white frame -> +1, padding -> -1


@needs_dataset
def test_translated_face_gives_translated_box(detector, identity_images):
    # Shifting by 80 frame px = 16 input px (a whole cell of the coarse grid) shows the model the same
    # picture moved; boxes must follow in both letterbox axes (the CNN itself is not exactly
    # shift-invariant near the borders, hence the 8% tolerance).
    face_img = pad_crop(identity_images["orl"][0])  # 138x168 once padded
    for canvas_wh, scale in (((640, 480), 2.0), ((480, 640), 2.0)):
        first = detector.detect(place(face_img, canvas_wh=canvas_wh, scale=scale, offset_xy=(20, 40)))
        moved = detector.detect(place(face_img, canvas_wh=canvas_wh, scale=scale, offset_xy=(100, 120)))
        assert len(first) == len(moved) == 1
        width = first[0].width
        assert np.allclose(np.array(moved[0].box) - first[0].box, 80, atol=0.08 * width)
        assert np.allclose(moved[0].keypoints - first[0].keypoints, 80, atol=0.08 * width)


@needs_dataset
def test_scaled_frame_gives_scaled_boxes(detector, identity_images):
    # The same scene at 640x480 and at 1280x960 letterboxes to (almost) the same input: boxes scale by 2.
    scene = place(pad_crop(identity_images["orl"][3]), canvas_wh=(640, 480), scale=2.2, offset_xy=(250, 60))
    big = resize_rgb(scene, 1280, 960)
    small_faces, big_faces = detector.detect(scene), detector.detect(big)
    assert len(small_faces) == len(big_faces) == 1
    tolerance = 0.03 * big_faces[0].width
    assert np.allclose(big_faces[0].box, np.array(small_faces[0].box) * 2, atol=tolerance)
    assert np.allclose(big_faces[0].keypoints, small_faces[0].keypoints * 2, atol=tolerance)


@needs_dataset
@pytest.mark.parametrize("source", SOURCES)
def test_face_found_where_it_was_placed_in_a_larger_frame(detector, identity_images, source):
    # Crop alone vs. pasted (scaled, offset) into a camera-sized frame: the model sees it at another
    # resolution, so allow 15% of the face width. Faces span >= 25% of the frame width, as at an ATM.
    misses, errors = 0, []
    for rgb in identity_images[source][::9]:
        crop = pad_crop(rgb)
        reference = detector.detect(crop)
        if len(reference) != 1:
            continue
        scale = 0.3 * 640 / reference[0].width
        if crop.shape[0] * scale > 470:
            scale = 470 / crop.shape[0]
        offset = (640 - round(crop.shape[1] * scale)) // 3, (480 - round(crop.shape[0] * scale)) // 2
        found = detector.detect(place(crop, canvas_wh=(640, 480), scale=scale, offset_xy=offset))
        if len(found) != 1:
            misses += 1
            continue
        expected = np.array(reference[0].box) * scale + np.tile(offset, 2)
        errors.append(np.abs(np.array(found[0].box) - expected).max() / (expected[2] - expected[0]))
    assert misses == 0
    assert np.median(errors) < 0.08 and np.max(errors) < 0.25


@needs_dataset
def test_mirrored_face_gives_mirrored_box(detector, identity_images):
    for rgb in identity_images["yale"][::10]:
        frame = pad_crop(rgb)
        (face,) = detector.detect(frame)
        (mirrored,) = detector.detect(np.ascontiguousarray(frame[:, ::-1]))
        width = frame.shape[1]
        expected = (width - face.box[2], face.box[1], width - face.box[0], face.box[3])
        assert np.allclose(mirrored.box, expected, atol=0.1 * face.width)


@needs_dataset
def test_two_faces_are_reported_largest_first(detector, identity_images):
    near, far = identity_images["yale"][5], identity_images["orl"][20]  # faces ~160 and ~70 px wide
    canvas = place(far, canvas_wh=(640, 480), scale=2.0, offset_xy=(440, 120))
    canvas[80 : 80 + 316, :416] = resize_rgb(near, 416, 316)  # the nearer customer, on the left
    faces = detector.detect(canvas)
    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    assert faces[0].center[0] < 416 < 440 < faces[1].center[0]


# --- non-faces -----------------------------------------------------------------------------------


def _non_face_images() -> Iterator[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(1234)
    for width, height in ((640, 480), (480, 640), (128, 128), (301, 97)):
        y, x = np.mgrid[0:height, 0:width].astype(np.float64)
        for value in ((0, 0, 0), (255, 255, 255), (128, 128, 128), (200, 30, 40), (30, 160, 60)):
            yield f"blank{value}", np.full((height, width, 3), value, np.uint8)
        yield "noise", rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        yield "grey noise", np.repeat(rng.integers(0, 256, (height, width, 1), dtype=np.uint8), 3, axis=2)
        yield "smooth noise", resize_rgb(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), width, height)
        for angle in (0.0, 0.8, 2.0):
            ramp = np.cos(angle) * x + np.sin(angle) * y
            ramp = (ramp - ramp.min()) / np.ptp(ramp) * 255
            yield f"gradient{angle}", np.stack([ramp, ramp[::-1], 255 - ramp], axis=2).astype(np.uint8)
        radial = np.hypot(x - width / 2, y - height / 2)
        yield "radial", np.repeat((radial / radial.max() * 255).astype(np.uint8)[:, :, None], 3, axis=2)
        text = np.full((height, width, 3), 235, np.uint8)  # lines of "glyphs": dark blocks in rows
        for row in range(6, height - 14, 20):
            col = 6
            while col < width - 12:
                glyph = int(rng.integers(3, 10))
                text[row : row + int(rng.integers(7, 13)), col : col + glyph] = int(rng.integers(0, 70))
                col += glyph + int(rng.integers(2, 7))
        yield "text", text
        checker = ((x // 16 + y // 16) % 2 * 255).astype(np.uint8)
        yield "checker", np.repeat(checker[:, :, None], 3, axis=2)


def test_no_face_on_generated_non_face_images(detector):
    found = {name: len(faces) for name, image in _non_face_images() if (faces := detector.detect(image))}
    assert found == {}


@needs_dataset
def test_no_face_on_background_corners_of_dataset_images(detector, identity_images):
    # Corners (1/5 of the short side) hold wall, hair or shoulder, upscaled to the model input.
    # Measured: best score 0.55 over 1692 corners (6 of them >= 0.5, MediaPipe's default threshold).
    false_faces, corners = 0, 0
    for images in identity_images.values():
        for rgb in images:
            side = min(rgb.shape[:2]) // 5
            for corner in (rgb[:side, :side], rgb[:side, -side:]):
                corners += 1
                false_faces += len(detector.detect(np.ascontiguousarray(corner)))
    print(f"\nbackground corners: {corners}, false faces: {false_faces}")
    assert corners > 1600
    assert false_faces == 0


# --- API behaviour -------------------------------------------------------------------------------


def test_input_is_validated(detector):
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(np.zeros((480, 640, 3), np.float32))
    with pytest.raises(ValueError, match="HxWx3"):
        detector.detect(np.zeros((480, 640, 4), np.uint8))
    assert detector.detect(np.zeros((480, 640), np.uint8)) == []  # greyscale is accepted


def test_options_are_validated(model_path):
    for bad in ({"score_threshold": 0.0}, {"score_threshold": 1.0}, {"nms_iou": 1.5}, {"num_threads": 0}):
        with pytest.raises(ValueError):
            FaceDetector(model_path, **bad)


@needs_dataset
def test_threshold_controls_what_is_reported(model_path, identity_images):
    frame = pad_crop(identity_images["rmfd"][0])
    with FaceDetector(model_path, score_threshold=0.05) as loose, FaceDetector(model_path) as default:
        score = default.detect(frame)[0].score
        assert len(loose.detect(frame)) >= 1
    with FaceDetector(model_path, score_threshold=min(0.999, score + 0.01)) as strict:
        assert strict.detect(frame) == []


def test_detect_records_timing_and_loads_once(model_path):
    calls = []

    def factory(path: Path, *, num_threads: int) -> object:
        from atmguard.vision.runtime import load_interpreter

        calls.append(num_threads)
        return load_interpreter(path, num_threads=num_threads)

    det = FaceDetector(model_path, num_threads=2, interpreter_factory=factory)
    assert calls == []  # the constructor loads nothing
    for _ in range(3):
        det.detect(np.zeros((480, 640, 3), np.uint8))
    assert calls == [2]
    assert det.last_timing is not None and det.last_timing.invoke_ms > 0
    assert det.last_timing.total_ms >= det.last_timing.invoke_ms
    det.close()
    det.close()  # idempotent
    with pytest.raises(ModelError, match="closed"):
        det.detect(np.zeros((48, 64, 3), np.uint8))


def test_model_with_unexpected_tensors_is_rejected(tmp_path, model_path):
    class WrongModel:
        def get_input_details(self) -> list[dict]:
            return [{"index": 0, "shape": np.array([1, 192, 192, 3]), "dtype": np.float32}]

        def get_output_details(self) -> list[dict]:
            return [{"index": 1, "shape": np.array([1, 2304, 16]), "dtype": np.float32}]

    det = FaceDetector(model_path, interpreter_factory=lambda path, num_threads: WrongModel())
    with pytest.raises(ModelError, match="not BlazeFace short-range"):
        det.open()


def test_from_settings_verifies_the_model_at_open(tmp_path, model_path):
    settings = settings_from_mapping({"paths": {"models_dir": str(MODELS_DIR)}})
    with FaceDetector.from_settings(settings, score_threshold=0.6) as det:
        assert det.score_threshold == 0.6 and det.model_path == model_path.resolve()
    root = tmp_path / "models"
    (root / "third_party").mkdir(parents=True)
    (root / "manifest.json").write_bytes((MODELS_DIR / "manifest.json").read_bytes())
    (root / "third_party" / model_path.name).write_bytes(model_path.read_bytes()[:-1] + b"\x00")
    det = FaceDetector.from_settings(settings_from_mapping({"paths": {"models_dir": str(root)}}))
    with pytest.raises(ModelError, match=r"sha256 mismatch: expected 3bc182eb.*, actual "):
        det.open()


@needs_dataset
def test_draw_faces_marks_box_and_keypoints_without_touching_the_frame(detector, identity_images):
    frame = pad_crop(identity_images["yale"][2])
    original = frame.copy()
    faces = detector.detect(frame)
    drawn = draw_faces(frame, faces)
    assert isinstance(drawn, Image.Image) and drawn.size == (frame.shape[1], frame.shape[0])
    assert np.array_equal(frame, original)
    pixels = np.asarray(drawn)
    x0, y0, _, _ = faces[0].clipped_box(frame.shape[1], frame.shape[0])
    assert tuple(pixels[y0 + 1, x0 + 1]) == (0, 255, 0)  # box outline
    nose_x, nose_y = (round(v) for v in faces[0].keypoint("nose_tip"))
    assert tuple(pixels[nose_y, nose_x]) == (255, 255, 0)
    assert draw_faces(frame, []).tobytes() == Image.fromarray(frame).tobytes()


def test_face_helpers():
    face = Face(box=(-10.0, 5.0, 30.0, 65.0), keypoints=np.zeros((6, 2), np.float32), score=0.9)
    assert (face.width, face.height, face.area, face.center) == (40.0, 60.0, 2400.0, (10.0, 35.0))
    assert face.clipped_box(20, 50) == (0, 5, 20, 50)
