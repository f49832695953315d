"""Dense pre-training of a VLM checkpoint's vision tower on whole-scene (GSE) images.

    finers-rt train vision --init GSE_CHECKPOINT --cache CACHE --out RUN_DIR --steps 1000

The vision tower alone (no LM, no prompt: ~4x cheaper per image than an SFT step) learns, per
merged image token, the colours / shapes / patterns painted in its cell (`dense.cell_targets`,
multi-label BCE through a linear head that is not exported). RUN_DIR/checkpoint is the whole HF
checkpoint with the new vision weights: continue with `finers-rt train gse --init
RUN_DIR/checkpoint`. Resumable (trainer_state.pt: step, optimizer, head, sampler), seeded; the
held-out accuracies (`--eval-cache`) are logged to RUN_DIR/log.jsonl at every save.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from finers_rt.errors import InputError
from finers_rt.image import preprocess_image
from finers_rt.train import checkpoint as ckpt
from finers_rt.train import dense
from finers_rt.train.data import SampleCache


@dataclass(frozen=True)
class VisionConfig:
    """One vision pre-training run; `init` is an HF checkpoint folder (GSE stage)."""

    cache_dir: str
    out_dir: str
    init: str
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    save_every: int = 100
    log_every: int = 10
    eval_cache: str | None = None
    eval_images: int = 20
    seed: int = 0
    threads: int = 1
    time_limit_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "save_every", "log_every", "eval_images"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise InputError(f"lr must be > 0, got {self.lr}")


def _vision_features(visual, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Merged-token features [N, hidden] of the HF vision tower (a tensor, or an output object
    with `pooler_output` in newer transformers; as `export.validate` reads it)."""
    out = visual(pixels, grid_thw=grid)
    return getattr(out, "pooler_output", out)


def image_batch(cache: SampleCache, indices, vision_cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixel patches, grid_thw [B, 3], labels [sum cells, A]) of the GSE images of `indices`."""
    pixels, grids, labels = [], [], []
    merge = vision_cfg.merge_size
    for i in indices:
        patches, grid = preprocess_image(np.ascontiguousarray(cache.gse_image(int(i))), vision_cfg)
        pixels.append(torch.from_numpy(patches))
        grids.append(grid)
        labels.append(torch.from_numpy(dense.cell_targets(cache.object_rows(int(i)),
                                                          (grid[1] // merge, grid[2] // merge))))
    return torch.cat(pixels), torch.tensor(grids, dtype=torch.long), torch.cat(labels)


def train_vision(cfg: VisionConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) vision pre-training; return {"step", "loss", "checkpoint", "eval"}."""
    from finers_rt.export.checkpoints import load_processor
    from finers_rt.export.pointer import load_vlm
    from finers_rt.train.batch import Collator

    torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = SampleCache(cfg.cache_dir)
    state_path = run_dir / "trainer_state.pt"
    state = ckpt.load_state(state_path) if state_path.is_file() else None
    src = run_dir / "checkpoint" if state is not None else Path(cfg.init)
    if not (src / "config.json").is_file():
        raise InputError(f"--init must be an HF checkpoint folder (with config.json); '{src}' has none"
                         + (" (resuming: the run folder's checkpoint/ is missing)" if state is not None else ""))
    cache.scene_objects(log)
    model = load_vlm(src, dtype=torch.float32, attn_implementation="sdpa")
    visual = model.model.visual
    vision_cfg = Collator(load_processor(src)).vision
    head = torch.nn.Linear(model.config.vision_config.out_hidden_size, len(dense.ATTRIBUTES))
    params = list(visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    step = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        head.load_state_dict(state["head"])
        ckpt.restore_rng(rng, state["rng"])
        step = int(state["step"])
        log(f"resumed {run_dir} at step {step}")
    held_out = None
    if cfg.eval_cache:
        eval_cache = SampleCache(cfg.eval_cache)
        eval_cache.scene_objects(log)
        held_out = image_batch(eval_cache, range(min(cfg.eval_images, len(eval_cache))), vision_cfg)
    visual.train()
    t0, done0, loss_ema, metrics = time.time(), step, None, {}
    while step < cfg.steps:
        pixels, grid, labels = image_batch(cache, rng.choice(len(cache), cfg.batch_size), vision_cfg)
        loss = dense.attribute_loss(head(_vision_features(visual, pixels, grid)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        out_of_time = cfg.time_limit_s > 0 and time.time() - t0 > cfg.time_limit_s
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = (step - done0) / max(1e-9, time.time() - t0)
            ckpt.append_log(run_dir, {"step": step, "dense": round(loss.item(), 4),
                                      "loss_ema": round(loss_ema, 4), "steps_per_s": round(rate, 3)})
            log(f"[vision] step {step}/{cfg.steps} dense {loss.item():.3f} (ema {loss_ema:.3f}) "
                f"{rate:.2f} it/s")
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
            ckpt.save_hf(model, src, run_dir / "checkpoint")
            src = run_dir / "checkpoint"
            ckpt.save_state(state_path, {"step": step, "optimizer": opt.state_dict(),
                                         "head": head.state_dict(), "rng": ckpt.rng_state(rng),
                                         "config": asdict(cfg)})
            if held_out is not None:
                visual.eval()
                with torch.no_grad():
                    logits = head(_vision_features(visual, held_out[0], held_out[1])).numpy()
                visual.train()
                metrics = dense.attribute_accuracy(logits, held_out[2].numpy())
                ckpt.append_log(run_dir, {"step": step, "eval": metrics})
                log(f"[vision] held-out at step {step}: "
                    + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        if out_of_time:
            log(f"[vision] time limit {cfg.time_limit_s:.0f} s reached at step {step}")
            break
    return {"step": step, "loss": loss_ema, "checkpoint": str(run_dir / "checkpoint"), "eval": metrics}
