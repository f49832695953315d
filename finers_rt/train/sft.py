"""Supervised fine-tuning of a GSE or LPR stage, nanoGPT style: one loop, top to bottom.

    finers-rt train gse --cache CACHE --out RUN_DIR --steps 2000
    torchrun --nproc_per_node 4 -m finers_rt.cli train gse ...   (DDP: one process per rank)

The run is resumable (RUN_DIR/checkpoint + trainer_state.pt; see `checkpoint.py`), seeded
(sampling, dropout-free model, torch RNG all restored on resume), logs loss / lr / ETA and
writes RUN_DIR/checkpoint as an HF Qwen2.5-VL folder that `finers-rt export` takes.
Losses: text CE on the answer tokens, a soft (Gaussian) CE on coordinate tokens, a
training-only pointer loss (`batch.PointerHead`) on the LM's image-token states, for pointer
models the in-model pointer's axis loss, and for GSE optionally the training-only dense
per-image-token loss (`dense.DenseHead`, `--dense-weight`), and optionally the training-only loss
that predicts the target attributes the question names from the last prompt position
(`dense.QueryHead`, `--query-weight`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from finers_rt.errors import InputError
from finers_rt.train import checkpoint as ckpt
from finers_rt.train import dense, frozen_vision, reading, shared_prefix, tie
from finers_rt.train.batch import Batch, Collator, PointerHead, to_device, token_losses
from finers_rt.train.data import (NOT_FOUND_RESPONSE, NOT_FOUND_THINK, SampleCache,
                                  format_gse_answer, format_lpr_answer, gse_prompt, lpr_prompt)

STAGES = ("gse", "lpr")
# "stock": HF Qwen2.5-VL; "pointer": FinersPointerQwen2_5_VL (finers_rt.export.pointer)
MODEL_CLASSES = ("stock", "pointer")
HEAD_NAMES = ("pointer", "dense", "query")  # the training-only heads saved in trainer_state.pt
COORDS_PER_ANSWER = {"gse": 4, "lpr": 8}  # bbox x1 y1 x2 y2 (+ points_1, points_2 for LPR)


@dataclass(frozen=True)
class SftConfig:
    """One SFT run. `init` is a model config name ("finers-tiny", "test") or an HF folder."""

    stage: str
    cache_dir: str
    out_dir: str
    init: str = "finers-tiny"
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    coord_weight: float = 2.0
    coord_sigma: float = 1.5
    pointer_weight: float = 1.0
    model_class: str = "stock"
    axis_weight: float = 1.0
    joint_pointer: bool = False
    joint_weight: float = 1.0
    query_at_x1: bool = False
    carry_heads: bool = False
    dense_weight: float = 0.0
    query_weight: float = 0.0
    head_lr: float = 0.0
    blank_image: bool = False
    option_think: bool = False
    freeze_vision: bool = False
    questions_per_image: int = 1
    curriculum_steps: int = 0
    curriculum_start: float = 0.03
    save_every: int = 100
    log_every: int = 10
    eval_every: int = 0
    eval_cache: str | None = None
    eval_samples: int = 24
    seed: int = 0
    threads: int = 1
    device: str = "cpu"
    workers: int = 0
    time_limit_s: float = 0.0
    negative_fraction: float = 0.0
    tie_weight: float = 0.0
    read_attention: float = 0.0
    extent_weight: float = 0.0
    readout_weight: float = 0.0
    readout_dims: int = 16
    read_attention_layer: int = 0
    read_attention_head: int = 0
    tie_coords: int = 1

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise InputError(f"stage must be one of {STAGES}, got '{self.stage}'")
        for name in ("steps", "batch_size", "save_every", "log_every", "questions_per_image"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.model_class not in MODEL_CLASSES:
            raise InputError(f"model class must be one of {MODEL_CLASSES}, got '{self.model_class}'")
        if self.dense_weight > 0 and self.stage != "gse":
            raise InputError("--dense-weight labels the GSE image (whole scene): stage gse only")
        if self.questions_per_image > 1 and self.stage != "gse":
            raise InputError("--questions-per-image shares the whole-scene image of GSE prompts: "
                             "stage gse only (an LPR crop belongs to one question)")
        if self.lr <= 0 or self.min_lr < 0:
            raise InputError(f"lr must be > 0 and min_lr >= 0, got {self.lr}, {self.min_lr}")
        if self.blank_image and ((self.query_weight <= 0 and self.tie_weight <= 0
                                  and self.read_attention <= 0)
                                 or self.dense_weight > 0 or self.questions_per_image > 1):
            raise InputError("--blank-image trains only the question-reading loss: it needs "
                             "--query-weight, --tie-weight or --read-attention > 0, and no --dense-weight or "
                             "--questions-per-image")
        if self.head_lr < 0:
            raise InputError(f"head lr must be >= 0 (0 = the model's lr), got {self.head_lr}")
        if self.joint_pointer and self.model_class != "pointer":
            raise InputError("--joint-pointer makes the in-model pointer joint: it needs "
                             "--model-class pointer")
        if self.query_at_x1 and (self.query_weight <= 0 or self.blank_image):
            raise InputError("--query-at-x1 moves the question-reading loss to the first "
                             "coordinate: it needs --query-weight > 0 and no --blank-image")
        if self.carry_heads and not _is_run_checkpoint(self.init):
            raise InputError("--carry-heads takes the training-only heads of the run whose "
                             "checkpoint --init is: --init must be a <run>/checkpoint folder "
                             f"next to <run>/trainer_state.pt, got '{self.init}'")
        if self.joint_weight < 0:
            raise InputError(f"joint weight must be >= 0, got {self.joint_weight}")
        if not 0.0 <= self.negative_fraction < 1.0:
            raise InputError(f"negative fraction must be in [0, 1), got {self.negative_fraction}")
        if self.tie_weight < 0:
            raise InputError(f"tie weight must be >= 0, got {self.tie_weight}")
        if self.tie_weight > 0 and not self.joint_pointer:
            raise InputError("--tie-weight ties the joint in-model pointer to the stage image's "
                             "per-cell labels: --model-class pointer --joint-pointer")
        if not 1 <= self.tie_coords <= COORDS_PER_ANSWER[self.stage]:
            raise InputError(f"--tie-coords must be in [1, {COORDS_PER_ANSWER[self.stage]}] "
                             f"for stage {self.stage}, got {self.tie_coords}")
        if self.extent_weight < 0:
            raise InputError(f"extent weight must be >= 0, got {self.extent_weight}")
        if self.extent_weight > 0 and (self.stage != "lpr" or self.model_class != "pointer"
                                       or self.blank_image):
            raise InputError("--extent-weight trains the in-model pointer's extent on the answer "
                             "box: stage lpr with --model-class pointer (GSE's box is a "
                             "fixed-size region), without --blank-image")
        if self.readout_weight < 0:
            raise InputError(f"readout weight must be >= 0, got {self.readout_weight}")
        if self.readout_weight > 0 and (self.model_class != "pointer" or self.blank_image):
            raise InputError("--readout-weight trains the in-model pointer's readout on the "
                             "answer's response: --model-class pointer, without --blank-image")
        if not 1 <= self.readout_dims <= 32:
            raise InputError(f"--readout-dims must be in [1, 32], got {self.readout_dims}")
        if self.read_attention < 0:
            raise InputError(f"read-attention weight must be >= 0, got {self.read_attention}")
        if self.read_attention > 0 and self.questions_per_image > 1:
            raise InputError("--read-attention supervises the attention over the whole prompt "
                             "of one sequence: not with --questions-per-image")
        if self.negative_fraction > 0 and (self.stage != "lpr" or self.blank_image):
            raise InputError("--negative-fraction draws LPR crops without the target: stage lpr "
                             "only, without --blank-image")


def param_groups(cfg: SftConfig, model_params: list, head_params: list) -> list[dict]:
    """AdamW parameter groups: one for everything, or (with `head_lr` > 0) the exported
    model's parameters at `lr` and the training-only heads (pointer, dense, query) at
    `head_lr`, both on the same warm-up + cosine shape (the "lr_scale" each group keeps)."""
    if cfg.head_lr <= 0:
        return [{"params": model_params + head_params, "lr_scale": 1.0}]
    return [{"params": model_params, "lr_scale": 1.0},
            {"params": head_params, "lr_scale": cfg.head_lr / cfg.lr}]


def lr_at(cfg: SftConfig, step: int) -> float:
    """Linear warm-up then cosine decay to min_lr over `steps`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def min_area_at(cfg: SftConfig, step: int) -> float:
    """Curriculum: only targets of at least this area_percent are drawn (large first)."""
    if cfg.curriculum_steps <= 0 or step >= cfg.curriculum_steps:
        return 0.0
    return cfg.curriculum_start * (1 - step / cfg.curriculum_steps)


