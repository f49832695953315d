"""The torch reference FineRS pipeline: what a user would run without finers-rt.

HF transformers `generate` (greedy, the checkpoint's generation_config, KV cache on) on the
bundle's SOURCE Qwen2.5-VL checkpoints + segment-anything `SamPredictor` on its SOURCE SAM
checkpoint, in the exact FineRS flow (FINERS_SPEC.md), with the same prompts
(`finers_rt.prompts`) and coordinate maps (`finers_rt.geometry`) as the runtime, so outputs
can be compared. Used by `finers-rt bench --reference` as the baseline; never by the runtime.

Flow of `ReferencePipeline.run` (the official one, no tile fallback):
PIL load -> GSE on the image resized (bilinear, aspect not kept) to the GSE size -> region
mapped back -> dynamic box crop of the ORIGINAL image -> LPR on the crop resized to the LPR
size -> box + 2 points mapped to crop pixels -> `SamPredictor.set_image(crop)` +
`predict(points, labels 1,1, box, multimask_output=True)`, best score -> mask pasted back.
SAM runs whenever LPR gives a box that is non-empty inside the crop (the official code does
not read LPR's "not found" response; the runtime does, and skips SAM then).

Stage timings (ms, `time.perf_counter`): `vision` = processor (resize + patches + chat
template) + the vision tower (forward hooks); `prefill` = `generate` start to the first
logits-processor call minus the vision tower; `decode` = first logits-processor call to the
end of `generate`; `tokens` = generated ids (eos included, like the runtime counts them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from finers_rt import geometry
from finers_rt.config import PipelineConfig
from finers_rt.errors import ArtifactError, InputError, suggest
from finers_rt.frame import file_key
from finers_rt.manifest import BundleManifest, SamManifest, VlmStageManifest
from finers_rt.parsing import parse_output
from finers_rt.prompts import build_gse_prompt, build_lpr_prompt

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
ANSWER_STOP = "</answer>"


class _StepClock(LogitsProcessor):
    """A logits processor that only records when each step's logits arrive."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


@dataclass
class ReferenceGeneration:
    """token_ids: generated ids; text: decoded, special tokens skipped; timings_ms: vision,
    prefill, decode (ms) and tokens."""

    token_ids: list[int]
    text: str
    timings_ms: dict[str, float]


class ReferenceVlm:
    """One Qwen2.5-VL stage on HF transformers (float32, CPU)."""

    def __init__(self, model, processor, stage_size_wh: Sequence[int], hf_dir: Path):
        self.model, self.processor = model, processor
        self.stage_size_wh = (int(stage_size_wh[0]), int(stage_size_wh[1]))
        self.hf_dir = hf_dir
        self._vision_ms = 0.0
        self._vision_start = 0.0
        visual = model.model.visual
        visual.register_forward_pre_hook(self._vision_begin)
        visual.register_forward_hook(self._vision_end)

    @classmethod
    def load(cls, hf_dir: str | Path, stage_size_wh: Sequence[int],
             attn_implementation: str = "sdpa") -> "ReferenceVlm":
        """Load an HF checkpoint folder as the torch reference of a stage of `stage_size_wh`."""
        from finers_rt.export.checkpoints import load_processor
        from finers_rt.export.pointer import load_vlm

        check_attn(attn_implementation)
        hf_dir = Path(hf_dir)
        if not (hf_dir / "config.json").is_file():
            raise ArtifactError(f"reference checkpoint {hf_dir} is not a Hugging Face folder "
                                "(no config.json); the bundle's source checkpoints must still exist")
        model = load_vlm(hf_dir, dtype=torch.float32, attn_implementation=attn_implementation).eval()
        return cls(model, load_processor(hf_dir), stage_size_wh, hf_dir)

    @classmethod
    def from_stage_folder(cls, stage_dir: str | Path, attn_implementation: str = "sdpa") -> "ReferenceVlm":
        """The reference of an exported stage folder: its `source.path` at its stage size."""
        manifest = VlmStageManifest.load(Path(stage_dir))
        source = manifest.source.get("path")
        if not source:
            raise ArtifactError(f"{stage_dir}: manifest has no source.path (the HF checkpoint)")
        return cls.load(resolve_source_path(source, stage_dir), manifest.image.stage_size_wh,
                        attn_implementation)

    def set_attn(self, attn_implementation: str) -> None:
        check_attn(attn_implementation)
        self.model.set_attn_implementation(attn_implementation)

    def _vision_begin(self, module, args):
        self._vision_start = time.perf_counter()

    def _vision_end(self, module, args, output):
        self._vision_ms += (time.perf_counter() - self._vision_start) * 1000.0

    def generate(self, image: Image.Image, text: str, max_new_tokens: int,
                 stop_at: str | None = ANSWER_STOP, ignore_eos: bool = False) -> ReferenceGeneration:
        """Greedy HF `generate` for `image` (PIL RGB, any size; resized to the stage size with
        PIL bilinear) then `text` in one user turn. `ignore_eos` generates exactly
        `max_new_tokens` (for fixed-token-count benchmarks)."""
        start = time.perf_counter()
        stage_image = image if image.size == self.stage_size_wh else image.resize(
            self.stage_size_wh, Image.Resampling.BILINEAR)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        chat = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = self.processor(images=[stage_image], text=[chat], return_tensors="pt")
        preprocess_ms = (time.perf_counter() - start) * 1000.0
        clock = _StepClock()
        kwargs: dict[str, Any] = {"do_sample": False, "max_new_tokens": int(max_new_tokens),
                                  "logits_processor": LogitsProcessorList([clock])}
        if stop_at and not ignore_eos:
            kwargs.update(stop_strings=[stop_at], tokenizer=self.processor.tokenizer)
        if ignore_eos:
            kwargs["eos_token_id"] = None
        for name in ("top_k", "top_p", "temperature"):
            kwargs[name] = None
        self._vision_ms = 0.0
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        end = time.perf_counter()
        ids = out[0, enc["input_ids"].shape[1]:].tolist()
        first = clock.times[0] if clock.times else end
        timings = {"vision": preprocess_ms + self._vision_ms,
                   "prefill": (first - start) * 1000.0 - self._vision_ms,
                   "decode": (end - first) * 1000.0, "tokens": float(len(ids))}
        text_out = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
        return ReferenceGeneration(ids, text_out, timings)


