"""`finers-rt bench` orchestration: the runtime side, the bandwidth floor and the result record.

Torch-free at import (the reference is imported inside `run_bench` only with `reference=True`).
See `finers_rt.bench` for the scenarios and statistics.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from finers_rt import bench
from finers_rt.bench import BenchOptions


class _TimedBackend:
    """Wraps a decoder backend; sums the session time of decode steps (`seq == 1`)."""

    def __init__(self, inner):
        self._inner = inner
        self.decode_ms = 0.0
        self.decode_calls = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def run(self, feeds, output_names=None):
        start = time.perf_counter()
        out = self._inner.run(feeds, output_names)
        if feeds["inputs_embeds"].shape[1] == 1:
            with self._lock:
                self.decode_ms += (time.perf_counter() - start) * 1000.0
                self.decode_calls += 1
        return out


class RuntimeSide:
    """finers-rt's `Pipeline` as a bench side (`query`, `probe`, `batch`)."""

    def __init__(self, pipe, max_new_tokens: int | None):
        self.pipe = pipe
        self.max_new_tokens = max_new_tokens or pipe.config.max_new_tokens
        self.timers = {}
        for role in ("gse", "lpr"):
            stage = getattr(pipe, role)
            stage.decoder = _TimedBackend(stage.decoder)
            self.timers[role] = stage.decoder

    def _session_ms(self) -> float:
        """Decoder session time of decode steps so far: `decoder.run` calls (timed by the wrapper)
        + the steps a "shared" K/V stage runs through its IO binding (`VlmStage.decode_session_ms`)."""
        wrapped = sum(t.decode_ms for t in self.timers.values())
        bound = sum(float(getattr(getattr(self.pipe, role), "decode_session_ms", 0.0)) for role in self.timers)
        return wrapped + bound

    def query(self, path: Path, question: str) -> dict[str, Any]:
        session_before = self._session_ms()
        r = self.pipe.run(str(path), question, max_new_tokens=self.max_new_tokens)
        return {"timings": normalize_timings(r.timings_ms), "gse_text": r.raw["gse"],
                "lpr_text": r.raw["lpr"][0] if r.raw["lpr"] else None, "mask": r.mask,
                "answer": r.answer, "decode_session_ms": self._session_ms() - session_before}

    def probe(self, path: Path) -> dict[str, Any]:
        from finers_rt.image import load_image
        from finers_rt.prompts import build_lpr_prompt

        cfg, timings = self.pipe.config, {}
        session_before = self._session_ms()
        pixels = load_image(str(path))
        spec = bench.centre_probe((pixels.shape[1], pixels.shape[0]), cfg.crop_min_side)
        x1, y1, x2, y2 = spec["crop_xyxy"]
        crop = np.ascontiguousarray(pixels[y1:y2, x1:x2])
        out = self.pipe.lpr.generate(crop, build_lpr_prompt(bench.PROBE_QUESTION),
                                     max_new_tokens=self.max_new_tokens, stop_at="</answer>")
        session_ms = self._session_ms() - session_before
        for key, value in out.timings_ms.items():
            if key in ("vision", "decode", "tokens"):
                timings[f"lpr_{key}_ms" if key != "tokens" else "lpr_tokens"] = value
        timings["lpr_prefill_ms"] = sum(out.timings_ms.get(k, 0.0) for k in
                                        ("prefix_prefill", "question_prefill", "prefix_load"))
        start = time.perf_counter()
        self.pipe.sam.set_image(crop)
        timings["sam_encoder_ms"] = (time.perf_counter() - start) * 1000.0
        start = time.perf_counter()
        mask, _ = self.pipe.sam.predict_best(spec["box_xyxy"], spec["points_xy"], cfg.sam_point_labels)
        timings["sam_decoder_ms"] = (time.perf_counter() - start) * 1000.0
        return {"timings": timings, "lpr_text": out.text, "mask": mask, "decode_session_ms": session_ms}

    def batch(self, paths: Sequence[Path], questions: Sequence[str]) -> list[dict[str, Any]]:
        """Images on 2 threads over one Pipeline: its per-stage locks let GSE of one image
        overlap LPR / SAM of another."""
        with ThreadPoolExecutor(max_workers=min(2, len(paths))) as pool:
            return list(pool.map(self.query, paths, questions))


def normalize_timings(timings: dict[str, float]) -> dict[str, float]:
    """Pipeline timings -> the bench's stage keys: `<stage>_prefill_ms` = prefix prefill +
    question prefill + prefix-cache load; per-stage totals are dropped."""
    out = {k: v for k, v in timings.items() if not k.endswith(("_total_ms", "prefix_prefill_ms",
                                                                  "question_prefill_ms", "prefix_load_ms"))}
    for stage in ("gse", "lpr"):
        parts = [timings[k] for k in (f"{stage}_prefix_prefill_ms", f"{stage}_question_prefill_ms",
                                      f"{stage}_prefix_load_ms") if k in timings]
        if parts:
            out[f"{stage}_prefill_ms"] = float(sum(parts))
    return out


def decode_report(records: Sequence[dict], floors: dict[str, dict]) -> dict[str, Any]:
    """Decode ms/token vs the bandwidth floor per stage, and the Python overhead of the loop
    (decode time minus decoder-session time) from the runtime's `single` + `stages` records."""
    out: dict[str, Any] = {}
    for stage in ("gse", "lpr"):
        per_token = [r["timings"][f"{stage}_decode_ms"] / r["timings"][f"{stage}_tokens"]
                     for r in records if r["timings"].get(f"{stage}_tokens")]
        if per_token and stage in floors:
            ms = float(np.median(per_token))
            out[stage] = {"ms_per_token_p50": ms, "floor_ms_per_token": floors[stage]["floor_ms_per_token"],
                          "vs_floor": ms / floors[stage]["floor_ms_per_token"]}
    decode_ms = sum(r["timings"].get(f"{s}_decode_ms", 0.0) for r in records for s in ("gse", "lpr"))
    tokens = sum(r["timings"].get(f"{s}_tokens", 0.0) for r in records for s in ("gse", "lpr"))
    session = sum(r.get("decode_session_ms", 0.0) for r in records)
    if decode_ms > 0 and tokens > 0:
        out["python_overhead_ms_per_token"] = (decode_ms - session) / tokens
        out["python_overhead_fraction"] = (decode_ms - session) / decode_ms
    return out


