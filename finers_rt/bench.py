"""`finers-rt bench`: per-stage latency, memory and output agreement, runtime vs the torch reference.

Torch-free at import: the reference (`finers_rt.export.reference`, HF `generate` +
segment-anything `SamPredictor` on the bundle's SOURCE checkpoints) is imported only when asked
for. Both sides run in one process on the same generated images and questions.

Scenarios (each query = one image file + one referring question through the whole pipeline;
the runtime runs with `max_extra_crops=0`, i.e. the reference flow):
- `single`: one question per image, a new image per iteration (caches cold);
- `repeat`: K questions on the same image file; `first` = question 1, `rest` = questions 2..K
  (the runtime's prefix / vision / SAM caches should make these cheap). Both sides keep the
  last decoded file (a robot decodes a camera frame once and asks about it K times), so the
  decode counts in question 1 only, on both sides;
- `batch`: B different images back to back (throughput, images/s; the runtime overlaps stages
  across 2 threads on one Pipeline, the reference runs them one after the other);
- `stages`: LPR + SAM on a fixed centre crop with a fixed box and points, so those stages are
  measured even when a (random) GSE gives no parsable region.
Times are milliseconds; statistics are p50 / p90 (linear interpolation) / max over iterations
after warm-up. Peak RSS is VmHWM, reset (Linux clear_refs) before each side.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from finers_rt.errors import InputError

STAGES = ("load_ms", "gse_vision_ms", "gse_prefill_ms", "gse_decode_ms", "crop_ms", "lpr_vision_ms",
          "lpr_prefill_ms", "lpr_decode_ms", "sam_encoder_ms", "sam_decoder_ms", "paste_ms", "total_ms")
QUESTIONS = ("the red pen", "the small blue cup", "the green star", "the white cross on the sign",
             "the person in the yellow coat", "the black cat", "the orange ball", "the grey car")
PROBE_QUESTION = "the object in the centre"


@dataclass(frozen=True)
class BenchOptions:
    """What to measure. `max_new_tokens=None` uses the bundle's setting (FineRS: 1024)."""

    model: str | None = None
    reference: bool = False
    queries_per_image: int = 3
    iters: int = 3
    warmup: int = 1
    batch: int = 2
    image_size_wh: tuple[int, int] = (3840, 2160)
    max_new_tokens: int | None = None
    threads: int | None = None
    attn: str = "auto"
    seed: int = 0

    def __post_init__(self):
        for name, low in (("queries_per_image", 2), ("iters", 1), ("warmup", 0), ("batch", 1)):
            if getattr(self, name) < low:
                raise InputError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if min(self.image_size_wh) < 28:
            raise InputError(f"image size must be >= 28x28, got {self.image_size_wh}")
        if self.attn not in ("auto", "sdpa", "eager"):
            raise InputError(f"attn must be auto, sdpa or eager, got '{self.attn}'")


# ---- statistics ------------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict[str, float]:
    """{"p50", "p90", "max", "mean", "n"} of `values` (numpy linear-interpolation percentiles);
    an empty input gives n=0 and no other keys."""
    data = np.asarray([float(v) for v in values], dtype=np.float64)
    if data.size == 0:
        return {"n": 0}
    return {"p50": float(np.percentile(data, 50)), "p90": float(np.percentile(data, 90)),
            "max": float(data.max()), "mean": float(data.mean()), "n": int(data.size)}


