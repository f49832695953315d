"""`finers-rt eval`: the pipeline over a FineRS-4k-format folder, scored with the official metrics.

Predictions are written in the `score` format, so `finers-rt score` on them gives the same numbers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from finers_rt.dataset import load_annotations, resolve_image_path
from finers_rt.errors import InputError
from finers_rt.image import load_image
from finers_rt.metrics import MetricAccumulator, is_box_inside_region
from finers_rt.rle import encode_mask


def evaluate_folder(pipe, data_dir: str | os.PathLike, out_path: str | os.PathLike | None = None,
                    limit: int | None = None, overwrite: bool = False,
                    progress: bool = True) -> dict[str, Any]:
    """Run `pipe` on every annotation of `data_dir/annotations.json` (images in
    `data_dir/images/`); return the metrics (+ "n_predictions", "timings_ms" medians)."""
    folder = Path(data_dir)
    annotations_path, images_dir = folder / "annotations.json", folder / "images"
    if not annotations_path.is_file():
        raise InputError(f"{folder}: no annotations.json (expected a FineRS-4k-format folder "
                         "with annotations.json and images/)")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if out_path is not None and Path(out_path).exists() and not overwrite:
        raise InputError(f"refusing to overwrite {out_path}; pass --force or choose another --out")
    annotations = load_annotations(annotations_path, images_dir=images_dir)[:limit]
    accumulator = MetricAccumulator(images_dir=images_dir)
    predictions, totals, paths, gse_hits = [], [], {}, []
    for ann in _progress(annotations, progress):
        image = load_image(resolve_image_path(images_dir, ann.image_path))
        result = pipe.run(image, ann.question, question_type=ann.q_type, options=ann.options)
        height, width = image.shape[:2]
        sample = accumulator.add(ann, result.mask, result.answer, result.region_xyxy,
                                 size_wh=(width, height))
        paths[result.path] = paths.get(result.path, 0) + 1
        gse_hits.append(_gse_crop_hit(result, sample.gt_box_xyxy))
        predictions.append({"index": ann.index, "mask_rle": encode_mask(result.mask),
                            "response": result.answer,
                            "bbox_xyxy": list(result.bbox_xyxy) if result.bbox_xyxy else None,
                            "region_xyxy": list(result.region_xyxy) if result.region_xyxy else None,
                            "path": result.path})
        totals.append(result.timings_ms.get("total_ms", 0.0))
    metrics = accumulator.result()
    metrics["n_predictions"] = len(predictions)
    metrics["timings_ms"] = {"total_p50": float(np.median(totals)) if totals else None,
                             "total_p90": float(np.percentile(totals, 90)) if totals else None}
    # `region` scores the crop the answer came from (a fallback tile when one was used);
    # `region_gse` scores GSE's own crop, the official stage metric, whatever came after it.
    metrics["paths"] = paths
    metrics["region_gse"] = {"hits": int(sum(gse_hits)),
                             "recall_all": float(np.mean(gse_hits)) if gse_hits else None}
    if out_path is not None:
        _write_json(Path(out_path), {"predictions": predictions})
        metrics["predictions_path"] = str(out_path)
    return metrics


def _progress(items, enabled: bool):
    if not enabled:
        yield from items
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("evaluating", total=len(items))
        for item in items:
            yield item
            bar.advance(task)


def _gse_crop_hit(result, gt_box_xyxy) -> bool:
    """True when the GT box lies inside the crop made from GSE's region (the first LPR crop)."""
    if result.gse_region_xyxy is None or not result.attempts or gt_box_xyxy is None:
        return False
    return is_box_inside_region(gt_box_xyxy, result.attempts[0]["crop_xyxy"])


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload), encoding="utf-8")
    os.replace(tmp, path)
