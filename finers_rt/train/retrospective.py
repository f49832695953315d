"""Locate-informed retrospective target regions for GSE (FINERS_SPEC.md "Training signal").

GSE's target region is not simply the region centred on the GT box: among candidate regions
that contain the target, it is the one on whose crop the current LPR localises the target
best. LPR's output is fed back to pick GSE's target:

    candidates = regions of the requested size containing the GT box (centred one first)
    for each: crop the ORIGINAL image as the pipeline would (region -> dynamic box), run LPR,
              score its box against the GT in that crop
    target = the best-scoring candidate (ties: the earliest, i.e. the centred one)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from finers_rt import geometry
from finers_rt.train.data import (StageSizes, centred_region, crop_item, lpr_prompt,
                                  polygon_box_xyxy)
from finers_rt.train.rewards import lpr_reward

# (crop image [h, w, 3] uint8, record, GT box in the LPR frame, GT mask [h, w]) -> score
LprScorer = Callable[[np.ndarray, dict, Sequence[float], np.ndarray], float]


def candidate_regions(gt_box_xyxy: Sequence[float], side_wh: Sequence[float],
                      frame_wh: Sequence[int], per_axis: int = 3) -> list[tuple[float, ...]]:
    """Regions of size side_wh (stage frame) that contain the GT box: the centred one first,
    then a per_axis x per_axis grid of placements from "box at the far edge" to the other."""
    regions = [centred_region(gt_box_xyxy, tuple(side_wh), tuple(frame_wh))]
    starts = []
    for axis in (0, 1):
        lo = max(gt_box_xyxy[axis + 2] - side_wh[axis], 0.0)
        hi = min(gt_box_xyxy[axis], frame_wh[axis] - side_wh[axis])
        hi = max(hi, lo)
        starts.append(np.linspace(lo, hi, per_axis) if per_axis > 1 else np.array([lo]))
    for y in starts[1]:
        for x in starts[0]:
            region = (float(x), float(y), float(x) + side_wh[0], float(y) + side_wh[1])
            if not any(np.allclose(region, r, atol=0.5) for r in regions):
                regions.append(region)
    return regions


def pipeline_crop(region_stage: Sequence[float], image_wh: Sequence[int],
                  sizes: StageSizes) -> tuple[int, int, int, int]:
    """The crop the pipeline takes for a GSE region: stage -> original (reference rounding),
    then the dynamic box."""
    region = geometry.stage_to_frame_box(region_stage, image_wh, sizes.gse_size_wh)
    return geometry.dynamic_box(region, image_wh, sizes.crop_min_side)


def choose_target_region(image: np.ndarray, record: dict[str, Any], sizes: StageSizes,
                         score_lpr: LprScorer, per_axis: int = 3
                         ) -> tuple[tuple[float, ...], list[float]]:
    """(best region in the GSE stage frame, score of every candidate).

    image: ORIGINAL [H, W, 3] uint8; record: the FineRS annotation of the target."""
    height, width = image.shape[:2]
    gt_stage = geometry.frame_to_stage_box(polygon_box_xyxy(record["points"]), (width, height),
                                           sizes.gse_size_wh)
    regions = candidate_regions(gt_stage, sizes.region_side_stage(), sizes.gse_size_wh, per_axis)
    scores = []
    for region in regions:
        item = crop_item(image, record, pipeline_crop(region, (width, height), sizes), sizes)
        box = item["meta"]["box_stage"]
        scores.append(-1.0 if box is None else float(score_lpr(item["image"], record, box,
                                                                item["mask"])))
    best = int(np.argmax(scores))  # first maximum: ties keep the centred region
    return regions[best], scores


def model_scorer(model, collator, max_new_tokens: int = 96) -> LprScorer:
    """An LprScorer that runs an LPR torch model greedily: box IoU + points on the object."""
    from finers_rt.train.evaluate import generate_texts

    def score(crop: np.ndarray, record: dict, gt_box, gt_mask) -> float:
        text = generate_texts(model, collator, crop, lpr_prompt(record), max_new_tokens)[0][0]
        reward = lpr_reward(text, record, gt_box, gt_mask)
        return reward["box_iou"] + 0.5 * reward["points"]

    return score
