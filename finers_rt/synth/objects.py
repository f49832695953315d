"""Synthetic scene objects: the attribute vocabulary, exact polygons, placement and painting.

Every object is a polygon with integer vertices (x right, y down, original image pixels). Its
pixels are exactly `finers_rt.dataset.polygon_to_mask(points_xy, H, W)`: painting rasterises
that mask in a small window around the object, which equals the full-image rasterisation
because cv2 fills integer polygons translation-invariantly. Vertices come from Python's
`math` (not numpy's SIMD transcendentals) so that a seed gives the same polygons on every
machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from finers_rt.dataset import polygon_to_mask

# Well-separated, saturated RGB colours; the background only uses muted colours.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 40), "orange": (255, 135, 0), "yellow": (250, 220, 30),
    "green": (40, 170, 60), "cyan": (0, 205, 215), "blue": (35, 80, 225),
    "purple": (135, 50, 190), "pink": (255, 120, 200), "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "pentagon", "hexagon", "cross",
          "ellipse")
# The "others" attribute: how the surface of the object looks.
PATTERNS = ("solid", "striped", "dotted", "outlined")
PATTERN_WEIGHTS = (0.55, 0.15, 0.15, 0.15)

# Second colour of striped / dotted / outlined objects: readable against the main colour
# and never confusable with another palette entry's main colour.
_SECOND_COLOR = {"white": (110, 110, 110), "black": (150, 150, 150), "yellow": (20, 20, 20),
                 "cyan": (20, 20, 20), "orange": (20, 20, 20)}
_DEFAULT_SECOND = (245, 245, 245)
MIN_PATTERN_EXTENT_PX = 12   # smaller objects are always solid (a pattern would be unreadable)
MIN_RADIUS_PX = 3.0
MAX_TILT_DEG = 12.0          # small rotation jitter; a square tilted 45 deg would be a diamond


@dataclass(frozen=True)
class SceneObject:
    """One painted object.

    points_xy: int32 [N, 2] polygon vertices (x, y) in image pixels, inside the image.
    box_xyxy: inclusive pixel box (x1, y1, x2, y2) of the rasterised mask.
    center_xy: float (x, y) centre of the mask's pixels.
    area_px: number of mask pixels; area_percent = 100 * area_px / (W * H).
    """

    color: str
    shape: str
    pattern: str
    points_xy: np.ndarray
    box_xyxy: tuple[int, int, int, int]
    center_xy: tuple[float, float]
    area_px: int
    area_percent: float

    def value(self, field: str) -> str:
        """The object's value of 'color' | 'shape' | 'pattern'."""
        return {"color": self.color, "shape": self.shape, "pattern": self.pattern}[field]


def _regular(n: int, phase_deg: float = -90.0) -> list[tuple[float, float]]:
    """Unit regular n-gon, first vertex at `phase_deg` (-90 = pointing up)."""
    return [(math.cos(math.radians(phase_deg + 360.0 * k / n)),
             math.sin(math.radians(phase_deg + 360.0 * k / n))) for k in range(n)]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        a = math.radians(-90.0 + 180.0 * k / points)
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _cross(arm: float = 0.36) -> list[tuple[float, float]]:
    a = arm
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a),
            (-1, a), (-1, -a), (-a, -a)]


