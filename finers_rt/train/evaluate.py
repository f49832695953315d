"""Generation with the torch model and quick held-out metrics for the learning curves.

The real evaluation is `finers-rt eval` on an exported bundle (official metrics); this one runs
inside training on a cache and measures what each stage is responsible for:
GSE: region recall (GT box inside the crop the pipeline would take), the same counting only
regions within 50% of the requested size (`recall_sized`: an oversized region makes the
dynamic box cover most of the image, which "recalls" everything), centre hit, valid rate.
LPR: box IoU > 0.5 rate, mean IoU, points on the object, valid rate, where the box centre
lands (`centre_on_target`, `centre_on_other`: another object of the scene, else background),
the box's size against the target's (`log2_width_ratio`); on caches with negative crops also
how often it says the object is found on its crop (`found_on_target`) and not found on a crop
without it (`not_found_on_negative`).
Every metric is also given per official size bucket of the target (`S/...`, `XS/...`,
`XXS/...`, with `BUCKET/samples`), and the answer's correctness per question type
(`answer_option`: MCQ, `answer_reasoning`: open QA, `answer_referring`: "found"; each over the
samples of its type only) and, over the MCQ + open QA samples, per attribute the question asks
about (`qa_colors`, `qa_shape`, `qa_position`, `qa_others`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finers_rt import geometry
from finers_rt.dataset import ATTRIBUTES, Q_TYPES, size_bucket
from finers_rt.errors import InputError
from finers_rt.parsing import parse_output, says_not_found
from finers_rt.train import dense
from finers_rt.train.batch import Collator
from finers_rt.train.data import SampleCache, gse_prompt, lpr_prompt
from finers_rt.train.rewards import gse_reward, lpr_reward, size_reward


def prompt_inputs(collator: Collator, image: np.ndarray, text: str) -> dict[str, torch.Tensor]:
    """HF model inputs (batch 1) of the prompt only: image [h, w, 3] uint8, user text."""
    batch = collator([image], [text], [""])
    n_prompt = int(batch.answer_pos[0]) + 1
    return {"input_ids": batch.input_ids[:, :n_prompt],
            "attention_mask": batch.attention_mask[:, :n_prompt],
            "pixel_values": batch.pixel_values, "image_grid_thw": batch.image_grid_thw}


@torch.no_grad()
def generate_texts(model, collator: Collator, image: np.ndarray, text: str,
                   max_new_tokens: int = 96, num_samples: int = 1, temperature: float = 0.0
                   ) -> tuple[list[str], torch.Tensor, int]:
    """Generate `num_samples` answers (greedy when temperature is 0).

    Returns (texts, sequences [n, prompt + new] int64 (prompt included), prompt length)."""
    inputs = {k: v.to(model.device) for k, v in prompt_inputs(collator, image, text).items()}
    end_ids = [collator.end_id, collator.pad_id]
    kwargs: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0,
                  "num_return_sequences": num_samples}
    seqs = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=end_ids,
                          pad_token_id=collator.pad_id, repetition_penalty=1.0, **kwargs)
    n_prompt = inputs["input_ids"].shape[1]
    seqs = seqs.cpu()
    texts = collator.tokenizer.batch_decode(seqs[:, n_prompt:], skip_special_tokens=True)
    return texts, seqs, n_prompt


def evaluate_stage(model, collator: Collator, cache: SampleCache, stage: str,
                   limit: int | None = None) -> dict[str, float]:
    """Greedy-decode the first `limit` cache entries and return the stage's metrics."""
    n = len(cache) if limit is None else min(limit, len(cache))
    rows = [(_eval_gse if stage == "gse" else _eval_lpr)(model, collator, cache, i) for i in range(n)]
    out = _means(rows)
    for bucket in ("S", "XS", "XXS"):  # the official size buckets of the questions' targets
        chosen = [r for i, r in enumerate(rows)
                  if size_bucket(cache.entries[i]["record"]["area_percent"]) == bucket]
        if chosen:
            out[f"{bucket}/samples"] = float(len(chosen))
            out.update({f"{bucket}/{key}": value for key, value in _means(chosen).items()})
    return out