def stage_example(cache: SampleCache, stage: str, index: int, crop: int = 0,
                  option_think: bool = False):
    """(image [h, w, 3] uint8, user text, target text, pointer (x, y)) of cache entry `index`
    (`option_think`: see `data.think_for`)."""
    entry = cache.entries[index]
    record = entry["record"]
    if stage == "gse":
        region = entry["gse"]["region_stage"]
        box = entry["gse"]["gt_box_stage"]
        return (cache.gse_image(index), gse_prompt(record),
                format_gse_answer(record, region, option_think),
                ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))
    meta = entry["lpr"][crop]
    box = meta["box_stage"]
    return (np.asarray(cache.lpr_images[cache.lpr_row(index, crop)]), lpr_prompt(record),
            format_lpr_answer(record, box, meta["points_stage"], option_think),
            ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))


def negative_example(cache: SampleCache, index: int, k: int, option_think: bool = False):
    """Like `stage_example` for LPR negative crop `k` of entry `index` (no target in it):
    the answer thinks NOT_FOUND_THINK, boxes the decoy (or the whole crop) and says
    NOT_FOUND_RESPONSE."""
    record = cache.entries[index]["record"]
    image, meta, _ = cache.negative(index, k)
    box = meta["answer_box_stage"]
    return (image, lpr_prompt(record),
            format_lpr_answer(record, box, meta["answer_points_stage"], option_think,
                              response=NOT_FOUND_RESPONSE, think=NOT_FOUND_THINK),
            ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))


def image_key(cache: SampleCache, stage: str, index: int, crop: int = 0) -> int:
    """The row of entry `index`'s stage image in the cache (the frozen-vision memo's key);
    negative crop k is `crop` = -(k + 1), keyed after every positive row."""
    if stage == "gse":
        return cache.gse_row(index)
    if crop < 0:
        return cache.lpr_images.shape[0] + int(cache.entries[index]["negative_rows"][-crop - 1])
    return cache.lpr_row(index, crop)


def draw_crops(cache: SampleCache, cfg: SftConfig, picks: np.ndarray,
               rng: np.random.Generator) -> list[int]:
    """Per pick, a positive crop index (>= 0) or, with probability `negative_fraction` where
    the entry has negatives, negative crop k as -(k + 1)."""
    crops = rng.integers(0, cache.lpr_crops, size=len(picks))
    if cfg.negative_fraction <= 0:
        return [int(k) for k in crops]
    out = []
    for i, k in zip(picks, crops):
        n_neg = cache.negative_count(int(i))
        if n_neg and rng.random() < cfg.negative_fraction:
            out.append(-int(rng.integers(n_neg)) - 1)
        else:
            out.append(int(k))
    return out


def sample_batch(cache: SampleCache, cfg: SftConfig, collator: Collator,
                 rng: np.random.Generator, step: int) -> Batch:
    weights = cache.area_weights(min_area_at(cfg, step))
    picks = rng.choice(len(cache), size=cfg.batch_size, p=weights)
    crops = draw_crops(cache, cfg, picks, rng)
    examples = [negative_example(cache, int(i), -k - 1, cfg.option_think) if k < 0 else
                stage_example(cache, cfg.stage, int(i), int(k), cfg.option_think)
                for i, k in zip(picks, crops)]
    images, texts, targets, pointers = (list(col) for col in zip(*examples))
    if cfg.blank_image:
        images, pointers = [blank_image(collator)] * len(images), None
    batch = collator(images, texts, targets, pointers)
    if cfg.freeze_vision and not cfg.blank_image:
        batch.image_keys = torch.tensor([image_key(cache, cfg.stage, int(i), int(k))
                                         for i, k in zip(picks, crops)], dtype=torch.long)
    if cfg.dense_weight > 0 or (cfg.tie_weight > 0 and not cfg.blank_image):
        batch.cell_labels = dense.batch_labels(
            [stage_object_rows(cache, cfg.stage, int(i), int(k)) for i, k in zip(picks, crops)],
            batch.image_grid_thw, collator.vision.merge_size)
    if cfg.query_weight > 0 or cfg.tie_weight > 0 or cfg.read_attention > 0:
        batch.query_labels = question_labels(cache, [int(i) for i in picks])
    if cfg.tie_weight > 0 or cfg.read_attention > 0:
        batch.region_labels = region_labels(cache, [int(i) for i in picks])
    return batch


