"""Writing a Result for a person: `mask.png` and `overlay.png` (region, box, points, tinted mask).

Files that already exist are never overwritten unless `overwrite=True`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from finers_rt.errors import InputError

REGION_BGR = (255, 160, 0)   # blue-ish: the crop LPR looked at
BOX_BGR = (0, 220, 0)        # green: LPR's box
POINT_BGR = (0, 0, 255)      # red: LPR's points
MASK_BGR = np.array([0, 0, 255], np.float32)


def draw_overlay(image_rgb: np.ndarray, result: Any, alpha: float = 0.5) -> np.ndarray:
    """A copy of `image_rgb` [H, W, 3] uint8 with the mask tinted and region/box/points drawn;
    returned as BGR uint8 (ready for cv2.imwrite)."""
    canvas = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    _tint(canvas, result.mask, alpha)
    thickness = max(2, round(max(canvas.shape[:2]) / 800))
    if result.region_xyxy is not None:
        x1, y1, x2, y2 = result.region_xyxy
        cv2.rectangle(canvas, (x1, y1), (x2, y2), REGION_BGR, thickness)
    if result.bbox_xyxy is not None:
        x1, y1, x2, y2 = result.bbox_xyxy
        cv2.rectangle(canvas, (x1, y1), (x2, y2), BOX_BGR, thickness)
    for x, y in result.points_xy or ():
        cv2.circle(canvas, (int(x), int(y)), 3 * thickness, POINT_BGR, -1)
    return canvas


def _tint(canvas: np.ndarray, mask: np.ndarray, alpha: float) -> None:
    """Blend MASK_BGR into `canvas` [H, W, 3] uint8 where `mask` [H, W] bool is set, in place;
    only the mask's bounding box is touched (`pixel * (1 - alpha) + colour * alpha` in float32,
    truncated to uint8)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return
    cols = np.flatnonzero(mask[rows[0]:rows[-1] + 1].any(axis=0))
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    tinted = canvas[window].astype(np.float32) * (1 - alpha) + MASK_BGR * alpha
    np.copyto(canvas[window], tinted.astype(np.uint8), where=mask[window][:, :, None])


def write_outputs(out_dir: str | Path, image_rgb: np.ndarray, result: Any,
                  overwrite: bool = False) -> dict[str, str]:
    """Write `mask.png` (0/255) and `overlay.png` into out_dir; return their paths."""
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out must be a folder, but '{folder}' is a file")
    paths = {"mask": folder / "mask.png", "overlay": folder / "overlay.png"}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise InputError(f"refusing to overwrite {existing}; choose another --out or pass --force")
    folder.mkdir(parents=True, exist_ok=True)
    images = {"mask": result.mask.astype(np.uint8) * 255, "overlay": draw_overlay(image_rgb, result)}
    for name, path in paths.items():
        if not cv2.imwrite(str(path), images[name]):
            raise InputError(f"could not write {path} (disk full or not writable?)")
    return {name: str(path) for name, path in paths.items()}