def torch_environment() -> dict[str, object]:
    """The reference side's torch version and thread count, for the bench record."""
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def check_attn(name: str) -> str:
    if name not in ATTN_IMPLEMENTATIONS:
        raise InputError(f"unknown attention implementation '{name}'{suggest(name, ATTN_IMPLEMENTATIONS)}"
                         f"; expected one of {ATTN_IMPLEMENTATIONS}")
    return name


def resolve_source_path(recorded: str, folder: str | Path) -> Path:
    """A manifest's source path: relative paths are relative to the manifest's folder (shipped
    bundles record them so, to stay valid in any clone); absolute paths are used as they are."""
    path = Path(recorded)
    return path if path.is_absolute() else (Path(folder) / path).resolve()


class ReferenceSam:
    """segment-anything `SamPredictor` on the bundle's source SAM checkpoint."""

    def __init__(self, predictor):
        self.predictor = predictor

    @classmethod
    def from_sam_folder(cls, sam_dir: str | Path, checkpoint: str | Path | None = None) -> "ReferenceSam":
        """Build the SAM described by the folder's manifest `config` and load `checkpoint`
        (default: the manifest's `source.path` / `source.checkpoint`)."""
        from finers_rt.export.sam_configs import SamConfig, load_sam
        from finers_rt.export.torchvision_shim import import_segment_anything

        manifest = SamManifest.load(Path(sam_dir))
        ckpt = checkpoint or manifest.source.get("path") or manifest.source.get("checkpoint")
        if not ckpt:
            raise ArtifactError(f"{sam_dir}: no source checkpoint recorded; pass one explicitly")
        if checkpoint is None:
            ckpt = resolve_source_path(ckpt, sam_dir)
        sam = load_sam(ckpt, SamConfig.from_dict(dict(manifest.config)))
        return cls(import_segment_anything().SamPredictor(sam))

    def segment(self, crop: np.ndarray, box_xyxy, points_xy, point_labels, timings: dict) -> tuple[np.ndarray, float]:
        """crop [h, w, 3] uint8 RGB; box / points in crop pixels -> (mask bool [h, w], score)."""
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.predictor.set_image(np.ascontiguousarray(crop))
            timings["sam_encoder_ms"] = (time.perf_counter() - t0) * 1000.0
            t0 = time.perf_counter()
            masks, scores, _ = self.predictor.predict(
                point_coords=None if points_xy is None else np.asarray(points_xy, dtype=np.float64),
                point_labels=None if points_xy is None else np.asarray(point_labels),
                box=np.asarray(box_xyxy, dtype=np.float64), multimask_output=True)
            best = int(np.argmax(scores))
            timings["sam_decoder_ms"] = (time.perf_counter() - t0) * 1000.0
        return masks[best].astype(bool), float(scores[best])


@dataclass
class ReferenceResult:
    """Same meaning as `finers_rt.pipeline.Result` (coordinates in original pixels); `tokens`
    holds each stage's generated ids."""

    answer: str
    found: bool
    bbox_xyxy: tuple[int, int, int, int] | None
    region_xyxy: tuple[int, int, int, int] | None
    mask: np.ndarray
    score: float | None
    timings_ms: dict[str, float]
    raw: dict[str, Any]
    tokens: dict[str, list[int]] = field(default_factory=dict)


