"""Step 2 of the covering recipe: synthetic coverings, distractors and augmentation (numpy + Pillow).

Everything works on a 192x192 context crop (see covering_data.py) in which the face is upright
(eye line level) and its box and keypoints are known, so shapes can be placed anatomically:

- coverings (label 1): ``mask``, ``scarf``, ``balaclava``, ``hand``, ``visor``, ``hood_scarf``,
  ``object``; every one hides the mouth and the nose tip (checked on the drawn alpha, redrawn if not);
- distractors (label 0): ``sunglasses``, ``glasses``, ``hand_chin`` (hand below the mouth or on a
  cheek), ``beard``, ``neck_scarf`` (scarf or mask pulled under the chin), ``hood`` / ``helmet``
  / ``cap`` alone, ``mustache`` (a dark, crisp moustache, optionally with a goatee); the mouth stays
  visible (checked the same way).

Shapes are drawn at 2x and box-filtered down (soft, anti-aliased edges), filled with procedural
textures (solid, stripes, plaid, knit, camouflage blotches, prints, or a patch of another photo)
with fold shading, so the model cannot key on one flat colour or one hard edge.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CONTEXT = 192
OUT = 96
SS = 2  # supersampling of the alpha masks

COVERINGS = ("mask", "scarf", "balaclava", "hand", "visor", "hood_scarf", "object")
NON_MASK_COVERINGS = ("scarf", "balaclava", "hand", "visor", "hood_scarf")
DISTRACTORS = (
    "sunglasses",
    "glasses",
    "hand_chin",
    "beard",
    "neck_scarf",
    "hood",
    "helmet",
    "cap",
    "mustache",  # last: the validation draws of the kinds before it stay as they were
)

SKIN_TONES = np.array(
    [
        (255, 224, 196),
        (241, 194, 167),
        (224, 172, 138),
        (198, 134, 98),
        (170, 110, 75),
        (141, 85, 60),
        (110, 66, 45),
        (80, 50, 36),
        (233, 190, 150),
        (200, 160, 120),
    ],
    np.float32,
)


@dataclass(frozen=True)
class Geometry:
    """Face landmarks in context pixels, derived from the detector's box and keypoints."""

    cx: float
    top: float  # box top (forehead)
    chin: float
    fw: float  # face (box) width
    eye_y: float
    eye_d: float
    right_eye: tuple[float, float]
    left_eye: tuple[float, float]
    nose: tuple[float, float]
    mouth: tuple[float, float]

    @classmethod
    def from_points(cls, pts: np.ndarray) -> Geometry:
        (bx0, by0), (bx1, by1) = pts[0], pts[1]
        re, le, nose, mouth = pts[2], pts[3], pts[4], pts[5]
        fw = max(float(bx1 - bx0), 8.0)
        eye_d = max(float(np.hypot(*(le - re))), 0.25 * fw)
        chin = max(float(by1), float(mouth[1]) + 0.15 * fw)
        return cls(
            cx=float(bx0 + bx1) / 2,
            top=float(by0),
            chin=chin,
            fw=fw,
            eye_y=float(re[1] + le[1]) / 2,
            eye_d=eye_d,
            right_eye=(float(re[0]), float(re[1])),
            left_eye=(float(le[0]), float(le[1])),
            nose=(float(nose[0]), float(nose[1])),
            mouth=(float(mouth[0]), float(mouth[1])),
        )


# --- textures -------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    small = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, np.float32) / 255.0


def _random_colour(rng: np.random.Generator, *, dark: bool = False) -> np.ndarray:
    if dark and rng.random() < 0.75:
        return rng.uniform(5, 70, 3).astype(np.float32) * rng.uniform(0.8, 1.2, 3).astype(np.float32)
    palette = np.array(
        [
            (170, 205, 235),  # surgical blue
            (235, 235, 235),
            (30, 30, 35),
            (120, 120, 125),
            (40, 50, 90),
            (160, 40, 40),
            (220, 180, 200),
            (60, 90, 60),
            (200, 170, 120),
            (90, 60, 40),
        ],
        np.float32,
    )
    if rng.random() < 0.6:
        return palette[rng.integers(len(palette))] * rng.uniform(0.85, 1.1, 3).astype(np.float32)
    return rng.uniform(0, 255, 3).astype(np.float32)


