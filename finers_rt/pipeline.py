"""The FineRS pipeline: GSE -> region -> full-resolution crop -> LPR -> SAM -> mask pasted back.

This is the only module that knows the flow. Every size, prompt and policy comes from the
bundle manifest's `PipelineConfig`. Defaults follow the reference (FINERS_SPEC.md); beyond it,
when GSE gives no usable region or LPR does not localise the target in the crop, the pipeline
tries further crops (see `finers_rt.scheduling`) within `max_extra_crops`, and `Result.path`
says which path produced the answer ("gse", "gse+tiles", "tiles" or "none").

Threads: `Pipeline.run` may be called from several threads. Each stage (GSE, LPR, SAM) holds its
own lock around its stateful part (KV buffers, the SAM image), so concurrent calls are correct and
overlap across stages; for true parallel throughput on a multi-core machine, load one Pipeline per
worker thread (they share nothing).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finers_rt import geometry
from finers_rt.config import BackendOptions, PipelineConfig
from finers_rt.errors import ArtifactError, InputError, ManifestError
from finers_rt.frame import Frame, file_key, open_frame
from finers_rt.image import check_min_size
from finers_rt.manifest import BundleManifest
from finers_rt.parsing import ParsedOutput, parse_output, says_not_found
from finers_rt.prompts import build_gse_prompt, build_lpr_prompt, check_instruction
from finers_rt.scheduling import fallback_crops

DEFAULT_BUNDLE_NAME = "finers-tiny"
MIN_IMAGE_SIDE = 28  # the vision processor's patch*merge factor
ANSWER_STOP = "</answer>"


@dataclass
class Result:
    """What the pipeline found. Coordinates are ORIGINAL image pixels (x right, y down).

    answer: the final response text ("" when no stage answered); found: a target was localised
    (LPR gave a box and did not say "not found"); bbox_xyxy / points_xy: LPR's box and its two
    points; region_xyxy: the crop LPR looked at (for the reference path: GSE's region grown by
    the dynamic box; this is what region recall measures); gse_region_xyxy: GSE's ~256 region
    mapped back; mask: bool [H, W]; score: SAM's predicted IoU of the mask; path: which path
    produced the result; timings_ms: per stage; raw: the stages' generated texts; attempts: one
    entry per LPR crop tried.
    """

    answer: str
    found: bool
    bbox_xyxy: tuple[int, int, int, int] | None
    points_xy: tuple[tuple[int, int], ...] | None
    region_xyxy: tuple[int, int, int, int] | None
    gse_region_xyxy: tuple[int, int, int, int] | None
    mask: np.ndarray
    score: float | None
    path: str
    timings_ms: dict[str, float]
    raw: dict[str, Any]
    attempts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mask_area(self) -> int:
        return int(np.count_nonzero(self.mask))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary (the mask as its area; write the mask itself with `overlay`)."""
        return {"answer": self.answer, "found": self.found,
                "bbox_xyxy": _listify(self.bbox_xyxy), "points_xy": _listify(self.points_xy),
                "region_xyxy": _listify(self.region_xyxy),
                "gse_region_xyxy": _listify(self.gse_region_xyxy),
                "mask_area": self.mask_area, "score": self.score, "path": self.path,
                "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items() if k.endswith("_ms")},
                "tokens": {k.removesuffix("_tokens"): int(v) for k, v in self.timings_ms.items()
                           if k.endswith("_tokens")},
                "raw": self.raw, "attempts": self.attempts}


def _listify(value):
    if value is None:
        return None
    return [_listify(v) if isinstance(v, (tuple, list)) else v for v in value]


def default_bundle_path() -> Path:
    """The shipped default bundle: $FINERS_RT_MODEL, else `engines/finers-tiny` of the checkout,
    else the copy a wheel installs under `<prefix>/share/finers-rt/engines/`."""
    env = os.environ.get("FINERS_RT_MODEL")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "engines" / DEFAULT_BUNDLE_NAME,  # a checkout / editable install
                      Path(sys.prefix) / "share" / "finers-rt" / "engines" / DEFAULT_BUNDLE_NAME):
        if (candidate / "manifest.json").is_file():
            return candidate
    raise ArtifactError(
        f"no default model: the bundle '{DEFAULT_BUNDLE_NAME}' is not installed with this copy of "
        "finers-rt; pass a bundle with --model BUNDLE (or Pipeline.load(bundle=...)), or set "
        "FINERS_RT_MODEL")