def summarize_records(records: Sequence[dict]) -> dict[str, Any]:
    """Per-stage statistics over query records (a stage a query did not run counts as absent),
    plus summed tokens and tok/s per VLM stage."""
    stages = {key: summarize([r["timings"][key] for r in records if key in r["timings"]])
              for key in STAGES}
    out: dict[str, Any] = {"stages": {k: v for k, v in stages.items() if v["n"]}}
    for stage in ("gse", "lpr"):
        tokens = [r["timings"].get(f"{stage}_tokens", 0.0) for r in records]
        decode = sum(r["timings"].get(f"{stage}_decode_ms", 0.0) for r in records)
        if sum(tokens):
            out[f"{stage}_tokens"] = summarize(tokens)
            out[f"{stage}_tok_per_s"] = 1000.0 * sum(tokens) / decode if decode > 0 else None
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks of one shape; 1.0 when both are empty (the official convention)."""
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else float(np.count_nonzero(a & b) / union)


def token_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Length of the common prefix / the longer sequence (greedy outputs diverge for good once
    they differ); 1.0 for two empty sequences."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same / longest


# ---- the machine -----------------------------------------------------------------------------


def measure_bandwidth(nbytes: int = 256 << 20, repeats: int = 5, kind: str = "read") -> float:
    """Memory bandwidth ONE thread achieves, in GB/s, best of `repeats` passes over `nbytes`
    (far larger than any cache).

    kind "read" (the decode floor): a read-only pass, the maximum of the array's bytes (a SIMD
    reduction numpy runs on one thread, memory bound), `nbytes` counted: what a decode step that
    streams its weights once gets. kind "copy": a numpy copy, read + write counted
    (2 * nbytes); on one core this is higher than "read" (streaming stores do not wait on
    loads), so it overstates the bandwidth a weight-reading decode step can use.
    """
    if kind not in ("read", "copy"):
        raise InputError(f"bandwidth kind must be 'read' or 'copy', got '{kind}'")
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src) if kind == "copy" else None
    as_bytes = src.view(np.uint8)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        if dst is not None:
            np.copyto(dst, src)
        else:
            np.maximum.reduce(as_bytes)
        best = min(best, time.perf_counter() - start)
    moved = 2 * src.nbytes if kind == "copy" else src.nbytes
    return moved / best / 1e9


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """VmHWM of this process in MiB (None where /proc is absent)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def environment(threads: int | None) -> dict[str, Any]:
    """Versions, CPU, threads, providers, git sha and load average of this run."""
    import onnxruntime

    from finers_rt import __version__

    env: dict[str, Any] = {"finers_rt": __version__, "python": platform.python_version(),
                           "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
                           "providers": onnxruntime.get_available_providers(),
                           "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
                           "intra_op_threads": threads, "platform": platform.platform(),
                           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                           "git_sha": _git_sha(), "load_average_start": list(os.getloadavg())}
    for module in ("torch", "transformers"):
        if module in sys.modules:
            env[module] = sys.modules[module].__version__
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_sha() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# ---- inputs ----------------------------------------------------------------------------------