def _means(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per key the mean over rows, ignoring nan (nan when every row is nan)."""
    out = {}
    for key in rows[0]:
        values = np.array([r[key] for r in rows], dtype=np.float64)
        values = values[~np.isnan(values)]
        out[key] = float(values.mean()) if values.size else float("nan")
    return out


def evaluate_checkpoint(checkpoint: str | Path, cache_dir: str | Path, stage: str,
                        limit: int | None = None, threads: int = 1,
                        json_out: str | Path | None = None, force: bool = False) -> dict[str, Any]:
    """`finers-rt train evaluate`: greedy stage metrics of an HF checkpoint (stock or pointer)
    on a held-out cache, as the learning curves compute them; written to `json_out` (refused
    if it exists, unless `force`) and returned: {stage, checkpoint, cache, samples, seconds,
    metrics} (a metric no sample defines is None)."""
    from finers_rt.export.checkpoints import load_reference

    if stage not in ("gse", "lpr"):
        raise InputError(f"stage must be 'gse' or 'lpr', got '{stage}'")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}")
    if threads < 1:
        raise InputError(f"threads must be >= 1, got {threads}")
    out_path = None if json_out is None else Path(json_out)
    if out_path is not None and out_path.exists() and not force:
        raise InputError(f"{out_path} exists; pass --force to replace it")
    cache = SampleCache(cache_dir)
    torch.set_num_threads(threads)
    start = time.time()
    model, processor = load_reference(checkpoint)
    metrics = evaluate_stage(model, Collator(processor), cache, stage, limit)
    n = len(cache) if limit is None else min(limit, len(cache))
    report = {"stage": stage, "checkpoint": str(checkpoint), "cache": str(cache_dir),
              "samples": n, "seconds": round(time.time() - start, 1),
              "metrics": {k: (None if np.isnan(v) else v) for k, v in metrics.items()}}
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(out_path)
    return report


def _eval_gse(model, collator, cache: SampleCache, i: int) -> dict[str, float]:
    entry, sizes = cache.entries[i], cache.sizes
    record = entry["record"]
    text = generate_texts(model, collator, cache.gse_image(i), gse_prompt(record))[0][0]
    reward = gse_reward(text, record, entry["gse"]["region_stage"], entry["gse"]["gt_box_stage"],
                        sizes.region_side_stage())
    parsed = parse_output(text)
    recall = hit = sized = 0.0
    if parsed.bbox_xyxy is not None:
        # a region far larger than asked for grows the dynamic-box crop to most of the image:
        # it "recalls" the target while LPR then sees it at a fraction of a pixel
        sized = float(size_reward(parsed.bbox_xyxy, sizes.region_side_stage()) >= 0.5)
        scene_wh = sizes.scene_size_wh
        region = geometry.stage_to_frame_box(parsed.bbox_xyxy, scene_wh, sizes.gse_size_wh)
        crop = geometry.dynamic_box(region, scene_wh, sizes.crop_min_side)
        gt = entry["gse"]["gt_box_original"]
        recall = float(geometry.box_inside(gt, crop))
        box = entry["gse"]["gt_box_stage"]
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        x1, y1, x2, y2 = parsed.bbox_xyxy
        hit = float(x1 <= cx <= x2 and y1 <= cy <= y2)
    return {"region_recall": recall, "recall_sized": recall * sized, "centre_hit": hit,
            "size_ok": sized, "valid": reward["json"],
            "format": reward["format"], "answer": reward["answer"], "reward": reward["total"],
            **_answer_by_type(record, reward["answer"])}


def _answer_by_type(record: dict[str, Any], correct: float) -> dict[str, float]:
    """`answer_<type>` for each question type and, for MCQ / open QA questions, `qa_<attribute>`
    for each attribute: `correct` for the record's own type / attribute, nan for the others (so
    each key's mean runs over the samples it names)."""
    qtype = record["Q-type"]
    out = {f"answer_{t}": (float(correct) if qtype == t else float("nan")) for t in Q_TYPES}
    qa = qtype in ("option", "reasoning")
    out.update({f"qa_{a}": (float(correct) if qa and record.get("attribute") == a else float("nan"))
                for a in ATTRIBUTES})
    return out


def _eval_lpr(model, collator, cache: SampleCache, i: int) -> dict[str, float]:
    entry = cache.entries[i]
    record, meta = entry["record"], entry["lpr"][0]
    row = i * cache.lpr_crops
    text = generate_texts(model, collator, np.asarray(cache.lpr_images[row]), lpr_prompt(record))[0][0]
    reward = lpr_reward(text, record, meta["box_stage"], np.asarray(cache.lpr_masks[row]))
    out = {"iou_gt_0.5": float(reward["box_iou"] > 0.5), "mean_iou": reward["box_iou"],
           "points_on_object": reward["points"], "valid": reward["json"],
           "format": reward["format"], "answer": reward["answer"], "reward": reward["total"],
           **_answer_by_type(record, reward["answer"])}
    parsed = parse_output(text)
    out.update(_centre_objects(cache, i, parsed.bbox_xyxy))
    out["log2_width_ratio"] = _log2_width_ratio(parsed.bbox_xyxy, meta["box_stage"])
    if cache.negative_images is not None:  # nan where this entry has no negative crop
        out["found_on_target"] = float(not says_not_found(parsed.response))
        out["not_found_on_negative"] = float("nan")
        if cache.negative_count(i):
            neg_text = generate_texts(model, collator, cache.negative(i, 0)[0], lpr_prompt(record))[0][0]
            out["not_found_on_negative"] = float(says_not_found(parse_output(neg_text).response))
    return out


def _centre_objects(cache: SampleCache, i: int, bbox) -> dict[str, float]:
    """Where the centre of LPR box `bbox` (stage frame of entry `i`'s first crop, or None)
    lands: on the target's box (`centre_on_target`), else on another object's box of the
    scene (`centre_on_other`: a look-alike or a neighbour picked instead). Both 0 without a
    box or on the background."""
    out = {"centre_on_target": 0.0, "centre_on_other": 0.0}
    if bbox is None:
        return out
    entry = cache.entries[i]
    scene_w, scene_h = cache.sizes.scene_size_wh
    stage_w, stage_h = cache.sizes.lpr_size_wh
    c1, r1, c2, r2 = entry["lpr"][0]["crop_original"]
    x = c1 + (bbox[0] + bbox[2]) / 2 * (c2 - c1) / stage_w  # original pixels
    y = r1 + (bbox[1] + bbox[3]) / 2 * (r2 - r1) / stage_h
    rows = cache.object_rows(i)
    target = dense.target_row(rows, entry["gse"]["gt_box_original"], (scene_w, scene_h))
    hits = [j for j, row in enumerate(rows)
            if row[0] * scene_w <= x < row[2] * scene_w and row[1] * scene_h <= y < row[3] * scene_h]
    if target in hits:
        out["centre_on_target"] = 1.0
    elif hits:
        out["centre_on_other"] = 1.0
    return out


def _log2_width_ratio(bbox, gt) -> float:
    """log2 of (predicted box width + height) / (GT box width + height): 0 = the right size,
    +1 = twice as large; nan without a box (its mean over samples is the log of the geometric
    mean size ratio: a box of one size for every target shows as > 0 on small targets, < 0 on
    large ones)."""
    if bbox is None or gt is None:
        return float("nan")
    pred = max(bbox[2] - bbox[0], 0.0) + max(bbox[3] - bbox[1], 0.0)
    true = (gt[2] - gt[0]) + (gt[3] - gt[1])
    return float(np.log2(max(pred, 1.0) / max(true, 1.0)))