def texture(
    rng: np.random.Generator, *, dark: bool = False, photo: np.ndarray | None = None, size: int = CONTEXT
) -> np.ndarray:
    """A size x size x 3 float texture in 0..255."""
    c1 = _random_colour(rng, dark=dark)
    c2 = _random_colour(rng, dark=dark and rng.random() < 0.5)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.choice(["solid", "stripes", "plaid", "knit", "camo", "print", "photo"])
    if kind == "photo" and photo is None:
        kind = "solid"
    if kind == "solid":
        tex = np.broadcast_to(c1, (size, size, 3)).copy()
    elif kind == "stripes":
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(4, 24)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        t = (np.sin(2 * math.pi * phase) > rng.uniform(-0.5, 0.5)).astype(np.float32)[..., None]
        tex = c1 * t + c2 * (1 - t)
    elif kind == "plaid":
        p1, p2 = rng.uniform(6, 24, 2)
        a = (np.sin(2 * math.pi * xx / p1) > 0.3).astype(np.float32)
        b = (np.sin(2 * math.pi * yy / p2) > 0.3).astype(np.float32)
        t = np.clip(0.5 * a + 0.5 * b, 0, 1)[..., None]
        tex = c1 * t + c2 * (1 - t)
    elif kind == "knit":
        period = rng.uniform(2.5, 5)
        t = 0.5 + 0.25 * np.sin(2 * math.pi * xx / period) * np.sin(2 * math.pi * yy / (period * 1.6))
        tex = c1 * (0.75 + 0.5 * t[..., None])
    elif kind == "camo":
        tex = np.broadcast_to(c1, (size, size, 3)).copy()
        for _ in range(3):
            blob = _smooth_noise(rng, size, int(rng.integers(4, 10))) > rng.uniform(0.5, 0.7)
            tex[blob] = _random_colour(rng, dark=dark)
    elif kind == "print":
        tex = np.broadcast_to(c1, (size, size, 3)).copy()
        img = Image.fromarray(np.clip(tex, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(10, 60))):
            x, y = rng.uniform(0, size, 2)
            r = rng.uniform(1.5, 8)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in _random_colour(rng)))
        tex = np.asarray(img, np.float32)
    else:
        assert photo is not None
        tex = np.asarray(
            Image.fromarray(photo).filter(ImageFilter.GaussianBlur(rng.uniform(0, 2))), np.float32
        )
        if rng.random() < 0.5:
            tex = tex[:, ::-1]
    # Fabric folds and light fall-off: a smooth multiplicative shading field.
    shade = 0.75 + 0.5 * _smooth_noise(rng, size, int(rng.integers(2, 6)))
    if rng.random() < 0.5:
        period = rng.uniform(8, 20)
        shade *= 1 + rng.uniform(0.05, 0.2) * np.sin(2 * math.pi * yy / period + rng.uniform(0, 6))
    tex = tex * shade[..., None] + rng.normal(0, rng.uniform(1, 8), (size, size, 1)).astype(np.float32)
    return np.clip(tex, 0, 255)


# --- alpha masks ----------------------------------------------------------------------------------


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (CONTEXT * SS, CONTEXT * SS), 0)
    return img, ImageDraw.Draw(img)


def _alpha(img: Image.Image, *, blur: float = 0.0) -> np.ndarray:
    small = img.resize((CONTEXT, CONTEXT), Image.Resampling.BOX)
    if blur > 0:
        small = small.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(small, np.float32) / 255.0


def _s(*values: float) -> list[float]:
    return [v * SS for v in values]


def _ellipse(draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill: int = 255) -> None:
    draw.ellipse(_s(cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)


def _poly(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], fill: int = 255) -> None:
    draw.polygon([(x * SS, y * SS) for x, y in points], fill=fill)


def _capsule(
    draw: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float, width: float, fill: int = 255
) -> None:
    draw.line(_s(x0, y0, x1, y1), fill=fill, width=max(1, int(width * SS)))
    for x, y in ((x0, y0), (x1, y1)):
        _ellipse(draw, x, y, width / 2, width / 2, fill)


def _at(alpha: np.ndarray, point: tuple[float, float]) -> float:
    x = min(max(int(point[0]), 0), CONTEXT - 1)
    y = min(max(int(point[1]), 0), CONTEXT - 1)
    return float(alpha[y, x])


