"""Cluttered backgrounds for synthetic FineRS scenes.

A background is smooth colour fields + blotchy texture + fine grain + clutter (lines, stripes,
translucent patches and muted decoy shapes). Every colour is muted (low saturation, mid
luminance) so that it never looks like an object of the saturated palette in `objects.py`.

Speed matters (4K scenes by the ten thousand): large fields are drawn at low resolution and
upsampled with cv2.resize INTER_LINEAR_EXACT (bit-exact on every CPU, and faster than
INTER_LINEAR), the grain is one small random tile repeated over the image, and every blend
is exact (integer results), so a seed gives the same pixels on any machine.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

_GRAIN_TILE = 192
_TEXTURE_ZERO = 76
_UNIT9 = [(math.cos(2 * math.pi * m / 9), math.sin(2 * math.pi * m / 9)) for m in range(9)]


def muted_colors(rng: np.random.Generator, n: int) -> np.ndarray:
    """n muted RGB colours, uint8 [n, 3]: a grey level 70..190 plus a weak tint."""
    grey = rng.integers(70, 191, size=(n, 1))
    tint = rng.integers(-45, 46, size=(n, 3))
    return np.clip(grey + tint, 40, 215).astype(np.uint8)


def _upsampled(rng: np.random.Generator, grid_hw: tuple[int, int], size_wh: tuple[int, int],
               low: int, high: int, channels: int = 3) -> np.ndarray:
    """Random uint8 field on a coarse grid, bilinearly upsampled to size_wh: [H, W, C]."""
    field = rng.integers(low, high, size=(grid_hw[0], grid_hw[1], channels), dtype=np.uint8)
    out = cv2.resize(field, size_wh, interpolation=cv2.INTER_LINEAR_EXACT)
    return out if out.ndim == 3 else out[:, :, None]


def _base(rng: np.random.Generator, size_wh: tuple[int, int]) -> np.ndarray:
    """Smooth colour fields: a few muted colours on a coarse grid, upsampled. [H, W, 3]."""
    gh, gw = int(rng.integers(2, 5)), int(rng.integers(3, 7))
    colors = muted_colors(rng, gh * gw).reshape(gh, gw, 3)
    return cv2.resize(colors, size_wh, interpolation=cv2.INTER_LINEAR_EXACT)


def _texture(rng: np.random.Generator, size_wh: tuple[int, int]) -> np.ndarray:
    """Signed texture as uint8 offset by 64: blotches (1/24 res) + grain (small tile)."""
    w, h = size_wh
    blotch = _upsampled(rng, (max(2, h // 24), max(2, w // 24)), size_wh, 40, 89, channels=1)
    tile = rng.integers(0, 25, size=(_GRAIN_TILE, _GRAIN_TILE), dtype=np.uint8)
    oy, ox = int(rng.integers(0, _GRAIN_TILE)), int(rng.integers(0, _GRAIN_TILE))
    reps = (math.ceil((h + oy) / _GRAIN_TILE), math.ceil((w + ox) / _GRAIN_TILE))
    grain = np.tile(tile, reps)[oy:oy + h, ox:ox + w]
    return cv2.add(blotch[:, :, 0], grain)  # 40..112, mean ~_TEXTURE_ZERO


def _lines(rng: np.random.Generator, image: np.ndarray, scale: float) -> None:
    """Random straight lines and polylines (cables, edges, cracks), drawn in place."""
    h, w = image.shape[:2]
    n = int(rng.integers(15, 45))
    colors = muted_colors(rng, n)
    ends = rng.integers(0, [w, h, w, h], size=(n, 4))
    thick = np.maximum(1, (rng.integers(1, 9, size=n) * scale).astype(int))
    for (x0, y0, x1, y1), col, t in zip(ends, colors, thick):
        cv2.line(image, (int(x0), int(y0)), (int(x1), int(y1)), col.tolist(), int(t),
                 lineType=cv2.LINE_8)


def _stripes(rng: np.random.Generator, image: np.ndarray, scale: float) -> None:
    """A band of parallel lines (fences, road markings, planks) somewhere in the image."""
    h, w = image.shape[:2]
    for _ in range(int(rng.integers(0, 3))):
        col = muted_colors(rng, 1)[0].tolist()
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        dx, dy = int(rng.integers(-w // 3, w // 3 + 1)), int(rng.integers(-h // 3, h // 3 + 1))
        step = int(max(4, rng.integers(20, 80) * scale))
        t = int(max(1, rng.integers(1, 6) * scale))
        horizontal = abs(dx) >= abs(dy)
        for k in range(int(rng.integers(5, 20))):
            off = (0, k * step) if horizontal else (k * step, 0)
            cv2.line(image, (x + off[0], y + off[1]), (x + dx + off[0], y + dy + off[1]),
                     col, t, lineType=cv2.LINE_8)


def _patches(rng: np.random.Generator, image: np.ndarray, scale: float) -> None:
    """Translucent patches (large random polygons), blended 50/50 into image in place."""
    h, w = image.shape[:2]
    overlay = image.copy()
    n = int(rng.integers(6, 16))
    colors = muted_colors(rng, n)
    for col in colors:
        cx, cy = rng.integers(0, w), rng.integers(0, h)
        r = rng.integers(40, 500) * scale
        k = int(rng.integers(3, 9))
        ang = np.sort(rng.random(k)) * 2 * np.pi
        rad = r * (0.5 + rng.random(k))
        # angles -> unit vectors via math (bit-identical everywhere), not numpy SIMD
        pts = [(int(cx + rr * math.cos(a)), int(cy + rr * math.sin(a))) for a, rr in zip(ang, rad)]
        cv2.fillPoly(overlay, [np.array(pts, dtype=np.int32)], col.tolist())
    cv2.addWeighted(image, 0.5, overlay, 0.5, 0.0, dst=image)


def _decoys(rng: np.random.Generator, image: np.ndarray, scale: float) -> None:
    """Small greyish clutter that is no vocabulary shape: bars (aspect >= 3) and lumpy
    blobs (jittered radii), so that no decoy can pass for a palette object."""
    h, w = image.shape[:2]
    n = int(rng.integers(20, 60))
    grey = rng.integers(60, 200, size=(n, 1))
    colors = np.clip(grey + rng.integers(-10, 11, size=(n, 3)), 0, 255).astype(np.uint8)
    xy = rng.integers(0, [w, h], size=(n, 2))
    rad = np.maximum(3, (rng.integers(8, 45, size=n) * scale)).astype(int)
    for (x, y), r, col in zip(xy, rad, colors):
        k = int(rng.integers(0, 3))
        jitter = rng.random(9)
        if k == 0:  # bar, axis-aligned or not
            t = max(1, int(r) // 3)
            dx, dy = (int(r), 0) if jitter[0] < 0.5 else (0, int(r))
            cv2.line(image, (int(x - dx), int(y - dy)), (int(x + dx), int(y + dy)),
                     col.tolist(), t, lineType=cv2.LINE_8)
        else:  # lumpy blob: 9 vertices, radius jittered 40..100%
            pts = [(int(x + r * (0.4 + 0.6 * jitter[m]) * _UNIT9[m][0]),
                    int(y + r * (0.4 + 0.6 * jitter[m]) * _UNIT9[m][1])) for m in range(9)]
            cv2.fillPoly(image, [np.array(pts, dtype=np.int32)], col.tolist())


def render_background(rng: np.random.Generator, size_wh: tuple[int, int]) -> np.ndarray:
    """A cluttered background, uint8 [H, W, 3] RGB, drawn deterministically from `rng`.

    Clutter sizes scale with the image width relative to 3840 so a 640x360 scene looks like
    a downscaled 4K one.
    """
    w, h = size_wh
    scale = w / 3840.0
    image = _base(rng, size_wh)
    _patches(rng, image, scale)
    _stripes(rng, image, scale)
    _lines(rng, image, scale)
    _decoys(rng, image, scale)
    texture = cv2.cvtColor(_texture(rng, size_wh), cv2.COLOR_GRAY2RGB)  # zero point 76
    # image + texture - 76 on every channel, saturated to uint8 in one pass. Weights 1, 1 and
    # an integer offset keep the float arithmetic exact, so this is bit-exact on any CPU.
    return cv2.addWeighted(image, 1.0, texture, 1.0, -float(_TEXTURE_ZERO))
