"""FineRS rewards for GRPO (FINERS_SPEC.md "Training signal"); pure Python + numpy.

Every reward component is in [0, 1]; a stage's reward is their sum (`total`). Boxes are
(x1, y1, x2, y2) and points (x, y) in the stage frame the text was generated in.

GSE: think/answer format, JSON format, answer, region L1 and IoU to the target region, GT box
inside the region, region size close to the requested side. LPR: format, JSON format, answer,
box IoU, box L1, points inside the GT object.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from finers_rt.geometry import box_inside, box_iou
from finers_rt.metrics import is_mcq_correct, is_open_qa_correct
from finers_rt.parsing import ParsedOutput, parse_output, says_not_found

_FORMAT = re.compile(r"^\s*<think>.+?</think>\s*<answer>.+?</answer>\s*$", re.DOTALL)


def format_reward(text: str) -> float:
    """1 when the whole text is `<think>...</think><answer>...</answer>` (whitespace allowed)."""
    return 1.0 if _FORMAT.match(text or "") else 0.0


def json_reward(parsed: ParsedOutput, needs_points: bool) -> float:
    """1 when the answer object parsed with a bbox (and, for LPR, both points)."""
    ok = parsed.parsed and parsed.bbox_xyxy is not None
    return 1.0 if ok and (parsed.points_xy is not None or not needs_points) else 0.0


def answer_reward(response: str | None, record: dict[str, Any]) -> float:
    """referring: a response that does not say "not found"; option: MCQ rule; reasoning:
    open-QA rule (the official metrics' rules)."""
    if not response:
        return 0.0
    q_type = record["Q-type"]
    if q_type == "option":
        return float(is_mcq_correct(response, str(record["A"])))
    if q_type == "reasoning":
        return float(is_open_qa_correct(response, str(record["A"])))
    return 0.0 if says_not_found(response) else 1.0


def l1_reward(pred_xyxy: Sequence[float], target_xyxy: Sequence[float], scale: float) -> float:
    """max(0, 1 - mean |pred - target| / scale)."""
    err = float(np.mean(np.abs(np.asarray(pred_xyxy, float) - np.asarray(target_xyxy, float))))
    return max(0.0, 1.0 - err / scale)


def size_reward(region_xyxy: Sequence[float], side_wh: Sequence[float]) -> float:
    """1 for a region of exactly side_wh, falling linearly to 0 at a relative error of 1."""
    w, h = region_xyxy[2] - region_xyxy[0], region_xyxy[3] - region_xyxy[1]
    err = (abs(w - side_wh[0]) / side_wh[0] + abs(h - side_wh[1]) / side_wh[1]) / 2
    return max(0.0, 1.0 - err)


def points_reward(points_xy, mask: np.ndarray) -> float:
    """Fraction of the points that fall on the GT mask [H, W] (bool, stage frame)."""
    if points_xy is None:
        return 0.0
    height, width = mask.shape
    hits = [0 <= int(x) < width and 0 <= int(y) < height and bool(mask[int(y), int(x)])
            for x, y in points_xy]
    return float(np.mean(hits))


def gse_reward(text: str, record: dict[str, Any], target_region_xyxy: Sequence[float],
               gt_box_xyxy: Sequence[float], side_wh: Sequence[float]) -> dict[str, float]:
    """Reward components of one GSE output (stage frame) and their `total`."""
    parsed = parse_output(text)
    out = {"format": format_reward(text), "json": json_reward(parsed, needs_points=False),
           "answer": answer_reward(parsed.response, record),
           "region_l1": 0.0, "region_iou": 0.0, "inside": 0.0, "size": 0.0}
    if parsed.bbox_xyxy is not None:
        region = parsed.bbox_xyxy
        out["region_l1"] = l1_reward(region, target_region_xyxy, scale=max(side_wh))
        out["region_iou"] = box_iou(region, target_region_xyxy)
        out["inside"] = float(box_inside(gt_box_xyxy, region))
        out["size"] = size_reward(region, side_wh)
    out["total"] = sum(out.values())
    return out


def lpr_reward(text: str, record: dict[str, Any], gt_box_xyxy: Sequence[float],
               gt_mask: np.ndarray, l1_scale: float = 32.0) -> dict[str, float]:
    """Reward components of one LPR output (stage frame) and their `total`."""
    parsed = parse_output(text)
    out = {"format": format_reward(text), "json": json_reward(parsed, needs_points=True),
           "answer": answer_reward(parsed.response, record), "box_iou": 0.0, "box_l1": 0.0,
           "points": 0.0}
    if parsed.bbox_xyxy is not None:
        out["box_iou"] = box_iou(parsed.bbox_xyxy, gt_box_xyxy)
        out["box_l1"] = l1_reward(parsed.bbox_xyxy, gt_box_xyxy, scale=l1_scale)
    out["points"] = points_reward(parsed.points_xy, gt_mask)
    out["total"] = sum(out.values())
    return out