def mask_alpha(g: Geometry, rng: np.random.Generator) -> np.ndarray:
    img, draw = _canvas()
    top = g.eye_y + rng.uniform(0.3, 0.65) * (g.nose[1] - g.eye_y)
    half_w = g.fw * rng.uniform(0.42, 0.58)
    bottom = g.chin + g.fw * rng.uniform(-0.02, 0.15)
    mid = (top + bottom) / 2
    pts = [
        (g.cx - half_w, top + 0.12 * g.fw),
        (g.cx - 0.3 * half_w, top + rng.uniform(0, 0.04) * g.fw),
        (g.nose[0], top - 0.03 * g.fw),
        (g.cx + 0.3 * half_w, top + rng.uniform(0, 0.04) * g.fw),
        (g.cx + half_w, top + 0.12 * g.fw),
        (g.cx + half_w * 1.02, mid),
    ]
    for k in range(9):  # rounded bottom
        t = math.pi * k / 8
        pts.append((g.cx + half_w * math.cos(t), mid + (bottom - mid) * math.sin(t)))
    pts.append((g.cx - half_w * 1.02, mid))
    _poly(draw, pts)
    return _alpha(img, blur=rng.uniform(0, 0.8))


def scarf_alpha(g: Geometry, rng: np.random.Generator, *, top: float | None = None) -> np.ndarray:
    img, draw = _canvas()
    if top is None:
        top = g.eye_y + rng.uniform(0.2, 0.7) * (g.nose[1] - g.eye_y)
    half_w = g.fw * rng.uniform(0.6, 1.3)
    amp, period, phase = rng.uniform(0, 0.05) * g.fw, rng.uniform(0.3, 1.0) * g.fw, rng.uniform(0, 6)
    tilt = rng.uniform(-0.12, 0.12)
    xs = np.linspace(g.cx - half_w, g.cx + half_w, 24)
    edge = [
        (float(x), float(top + amp * math.sin(2 * math.pi * (x - g.cx) / period + phase) + tilt * (x - g.cx)))
        for x in xs
    ]
    # The ends droop (the scarf wraps around the head), the body falls to the bottom of the frame.
    edge[0] = (edge[0][0], edge[0][1] + 0.25 * g.fw)
    edge[-1] = (edge[-1][0], edge[-1][1] + 0.25 * g.fw)
    pts = [*edge, (g.cx + half_w * 1.2, CONTEXT + 4), (g.cx - half_w * 1.2, CONTEXT + 4)]
    _poly(draw, pts)
    return _alpha(img, blur=rng.uniform(0, 1.0))


def balaclava_alpha(g: Geometry, rng: np.random.Generator) -> np.ndarray:
    img, draw = _canvas()
    rx = g.fw * rng.uniform(0.65, 0.85)
    head_top = g.top - g.fw * rng.uniform(0.25, 0.45)
    _ellipse(draw, g.cx, (head_top + g.chin) / 2, rx, (g.chin - head_top) / 2 + 0.1 * g.fw)
    _poly(
        draw,
        [
            (g.cx - rx * 0.9, g.eye_y),
            (g.cx + rx * 0.9, g.eye_y),
            (g.cx + rx, CONTEXT + 4),
            (g.cx - rx, CONTEXT + 4),
        ],
    )
    # The eye band stays open.
    half_h = g.eye_d * rng.uniform(0.2, 0.38)
    x0 = g.right_eye[0] - g.eye_d * rng.uniform(0.35, 0.55)
    x1 = g.left_eye[0] + g.eye_d * rng.uniform(0.35, 0.55)
    if rng.random() < 0.5:
        draw.rounded_rectangle(_s(x0, g.eye_y - half_h, x1, g.eye_y + half_h), radius=half_h * SS, fill=0)
    else:  # two eye holes
        for ex, ey in (g.right_eye, g.left_eye):
            _ellipse(draw, ex, ey, g.eye_d * rng.uniform(0.3, 0.42), half_h, 0)
    return _alpha(img, blur=rng.uniform(0, 0.8))