def stage_object_rows(cache: SampleCache, stage: str, index: int, crop: int = 0
                      ) -> list[list[float]]:
    """The scene's objects in fractions of entry `index`'s stage image: the whole scene for
    GSE, the objects inside LPR crop `crop` (negative crop k as -(k + 1)) for LPR."""
    rows = cache.object_rows(index)
    if stage == "gse":
        return rows
    meta = (cache.negative(index, -crop - 1)[1] if crop < 0
            else cache.entries[index]["lpr"][crop])
    return dense.crop_rows(rows, meta["crop_original"], cache.sizes.scene_size_wh)


def blank_image(collator: Collator) -> np.ndarray:
    """The smallest image the processor takes as is (mid-grey, one merged window per
    `merge_size` patches a side: 56x56, 4 image tokens, for Qwen2.5-VL's 3136 min pixels)."""
    vision = collator.vision
    unit = vision.patch_size * vision.merge_size
    side = unit * max(1, math.ceil(math.sqrt(vision.min_pixels) / unit))
    return np.full((side, side, 3), 128, np.uint8)


def region_labels(cache: SampleCache, indices: list[int]) -> torch.Tensor:
    """[len(indices)] long: the image region each entry's question names (`tie.region_label`)."""
    return torch.tensor([tie.region_label(cache.entries[i]["record"]["Q"]) for i in indices],
                        dtype=torch.long)


def question_labels(cache: SampleCache, indices: list[int]) -> torch.Tensor:
    """[len(indices), fields] long: the target attributes each entry's question names
    (`dense.named_target_labels`; -1 = not named)."""
    out = []
    for i in indices:
        entry = cache.entries[i]
        rows = cache.object_rows(i)
        target = dense.target_row(rows, entry["gse"]["gt_box_original"], cache.sizes.scene_size_wh)
        out.append(dense.named_target_labels(rows, target, entry["record"]["Q"]))
    return torch.tensor(out, dtype=torch.long)


def sample_shared_batch(cache: SampleCache, cfg: SftConfig, collator: Collator,
                        rng: np.random.Generator, step: int) -> shared_prefix.SharedBatch:
    """GSE with `questions_per_image` K > 1: up to `batch_size` questions from
    ceil(batch_size / K) distinct scenes, each scene's image prefix computed once
    (`shared_prefix`). A scene's first question is drawn as `sample_batch` draws (curriculum
    weights); the others, up to K - 1, uniformly from the scene's other eligible questions."""
    weights = cache.area_weights(min_area_at(cfg, step))
    by_scene = cache.scene_entries()
    n_images = -(-cfg.batch_size // cfg.questions_per_image)
    left, rows, groups, firsts, questions = cfg.batch_size, [], [], [], []
    for first in rng.choice(len(cache), size=cfg.batch_size, p=weights):
        row = cache.gse_row(int(first))
        if row in rows:
            continue
        others = [e for e in by_scene[row] if e != first and weights[e] > 0]
        k = min(cfg.questions_per_image, left) - 1
        extra = rng.choice(others, size=min(k, len(others)), replace=False) if others and k > 0 else []
        picks = [int(first)] + [int(e) for e in extra]
        groups.append([stage_example(cache, "gse", i, 0, cfg.option_think)[1:] for i in picks])
        questions.extend(picks)
        rows.append(row)
        firsts.append(int(first))
        left -= len(picks)
        if len(rows) == n_images or left <= 0:
            break
    images = [np.asarray(cache.gse_images[r]) for r in rows]
    batch = shared_prefix.collate_shared(collator, images, groups, keys=rows)
    if cfg.dense_weight > 0 or cfg.tie_weight > 0:
        batch.prefix.cell_labels = dense.batch_labels([cache.object_rows(i) for i in firsts],
                                                      batch.prefix.image_grid_thw,
                                                      collator.vision.merge_size)
    if cfg.query_weight > 0 or cfg.tie_weight > 0:
        batch.query_labels = question_labels(cache, questions)
    if cfg.tie_weight > 0:
        batch.region_labels = region_labels(cache, questions)
    return batch


def draw_batch(cache: SampleCache, cfg: SftConfig, collator: Collator, rng: np.random.Generator,
               step: int):
    """The step's batch: a `SharedBatch` with --questions-per-image > 1, else a `Batch`."""
    if cfg.questions_per_image > 1:
        return sample_shared_batch(cache, cfg, collator, rng, step)
    return sample_batch(cache, cfg, collator, rng, step)


class _BatchStream(torch.utils.data.IterableDataset):
    """Endless batches for DataLoader workers; worker w draws with SeedSequence([seed, rank,
    start step, w]) and follows the curriculum from its own count (approximate step)."""

    def __init__(self, cache_dir: str, cfg: SftConfig, collator: Collator, start: int, rank: int):
        super().__init__()
        self.cache_dir, self.cfg, self.collator, self.start, self.rank = cache_dir, cfg, collator, start, rank

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        torch.set_num_threads(1)
        cache = SampleCache(self.cache_dir)
        rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, self.rank, self.start, wid]))
        k = 0
        while True:
            yield draw_batch(cache, self.cfg, self.collator, rng, self.start + k * n + wid)
            k += 1


def batch_stream(cache: SampleCache, cfg: SftConfig, collator: Collator, rng, start: int,
                 rank: int):
    """Training batches: drawn in-process from `rng` (workers 0: bit-exact resume), or by
    `cfg.workers` DataLoader processes (for a GPU; a resumed run draws fresh batches)."""
    if cfg.workers <= 0:
        step = start
        while True:
            yield draw_batch(cache, cfg, collator, rng, step)
            step += 1
    loader = torch.utils.data.DataLoader(
        _BatchStream(cfg.cache_dir, cfg, collator, start, rank), batch_size=None,
        num_workers=cfg.workers, prefetch_factor=4, pin_memory=cfg.device.startswith("cuda"))
    yield from loader


