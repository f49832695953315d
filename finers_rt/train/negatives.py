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


def target_object(record: dict[str, Any], objs: list, image_wh: tuple[int, int]) -> int:
    """Index of the record's target among the scene's objects (`dense.target_row`: the object
    whose pixel box is the question's polygon box)."""
    from finers_rt.train import dense

    return dense.target_row(dense.object_rows(objs, image_wh), polygon_box_xyxy(record["points"]),
                            image_wh)


def shared_fields(a, b) -> int:
    """How many of colour, shape and pattern two scene objects share."""
    return sum(a.value(f) == b.value(f) for f in FIELDS)


def _object_box(obj) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = obj.box_xyxy  # inclusive pixels -> half-open
    return (float(x1), float(y1), float(x2) + 1.0, float(y2) + 1.0)


def pick_negative_crops(target: int, objs: list, image_wh: tuple[int, int], sizes: StageSizes,
                        rng: np.random.Generator, count: int) -> list[tuple[int, int, int, int]]:
    """Up to `count` crops (x1, y1, x2, y2, original pixels) that do not touch objs[target]."""
    target_box = _object_box(objs[target])
    tiles = [t for t in geometry.tile_grid(image_wh, sizes.crop_min_side, TILE_OVERLAP)
             if geometry.box_iou(t, target_box) == 0]
    look_alikes = [o for i, o in enumerate(objs) if i != target and shared_fields(o, objs[target])]
    side = sizes.region_side_original(image_wh)
    crops = []
    for _ in range(count * 4):  # a few tries: a decoy's crop may touch the target
        if len(crops) == count:
            break
        if look_alikes and (not tiles or rng.random() < 0.5):
            decoy = look_alikes[int(rng.integers(len(look_alikes)))]
            region = random_region(_object_box(decoy), side, image_wh, rng)
            crop = geometry.dynamic_box(region, image_wh, sizes.crop_min_side)
        elif tiles:
            crop = tiles[int(rng.integers(len(tiles)))]
        else:
            break
        crop = tuple(int(v) for v in crop)
        if geometry.box_iou(crop, target_box) == 0 and not geometry.crop_is_empty(crop):
            crops.append(crop)
    return crops


def decoy_in_crop(crop_xyxy, objs: list, target: int) -> int | None:
    """The whole object in the crop most like objs[target] (shared fields, then area), or None."""
    best, best_key = None, None
    for i, o in enumerate(objs):
        if i == target or not geometry.box_inside(_object_box(o), crop_xyxy):
            continue
        key = (shared_fields(o, objs[target]), o.area_px)
        if best_key is None or key > best_key:
            best, best_key = i, key
    return best


def negative_item(image: np.ndarray, target: int, objs: list, crop_xyxy,
                  sizes: StageSizes) -> dict[str, Any]:
    """The crop resized to the LPR stage and the meta of its NOT-found answer:
    crop_original, answer_box_stage, answer_points_stage (the decoy's, or the whole crop),
    decoy (bool)."""
    decoy = decoy_in_crop(crop_xyxy, objs, target)
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
