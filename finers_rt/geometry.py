"""Coordinate maps between frames, with the reference's exact rounding.

Frames: ORIGINAL image (W x H pixels), a STAGE frame (the image or crop resized to the stage size,
e.g. 1920x1080 for GSE, 512x512 for LPR), and a CROP frame (pixels of a crop of the original,
origin at the crop's top-left). Boxes are (x1, y1, x2, y2); crops are half-open slices
`image[y1:y2, x1:x2]` like the reference.
"""

from __future__ import annotations

from typing import Sequence

BoxXYXY = tuple[int, int, int, int]


def stage_to_frame_box(box_xyxy: Sequence[int], frame_wh: Sequence[int],
                       stage_wh: Sequence[int]) -> BoxXYXY:
    """Map a box from a stage frame to a frame of size frame_wh: round(int(v) * W / stage_W).

    This is the reference's `round(int(x) * x_factor)` (Python's round, half to even).
    """
    fx, fy = frame_wh[0] / stage_wh[0], frame_wh[1] / stage_wh[1]
    x1, y1, x2, y2 = (int(v) for v in box_xyxy)
    return (round(x1 * fx), round(y1 * fy), round(x2 * fx), round(y2 * fy))


def stage_to_frame_points(points_xy: Sequence[Sequence[int]], frame_wh: Sequence[int],
                          stage_wh: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Map points from a stage frame to a frame of size frame_wh (same rounding as boxes)."""
    fx, fy = frame_wh[0] / stage_wh[0], frame_wh[1] / stage_wh[1]
    return tuple((round(int(x) * fx), round(int(y) * fy)) for x, y in points_xy)


def frame_to_stage_box(box_xyxy: Sequence[float], frame_wh: Sequence[int],
                       stage_wh: Sequence[int]) -> tuple[float, float, float, float]:
    """Inverse map (float, no rounding): a box in a frame of size frame_wh to the stage frame."""
    fx, fy = stage_wh[0] / frame_wh[0], stage_wh[1] / frame_wh[1]
    x1, y1, x2, y2 = box_xyxy
    return (x1 * fx, y1 * fy, x2 * fx, y2 * fy)


def dynamic_box(box_xyxy: Sequence[float], image_wh: Sequence[int], min_side: int = 512) -> BoxXYXY:
    """The reference "dynamic box": a square of side max(min_side, max(w, h)) centred on the box,
    each coordinate clamped to [0, W-1] / [0, H-1] (so a crop near a border is smaller)."""
    x1, y1, x2, y2 = box_xyxy
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    side = max(min_side, max(x2 - x1, y2 - y1))
    width, height = image_wh
    nx1, nx2 = int(round(cx - side / 2)), int(round(cx + side / 2))
    ny1, ny2 = int(round(cy - side / 2)), int(round(cy + side / 2))
    return (_clamp(nx1, 0, width - 1), _clamp(ny1, 0, height - 1),
            _clamp(nx2, 0, width - 1), _clamp(ny2, 0, height - 1))


def crop_is_empty(crop_xyxy: Sequence[int]) -> bool:
    """True when image[int(y1):int(y2), int(x1):int(x2)] has no pixels."""
    x1, y1, x2, y2 = (int(v) for v in crop_xyxy)
    return x2 <= x1 or y2 <= y1


def crop_to_image_box(box_xyxy: Sequence[int], crop_xyxy: Sequence[int]) -> BoxXYXY:
    """A box in crop pixels -> original-image pixels (offset by the crop origin)."""
    ox, oy = int(crop_xyxy[0]), int(crop_xyxy[1])
    x1, y1, x2, y2 = box_xyxy
    return (x1 + ox, y1 + oy, x2 + ox, y2 + oy)


def crop_to_image_points(points_xy: Sequence[Sequence[int]], crop_xyxy: Sequence[int]):
    ox, oy = int(crop_xyxy[0]), int(crop_xyxy[1])
    return tuple((x + ox, y + oy) for x, y in points_xy)


def clamp_box(box_xyxy: Sequence[float], frame_wh: Sequence[int]) -> BoxXYXY:
    """Order the corners and clamp to [0, W] x [0, H] (half-open pixel frame)."""
    x1, x2 = sorted((box_xyxy[0], box_xyxy[2]))
    y1, y2 = sorted((box_xyxy[1], box_xyxy[3]))
    width, height = frame_wh
    return (_clamp(int(x1), 0, width), _clamp(int(y1), 0, height),
            _clamp(int(x2), 0, width), _clamp(int(y2), 0, height))


def box_inside(inner_xyxy: Sequence[float], outer_xyxy: Sequence[float]) -> bool:
    """The reference `is_inside`: inner fully within outer (inclusive)."""
    return (inner_xyxy[0] >= outer_xyxy[0] and inner_xyxy[1] >= outer_xyxy[1]
            and inner_xyxy[2] <= outer_xyxy[2] and inner_xyxy[3] <= outer_xyxy[3])


def box_iou(a_xyxy: Sequence[float], b_xyxy: Sequence[float]) -> float:
    """IoU of two boxes in continuous coordinates (0 when either is empty)."""
    ix = max(0.0, min(a_xyxy[2], b_xyxy[2]) - max(a_xyxy[0], b_xyxy[0]))
    iy = max(0.0, min(a_xyxy[3], b_xyxy[3]) - max(a_xyxy[1], b_xyxy[1]))
    inter = ix * iy
    area_a = max(0.0, a_xyxy[2] - a_xyxy[0]) * max(0.0, a_xyxy[3] - a_xyxy[1])
    area_b = max(0.0, b_xyxy[2] - b_xyxy[0]) * max(0.0, b_xyxy[3] - b_xyxy[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def tile_grid(image_wh: Sequence[int], tile_side: int, overlap: float = 0.25) -> list[BoxXYXY]:
    """Square tiles of side `tile_side` covering the image with at least `overlap` (fraction),
    row-major; tiles are clipped to the image when it is smaller than a tile."""
    width, height = image_wh
    return [(x, y, min(x + tile_side, width), min(y + tile_side, height))
            for y in _starts(height, tile_side, overlap) for x in _starts(width, tile_side, overlap)]


def _starts(length: int, tile: int, overlap: float) -> list[int]:
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    count = -(-(length - tile) // stride) + 1
    last = length - tile
    return sorted({round(i * last / (count - 1)) for i in range(count)})


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(value, high))