def setup_distributed() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed (gloo) when run under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return int(os.environ.get("RANK", "0")), world


def _is_run_checkpoint(init: Any) -> bool:
    """True when `init` is `<run>/checkpoint` with `<run>/trainer_state.pt` next to it."""
    path = Path(str(init))
    return path.name == "checkpoint" and (path.parent / "trainer_state.pt").is_file()


def run_heads(init_dir: Path) -> tuple[Path | None, dict]:
    """(path, {name: state dict}) of the training-only heads ("pointer", "dense", "query") saved
    by the run whose checkpoint `init_dir` is (`<run>/checkpoint` next to
    `<run>/trainer_state.pt`); (None, {}) when `init_dir` is not such a checkpoint."""
    if not _is_run_checkpoint(init_dir):
        return None, {}
    state_path = Path(init_dir).parent / "trainer_state.pt"
    state = ckpt.load_state(state_path)
    return state_path, {k: state[k] for k in HEAD_NAMES if state.get(k)}


def joint_seed(init_dir: Path, log: Callable[[str], None] = print) -> dict | None:
    """The training-only joint pointer head (`batch.PointerHead`) of the run whose checkpoint
    `init_dir` is, to seed a new joint in-model pointer with: both score image tokens as
    softmax(q . k / sqrt(d)) of the final normed states (the head's width is the model's
    head_dim), so the in-model pointer starts where the head had got to. None when there is no
    such run state (fresh weights then)."""
    state_path, heads = run_heads(init_dir)
    if "pointer" not in heads:
        return None
    log(f"joint pointer: key / query seeded from the training-only pointer head of {state_path}")
    return heads["pointer"]


def carry_heads(heads: torch.nn.ModuleDict, init_dir: Path, log: Callable[[str], None] = print
                ) -> list[str]:
    """Load the training-only heads of the run whose checkpoint `init_dir` is into `heads`
    (`--carry-heads`), so a continuation does not restart them from random weights. A head
    the run did not save, or whose shapes differ, stays fresh. Returns the names loaded."""
    state_path, saved = run_heads(init_dir)
    if state_path is None:
        raise InputError(f"--carry-heads: {init_dir} is not a run's checkpoint/ folder next to "
                         "its trainer_state.pt")
    loaded = []
    for name, module in heads.items():
        mine = module.state_dict()
        theirs = saved.get(name)
        if theirs is None or set(theirs) != set(mine) or any(
                tuple(theirs[k].shape) != tuple(v.shape) for k, v in mine.items()):
            continue
        module.load_state_dict(theirs)
        loaded.append(name)
    fresh = [n for n in heads if n not in loaded]
    log(f"carried training-only heads {loaded or 'none'} from {state_path}"
        + (f" (fresh: {fresh})" if fresh else ""))
    return loaded


def build_model(cfg: SftConfig, run_dir: Path, rank: int = 0, log: Callable[[str], None] = print):
    """(model, processor, source folder of the processor files, resumed state or None)."""
    from finers_rt.export.checkpoints import load_processor
    from finers_rt.export.pointer import (add_pointer, has_cell_keys, has_extent, has_pointer,
                                          is_joint, load_vlm, readout_dims)
    from finers_rt.train.model import MODEL_CONFIGS, make_initial_checkpoint

    state_path = run_dir / "trainer_state.pt"
    state = ckpt.load_state(state_path) if state_path.is_file() else None
    if state is not None:
        src = run_dir / "checkpoint"
    elif cfg.init in MODEL_CONFIGS:
        src = run_dir / "init"
        if rank == 0 and not (src / "config.json").is_file():
            make_initial_checkpoint(src, cfg.init, seed=cfg.seed)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank starts from the folder rank 0 wrote
    else:
        src = Path(cfg.init)
        if not (src / "config.json").is_file():
            raise InputError(f"--init must be a model config {sorted(MODEL_CONFIGS)} or an HF "
                             f"folder, got '{cfg.init}'")
    if state is not None and cfg.joint_pointer and not is_joint(src):
        raise InputError(f"{run_dir} trains a per-axis pointer: resume it without "
                         "--joint-pointer, or start a new --out with --init its checkpoint")
    needs_pointer = cfg.model_class == "pointer" and not has_pointer(src)
    needs_joint = cfg.joint_pointer and not is_joint(src)
    needs_cells = cfg.tie_weight > 0 and not has_cell_keys(src)
    needs_extent = cfg.extent_weight > 0 and not has_extent(src)
    needs_readout = cfg.readout_weight > 0 and not readout_dims(src)
    if state is None and (needs_pointer or needs_joint or needs_cells or needs_extent
                          or needs_readout):
        stock, src = src, run_dir / "init_pointer"
        if rank == 0 and not (src / "config.json").is_file():
            torch.manual_seed(cfg.seed)
            seed = joint_seed(stock, log) if needs_joint else None
            add_pointer(stock, src, joint=True if cfg.joint_pointer else None, seed=seed,
                        cell_keys=True if needs_cells else None,
                        extent=True if needs_extent else None,
                        readout=cfg.readout_dims if needs_readout else None)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    model = load_vlm(src, dtype=torch.float32, attn_implementation="sdpa")
    return model, load_processor(src), src, state


