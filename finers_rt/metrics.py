"""FineRS evaluation metrics, computed exactly as the official evaluation does.

Segmentation (every annotation): I and U of the predicted vs ground-truth bool masks;
`iou_i = I / (U + 1e-5)`, plus 1.0 when U == 0 (an empty-vs-empty sample scores 1.0);
gIoU = mean(iou_i), cIoU = sum(I) / (sum(U) + 1e-10); per size bucket S / XS / XXS (from the
stored area_percent) and "all". An empty bucket reports giou = ciou = None with n = 0.

QA: `option` (MCQ) uses the official standalone-token regex, `reasoning` (open QA) the
difflib word ratio >= 0.8; both overall ("avg") and per attribute. `referring` has no QA score.

Region recall: a hit when the ground-truth box (inclusive pixel box of the GT mask) lies fully
inside the predicted GSE region (original image frame). `recall` = hits / samples that have a
region; `recall_all` = hits / all samples (a sample without a region is a miss there).

An annotation without a prediction counts as an empty mask, a wrong answer and no region.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from finers_rt.dataset import (ATTRIBUTES, SIZE_BUCKETS, Annotation, annotation_image_size_wh,
                               gt_mask, mask_bbox_xyxy, read_json_list)
from finers_rt.errors import InputError

IOU_EPS = 1e-5    # official per-sample IoU denominator epsilon
CIOU_EPS = 1e-10  # official cumulative IoU denominator epsilon
OPEN_QA_MIN_RATIO = 0.8
QA_TYPES = ("option", "reasoning")


def is_mcq_correct(response: str, gt_answer: str) -> bool:
    """Official MCQ check: the lowercased GT answer is a standalone token of the response.

    The official code interpolates gt unescaped into the regex; we `re.escape` it, which is
    identical for the option letters FineRS uses and safe for anything else.
    """
    gt = re.escape(gt_answer.lower())
    pattern = rf"(?:\b|[\(\[\{{'\" ]){gt}(?:\b|[\)\]\}}'\" ,.!?])"
    return re.search(pattern, (response or "").lower()) is not None


def is_open_qa_correct(response: str, gt_answer: str) -> bool:
    """Official open-QA check: some whitespace-separated word of the lowercased response has
    difflib.SequenceMatcher ratio >= 0.8 with the lowercased GT answer."""
    gt = gt_answer.lower()
    return any(difflib.SequenceMatcher(None, word, gt).ratio() >= OPEN_QA_MIN_RATIO
               for word in (response or "").lower().split())


def is_box_inside_region(box_xyxy: Sequence[float], region_xyxy: Sequence[float]) -> bool:
    """True when box (x1, y1, x2, y2) lies fully inside region (x1, y1, x2, y2), borders
    included, as the official region recall tests it."""
    gx1, gy1, gx2, gy2 = box_xyxy
    rx1, ry1, rx2, ry2 = region_xyxy
    return gx1 >= rx1 and gy1 >= ry1 and gx2 <= rx2 and gy2 <= ry2


def check_box_xyxy(box: Any, what: str) -> tuple[float, float, float, float]:
    """Validate a box [x1, y1, x2, y2] of finite numbers with x1 <= x2 and y1 <= y2."""
    ok = (isinstance(box, (list, tuple)) and len(box) == 4
          and all(isinstance(v, (int, float, np.integer, np.floating))
                  and not isinstance(v, (bool, np.bool_)) and math.isfinite(v) for v in box))
    if not ok:
        raise InputError(f"{what} must be [x1, y1, x2, y2] with 4 finite numbers, got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 < x1 or y2 < y1:
        raise InputError(f"{what} must have x1 <= x2 and y1 <= y2, got {list(box)}")
    return x1, y1, x2, y2


@dataclass(frozen=True)
class SampleScore:
    """The per-sample numbers behind the aggregate metrics (for logs and debugging)."""

    index: int
    bucket: str
    intersection: int
    union: int
    iou: float
    answer_correct: bool | None   # None for `referring`
    has_region: bool
    region_hit: bool
    gt_box_xyxy: tuple[float, float, float, float] | None = None  # None: empty GT mask


@dataclass
class _SegSums:
    n: int = 0
    iou_sum: float = 0.0
    inter_sum: int = 0
    union_sum: int = 0

    def to_dict(self) -> dict[str, Any]:
        if self.n == 0:
            return {"giou": None, "ciou": None, "n": 0}
        return {"giou": self.iou_sum / self.n,
                "ciou": self.inter_sum / (self.union_sum + CIOU_EPS), "n": self.n}


@dataclass
class _QACount:
    n: int = 0
    correct: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "correct": self.correct,
                "acc": self.correct / self.n if self.n else None}


@dataclass
class MetricAccumulator:
    """Streaming FineRS metrics: `add` one sample at a time, `result` at any point.

    Only running sums are kept, never masks. Ground-truth masks are rasterised from each
    annotation's polygon at its image size (read from the image header under `images_dir`,
    cached per path, unless `size_wh` is passed to `add`).
    """

    images_dir: str | Path | None = None
    samples: list[SampleScore] = field(default_factory=list, repr=False)
    _seg: dict[str, _SegSums] = field(
        default_factory=lambda: {b: _SegSums() for b in (*SIZE_BUCKETS, "all")}, repr=False)
    _qa: dict[str, dict[str, _QACount]] = field(
        default_factory=lambda: {t: {a: _QACount() for a in ("avg", *ATTRIBUTES)}
                                 for t in QA_TYPES}, repr=False)
    _sizes: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

    def size_wh_of(self, ann: Annotation) -> tuple[int, int]:
        """(width, height) of an annotation's image (header read once per path)."""
        if ann.image_path not in self._sizes:
            if self.images_dir is None:
                raise InputError(f"annotation {ann.index}: the image size is unknown; pass "
                                 f"size_wh to add() or images_dir to MetricAccumulator")
            self._sizes[ann.image_path] = annotation_image_size_wh(ann, self.images_dir)
        return self._sizes[ann.image_path]

    def add(self, annotation: Annotation, pred_mask: np.ndarray | None = None,
            response: str | None = None, region_xyxy: Sequence[float] | None = None, *,
            size_wh: tuple[int, int] | None = None) -> SampleScore:
        """Score one annotation against its prediction and add it to the running sums.

        pred_mask: bool [H, W] in the original image frame (None = no mask = empty);
        response: the answer text (None = no answer); region_xyxy: the GSE region
        (x1, y1, x2, y2) in original image pixels (None = no region).
        """
        where = f"annotation {annotation.index}"
        if response is not None and not isinstance(response, str):
            raise InputError(f"{where}: response must be a string, got {type(response).__name__}")
        region = (None if region_xyxy is None
                  else check_box_xyxy(list(region_xyxy), f"{where}: region_xyxy"))
        size_wh = tuple(size_wh) if size_wh is not None else self.size_wh_of(annotation)
        gt = gt_mask(annotation, size_wh=size_wh)  # [H, W] bool
        inter, union = _intersection_union(pred_mask, gt, where)
        iou = inter / (union + IOU_EPS) + (1.0 if union == 0 else 0.0)
        correct = _answer_correct(annotation, response)
        gt_box = mask_bbox_xyxy(gt)
        hit = region is not None and gt_box is not None and is_box_inside_region(gt_box, region)
        # every check passed: only now touch the running sums
        bucket = annotation.size_bucket
        for key in (bucket, "all"):
            sums = self._seg[key]
            sums.n += 1
            sums.iou_sum += iou
            sums.inter_sum += inter
            sums.union_sum += union
        if correct is not None:
            for key in ("avg", annotation.attribute):
                count = self._qa[annotation.q_type][key]
                count.n += 1
                count.correct += int(correct)
        sample = SampleScore(annotation.index, bucket, inter, union, iou, correct,
                             region is not None, hit,
                             None if gt_box is None else tuple(float(v) for v in gt_box))
        self.samples.append(sample)
        return sample

    def result(self) -> dict[str, Any]:
        """The metrics so far as a JSON-ready dict (see the module docstring for keys)."""
        n = len(self.samples)
        with_region = sum(s.has_region for s in self.samples)
        hits = sum(s.region_hit for s in self.samples)
        return {
            "seg": {k: v.to_dict() for k, v in self._seg.items()},
            "qa": {t: {k: v.to_dict() for k, v in counts.items()} for t, counts in self._qa.items()},
            "region": {"n": n, "n_with_region": with_region, "hits": hits,
                       "recall": hits / with_region if with_region else None,
                       "recall_all": hits / n if n else None},
            "n_annotations": n,
        }