class ReferencePipeline:
    """GSE -> dynamic-box crop -> LPR -> SAM in torch, settings from the bundle manifest."""

    def __init__(self, config: PipelineConfig, gse: ReferenceVlm, lpr: ReferenceVlm, sam: ReferenceSam):
        self.config, self.gse, self.lpr, self.sam = config, gse, lpr, sam
        self._last_frame: tuple[tuple, Image.Image] | None = None  # (file_key, decoded RGB image)

    @classmethod
    def load(cls, bundle: str | Path, attn_implementation: str = "sdpa") -> "ReferencePipeline":
        """Load the SOURCE checkpoints recorded in a bundle's manifest (`source.gse/lpr/sam`)."""
        folder = Path(bundle)
        manifest = BundleManifest.load(folder)
        config = PipelineConfig.from_dict(manifest.pipeline)
        source = manifest.source
        missing = [k for k in ("gse", "lpr", "sam") if not source.get(k)]
        if missing:
            raise ArtifactError(f"{folder}/manifest.json: source checkpoints {missing} are not "
                                "recorded; the reference needs the checkpoints the bundle was exported from")
        gse = ReferenceVlm.load(resolve_source_path(source["gse"], folder), config.gse_size_wh,
                                attn_implementation)
        lpr = ReferenceVlm.load(resolve_source_path(source["lpr"], folder), config.lpr_size_wh,
                                attn_implementation)
        sam = ReferenceSam.from_sam_folder(folder / manifest.stages["sam"],
                                           resolve_source_path(source["sam"], folder))
        return cls(config, gse, lpr, sam)

    def set_attn(self, attn_implementation: str) -> None:
        self.gse.set_attn(attn_implementation)
        self.lpr.set_attn(attn_implementation)

    def run(self, image_path: str | Path, instruction: str, question_type: str = "referring",
            options: str | None = None, max_new_tokens: int | None = None) -> ReferenceResult:
        """The official FineRS flow on one image file and one instruction. Like the runtime (and
        like a robot that asks K questions about one camera frame), the last decoded file is kept:
        a question about the same unchanged file does not decode it again."""
        cfg = self.config
        budget = max_new_tokens or cfg.max_new_tokens
        timings: dict[str, float] = {}
        start = time.perf_counter()
        pil = self._open(image_path)
        width, height = pil.size
        timings["load_ms"] = _ms(start)
        gse_text = build_gse_prompt(instruction, question_type, options, cfg.templates)
        gse_out = self.gse.generate(pil, gse_text, budget, ANSWER_STOP)
        _merge(timings, "gse", gse_out.timings_ms)
        raw: dict[str, Any] = {"gse": gse_out.text, "lpr": []}
        tokens = {"gse": gse_out.token_ids, "lpr": []}
        gse = parse_output(gse_out.text)
        mask = np.zeros((height, width), dtype=bool)
        result = ReferenceResult(gse.response or "", False, None, None, mask, None, timings, raw, tokens)
        if gse.bbox_xyxy is not None:
            region = geometry.stage_to_frame_box(gse.bbox_xyxy, (width, height), cfg.gse_size_wh)
            self._lpr_and_sam(pil, region, instruction, question_type, options, budget, result)
        result.timings_ms["total_ms"] = _ms(start)
        return result

    def _open(self, image_path: str | Path) -> Image.Image:
        """PIL open + convert("RGB"), or the kept image when the file is the last one unchanged."""
        key = file_key(image_path)
        if self._last_frame is None or self._last_frame[0] != key:
            self._last_frame = None  # free the old frame before decoding (as the runtime does)
            with Image.open(image_path) as img:
                self._last_frame = (key, img.convert("RGB"))
        return self._last_frame[1]

    def _lpr_and_sam(self, pil, region, instruction, question_type, options, budget, result) -> None:
        cfg, timings = self.config, result.timings_ms
        t0 = time.perf_counter()
        crop_xyxy = (geometry.dynamic_box(region, pil.size, cfg.crop_min_side)
                     if cfg.crop_policy == "dynamic_box" else tuple(int(v) for v in region))
        if geometry.crop_is_empty(crop_xyxy):
            crop_xyxy = (0, 0, pil.size[0], pil.size[1])
        crop_pil = pil.crop(crop_xyxy)
        crop_wh = crop_pil.size
        timings["crop_ms"] = _ms(t0)
        result.region_xyxy = tuple(int(v) for v in crop_xyxy)
        lpr_text = build_lpr_prompt(instruction, question_type, options, cfg.templates)
        out = self.lpr.generate(crop_pil, lpr_text, budget, ANSWER_STOP)
        _merge(timings, "lpr", out.timings_ms)
        result.raw["lpr"].append(out.text)
        result.tokens["lpr"].append(out.token_ids)
        parsed = parse_output(out.text)
        if parsed.response is not None:
            result.answer = parsed.response if cfg.answer_source == "lpr" else (result.answer or parsed.response)
        if parsed.bbox_xyxy is None:
            return
        box = geometry.stage_to_frame_box(parsed.bbox_xyxy, crop_wh, cfg.lpr_size_wh)
        box_crop = geometry.clamp_box(box, crop_wh)
        if geometry.crop_is_empty(box_crop):
            return
        points = None
        if parsed.points_xy is not None:
            mapped = geometry.stage_to_frame_points(parsed.points_xy, crop_wh, cfg.lpr_size_wh)
            points = [(min(max(x, 0), crop_wh[0]), min(max(y, 0), crop_wh[1])) for x, y in mapped]
        crop = np.asarray(crop_pil, dtype=np.uint8)
        crop_mask, score = self.sam.segment(crop, box_crop, points, cfg.sam_point_labels, timings)
        t0 = time.perf_counter()
        x1, y1 = result.region_xyxy[:2]
        result.mask[y1:y1 + crop_mask.shape[0], x1:x1 + crop_mask.shape[1]] = crop_mask
        timings["paste_ms"] = _ms(t0)
        result.found, result.score = True, score
        result.bbox_xyxy = geometry.crop_to_image_box(box, result.region_xyxy)