def train_sft(cfg: SftConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) SFT; return {"step", "loss", "checkpoint", "seconds"}."""
    torch.set_num_threads(cfg.threads)
    rank, world = setup_distributed()
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = SampleCache(cfg.cache_dir)
    if cfg.negative_fraction > 0 and cache.negative_images is None:
        raise InputError(f"--negative-fraction needs crops without the target: {cfg.cache_dir} "
                         "has none; build the cache with `finers-rt train cache --negative-crops K`")
    model, processor, src, state = build_model(cfg, run_dir, rank, log)
    collator = Collator(processor)
    text = model.config.text_config  # the aux head scores like the in-model pointer (joint_seed)
    pointer = PointerHead(text.hidden_size, dim=text.hidden_size // text.num_attention_heads)
    cells = dense.DenseHead(model.config.text_config.hidden_size)
    query = dense.QueryHead(model.config.text_config.hidden_size)
    needs_objects = (cfg.dense_weight > 0 or cfg.query_weight > 0 or cfg.tie_weight > 0
                     or cfg.read_attention > 0)
    if cfg.tie_weight > 0:
        tie.check_head(getattr(model, "pointer", None))
        model.pointer.tied_dims = tie.TIE_DIMS  # the token / axis CE train only the other dims
    if needs_objects and rank == 0:
        cache.scene_objects(log)  # built once by rank 0; the other ranks read it after the barrier
    if needs_objects and world > 1:
        torch.distributed.barrier()
    heads = torch.nn.ModuleDict({"pointer": pointer, "dense": cells, "query": query})
    if state is None and cfg.carry_heads:
        carry_heads(heads, Path(cfg.init), log if rank == 0 else (lambda _m: None))
    heads.to(cfg.device)
    model.to(cfg.device)
    memo = None
    if cfg.freeze_vision:
        frozen_vision.freeze(model)
    if cfg.freeze_vision and not cfg.blank_image:  # blank images are not in the memo
        memo = frozen_vision.VisionMemo(model.model.visual)
        if cfg.stage == "gse":  # one image per scene: all of them up front
            rows = sorted({image_key(cache, "gse", i) for i in range(len(cache))})
            memo.fill(((r, cache.gse_images[r]) for r in rows), collator.vision, log)
    # the dense / query heads join the optimizer only when used (runs saved without them resume)
    head_params = (list(pointer.parameters())
                   + (list(cells.parameters()) if cfg.dense_weight > 0 else [])
                   + (list(query.parameters())
                      if cfg.query_weight > 0 or cfg.read_attention > 0 else []))
    model_params = [p for p in model.parameters() if p.requires_grad]
    fast = set()
    if cfg.tie_weight > 0:  # the tied key / query are read out like the heads: the heads' lr
        fast |= {id(p) for p in tie.tied_parameters(model.pointer)}
    if cfg.read_attention > 0:  # so are the routed head's value / output projections
        fast |= {id(p) for p in reading.routed_parameters(model, cfg.read_attention_layer)}
    if cfg.extent_weight > 0:  # new and read out like the heads (the extent's scale started at 0)
        fast |= {id(p) for layer in (model.pointer.extent, model.pointer.extent_scale)
                 for p in layer.parameters()}
    if cfg.readout_weight > 0:  # new, and read out like the heads
        head = model.pointer
        fast |= {id(p) for layer in (head.readout, head.readout_scale, head.readout_out)
                 for p in layer.parameters()}
    if fast:
        head_params += [p for p in model_params if id(p) in fast]
        model_params = [p for p in model_params if id(p) not in fast]
    params = model_params + head_params
    groups = param_groups(cfg, model_params, head_params)
    scales = [g["lr_scale"] for g in groups]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, rank]))
    torch.manual_seed(cfg.seed + rank)
    step = 0
    if state is not None:
        if bool(state.get("config", {}).get("freeze_vision", False)) != cfg.freeze_vision:
            raise InputError(f"{run_dir} was trained {'with' if not cfg.freeze_vision else 'without'} "
                             "--freeze-vision: resume it the same way, or start a new --out")
        saved = state.get("config", {})
        for flag, key in (("--dense-weight", "dense_weight"), ("--query-weight", "query_weight")):
            if (float(saved.get(key, 0.0)) > 0) != (getattr(cfg, key) > 0):
                raise InputError(f"{run_dir} was trained with {flag} "
                                 f"{'off' if getattr(cfg, key) > 0 else 'on'}: its optimizer "
                                 "holds a different head; resume it the same way (any weight > 0 "
                                 "counts as on), or start a new --out with --init its checkpoint")
        if len(state["optimizer"]["param_groups"]) != len(opt.param_groups):
            raise InputError(f"{run_dir} was trained with --head-lr "
                             f"{'off' if cfg.head_lr > 0 else 'on'}: its optimizer holds "
                             f"{len(state['optimizer']['param_groups'])} parameter group(s); resume it "
                             "the same way, or start a new --out with --init its checkpoint")
        opt.load_state_dict(state["optimizer"])
        for group, scale in zip(opt.param_groups, scales):  # this run's --head-lr, not the saved one
            group["lr_scale"] = scale
        pointer.load_state_dict(state["pointer"])
        if "dense" in state:
            cells.load_state_dict(state["dense"])
        if "query" in state:
            query.load_state_dict(state["query"])
        ckpt.restore_rng(rng, state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        step = int(state["step"])
        log(f"resumed {run_dir} at step {step}")
    # a shared-prefix step is two model calls (prefix, then questions): one module call for DDP
    train_model = shared_prefix.SharedPrefixForward(model) if cfg.questions_per_image > 1 else model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model)
    model.train()
    if cfg.freeze_vision:
        model.model.visual.eval()
    t0, done_at_start, loss_ema, marks = time.time(), step, None, {}
    batches = batch_stream(cache, cfg, collator, rng, step, rank)
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step) * group.get("lr_scale", 1.0)
        batch = to_device(next(batches), cfg.device)
        losses = _train_step(train_model, heads, opt, params, batch, collator, cfg, world, memo)
        step += 1
        cfg = _fit_steps_to_time(cfg, step, step - done_at_start, t0, marks, log, world)
        # every rank must stop at the same step (a rank that stops early leaves the others
        # waiting in the next collective forever)
        out_of_time = cfg.time_limit_s > 0 and agree_any(
            time.time() - t0 > cfg.time_limit_s, world)
        if out_of_time:
            log(f"[{cfg.stage}] time limit {cfg.time_limit_s:.0f} s reached at step {step}")
        loss_ema = losses["loss"] if loss_ema is None else 0.9 * loss_ema + 0.1 * losses["loss"]
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            _log_progress(cfg, run_dir, step, losses, loss_ema, (step - done_at_start, t0), log)
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
            rngs = _gather_rngs(rng, world)
            if rank == 0:
                _save(run_dir, model, src, heads, opt, step, rngs, cfg)
                src = run_dir / "checkpoint"
        if rank == 0 and cfg.eval_every and cfg.eval_cache and step % cfg.eval_every == 0:
            _evaluate(cfg, model, collator, run_dir, step, log)
        if out_of_time:
            break
    if world > 1:
        torch.distributed.barrier()
    return {"step": step, "loss": loss_ema, "checkpoint": str(run_dir / "checkpoint"),
            "seconds": time.time() - t0}


def agree_any(flag: bool, world: int) -> bool:
    """True on every rank when `flag` is True on any (one all-reduce under DDP)."""
    if world <= 1:
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int64)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def agree_min(value: int, world: int) -> int:
    """The smallest of the ranks' `value`s, on every rank (the value itself without DDP)."""
    if world <= 1:
        return int(value)
    tensor = torch.tensor([int(value)], dtype=torch.int64)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
    return int(tensor.item())