def unit_polygon(shape: str, radius_px: float) -> list[tuple[float, float]]:
    """Unit-radius outline of a shape (extent [-1, 1]); round shapes get more vertices
    when they are drawn larger (about one vertex per 3 px of perimeter, 12..72)."""
    n_round = max(12, min(72, int(2 * math.pi * radius_px / 3)))
    if shape == "circle":
        return _regular(n_round)
    if shape == "ellipse":
        return [(x, 0.55 * y) for x, y in _regular(n_round)]
    if shape == "square":
        return [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    if shape == "triangle":
        return [(x, y + 0.2) for x, y in _regular(3)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]
    if shape == "pentagon":
        return _regular(5)
    if shape == "hexagon":
        return _regular(6, phase_deg=0.0)
    if shape == "star":
        return _star()
    if shape == "cross":
        return _cross()
    raise ValueError(f"unknown shape {shape!r}")


def _unit_area(shape: str) -> float:
    pts = unit_polygon(shape, 100.0)
    s = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        s += x0 * y1 - x1 * y0
    return abs(s) / 2.0


_UNIT_AREA = {s: _unit_area(s) for s in SHAPES}
# Farthest vertex from the centre at unit radius (a tilted square's corner reaches 1.2).
_UNIT_EXTENT = {s: max(math.hypot(x, y) for x, y in unit_polygon(s, 100.0)) for s in SHAPES}


def extent_px(shape: str, radius_px: float) -> float:
    """Largest distance of any vertex from the centre, at any tilt, in pixels."""
    return _UNIT_EXTENT[shape] * radius_px


def radius_for_area(shape: str, area_px: float) -> float:
    """Radius (px) at which `shape` covers about `area_px` pixels (at least MIN_RADIUS_PX)."""
    return max(MIN_RADIUS_PX, math.sqrt(area_px / _UNIT_AREA[shape]))


def polygon_points(shape: str, center_xy: tuple[float, float], radius_px: float,
                   tilt_deg: float) -> np.ndarray:
    """Integer polygon [N, 2] int32 (x, y) of a shape centred at center_xy, rotated by tilt."""
    c, s = math.cos(math.radians(tilt_deg)), math.sin(math.radians(tilt_deg))
    cx, cy = center_xy
    pts = [(round(cx + radius_px * (x * c - y * s)), round(cy + radius_px * (x * s + y * c)))
           for x, y in unit_polygon(shape, radius_px)]
    dedup = [p for i, p in enumerate(pts) if p != pts[i - 1]]
    return np.array(dedup if len(dedup) >= 3 else pts, dtype=np.int32)


def window_mask(points_xy: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Rasterise a polygon in its own bounding window.

    Returns (mask bool [h, w], x0, y0): mask[y, x] is pixel (x0 + x, y0 + y) of the
    full-image `polygon_to_mask(points_xy, H, W)`.
    """
    x0, y0 = (int(v) for v in points_xy.min(axis=0))
    x1, y1 = (int(v) for v in points_xy.max(axis=0))
    local = points_xy - np.array([x0, y0], dtype=np.int32)
    return polygon_to_mask(local, y1 - y0 + 1, x1 - x0 + 1), x0, y0


def pattern_layer(pattern: str, color: str, mask: np.ndarray, radius_px: float,
                  phase: int) -> np.ndarray:
    """Colours of the object's pixels: uint8 [h, w, 3] RGB over the window of `mask`.

    'solid' is the main colour; 'striped' has diagonal/straight stripes of the second colour
    (one third of the period), 'dotted' a grid of small dots, 'outlined' a rim. The main colour
    always covers most of the object. `phase` (0..3) picks the stripe direction.
    """
    h, w = mask.shape
    main = np.array(COLORS[color], dtype=np.uint8)
    layer = np.empty((h, w, 3), dtype=np.uint8)
    layer[:] = main
    if pattern == "solid":
        return layer
    second = np.array(_SECOND_COLOR.get(color, _DEFAULT_SECOND), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    if pattern == "striped":
        period = max(3, int(round(radius_px / 2.5)))
        coord = (xx, yy, xx + yy, xx - yy + w)[phase % 4]
        sel = (coord % period) < max(1, period // 3)
    elif pattern == "dotted":
        period = max(4, int(round(radius_px / 2.2)))
        half = period // 2
        dot_r2 = max(1, (period * period) // 12)
        sel = ((xx % period - half) ** 2 + (yy % period - half) ** 2) <= dot_r2
    elif pattern == "outlined":
        rim = max(1, int(round(radius_px / 7)))
        inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=rim)
        sel = mask & (inner == 0)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    layer[sel] = second
    return layer


def main_color_fraction(obj: SceneObject, radius_px: float, phase: int) -> float:
    """Fraction of the object's pixels that show its main colour (1.0 for 'solid')."""
    if obj.pattern == "solid":
        return 1.0
    mask, _x0, _y0 = window_mask(obj.points_xy)
    layer = pattern_layer(obj.pattern, obj.color, mask, radius_px, phase)
    main = np.all(layer == np.array(COLORS[obj.color], dtype=np.uint8), axis=-1)
    return float((main & mask).sum()) / float(mask.sum())


def paint_object(image: np.ndarray, obj: SceneObject, radius_px: float, phase: int,
                 bgr: bool = False) -> None:
    """Paint `obj` into image (uint8 [H, W, 3], RGB or with `bgr` BGR, in place): exactly
    the pixels of its mask, nothing else."""
    mask, x0, y0 = window_mask(obj.points_xy)
    h, w = mask.shape
    layer = pattern_layer(obj.pattern, obj.color, mask, radius_px, phase)
    if bgr:
        layer = layer[:, :, ::-1]
    window = image[y0:y0 + h, x0:x0 + w]
    window[mask] = layer[mask]


def make_object(color: str, shape: str, pattern: str, center_xy: tuple[float, float],
                radius_px: float, tilt_deg: float, size_wh: tuple[int, int]) -> SceneObject:
    """Build a SceneObject and measure its rasterised mask (area, box, centre)."""
    points = polygon_points(shape, center_xy, radius_px, tilt_deg)
    mask, x0, y0 = window_mask(points)
    ys, xs = np.nonzero(mask)
    area = int(xs.size)
    box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()), y0 + int(ys.max()))
    center = (x0 + float(xs.mean()), y0 + float(ys.mean()))
    return SceneObject(color=color, shape=shape, pattern=pattern, points_xy=points,
                       box_xyxy=box, center_xy=center, area_px=area,
                       area_percent=100.0 * area / (size_wh[0] * size_wh[1]))