def _merge(timings: dict[str, float], stage: str, stage_ms: dict[str, float]) -> None:
    for key, value in stage_ms.items():
        name = f"{stage}_tokens" if key == "tokens" else f"{stage}_{key}_ms"
        timings[name] = timings.get(name, 0.0) + float(value)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class ReferenceSide:
    """The reference as a `finers_rt.bench` side: `query`, `probe`, `batch` -> query records."""

    def __init__(self, pipeline: ReferencePipeline, max_new_tokens: int | None):
        self.pipeline = pipeline
        self.max_new_tokens = max_new_tokens or pipeline.config.max_new_tokens

    def query(self, path: Path, question: str) -> dict[str, Any]:
        r = self.pipeline.run(path, question, max_new_tokens=self.max_new_tokens)
        return {"timings": r.timings_ms, "gse_text": r.raw["gse"], "gse_ids": r.tokens["gse"],
                "lpr_text": r.raw["lpr"][0] if r.raw["lpr"] else None,
                "lpr_ids": r.tokens["lpr"][0] if r.tokens["lpr"] else None,
                "mask": r.mask, "answer": r.answer}

    def probe(self, path: Path) -> dict[str, Any]:
        """LPR + SAM on the bench's fixed centre crop (`finers_rt.bench.centre_probe`)."""
        from finers_rt.bench import PROBE_QUESTION, centre_probe

        cfg, timings = self.pipeline.config, {}
        with Image.open(path) as img:
            pil = img.convert("RGB")
        spec = centre_probe(pil.size, cfg.crop_min_side)
        crop_pil = pil.crop(spec["crop_xyxy"])
        out = self.pipeline.lpr.generate(crop_pil, build_lpr_prompt(PROBE_QUESTION), self.max_new_tokens,
                                         ANSWER_STOP)
        _merge(timings, "lpr", out.timings_ms)
        mask, _ = self.pipeline.sam.segment(np.asarray(crop_pil, dtype=np.uint8), spec["box_xyxy"],
                                            spec["points_xy"], cfg.sam_point_labels, timings)
        return {"timings": timings, "lpr_text": out.text, "lpr_ids": out.token_ids, "mask": mask}

    def batch(self, paths: Sequence[Path], questions: Sequence[str]) -> list[dict[str, Any]]:
        return [self.query(p, q) for p, q in zip(paths, questions)]


def choose_attn(pipeline: ReferencePipeline, image_path: Path, wanted: str = "auto",
                max_new_tokens: int = 8) -> tuple[str, dict[str, float]]:
    """Pick the attention implementation: `wanted`, or for "auto" the faster of sdpa / eager
    on one short GSE generate (after one untimed run each). Returns (name, ms per candidate)."""
    if wanted != "auto":
        pipeline.set_attn(check_attn(wanted))
        return wanted, {}
    with Image.open(image_path) as img:
        pil = img.convert("RGB")
    text = build_gse_prompt("the object in the centre")
    times = {}
    for name in ATTN_IMPLEMENTATIONS:
        pipeline.set_attn(name)
        pipeline.gse.generate(pil, text, max_new_tokens, None, ignore_eos=True)
        start = time.perf_counter()
        pipeline.gse.generate(pil, text, max_new_tokens, None, ignore_eos=True)
        times[name] = _ms(start)
    best = min(times, key=times.get)
    pipeline.set_attn(best)
    return best, times