def make_images(folder: Path, count: int, size_wh: Sequence[int], seed: int) -> list[Path]:
    """`count` deterministic photo-like JPEGs (smooth colour blobs + noise) of `size_wh`."""
    from PIL import Image

    width, height = int(size_wh[0]), int(size_wh[1])
    paths = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        coarse = rng.integers(0, 256, size=(max(2, height // 48), max(2, width // 48), 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), np.int16)
        noise = rng.integers(-10, 11, size=(height, width, 3), dtype=np.int16)
        path = folder / f"bench-{index:03d}.jpg"
        Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).save(path, quality=92)
        paths.append(path)
    return paths


def centre_probe(image_wh: Sequence[int], crop_min_side: int) -> dict[str, Any]:
    """The fixed `stages` prompt: a dynamic-box crop around the image centre, a box over the
    central half of the crop and two points inside it (crop pixels, xy)."""
    from finers_rt.geometry import dynamic_box

    width, height = image_wh
    crop = dynamic_box((width / 2 - 128, height / 2 - 128, width / 2 + 128, height / 2 + 128),
                       (width, height), crop_min_side)
    cw, ch = crop[2] - crop[0], crop[3] - crop[1]
    box = (cw // 4, ch // 4, 3 * cw // 4, 3 * ch // 4)
    return {"crop_xyxy": crop, "box_xyxy": box,
            "points_xy": [(cw // 2, ch // 2), (cw // 2 + cw // 8, ch // 2)]}


# ---- scenarios (generic over a side) ---------------------------------------------------------


def run_scenarios(side, images: dict[str, list[Path]], opts: BenchOptions) -> dict[str, Any]:
    """Run every scenario on `side` (an object with `query(path, question)`, `probe(path)` and
    `batch(paths, questions)`); returns the raw per-query records by scenario."""
    k = opts.queries_per_image
    for index, path in enumerate(images["warmup"]):
        side.query(path, QUESTIONS[index % len(QUESTIONS)])
        side.probe(path)
    single = [side.query(path, QUESTIONS[0]) for path in images["single"]]
    repeat = [[side.query(path, QUESTIONS[q % len(QUESTIONS)]) for q in range(k)]
              for path in images["repeat"]]
    probes = [side.probe(path) for path in images["single"]]
    start = time.perf_counter()
    side.batch(images["batch"], [QUESTIONS[i % len(QUESTIONS)] for i in range(len(images["batch"]))])
    batch_ms = (time.perf_counter() - start) * 1000.0
    return {"single": single, "repeat": repeat, "stages": probes, "batch_ms": batch_ms,
            "batch_images": len(images["batch"])}


def summarize_side(raw: dict[str, Any]) -> dict[str, Any]:
    """Statistics of one side's raw scenario records (JSON-ready)."""
    rest = [q for queries in raw["repeat"] for q in queries[1:]]
    return {"single": summarize_records(raw["single"]),
            "repeat_first": summarize_records([queries[0] for queries in raw["repeat"]]),
            "repeat_rest": summarize_records(rest),
            "stages": summarize_records(raw["stages"]),
            "batch": {"images": raw["batch_images"], "total_ms": raw["batch_ms"],
                      "images_per_s": 1000.0 * raw["batch_images"] / raw["batch_ms"]}}


def prefix_agreement(ref_ids: Sequence[int], text: str, decode: Callable[[list[int]], str]) -> float:
    """How far the runtime's text follows the reference's greedy ids: the largest k such that
    `decode(ref_ids[:k])` is a prefix of `text`, over len(ref_ids) (1.0 when the texts are
    equal). The runtime reports text only, so this is measured in the reference's tokens."""
    if decode(list(ref_ids)) == text:
        return 1.0
    best = 0
    for k in range(1, len(ref_ids) + 1):
        if not text.startswith(decode(list(ref_ids[:k]))):
            break
        best = k
    return best / max(1, len(ref_ids))


def compare_outputs(ours: dict[str, Any], ref: dict[str, Any],
                    decode: dict[str, Callable[[list[int]], str]]) -> dict:
    """Agreement of the two sides on the same queries (single + repeat + stages probes):
    texts equal, `prefix_agreement` per VLM stage (decoded with `decode[stage]`), answers
    equal, mask IoU (1.0 when both masks are empty)."""
    pairs = list(zip(ours["single"], ref["single"]))
    pairs += [p for a, b in zip(ours["repeat"], ref["repeat"]) for p in zip(a, b)]
    gse_agree, lpr_agree, ious, same_text, same_answer = [], [], [], [], []
    for a, b in pairs:
        gse_agree.append(prefix_agreement(b["gse_ids"], a["gse_text"], decode["gse"]))
        same_text.append(a["gse_text"] == b["gse_text"])
        same_answer.append(a["answer"] == b["answer"])
        if a["lpr_text"] is not None or b["lpr_text"] is not None:
            lpr_agree.append(prefix_agreement(b["lpr_ids"] or [], a["lpr_text"] or "", decode["lpr"]))
        ious.append(mask_iou(a["mask"], b["mask"]))
    probes = list(zip(ours["stages"], ref["stages"]))
    probe_lpr = [prefix_agreement(b["lpr_ids"], a["lpr_text"], decode["lpr"]) for a, b in probes]
    probe_iou = [mask_iou(a["mask"], b["mask"]) for a, b in probes]
    return {"queries": len(pairs), "gse_text_equal": float(np.mean(same_text)),
            "gse_token_agreement": float(np.mean(gse_agree)),
            "lpr_token_agreement": float(np.mean(lpr_agree)) if lpr_agree else None,
            "lpr_queries": len(lpr_agree), "answer_equal": float(np.mean(same_answer)),
            "mask_iou_mean": float(np.mean(ious)), "mask_iou_min": float(np.min(ious)),
            "probe_lpr_token_agreement": float(np.mean(probe_lpr)),
            "probe_mask_iou_mean": float(np.mean(probe_iou)),
            "probe_mask_iou_min": float(np.min(probe_iou))}


def ratios(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """reference p50 / ours p50 per stage of each scenario (None where either is missing/zero)."""
    out: dict[str, Any] = {}
    for scenario in ("single", "repeat_first", "repeat_rest", "stages"):
        a, b = ours[scenario]["stages"], ref[scenario]["stages"]
        out[scenario] = {k: _ratio(b[k]["p50"], a[k]["p50"]) for k in STAGES if k in a and k in b}
    out["batch_images_per_s"] = _ratio(ours["batch"]["images_per_s"], ref["batch"]["images_per_s"])
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return float(num / den)


def make_image_sets(folder: Path, opts: BenchOptions) -> dict[str, list[Path]]:
    """Disjoint image lists per scenario so no cache carries over between them."""
    counts = {"warmup": opts.warmup, "single": opts.iters, "repeat": opts.iters, "batch": opts.batch}
    paths = make_images(folder, sum(counts.values()), opts.image_size_wh, opts.seed)
    sets, start = {}, 0
    for name, count in counts.items():
        sets[name] = paths[start:start + count]
        start += count
    return sets


def bench_command_line(opts: BenchOptions, json_out: str | None = None, plot: str | None = None) -> str:
    """The `finers-rt bench` command that reproduces `opts` (recorded beside each result)."""
    parts = ["finers-rt", "bench"]
    if opts.model:
        parts += ["--model", str(opts.model)]
    if opts.reference:
        parts.append("--reference")
    parts += ["--queries-per-image", str(opts.queries_per_image), "--iters", str(opts.iters),
              "--warmup", str(opts.warmup), "--batch", str(opts.batch),
              "--image-size", f"{opts.image_size_wh[0]}x{opts.image_size_wh[1]}", "--attn", opts.attn]
    for flag, value in (("--max-new-tokens", opts.max_new_tokens), ("--threads", opts.threads),
                        ("--json", json_out), ("--plot", plot)):
        if value is not None:
            parts += [flag, str(value)]
    return " ".join(parts)


def save_json(result: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def scratch_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="finers-bench-")
