"""Negative LPR crops: pipeline-like crops that do NOT hold the question's target.

The pipeline scans further full-resolution crops when LPR says the object is not in the one
it was given (`finers_rt.scheduling`, `parsing.says_not_found`). An LPR trained only on crops
that hold the target never says so. A negative crop teaches it: same prompt, a crop without
the target, the answer's response NOT_FOUND_RESPONSE. The box and points of that answer go
on the "decoy": the object in the crop most like the target (most shared colour / shape /
pattern, then the largest), i.e. what a model that has not read the question closely would
box. A crop with no whole object answers the whole crop (box [0, 0, w, h], both points at
its centre).

Two kinds, half each (when both exist):
- decoy crops: like `data.make_lpr_item`, a random region around an object sharing a field
  with the target, grown by the dynamic box: the crops a GSE that confuses look-alikes gives;
- tiles: the runtime's fallback grid (`geometry.tile_grid`, side `crop_min_side`, overlap
  `scheduling.TILE_OVERLAP`).
Neither may touch the target's box.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from finers_rt import geometry
from finers_rt.image import resize_for_stage
from finers_rt.scheduling import TILE_OVERLAP
from finers_rt.train.data import StageSizes, crop_item, polygon_box_xyxy, random_region

FIELDS = ("color", "shape", "pattern")


def target_object(record: dict[str, Any], objs: list) -> int:
    """Index of the record's target among the scene's objects (nearest box centre)."""
    x1, y1, x2, y2 = polygon_box_xyxy(record["points"])
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    dist = [(o.box_xyxy[0] + o.box_xyxy[2] + 1) / 2 - cx for o in objs]
    dist = [dx * dx + ((o.box_xyxy[1] + o.box_xyxy[3] + 1) / 2 - cy) ** 2
            for dx, o in zip(dist, objs)]
    return int(np.argmin(dist))


def shared_fields(a, b) -> int:
    """How many of colour, shape and pattern two scene objects share."""
    return sum(a.value(f) == b.value(f) for f in FIELDS)


def _object_box(obj) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = obj.box_xyxy  # inclusive pixels
    return (float(x1), float(y1), float(x2) + 1.0, float(y2) + 1.0)


def _touches(box_a, box_b) -> bool:
    return box_a[0] < box_b[2] and box_b[0] < box_a[2] and box_a[1] < box_b[3] and box_b[1] < box_a[3]


def pick_negative_crops(record: dict[str, Any], objs: list, image_wh: tuple[int, int],
                        sizes: StageSizes, rng: np.random.Generator, count: int
                        ) -> list[tuple[int, int, int, int]]:
    """Up to `count` crops (x1, y1, x2, y2, original pixels) that do not touch the target."""
    target = objs[target_object(record, objs)]
    target_box = _object_box(target)
    tiles = [t for t in geometry.tile_grid(image_wh, sizes.crop_min_side, TILE_OVERLAP)
             if not _touches(t, target_box)]
    look_alikes = [o for o in objs if o is not target and shared_fields(o, target) > 0]
    side = sizes.region_side_original(image_wh)
    crops = []
    for _ in range(count * 4):  # a few tries: a decoy's crop may touch the target
        if len(crops) == count:
            break
        if look_alikes and (not tiles or rng.random() < 0.5):
            decoy = look_alikes[int(rng.integers(len(look_alikes)))]
            region = random_region(_object_box(decoy), side, image_wh, rng)
            crop = geometry.dynamic_box(region, image_wh, sizes.crop_min_side)
            crop = tuple(int(v) for v in crop)
        elif tiles:
            crop = tuple(int(v) for v in tiles[int(rng.integers(len(tiles)))])
        else:
            break
        if not _touches(crop, target_box) and not geometry.crop_is_empty(crop):
            crops.append(crop)
    return crops


def decoy_in_crop(crop_xyxy, objs: list, target_index: int) -> int | None:
    """The whole object in the crop most like the target (shared fields, then area), or None."""
    x1, y1, x2, y2 = crop_xyxy
    target = objs[target_index]
    best, best_key = None, None
    for i, o in enumerate(objs):
        bx1, by1, bx2, by2 = _object_box(o)
        if i == target_index or bx1 < x1 or by1 < y1 or bx2 > x2 or by2 > y2:
            continue
        key = (shared_fields(o, target), o.area_px)
        if best_key is None or key > best_key:
            best, best_key = i, key
    return best


def negative_item(image: np.ndarray, record: dict[str, Any], objs: list, crop_xyxy,
                  sizes: StageSizes) -> dict[str, Any]:
    """The crop resized to the LPR stage and the meta of its NOT-found answer:
    crop_original, answer_box_stage, answer_points_stage (the decoy's, or the whole crop),
    decoy (bool)."""
    decoy = decoy_in_crop(crop_xyxy, objs, target_object(record, objs))
    if decoy is not None:
        item = crop_item(image, {"points": objs[decoy].points_xy.tolist()}, crop_xyxy, sizes)
        if item["meta"]["box_stage"] is not None:
            meta = item["meta"]
            return {"image": item["image"],
                    "meta": {"crop_original": meta["crop_original"],
                             "answer_box_stage": meta["box_stage"],
                             "answer_points_stage": meta["points_stage"], "decoy": True}}
    x1, y1, x2, y2 = (int(v) for v in crop_xyxy)
    w, h = sizes.lpr_size_wh
    return {"image": resize_for_stage(image[y1:y2, x1:x2], sizes.lpr_size_wh),
            "meta": {"crop_original": [x1, y1, x2, y2],
                     "answer_box_stage": [0.0, 0.0, float(w), float(h)],
                     "answer_points_stage": [[w / 2, h / 2], [w / 2, h / 2]], "decoy": False}}