def _fit_steps_to_time(cfg: SftConfig, step: int, done: int, t0: float, marks: dict,
                       log, world: int = 1) -> SftConfig:
    """With a time limit, once the speed is known (steps 10..40 of this process) shorten
    `steps` so the cosine schedule ends within the limit; under DDP every rank takes the
    smallest of the ranks' fits (their speeds differ a little)."""
    if cfg.time_limit_s <= 0 or done not in (10, 40):
        return cfg
    marks[done] = time.time()
    if done == 10:
        return cfg
    rate = 30 / max(1e-9, marks[40] - marks[10])
    left = cfg.time_limit_s - (marks[40] - t0)
    fitted = agree_min(min(cfg.steps, step + int(rate * left * 0.92)), world)
    log(f"[{cfg.stage}] {rate:.2f} it/s: the run ends at step {fitted} within the time limit")
    return replace(cfg, steps=fitted)


def _train_step(train_model, heads, opt, params, batch, collator: Collator,
                cfg: SftConfig, world: int, memo=None) -> dict[str, float]:
    """One optimizer step on `batch` (a `Batch`, or a `SharedBatch` with a
    `SharedPrefixForward` model); returns the loss terms as floats. `heads` holds the
    training-only "pointer", "dense" and "query" heads; `memo` the frozen tower's features (or None)."""
    hf_model = _hf_model(train_model)
    if isinstance(batch, shared_prefix.SharedBatch):
        out_p, out = train_model(batch, memo)
        images, last_img, last = batch.prefix, out_p.hidden_states[-1], out.hidden_states[-1]
        point = lambda: shared_prefix.pointer_head_loss(heads["pointer"], last_img, last, batch)
    else:
        inputs = batch.model_inputs() if memo is None else memo.model_inputs(hf_model, batch)
        out = train_model(**inputs, output_hidden_states=True)
        images, last = batch, out.hidden_states[-1]
        last_img = last
        point = lambda: heads["pointer"](last, batch)
    if cfg.blank_image:  # no image to read coordinates or options from: question reading only
        zero = out.logits.sum() * 0
        text_loss = coord_loss = point_loss = axis_loss = joint_loss = zero
    else:
        text_loss, coord_loss = token_losses(out.logits, batch.labels, collator, cfg.coord_sigma)
        zero = text_loss * 0
        point_loss = point() if cfg.pointer_weight > 0 else zero
        axis_loss = _axis_loss(hf_model, batch, collator, cfg) if cfg.axis_weight > 0 else zero
        joint_loss = _joint_loss(hf_model, batch, collator, cfg) if cfg.joint_weight > 0 else zero
    slots = x1 = None  # the positions that write the answer's first coordinates; x1 first
    if cfg.query_at_x1 or cfg.tie_weight > 0 or cfg.read_attention > 0:
        slots = _coordinate_slots(batch.labels, collator, cfg.stage, batch.answer_pos,
                                  cfg.tie_coords if cfg.tie_weight > 0 else 1)
        x1 = slots[:, 0]
    read_loss = read_value = zero
    if cfg.read_attention > 0:  # plain batches only (checked by SftConfig)
        read_loss, read_value = reading.reading_losses(
            hf_model, out.hidden_states, batch, collator, x1, heads["query"],
            cfg.read_attention_layer, cfg.read_attention_head)
    query_loss = zero
    if cfg.query_weight > 0 and batch.query_labels is not None:
        query_loss = heads["query"](last, batch.answer_pos, batch.query_labels)
        if cfg.query_at_x1:  # the state that writes x1 must carry the question too
            query_loss = 0.5 * (query_loss + heads["query"](last, x1, batch.query_labels))
    extent_loss = zero
    if cfg.extent_weight > 0:
        extent_loss = _extent_loss(hf_model, last, batch, collator, cfg.stage)
    readout_loss = response_loss = zero
    if cfg.readout_weight > 0:
        response = response_positions(batch.labels, collator)  # once for both terms
        readout_loss = _readout_loss(hf_model, batch, response)
        response_loss = _response_loss(out.logits, batch.labels, response)
    tie_key = tie_query = zero
    if cfg.tie_weight > 0:
        tie_key, tie_query = _tie_losses(hf_model.pointer, batch, images, last_img, last, slots,
                                         collator, cfg.stage)
    dense_loss = zero
    if cfg.dense_weight > 0 and images.cell_labels is not None:
        dense_loss = heads["dense"](last_img, images.image_spans, images.image_grid_thw,
                                    images.cell_labels, collator.vision.merge_size)
    loss = (text_loss + cfg.coord_weight * coord_loss + cfg.pointer_weight * point_loss
            + cfg.axis_weight * axis_loss + cfg.joint_weight * joint_loss
            + cfg.dense_weight * dense_loss
            + cfg.query_weight * query_loss
            + cfg.tie_weight * (tie_key + tie_query)
            + cfg.read_attention * (read_loss + read_value)
            + cfg.extent_weight * extent_loss
            + cfg.readout_weight * (readout_loss + response_loss))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if world > 1:  # the heads are outside DDP: average their gradients by hand
        for p in heads.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return {"loss": loss.item(), "text": text_loss.item(), "coord": coord_loss.item(),
            "pointer": point_loss.item(), "axis": axis_loss.item(), "joint": joint_loss.item(),
            "dense": dense_loss.item(),
            "query": query_loss.item(), "tie_key": tie_key.item(), "tie_query": tie_query.item(),
            "read": read_loss.item(), "read_value": read_value.item(),
            "extent": extent_loss.item(), "readout": readout_loss.item(),
            "response": response_loss.item()}