def _hand(
    draw: ImageDraw.ImageDraw,
    g: Geometry,
    rng: np.random.Generator,
    *,
    centre: tuple[float, float],
    scale: float,
) -> None:
    """A palm with four fingers and a forearm, fingers pointing across the face."""
    side = rng.choice([-1.0, 1.0])
    angle = math.radians(rng.uniform(-35, 35)) + (0 if side > 0 else math.pi)
    ux, uy = math.cos(angle), math.sin(angle)  # along the fingers
    vx, vy = -uy, ux
    px, py = centre
    palm_w, palm_h = 0.36 * g.fw * scale, 0.3 * g.fw * scale
    # Palm as a rotated polygon (approximate ellipse), behind the fingers' base.
    pts = []
    for k in range(16):
        t = 2 * math.pi * k / 16
        a, b = palm_w * math.cos(t), palm_h * math.sin(t)
        pts.append((px - ux * palm_w * 0.6 + ux * a + vx * b, py - uy * palm_w * 0.6 + uy * a + vy * b))
    _poly(draw, pts)
    finger_w = 0.12 * g.fw * scale
    for k, length in enumerate(rng.uniform(0.45, 0.7, 4) * g.fw * scale):
        offset = (k - 1.5) * finger_w * 1.05
        bx, by = px + vx * offset, py + vy * offset
        _capsule(draw, bx, by, bx + ux * length, by + uy * length, finger_w)
    if rng.random() < 0.6:  # thumb
        tx, ty = px - vx * 2.2 * finger_w, py - vy * 2.2 * finger_w
        _capsule(
            draw,
            tx - ux * palm_w,
            ty - uy * palm_w,
            tx + ux * 0.1 * g.fw,
            ty + uy * 0.25 * g.fw,
            finger_w * 1.1,
        )
    # Forearm to the frame edge.
    fx, fy = px - ux * palm_w * 1.4, py - uy * palm_w * 1.4
    _capsule(draw, fx, fy, fx - ux * g.fw + rng.uniform(-0.2, 0.2) * g.fw, fy + g.fw * 1.5, palm_h * 1.6)


def hand_alpha(g: Geometry, rng: np.random.Generator, *, over_mouth: bool) -> np.ndarray:
    img, draw = _canvas()
    scale = rng.uniform(0.9, 1.3)
    if over_mouth:
        centre = (
            g.cx + rng.uniform(-0.15, 0.15) * g.fw,
            (g.nose[1] + g.mouth[1]) / 2 + rng.uniform(-0.05, 0.1) * g.fw,
        )
    elif rng.random() < 0.5:  # under the chin
        centre = (g.cx + rng.uniform(-0.2, 0.2) * g.fw, g.chin + rng.uniform(0.15, 0.35) * g.fw)
    else:  # on a cheek / the side of the head
        centre = (
            g.cx + rng.choice([-1, 1]) * rng.uniform(0.65, 0.85) * g.fw,
            g.eye_y + rng.uniform(0, 0.4) * g.fw,
        )
    _hand(draw, g, rng, centre=centre, scale=scale)
    return _alpha(img, blur=rng.uniform(0, 0.7))


def skin_colour(context: np.ndarray, g: Geometry, rng: np.random.Generator) -> np.ndarray:
    """The person's own skin tone (forehead/cheek sample) most of the time, else a palette tone."""
    if rng.random() < 0.6:
        y = int(np.clip(g.eye_y - 0.35 * g.eye_d, 0, CONTEXT - 4))
        x = int(np.clip(g.cx, 2, CONTEXT - 4))
        patch = context[max(0, y - 3) : y + 3, max(0, x - 3) : x + 3].reshape(-1, 3).astype(np.float32)
        colour = np.median(patch, axis=0)
    else:
        colour = SKIN_TONES[rng.integers(len(SKIN_TONES))]
    return colour * rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, 3).astype(np.float32)