def _answer_correct(ann: Annotation, response: str | None) -> bool | None:
    """Official QA correctness of a response (None for `referring`: no QA metric)."""
    if ann.q_type == "option":
        return is_mcq_correct(response or "", ann.answer)
    if ann.q_type == "reasoning":
        return is_open_qa_correct(response or "", ann.answer)
    return None


def _intersection_union(pred: np.ndarray | None, gt: np.ndarray, where: str) -> tuple[int, int]:
    """(I, U) pixel counts of a predicted mask [H, W] (None = empty) against gt [H, W] bool."""
    if pred is None:
        return 0, int(np.count_nonzero(gt))
    pred = np.asarray(pred)
    if pred.shape != gt.shape:
        raise InputError(f"{where}: predicted mask must be [H, W] = {list(gt.shape)} like the "
                         f"image, got shape {list(pred.shape)}")
    if pred.dtype != bool:
        pred = pred != 0
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


# ---- prediction files and scoring ------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """One predicted sample. `mask_rle` is a COCO RLE of the [H, W] mask in the original image
    frame (None = no mask); boxes are (x1, y1, x2, y2) in original image pixels."""

    index: int
    mask_rle: dict[str, Any] | None = None
    response: str | None = None
    bbox_xyxy: tuple[float, float, float, float] | None = None
    region_xyxy: tuple[float, float, float, float] | None = None


def _parse_prediction(record: Any, position: int, n_annotations: int) -> Prediction:
    where = f"prediction {position}"
    if not isinstance(record, dict):
        raise InputError(f"{where}: must be a JSON object, got {type(record).__name__}")
    index = record.get("index")
    if not isinstance(index, int) or isinstance(index, bool):
        raise InputError(f"{where}: 'index' must be an int (the annotation position), "
                         f"got {index!r}")
    if not 0 <= index < n_annotations:
        raise InputError(f"{where}: index {index} is out of range: the annotation file has "
                         f"{n_annotations} annotations (valid 0..{n_annotations - 1})")
    where = f"{where} (index {index})"
    rle = record.get("mask_rle")
    if rle is not None and (not isinstance(rle, dict) or "size" not in rle or "counts" not in rle):
        raise InputError(f"{where}: 'mask_rle' must be a COCO RLE object with 'size' and "
                         f"'counts', got {rle!r:.80}")
    response = record.get("response")
    if response is not None and not isinstance(response, str):
        raise InputError(f"{where}: 'response' must be a string, got {type(response).__name__}")
    boxes = {}
    for key in ("bbox_xyxy", "region_xyxy"):
        value = record.get(key)
        boxes[key] = None if value is None else check_box_xyxy(value, f"{where}: '{key}'")
    return Prediction(index, rle, response, boxes["bbox_xyxy"], boxes["region_xyxy"])


def load_predictions(path: str | Path, n_annotations: int) -> dict[int, Prediction]:
    """Load a predictions file `{"predictions": [{"index", "mask_rle", "response",
    "bbox_xyxy"?, "region_xyxy"?}, ...]}` keyed by annotation index.

    Raises InputError for a missing/malformed file, bad records, and duplicate or
    out-of-range indexes. RLE contents are checked later, against each image's size.
    """
    records = read_json_list(path, "predictions", "predictions file")
    out: dict[int, Prediction] = {}
    for position, record in enumerate(records):
        pred = _parse_prediction(record, position, n_annotations)
        if pred.index in out:
            raise InputError(f"prediction {position}: duplicate index {pred.index} (the "
                             f"annotation already has a prediction)")
        out[pred.index] = pred
    return out


def score_predictions(annotations: Sequence[Annotation], predictions: dict[int, Prediction],
                      images_dir: str | Path) -> dict[str, Any]:
    """Score predictions (by annotation index) against annotations; see `MetricAccumulator`.

    Each RLE must have the size [H, W] of its annotation's image. Returns the accumulator's
    result plus "n_predictions".
    """
    from finers_rt.rle import decode_mask

    acc = MetricAccumulator(images_dir=images_dir)
    for ann in annotations:
        pred = predictions.get(ann.index)
        if pred is None:
            acc.add(ann)
            continue
        size_wh = acc.size_wh_of(ann)
        mask = None
        if pred.mask_rle is not None:
            where = f"prediction for annotation {ann.index}"
            if list(pred.mask_rle.get("size", [])) != [size_wh[1], size_wh[0]]:
                raise InputError(f"{where}: mask_rle size {pred.mask_rle.get('size')} does not "
                                 f"match the image {ann.image_path}: expected [h, w] = "
                                 f"[{size_wh[1]}, {size_wh[0]}]")
            try:
                mask = decode_mask(pred.mask_rle)
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from None
        acc.add(ann, mask, pred.response, pred.region_xyxy, size_wh=size_wh)
    result = acc.result()
    result["n_predictions"] = len(predictions)
    return result


def score_files(annotations_path: str | Path, predictions_path: str | Path,
                images_dir: str | Path) -> dict[str, Any]:
    """Load and validate an annotation file, a predictions file and the images' sizes, then
    score. Every problem is an InputError naming the file / annotation / prediction."""
    from finers_rt.dataset import load_annotations

    annotations = load_annotations(annotations_path, images_dir=images_dir)
    predictions = load_predictions(predictions_path, len(annotations))
    return score_predictions(annotations, predictions, images_dir)


def render_score_tables(result: dict[str, Any]) -> list[Any]:
    """rich Tables (segmentation, QA, region) of a `score_*` result, for the terminal."""
    from rich.table import Table

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    seg = Table(title="Segmentation", caption=f"{result['n_predictions']} predictions for "
                                              f"{result['n_annotations']} annotations")
    for col in ("bucket", "gIoU %", "cIoU %", "n"):
        seg.add_column(col, justify="left" if col == "bucket" else "right")
    for bucket, m in result["seg"].items():
        seg.add_row(bucket, fmt(m["giou"]), fmt(m["ciou"]), str(m["n"]))
    qa = Table(title="QA accuracy % (correct / n)")
    qa.add_column("type")
    keys = ("avg", *ATTRIBUTES)
    for key in keys:
        qa.add_column(key, justify="right")
    for q_type, counts in result["qa"].items():
        qa.add_row(q_type, *(f"{fmt(counts[k]['acc'])} ({counts[k]['correct']}/{counts[k]['n']})"
                             for k in keys))
    region = result["region"]
    reg = Table(title="Region recall % (GT box inside the GSE region)")
    for col in ("recall", "recall_all", "hits", "with region", "n"):
        reg.add_column(col, justify="right")
    reg.add_row(fmt(region["recall"]), fmt(region["recall_all"]), str(region["hits"]),
                str(region["n_with_region"]), str(region["n"]))
    return [seg, qa, reg]