def _extent_loss(model, last: torch.Tensor, batch, collator: Collator, stage: str) -> torch.Tensor:
    """Smooth-L1 of the in-model pointer's extent (`export.pointer.PointerHead.extent`) on the
    target's image token against half the answer box's width and height in cells, read from
    the answer's first four coordinate tokens (x1, y1, x2, y2). 0 without such samples."""
    head = model.pointer
    cell_px = float(model.config.finers_pointer["cell_px"])
    missing = torch.full_like(batch.answer_pos, -1)
    slots = _coordinate_slots(batch.labels, collator, stage, missing, 4)  # [B, 4], -1 = none
    rows = torch.nonzero((slots >= 0).all(dim=1) & (batch.pointer_index >= 0)).flatten()
    if rows.numel() == 0:
        return last.sum() * 0
    tokens = batch.labels[rows[:, None], slots[rows] + 1]
    lookup = collator.coord_lookup.to(tokens.device)
    values = collator.coord_values.to(last.device)[lookup[tokens]]  # [R, 4] x1, y1, x2, y2
    target = (values[:, 2:] - values[:, :2]) / (2.0 * cell_px)  # half width / height, cells
    token = batch.image_spans[rows, 0] + batch.pointer_index[rows]
    return F.smooth_l1_loss(head.extent(last[rows, token]), target)


def response_positions(labels: torch.Tensor, collator: Collator) -> torch.Tensor:
    """[B, S - 1] bool: the positions whose next target token is part of the answer's
    `response` value: the tokens after the last "':" of the answer (the response key is the
    answer's last) and its opening quote, up to the first token holding the closing quote."""
    tok = collator.tokenizer
    key_end = tok.convert_tokens_to_ids("':")
    if key_end is None or key_end == tok.unk_token_id:
        raise InputError("finding the answer's response needs \"':\" as one token of the "
                         "tokenizer (the FineRS answer format's key end); this tokenizer has none")
    targets = labels[:, 1:]
    out = torch.zeros(targets.shape, dtype=torch.bool, device=labels.device)
    quote_ids = collator.quote_token_ids
    for b in range(targets.shape[0]):
        row = targets[b].tolist()
        ends = [j for j, t in enumerate(row) if t == key_end]
        if not ends:
            continue
        j = ends[-1] + 2  # past "':" and the opening quote token
        while j < len(row) and row[j] >= 0 and row[j] not in quote_ids:
            out[b, j] = True
            j += 1
    return out


def _response_loss(logits: torch.Tensor, labels: torch.Tensor, response: torch.Tensor
                   ) -> torch.Tensor:
    """CE of the response value's tokens alone (`response`: `response_positions`; in the text
    CE they are ~1 token in 60, so their gradient is diluted that much). 0 without them."""
    if not response.any():
        return logits.sum() * 0
    return F.cross_entropy(logits[:, :-1][response].float(), labels[:, 1:][response])


def _readout_loss(model, batch, response: torch.Tensor) -> torch.Tensor:
    """Attention supervision of the in-model pointer's readout: at every position that writes
    a token of the response (`response`: `response_positions`), -log of the pointer's
    attention (both axis heads) on the target's image token, so the readout the words read
    is the target's. 0 without such positions."""
    head = model.pointer
    probs = getattr(head, "last_probs", None)  # [B, 2, S, T]
    if probs is None:
        return torch.zeros((), device=batch.labels.device)
    mask = response[:, :probs.shape[2]] & (batch.pointer_index >= 0)[:, None]
    if not mask.any():
        return probs.sum() * 0
    b_idx, s_idx = mask.nonzero(as_tuple=True)
    on_target = probs[b_idx, :, s_idx, _target_tokens(batch)[b_idx]]  # [n, 2]
    return -torch.log(on_target + head.eps).mean()


def _target_tokens(batch) -> torch.Tensor:
    """[B]: each question's target image token as an index into the pointer's keys (a shared
    batch's prefix (image) rows come first in them)."""
    if isinstance(batch, shared_prefix.SharedBatch):
        starts = batch.prefix.image_spans[batch.owner, 0]
    else:
        starts = batch.image_spans[:, 0]
    return starts + batch.pointer_index


def _tie_losses(head, batch, images, last_img: torch.Tensor, last: torch.Tensor,
                coords: torch.Tensor, collator: Collator, stage: str = "gse"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(key loss, query loss) of `tie`: the in-model pointer's key on the image tokens (and
    text tokens) of `images` when they carry cell labels (none with --blank-image), its query
    at the last prompt position and at the positions that write the answer's first
    coordinates (`coords` [B, K]: x1 only for K = 1, `--tie-coords`) of each question.
    `images` is the `Batch` holding the image tokens (`batch` itself, or a shared batch's
    prefix); `last_img` / `last` the final normed states of those rows / of the question rows.
    For LPR the question's image region (of the whole scene) says nothing about the crop: the
    query's region dims are pushed to 0 there."""
    zero = last.sum() * 0
    key = zero
    if images.cell_labels is not None:
        key = tie.key_loss(head, last_img, images.image_spans, images.image_grid_thw,
                           images.cell_labels, collator.vision.merge_size,
                           _text_states(batch, images, last_img, last))
    query = zero
    if batch.query_labels is not None and batch.region_labels is not None:
        rows = torch.arange(last.shape[0], device=last.device)
        states = torch.cat([last[rows, batch.answer_pos]]
                           + [last[rows, coords[:, k]] for k in range(coords.shape[1])])
        regions = (batch.region_labels if stage == "gse"
                   else torch.full_like(batch.region_labels, -1))
        targets = tie.query_targets(batch.query_labels, regions)
        query = tie.query_loss(head, states, targets.repeat(coords.shape[1] + 1, 1))
    return key, query