@dataclass
class _LprOutcome:
    crop_xyxy: tuple[int, int, int, int]
    crop: np.ndarray  # [h, w, 3] uint8, the pixels LPR saw (SAM segments the same array)
    parsed: ParsedOutput
    box_crop: tuple[int, int, int, int] | None
    points_crop: tuple[tuple[int, int], ...] | None
    usable: bool
    reason: str


class Pipeline:
    """Bundle + image + instruction -> Result. Build with `Pipeline.load(bundle)`."""

    def __init__(self, manifest: BundleManifest, config: PipelineConfig, gse, lpr, sam,
                 max_extra_crops: int = 4):
        if max_extra_crops < 0:
            raise InputError(f"max_extra_crops must be >= 0, got {max_extra_crops}")
        self.manifest, self.config = manifest, config
        self.gse, self.lpr, self.sam = gse, lpr, sam
        self.max_extra_crops = max_extra_crops
        self._locks = {"gse": threading.Lock(), "lpr": threading.Lock(), "sam": threading.Lock(),
                       "frame": threading.Lock()}
        self._last_frame: tuple[tuple, Frame] | None = None  # (file_key, decoded frame)

    @classmethod
    def load(cls, bundle: str | os.PathLike | None = None,
             backend_options: BackendOptions | None = None, max_extra_crops: int = 4,
             prefix_cache_bytes: int = 2 << 30) -> "Pipeline":
        """Open a bundle folder (None = the shipped default) and all its graphs."""
        from finers_rt.kvcache import PrefixCache
        from finers_rt.sam import SamPredictorRT
        from finers_rt.vlm import VlmStage

        folder = Path(bundle) if bundle is not None else default_bundle_path()
        manifest = BundleManifest.load(folder)
        config = PipelineConfig.from_dict(manifest.pipeline)
        options = backend_options or BackendOptions()
        cache = PrefixCache(max_bytes=prefix_cache_bytes)
        stages = {}
        for role in ("gse", "lpr"):
            stage = VlmStage.load(folder / manifest.stages[role], options, prefix_cache=cache)
            wanted = config.gse_size_wh if role == "gse" else config.lpr_size_wh
            if tuple(stage.manifest.image.stage_size_wh) != tuple(wanted):
                raise ManifestError(
                    f"{folder}: the {role} stage was exported for {stage.manifest.image.stage_size_wh}"
                    f" but the pipeline settings say {list(wanted)}; re-export the stage")
            stages[role] = stage
        sam = SamPredictorRT.load(folder / manifest.stages["sam"], options)
        return cls(manifest, config, stages["gse"], stages["lpr"], sam, max_extra_crops)

    # ---- the flow ------------------------------------------------------------------------------

    def run(self, image: Any, instruction: str, question_type: str = "referring",
            options: str | None = None, max_new_tokens: int | None = None) -> Result:
        """Answer `instruction` on `image`: a path, an HxWx3 uint8 RGB array, or a
        `finers_rt.frame.Frame`. The last decoded file is kept: asking about the same unchanged
        file again does not decode it again. For K questions about one in-memory camera frame,
        wrap it once (`frame = open_frame(rgb)`) and pass the Frame: its stage resize is then
        computed once too (an array is re-wrapped, and re-resized, on every call)."""
        check_instruction(instruction, question_type, options)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        frame = self._open(image)
        check_min_size(frame, (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE))
        height, width = frame.shape[:2]
        timings["load_ms"] = _ms(start)
        cfg = self.config
        budget = max_new_tokens or cfg.max_new_tokens

        gse_text = build_gse_prompt(instruction, question_type, options, cfg.templates)
        t0 = time.perf_counter()
        resized_before = frame.has_resized(cfg.gse_size_wh)
        gse_image = frame.resized(cfg.gse_size_wh)  # the stage resize, once per frame
        if not resized_before:
            timings["gse_vision_ms"] = _ms(t0)  # the stage adds processor + vision graph
        with self._locks["gse"]:
            gse_out = self.gse.generate(gse_image, gse_text, max_new_tokens=budget, stop_at=ANSWER_STOP)
        _merge_timings(timings, "gse", gse_out.timings_ms)
        gse = parse_output(gse_out.text)
        raw: dict[str, Any] = {"gse": gse_out.text, "lpr": []}

        gse_region = None
        first_crop = None
        if gse.bbox_xyxy is not None:
            gse_region = geometry.stage_to_frame_box(gse.bbox_xyxy, (width, height), cfg.gse_size_wh)
            first_crop = self._crop_for_region(gse_region, (width, height))

        lpr_text = build_lpr_prompt(instruction, question_type, options, cfg.templates)
        attempts: list[dict[str, Any]] = []
        outcome = None
        if first_crop is not None:
            outcome = self._run_lpr(frame, first_crop, lpr_text, budget, timings, raw, attempts)
        path = "gse" if outcome is not None and outcome.usable else "none"
        if path == "none" and self.max_extra_crops > 0:
            t0 = time.perf_counter()
            candidates = fallback_crops((width, height), cfg.crop_min_side, gse_region,
                                        exclude=first_crop, limit=self.max_extra_crops)
            timings["schedule_ms"] = _ms(t0)
            for crop in candidates:
                attempt = self._run_lpr(frame, crop, lpr_text, budget, timings, raw, attempts)
                if attempt.usable:
                    outcome = attempt
                    path = "gse+tiles" if first_crop is not None else "tiles"
                    break
        result = self._finish(frame, outcome, path, gse, gse_region, timings, raw, attempts,
                              question_type)
        result.timings_ms["total_ms"] = _ms(start)
        return result

    def _open(self, image: Any) -> Frame:
        """The decoded frame of `image`: arrays are wrapped; a file is decoded unless it is the
        same unchanged file (`file_key`) as the last call's."""
        if isinstance(image, Frame):
            return image
        if isinstance(image, np.ndarray):
            return open_frame(image)
        if not isinstance(image, (str, os.PathLike)):
            raise InputError("image must be a file path, an HxWx3 uint8 array or a Frame, got "
                             f"{type(image).__name__}")
        key = file_key(image)
        with self._locks["frame"]:
            if self._last_frame is not None and self._last_frame[0] == key:
                return self._last_frame[1]
            # Drop the old frame first: the decoder then reuses its memory instead of faulting
            # in fresh pages (measured ~45 ms per 4K frame on a loaded machine).
            self._last_frame = None
        frame = open_frame(image)
        with self._locks["frame"]:
            self._last_frame = (key, frame)
        return frame

    def forget_frame(self) -> None:
        """Drop the kept decoded frame (its memory: about 4 bytes per pixel)."""
        with self._locks["frame"]:
            self._last_frame = None

    def _crop_for_region(self, region_xyxy, image_wh) -> tuple[int, int, int, int]:
        cfg = self.config
        if cfg.crop_policy == "dynamic_box":
            crop = geometry.dynamic_box(region_xyxy, image_wh, cfg.crop_min_side)
        else:
            crop = tuple(int(v) for v in region_xyxy)
        if geometry.crop_is_empty(crop):
            # The reference falls back to the whole image when the crop has no pixels.
            crop = (0, 0, image_wh[0], image_wh[1])
        return crop

    def _run_lpr(self, frame, crop_xyxy, lpr_text, budget, timings, raw, attempts) -> _LprOutcome:
        t0 = time.perf_counter()
        x1, y1, x2, y2 = (int(v) for v in crop_xyxy)
        crop = frame.crop((x1, y1, x2, y2))
        crop_wh = (crop.shape[1], crop.shape[0])
        timings["crop_ms"] = timings.get("crop_ms", 0.0) + _ms(t0)
        with self._locks["lpr"]:
            out = self.lpr.generate(crop, lpr_text, max_new_tokens=budget, stop_at=ANSWER_STOP)
        _merge_timings(timings, "lpr", out.timings_ms)
        raw["lpr"].append(out.text)
        parsed = parse_output(out.text)
        box = points = None
        usable, reason = False, "no parsable bbox"
        if parsed.bbox_xyxy is not None:
            box = geometry.stage_to_frame_box(parsed.bbox_xyxy, crop_wh, self.config.lpr_size_wh)
            if parsed.points_xy is not None:
                points = geometry.stage_to_frame_points(parsed.points_xy, crop_wh,
                                                        self.config.lpr_size_wh)
            clamped = geometry.clamp_box(box, crop_wh)
            if geometry.crop_is_empty(clamped):
                reason = "bbox outside the crop"
            elif says_not_found(parsed.response):
                reason = "LPR says the object is not there"
            else:
                usable, reason = True, "ok"
        attempts.append({"crop_xyxy": [x1, y1, x2, y2], "usable": usable, "reason": reason})
        return _LprOutcome((x1, y1, x2, y2), crop, parsed, box, points, usable, reason)

    def _finish(self, frame, outcome, path, gse, gse_region, timings, raw, attempts,
                question_type: str) -> Result:
        height, width = frame.shape[:2]
        mask = np.zeros((height, width), dtype=bool)
        score = bbox = points = region = None
        answer_lpr = outcome.parsed.response if outcome is not None else None
        if outcome is not None:
            region = outcome.crop_xyxy
        if outcome is not None and outcome.usable:
            x1, y1, x2, y2 = outcome.crop_xyxy
            crop = outcome.crop
            crop_wh = (crop.shape[1], crop.shape[0])
            box_crop = geometry.clamp_box(outcome.box_crop, crop_wh)
            points_crop = None
            if outcome.points_crop is not None:
                points_crop = [(min(max(px, 0), crop_wh[0]), min(max(py, 0), crop_wh[1]))
                               for px, py in outcome.points_crop]
            crop_mask, score = self._segment(crop, box_crop, points_crop, timings)
            t0 = time.perf_counter()
            mask[y1:y2, x1:x2] = crop_mask
            timings["paste_ms"] = _ms(t0)
            bbox = geometry.crop_to_image_box(outcome.box_crop, outcome.crop_xyxy)
            if outcome.points_crop is not None:
                points = geometry.crop_to_image_points(outcome.points_crop, outcome.crop_xyxy)
        answer = _pick_answer(self.config.answer_source, answer_lpr, gse.response, question_type)
        found = bool(outcome is not None and outcome.usable)
        return Result(answer=answer, found=found, bbox_xyxy=bbox, points_xy=points,
                      region_xyxy=region, gse_region_xyxy=gse_region, mask=mask, score=score,
                      path=path, timings_ms=timings, raw=raw, attempts=attempts)

    def _segment(self, crop, box_crop, points_crop, timings) -> tuple[np.ndarray, float]:
        labels = self.config.sam_point_labels if points_crop is not None else None
        with self._locks["sam"]:
            t0 = time.perf_counter()
            self.sam.set_image(crop)  # owned, C-contiguous (Frame.crop)
            timings["sam_encoder_ms"] = _ms(t0)
            t0 = time.perf_counter()
            crop_mask, score = self.sam.predict_best(box_crop, points_crop, labels)
            timings["sam_decoder_ms"] = _ms(t0)
        return crop_mask, score

    def cache_stats(self) -> dict[str, Any]:
        """Hit/miss counters of the prefix cache and the SAM embedding cache."""
        stats = {"sam": vars(self.sam.stats).copy()}
        cache = getattr(self.gse, "prefix_cache", None)
        if cache is not None:
            stats["prefix"] = cache.stats()
        return stats


def _pick_answer(source: str, lpr_response: str | None, gse_response: str | None,
                 question_type: str) -> str:
    """The configured stage's response, the other one when it has none. A question (reasoning,
    option) that the preferred stage answers with "not found" takes the other stage's answer
    when that one is an answer: "not found" only answers a referring question."""
    first, second = (lpr_response, gse_response) if source == "lpr" else (gse_response, lpr_response)
    if (question_type != "referring" and first is not None and says_not_found(first)
            and second and not says_not_found(second)):
        return second
    return first if first is not None else (second or "")


def _merge_timings(timings: dict[str, float], stage: str, stage_ms: dict[str, float]) -> None:
    """Add a stage's phase times as `<stage>_<phase>_ms` (summed over several calls) and its
    generated token count as `<stage>_tokens` (tok/s is derived, not summed)."""
    for key, value in stage_ms.items():
        if key == "tok_per_s" or not isinstance(value, (int, float)):
            continue
        name = f"{stage}_{key}" if key == "tokens" else f"{stage}_{key.removesuffix('_ms')}_ms"
        timings[name] = timings.get(name, 0.0) + float(value)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0