def skin_texture(colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    shade = 0.8 + 0.35 * _smooth_noise(rng, CONTEXT, int(rng.integers(2, 5)))
    tex = colour[None, None, :] * shade[..., None]
    return np.clip(tex + rng.normal(0, 3, (CONTEXT, CONTEXT, 1)), 0, 255).astype(np.float32)


def visor_layers(g: Geometry, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Helmet shell then a dark visor over the whole face, with a specular streak."""
    shell, draw = _canvas()
    r = g.fw * rng.uniform(0.85, 1.1)
    _ellipse(draw, g.cx, g.eye_y + 0.1 * g.fw, r, r * 1.1)
    _poly(
        draw,
        [
            (g.cx - r, g.eye_y),
            (g.cx + r, g.eye_y),
            (g.cx + r * 0.9, CONTEXT + 4),
            (g.cx - r * 0.9, CONTEXT + 4),
        ],
    )
    shell_colour = _random_colour(rng)
    shell_tex = np.clip(
        shell_colour * (0.6 + 0.6 * _smooth_noise(rng, CONTEXT, 3))[..., None], 0, 255
    ).astype(np.float32)
    visor, vdraw = _canvas()
    x0, x1 = g.cx - g.fw * rng.uniform(0.55, 0.7), g.cx + g.fw * rng.uniform(0.55, 0.7)
    y0 = g.top - g.fw * rng.uniform(0.0, 0.2)
    y1 = g.chin + g.fw * rng.uniform(0.0, 0.2)
    vdraw.rounded_rectangle(_s(x0, y0, x1, y1), radius=0.25 * g.fw * SS, fill=255)
    tint = rng.uniform(0, 60, 3).astype(np.float32)
    if rng.random() < 0.3:  # mirrored / iridium visor
        tint = _random_colour(rng) * 0.6
    visor_tex = np.broadcast_to(tint, (CONTEXT, CONTEXT, 3)).copy()
    yy, xx = np.mgrid[0:CONTEXT, 0:CONTEXT].astype(np.float32)
    streak = np.exp(
        -(((xx - g.cx) * 0.7 + (yy - g.eye_y) * 0.7 - rng.uniform(-20, 20)) ** 2)
        / (2 * rng.uniform(3, 10) ** 2)
    )
    visor_tex += streak[..., None] * rng.uniform(40, 180)
    visor_alpha = _alpha(visor, blur=0.5) * rng.uniform(0.75, 1.0)
    return [(_alpha(shell, blur=0.5), shell_tex), (visor_alpha, np.clip(visor_tex, 0, 255))]


def hood_alpha(g: Geometry, rng: np.random.Generator) -> np.ndarray:
    img, draw = _canvas()
    r = g.fw * rng.uniform(0.9, 1.25)
    _ellipse(draw, g.cx, g.eye_y, r, r * 1.15)
    _poly(
        draw,
        [
            (g.cx - r, g.eye_y),
            (g.cx + r, g.eye_y),
            (g.cx + r * 1.3, CONTEXT + 4),
            (g.cx - r * 1.3, CONTEXT + 4),
        ],
    )
    # The face opening: an oval from the forehead to under the chin.
    open_rx = g.fw * rng.uniform(0.5, 0.62)
    top = g.top - g.fw * rng.uniform(-0.1, 0.15)
    bottom = g.chin + g.fw * rng.uniform(0.1, 0.3)
    _ellipse(draw, g.cx, (top + bottom) / 2, open_rx, (bottom - top) / 2, 0)
    return _alpha(img, blur=rng.uniform(0.3, 1.2))


def cap_alpha(g: Geometry, rng: np.random.Generator) -> np.ndarray:
    img, draw = _canvas()
    r = g.fw * rng.uniform(0.55, 0.7)
    brim = g.eye_y - g.eye_d * rng.uniform(0.45, 0.8)
    _ellipse(draw, g.cx, brim, r, r * 0.8)
    draw.rectangle(_s(0, brim, CONTEXT, CONTEXT), fill=0)
    if rng.random() < 0.6:  # peak
        _ellipse(draw, g.cx, brim, r * 1.1, 0.12 * g.fw)
    return _alpha(img, blur=0.5)


def glasses_layers(
    g: Geometry, rng: np.random.Generator, *, dark: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    lens, ldraw = _canvas()
    frame, fdraw = _canvas()
    rx = g.eye_d * rng.uniform(0.3, 0.45)
    ry = g.eye_d * rng.uniform(0.2, 0.33)
    width = max(1, int(g.eye_d * rng.uniform(0.03, 0.09) * SS))
    rounded = rng.random() < 0.5
    dy = g.eye_d * rng.uniform(-0.05, 0.08)
    for ex, ey in (g.right_eye, g.left_eye):
        box = _s(ex - rx, ey + dy - ry, ex + rx, ey + dy + ry)
        if rounded:
            ldraw.ellipse(box, fill=255)
            fdraw.ellipse(box, outline=255, width=width)
        else:
            ldraw.rounded_rectangle(box, radius=ry * SS * 0.5, fill=255)
            fdraw.rounded_rectangle(box, radius=ry * SS * 0.5, outline=255, width=width)
    (rex, rey), (lex, ley) = g.right_eye, g.left_eye
    fdraw.line(_s(rex + rx, rey + dy, lex - rx, ley + dy), fill=255, width=width)
    fdraw.line(
        _s(rex - rx, rey + dy, rex - rx - 0.3 * g.eye_d, rey + dy - 0.05 * g.eye_d), fill=255, width=width
    )
    fdraw.line(
        _s(lex + rx, ley + dy, lex + rx + 0.3 * g.eye_d, ley + dy - 0.05 * g.eye_d), fill=255, width=width
    )
    frame_colour = _random_colour(rng, dark=True) if rng.random() < 0.7 else _random_colour(rng)
    layers = []
    lens_alpha = _alpha(lens) * (rng.uniform(0.8, 0.97) if dark else rng.uniform(0.0, 0.15))
    lens_colour = (
        rng.uniform(0, 50, 3).astype(np.float32) if dark else rng.uniform(150, 255, 3).astype(np.float32)
    )
    layers.append((lens_alpha, np.broadcast_to(lens_colour, (CONTEXT, CONTEXT, 3)).copy()))
    layers.append((_alpha(frame), np.broadcast_to(frame_colour, (CONTEXT, CONTEXT, 3)).copy()))
    return layers


def beard_alpha(g: Geometry, rng: np.random.Generator) -> np.ndarray:
    img, draw = _canvas()
    half_w = g.fw * rng.uniform(0.4, 0.52)
    top = g.nose[1] + rng.uniform(0.0, 0.4) * (g.mouth[1] - g.nose[1])
    pts = [(g.cx - half_w, top)]
    for k in range(9):
        t = math.pi * k / 8
        pts.append(
            (g.cx - half_w * math.cos(t), g.mouth[1] + (g.chin - g.mouth[1] + 0.1 * g.fw) * math.sin(t))
        )
    pts.append((g.cx + half_w, top))
    _poly(draw, pts)
    # The lips stay visible.
    mouth_rx = g.eye_d * rng.uniform(0.38, 0.5)
    _ellipse(draw, g.mouth[0], g.mouth[1], mouth_rx, g.eye_d * rng.uniform(0.14, 0.22), 0)
    return _alpha(img, blur=rng.uniform(0.8, 1.6)) * rng.uniform(0.6, 0.9)


def mustache_alpha(g: Geometry, rng: np.random.Generator) -> np.ndarray:
    """A thick dark moustache between the nose and the upper lip (the first model flagged these on
    Yale faces: a dark band over the philtrum looks like a mask edge), sometimes with a goatee."""
    img, draw = _canvas()
    gap = g.mouth[1] - g.nose[1]
    top = g.nose[1] + gap * rng.uniform(0.05, 0.3)
    bottom = g.mouth[1] - gap * rng.uniform(0.12, 0.3)
    half_w = g.eye_d * rng.uniform(0.45, 0.75)
    droop = gap * rng.uniform(0.0, 0.6)  # ends hang down beside the mouth (walrus / horseshoe)
    mx = g.mouth[0]
    _poly(
        draw,
        [
            (mx - 0.25 * half_w, top),
            (mx + 0.25 * half_w, top),
            (mx + half_w, bottom - 0.2 * gap),
            (mx + half_w * 1.05, bottom + droop),
            (mx + half_w * 0.8, bottom + droop),
            (mx + 0.5 * half_w, bottom),
            (mx - 0.5 * half_w, bottom),
            (mx - half_w * 0.8, bottom + droop),
            (mx - half_w * 1.05, bottom + droop),
            (mx - half_w, bottom - 0.2 * gap),
        ],
    )
    if rng.random() < 0.35:  # goatee under the lower lip
        _ellipse(
            draw,
            mx,
            (g.mouth[1] + g.chin) / 2 + 0.05 * g.fw,
            g.eye_d * rng.uniform(0.2, 0.35),
            (g.chin - g.mouth[1]) * rng.uniform(0.3, 0.45),
        )
    # The lips stay visible.
    _ellipse(draw, g.mouth[0], g.mouth[1], g.eye_d * rng.uniform(0.3, 0.42), gap * rng.uniform(0.08, 0.18), 0)
    return _alpha(img, blur=rng.uniform(0.3, 1.0)) * rng.uniform(0.8, 1.0)


def _composite(image: np.ndarray, alpha: np.ndarray, tex: np.ndarray) -> np.ndarray:
    return image * (1 - alpha[..., None]) + tex * alpha[..., None]


def apply_covering(
    kind: str,
    context: np.ndarray,
    pts: np.ndarray,
    rng: np.random.Generator,
    *,
    photo: np.ndarray | None = None,
) -> np.ndarray:
    """``context`` with covering or distractor ``kind`` drawn over the face; uint8 192x192x3."""
    g = Geometry.from_points(pts)
    img = context.astype(np.float32)
    for _attempt in range(4):
        layers = _layers(kind, context, g, rng, photo)
        union = np.zeros((CONTEXT, CONTEXT), np.float32)
        for alpha, _ in layers:
            union = np.maximum(union, alpha)
        if _valid(kind, union, g):
            break
    for alpha, tex in layers:
        img = _composite(img, alpha, tex)
    return np.clip(img, 0, 255).astype(np.uint8)


def _valid(kind: str, union: np.ndarray, g: Geometry) -> bool:
    mouth, nose = _at(union, g.mouth), _at(union, g.nose)
    if kind in COVERINGS and kind != "visor":
        return mouth > 0.7 and nose > 0.5
    if kind in ("hand_chin", "neck_scarf", "beard", "mustache"):
        return mouth < 0.25 and nose < 0.1
    return True


def _layers(
    kind: str, context: np.ndarray, g: Geometry, rng: np.random.Generator, photo: np.ndarray | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    dark = rng.random() < 0.5
    if kind == "mask":
        layers = [(mask_alpha(g, rng), texture(rng, photo=None))]
        if rng.random() < 0.5:  # ear loops
            loops, draw = _canvas()
            y = g.nose[1]
            for sx in (-1, 1):
                draw.line(_s(g.cx + sx * 0.5 * g.fw, y, g.cx + sx * 0.62 * g.fw, g.eye_y), fill=255, width=SS)
            layers.append((_alpha(loops), np.full((CONTEXT, CONTEXT, 3), rng.uniform(180, 255), np.float32)))
        return layers
    if kind == "scarf":
        return [(scarf_alpha(g, rng), texture(rng, dark=dark))]
    if kind == "balaclava":
        return [(balaclava_alpha(g, rng), texture(rng, dark=rng.random() < 0.8))]
    if kind == "hand":
        tex = skin_texture(skin_colour(context, g, rng), rng)
        layers = [(hand_alpha(g, rng, over_mouth=True), tex)]
        if rng.random() < 0.25:  # the other hand too
            layers.append((hand_alpha(g, rng, over_mouth=True), tex))
        return layers
    if kind == "visor":
        return visor_layers(g, rng)
    if kind == "hood_scarf":
        return [(hood_alpha(g, rng), texture(rng, dark=dark)), (scarf_alpha(g, rng), texture(rng, dark=dark))]
    if kind == "object":
        img, draw = _canvas()
        cx = g.cx + rng.uniform(-0.15, 0.15) * g.fw
        cy = (g.nose[1] + g.mouth[1]) / 2
        rx, ry = g.fw * rng.uniform(0.3, 0.55), g.fw * rng.uniform(0.25, 0.45)
        if rng.random() < 0.5:
            _ellipse(draw, cx, cy, rx, ry)
        else:
            draw.rounded_rectangle(
                _s(cx - rx, cy - ry, cx + rx, cy + ry), radius=rng.uniform(0, 0.5) * ry * SS, fill=255
            )
        return [(_alpha(img, blur=rng.uniform(0, 1)), texture(rng, photo=photo))]
    if kind in ("sunglasses", "glasses"):
        return glasses_layers(g, rng, dark=kind == "sunglasses")
    if kind == "hand_chin":
        return [(hand_alpha(g, rng, over_mouth=False), skin_texture(skin_colour(context, g, rng), rng))]
    if kind == "beard":
        colour = rng.uniform(10, 90) * rng.uniform(0.85, 1.1, 3).astype(np.float32)
        hair = colour * (0.6 + 0.8 * rng.random((CONTEXT, CONTEXT, 1)).astype(np.float32))
        return [(beard_alpha(g, rng), np.clip(hair, 0, 255))]
    if kind == "mustache":
        colour = rng.uniform(5, 60) * rng.uniform(0.85, 1.1, 3).astype(np.float32)
        hair = colour * (0.7 + 0.6 * rng.random((CONTEXT, CONTEXT, 1)).astype(np.float32))
        return [(mustache_alpha(g, rng), np.clip(hair, 0, 255))]
    if kind == "neck_scarf":
        top = g.chin + g.fw * rng.uniform(-0.02, 0.2)
        return [(scarf_alpha(g, rng, top=top), texture(rng, dark=dark))]
    if kind == "hood":
        return [(hood_alpha(g, rng), texture(rng, dark=dark))]
    if kind == "helmet":
        shell, _visor = visor_layers(g, rng)
        # An open-face helmet: the shell with the face cut out (eyes to chin visible).
        img, draw = _canvas()
        top = g.top - g.fw * rng.uniform(-0.1, 0.1)
        bottom = g.chin + g.fw * 0.4
        _ellipse(draw, g.cx, (top + bottom) / 2, g.fw * rng.uniform(0.5, 0.6), (bottom - top) / 2)
        return [(shell[0] * (1 - _alpha(img, blur=0.5)), shell[1])]
    if kind == "cap":
        return [(cap_alpha(g, rng), texture(rng, dark=dark))]
    raise ValueError(f"unknown covering kind {kind!r}")


# --- geometric and photometric augmentation -------------------------------------------------------


def random_frame_cut(context: np.ndarray, pts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Re-frame as a tighter web crop would be: cut at random lines around the face, edge-pad back."""
    (bx0, by0), (bx1, by1) = pts[0], pts[1]
    fw = bx1 - bx0
    x0 = int(rng.uniform(0, max(1, bx0 + 0.1 * fw)))
    x1 = int(rng.uniform(min(CONTEXT - 1, bx1 - 0.1 * fw), CONTEXT))
    y0 = int(rng.uniform(0, max(1, by0 + 0.05 * fw)))
    y1 = int(rng.uniform(min(CONTEXT - 1, by1 + 0.05 * fw), CONTEXT))
    if x1 - x0 < 8 or y1 - y0 < 8:
        return context
    region = context[y0:y1, x0:x1]
    return np.pad(region, ((y0, CONTEXT - y1), (x0, CONTEXT - x1), (0, 0)), mode="edge")


def canonical_crop(context: np.ndarray) -> np.ndarray:
    """The daemon's crop: the centre half of the context (same centre, rotation and pixel size)."""
    lo = (CONTEXT - OUT) // 2
    return np.ascontiguousarray(context[lo : lo + OUT, lo : lo + OUT])


def jittered_crop(context: np.ndarray, rng: np.random.Generator, *, strength: float = 1.0) -> np.ndarray:
    """A 96x96 crop of the context with random zoom, shift, rotation and mirroring."""
    zoom = math.exp(rng.uniform(-0.17, 0.2) * strength)  # crop side / canonical side
    angle = math.radians(rng.uniform(-14, 14) * strength)
    sx, sy = rng.uniform(-0.08, 0.08, 2) * strength * OUT
    cos_s, sin_s = math.cos(angle) * zoom, math.sin(angle) * zoom
    c = CONTEXT / 2
    h = OUT / 2
    coeffs = (cos_s, -sin_s, c + sx - cos_s * h + sin_s * h, sin_s, cos_s, c + sy - sin_s * h - cos_s * h)
    out = Image.fromarray(context).transform(
        (OUT, OUT), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR
    )
    arr = np.asarray(out)
    return arr[:, ::-1] if rng.random() < 0.5 else arr


def photometric(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lighting, colour, blur, resolution, noise and JPEG damage, each with its own probability."""
    img = crop.astype(np.float32)
    if rng.random() < 0.3:  # downscale-upscale: low-resolution web crops and small faces
        factor = rng.uniform(1.5, 4.0)
        small = max(12, int(OUT / factor))
        pil = Image.fromarray(crop).resize((small, small), Image.Resampling.BOX)
        img = np.asarray(pil.resize((OUT, OUT), Image.Resampling.BILINEAR), np.float32)
    if rng.random() < 0.3:
        img = np.asarray(
            Image.fromarray(img.astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5))),
            np.float32,
        )
    gray = img.mean(axis=2, keepdims=True)
    # Grayscale a quarter of the time: monochrome / IR ATM cameras (and the Yale lab photos).
    saturation = 0.0 if rng.random() < 0.25 else rng.uniform(0.5, 1.5)
    img = gray + (img - gray) * saturation
    img = img * rng.uniform(0.85, 1.15, 3).astype(np.float32)  # white balance
    if rng.random() < 0.35:  # side light or backlight: a linear gradient across the face
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:OUT, 0:OUT].astype(np.float32) / OUT - 0.5
        ramp = 1 + rng.uniform(0.2, 0.8) * (xx * math.cos(angle) + yy * math.sin(angle))
        img = img * ramp[..., None]
    if rng.random() < 0.2:  # harsh directional light: one side of the face falls into deep shadow
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:OUT, 0:OUT].astype(np.float32) / OUT - 0.5
        along = (xx * math.cos(angle) + yy * math.sin(angle) - rng.uniform(-0.2, 0.2)) / rng.uniform(
            0.04, 0.2
        )
        step = 1 / (1 + np.exp(-np.clip(along, -30, 30)))
        shadow = rng.uniform(0.12, 0.5)
        img = img * (shadow + (1 - shadow) * step)[..., None] * rng.uniform(1.0, 1.5)
    contrast = rng.uniform(0.4, 1.4) if rng.random() < 0.3 else rng.uniform(0.6, 1.4)
    img = (img - 128) * contrast + 128 + rng.uniform(-50, 50)
    img = np.clip(img, 0, 255)
    gamma = math.exp(rng.uniform(-0.45, 0.45))
    img = 255.0 * (img / 255.0) ** gamma
    if rng.random() < 0.3:
        img = img + rng.normal(0, rng.uniform(2, 12), img.shape)
    out = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < 0.4:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(rng.integers(15, 90)))
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


Augmenter = Callable[[np.ndarray, np.random.Generator], np.ndarray]