def bandwidth_floors(pipe, bandwidth_gbs: float) -> dict[str, dict[str, float]]:
    """Per VLM stage: decoder weight bytes (decoder.onnx + external data) and K/V bytes of the
    prompt, and the ms/token a decode step needs at `bandwidth_gbs` to read them once."""
    floors = {}
    for role in ("gse", "lpr"):
        stage = getattr(pipe, role)
        weights = sum(p.stat().st_size for p in Path(stage.folder).glob("decoder.onnx*"))
        text = stage.manifest.text
        prompt = stage.tokenizer.build_prompt(stage.manifest.image.num_image_tokens,
                                              bench.QUESTIONS[0]).input_ids.size
        kv = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 4 * int(prompt)
        floors[role] = {"weight_bytes": int(weights), "prompt_kv_bytes": int(kv),
                        "prompt_tokens": int(prompt),
                        "floor_ms_per_token": (weights + kv) / (bandwidth_gbs * 1e9) * 1000.0}
    return floors


def run_bench(opts: BenchOptions, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Measure the runtime (and the reference with `opts.reference`) on a bundle; return the
    JSON-ready record with `speedup_e2e` / `speedup_repeat_query` at the top level (None
    without the reference)."""
    from finers_rt.config import BackendOptions
    from finers_rt.pipeline import Pipeline, default_bundle_path

    bundle = Path(opts.model) if opts.model else default_bundle_path()
    env = bench.environment(opts.threads)
    bandwidth = bench.measure_bandwidth(kind="read")  # the floor: one thread reading weights
    bandwidth_copy = bench.measure_bandwidth(kind="copy")
    log(f"memory bandwidth (1 thread) read {bandwidth:.1f} GB/s, copy {bandwidth_copy:.1f} GB/s")
    with bench.scratch_dir() as scratch:
        images = bench.make_image_sets(Path(scratch), opts)
        bench.reset_peak_rss()
        pipe = Pipeline.load(bundle, BackendOptions(intra_op_threads=opts.threads), max_extra_crops=0)
        side = RuntimeSide(pipe, opts.max_new_tokens)
        log("runtime: running scenarios")
        ours_raw = bench.run_scenarios(side, images, opts)
        ours = bench.summarize_side(ours_raw)
        ours["peak_rss_mb"] = bench.peak_rss_mb()
        floors = bandwidth_floors(pipe, bandwidth)
        ours["decode"] = decode_report(ours_raw["single"] + ours_raw["stages"], floors)
        result: dict[str, Any] = {"speedup_e2e": None, "speedup_repeat_query": None,
                                  "model": str(pipe.manifest.name), "options": _options_dict(opts),
                                  "environment": env, "bandwidth_gbs": bandwidth,
                                  "bandwidth_copy_gbs": bandwidth_copy, "floors": floors,
                                  "ours": ours}
        if opts.reference:
            _run_reference(opts, bundle, images, pipe, ours_raw, result, log)
    env["load_average_end"] = list(os.getloadavg())
    return result


def _run_reference(opts, bundle, images, pipe, ours_raw, result, log) -> None:
    from finers_rt.export.reference import (ReferencePipeline, ReferenceSide, choose_attn,
                                            torch_environment)

    bench.reset_peak_rss()
    ref_pipe = ReferencePipeline.load(bundle)
    probe_image = (images["warmup"] or images["single"])[0]
    attn, attn_ms = choose_attn(ref_pipe, probe_image, opts.attn)
    log(f"reference: attention '{attn}' {attn_ms}; running scenarios")
    ref_raw = bench.run_scenarios(ReferenceSide(ref_pipe, opts.max_new_tokens), images, opts)
    ref = bench.summarize_side(ref_raw)
    ref["peak_rss_mb"] = bench.peak_rss_mb()
    ref["attn_implementation"], ref["attn_probe_ms"] = attn, attn_ms
    records = ref_raw["single"] + ref_raw["stages"]
    ref["decode"] = {s: {"ms_per_token_p50": float(np.median(
        [r["timings"][f"{s}_decode_ms"] / r["timings"][f"{s}_tokens"] for r in records
         if r["timings"].get(f"{s}_tokens")]))} for s in ("gse", "lpr")
        if any(r["timings"].get(f"{s}_tokens") for r in records)}
    result["environment"].update(torch_environment())
    result["reference"] = ref
    decoders = {role: getattr(pipe, role).tokenizer.decode for role in ("gse", "lpr")}
    result["agreement"] = bench.compare_outputs(ours_raw, ref_raw, decoders)
    result["ratios_p50"] = bench.ratios(result["ours"], ref)
    ours = result["ours"]
    result["speedup_e2e"] = bench._ratio(ref["single"]["stages"]["total_ms"]["p50"],
                                         ours["single"]["stages"]["total_ms"]["p50"])
    result["speedup_repeat_query"] = bench._ratio(ref["repeat_rest"]["stages"]["total_ms"]["p50"],
                                                  ours["repeat_rest"]["stages"]["total_ms"]["p50"])


def _options_dict(opts: BenchOptions) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(opts).items()}