def _text_states(batch, images, last_img: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[N, H]: the final states of every real text token the pointer's queries can see (the
    image rows' tokens outside the image span, and a shared batch's question rows)."""
    mask = images.attention_mask.bool().clone()
    for b, (start, count) in enumerate(images.image_spans.tolist()):
        mask[b, start:start + count] = False
    parts = [last_img[mask]]
    if isinstance(batch, shared_prefix.SharedBatch):
        parts.append(last[batch.suffix_mask.bool()])
    return torch.cat(parts)


def _hf_model(train_model):
    """The HF model inside DDP and/or `SharedPrefixForward`."""
    model = getattr(train_model, "module", train_model)
    return model.model if isinstance(model, shared_prefix.SharedPrefixForward) else model


def _coordinate_positions(labels: torch.Tensor, collator: Collator, stage: str) -> torch.Tensor:
    """[B, S - 1] bool: the positions whose next target token is one of the answer's first
    COORDS_PER_ANSWER coordinates."""
    targets = labels[:, 1:]
    lookup = collator.coord_lookup.to(labels.device)  # token id -> coordinate slot, -1 = none
    mask = (targets >= 0) & (lookup[targets.clamp(min=0)] >= 0)
    order = torch.cumsum(mask.long(), dim=1) - 1  # k-th coordinate of the sample
    return mask & (order < COORDS_PER_ANSWER[stage])


def _coordinate_slots(labels: torch.Tensor, collator: Collator, stage: str,
                      fallback: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count]: per sample the positions whose next target token is the answer's k-th
    coordinate (k < count: x1, y1, x2, y2; column 0 is the one that writes x1); `fallback`
    (e.g. the last prompt position) for samples without it."""
    is_coord = _coordinate_positions(labels, collator, stage)
    order = torch.cumsum(is_coord.long(), dim=1) - 1
    out = []
    for k in range(count):
        at = is_coord & (order == k)
        out.append(torch.where(at.any(dim=1), torch.argmax(at.long(), dim=1), fallback))
    return torch.stack(out, dim=1)


def _joint_loss(model, batch, collator: Collator, cfg: SftConfig) -> torch.Tensor:
    """Token supervision of a joint in-model pointer: at each answer coordinate, -log of its
    attention on the target's image token (the one `batch.PointerHead` is trained on), from
    the model's last call. 0 for stock and per-axis pointer models."""
    head = getattr(model, "pointer", None)
    probs = getattr(head, "last_token_probs", None)  # [B, S, T]
    if probs is None or not head.joint:
        return torch.zeros((), device=batch.labels.device)
    mask = _coordinate_positions(batch.labels, collator, cfg.stage)[:, :probs.shape[1]]
    mask &= (batch.pointer_index >= 0)[:, None]
    if not mask.any():
        return probs.sum() * 0
    b_idx, s_idx = mask.nonzero(as_tuple=True)
    return -torch.log(probs[b_idx, s_idx, _target_tokens(batch)[b_idx]] + head.eps).mean()


def _axis_loss(model, batch, collator: Collator, cfg: SftConfig) -> torch.Tensor:
    """Dense pointer supervision (pointer models only): at each answer coordinate (x, y
    alternate: bbox then points), -log of the in-model pointer's column (x) or row (y) mass on
    the target value's cells (the probabilities of the model's last call). 0 for stock models."""
    head = getattr(model, "pointer", None)
    probs = getattr(head, "last_axis_probs", None)  # [B, 2, S, C]
    if probs is None:
        return torch.zeros((), device=batch.labels.device)
    targets = batch.labels[:, 1:]
    mask = _coordinate_positions(batch.labels, collator, cfg.stage)
    order = torch.cumsum(mask.long(), dim=1) - 1
    if not mask.any():
        return probs.sum() * 0
    b_idx, s_idx = mask.nonzero(as_tuple=True)
    axis = order[b_idx, s_idx] % 2
    weights = head.cell_map[:, targets[b_idx, s_idx]].T  # [n, C]
    mass = (probs[b_idx, axis, s_idx] * weights).sum(-1)
    return -torch.log(mass + head.eps).mean()


def _log_progress(cfg: SftConfig, run_dir: Path, step: int, losses: dict[str, float],
                  loss_ema: float, progress: tuple[int, float], log) -> None:
    """Append the step to log.jsonl and print loss, lr, speed and ETA."""
    done, t0 = progress
    rate = done / max(1e-9, time.time() - t0)
    eta = (cfg.steps - step) / max(rate, 1e-9)
    rec = {"step": step, **{k: round(v, 4) for k, v in losses.items()},
           "loss_ema": round(loss_ema, 4), "lr": lr_at(cfg, step - 1),
           "steps_per_s": round(rate, 3), "elapsed_s": round(time.time() - t0, 1)}
    ckpt.append_log(run_dir, rec)
    log(f"[{cfg.stage}] step {step}/{cfg.steps} loss {rec['loss']:.3f} (ema {loss_ema:.3f}, "
        f"coord {rec['coord']:.3f}, pointer {rec['pointer']:.3f}, axis {rec['axis']:.3f}, "
        f"joint {rec.get('joint', 0.0):.3f}, "
        f"dense {rec['dense']:.3f}, query {rec['query']:.3f}"
        + (f", tie {rec['tie_key']:.3f}/{rec['tie_query']:.3f}" if cfg.tie_weight > 0 else "")
        + (f", read {rec['read']:.3f}/{rec['read_value']:.3f}" if cfg.read_attention > 0 else "")
        + (f", extent {rec['extent']:.3f}" if cfg.extent_weight > 0 else "")
        + (f", readout {rec['readout']:.3f}, response {rec['response']:.3f}"
           if cfg.readout_weight > 0 else "")
        + ") "
        f"lr {rec['lr']:.2e} {rate:.2f} it/s ETA {_hms(eta)}")


def _gather_rngs(rng, world: int) -> list[dict[str, Any]]:
    """Every rank's sampler state (collective under DDP), so a resumed run draws the same."""
    mine = ckpt.rng_state(rng)
    if world == 1:
        return [mine]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def _save(run_dir, model, src, heads, opt, step, rngs, cfg) -> None:
    ckpt.save_hf(model, src, run_dir / "checkpoint")
    ckpt.save_state(run_dir / "trainer_state.pt", {
        "step": step, "optimizer": opt.state_dict(), "pointer": heads["pointer"].state_dict(),
        "dense": heads["dense"].state_dict(), "query": heads["query"].state_dict(),
        "rng": rngs, "config": asdict(cfg)})


def _evaluate(cfg, model, collator, run_dir, step, log) -> None:
    from finers_rt.train.evaluate import evaluate_stage

    model.eval()
    metrics = evaluate_stage(model, collator, SampleCache(cfg.eval_cache), cfg.stage,
                             limit=cfg.eval_samples)
    model.train()
    ckpt.append_log(run_dir, {"step": step, "eval": metrics})
    log(f"[{cfg.stage}] eval at step {step}: "  # per-bucket values: in log.jsonl
        + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "/" not in k))


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
