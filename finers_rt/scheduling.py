"""Crop scheduling beyond the reference: which further crops LPR should look at.

When GSE gives no parsable region, or LPR does not localise the target in GSE's crop, the
pipeline scans full-resolution square tiles of the LPR crop side. Tiles are ordered by what the
model said: nearest to GSE's region first when there is one, else from the image centre
outwards; tiles that mostly repeat a crop already tried are skipped.
"""

from __future__ import annotations

from typing import Sequence

from finers_rt import geometry

TILE_OVERLAP = 0.25
SAME_CROP_IOU = 0.5


def fallback_crops(image_wh: Sequence[int], side: int,
                   region_xyxy: Sequence[float] | None = None,
                   exclude: Sequence[int] | None = None, limit: int = 4) -> list[tuple[int, int, int, int]]:
    """Up to `limit` tiles (x1, y1, x2, y2) in original pixels, best candidates first.

    image_wh: (W, H); side: tile side in original pixels (the crop size LPR expects);
    region_xyxy: GSE's region in original pixels, if any; exclude: a crop already tried.
    """
    if limit <= 0:
        return []
    tiles = geometry.tile_grid(image_wh, side, TILE_OVERLAP)
    if region_xyxy is not None:
        cx, cy = (region_xyxy[0] + region_xyxy[2]) / 2, (region_xyxy[1] + region_xyxy[3]) / 2
    else:
        cx, cy = image_wh[0] / 2, image_wh[1] / 2

    def distance(tile):
        tx, ty = (tile[0] + tile[2]) / 2, (tile[1] + tile[3]) / 2
        return (tx - cx) ** 2 + (ty - cy) ** 2

    ordered = sorted(tiles, key=lambda t: (distance(t), t[1], t[0]))
    if exclude is not None:
        ordered = [t for t in ordered if geometry.box_iou(t, exclude) < SAME_CROP_IOU]
    return ordered[:limit]
