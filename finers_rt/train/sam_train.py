"""Training of the small SAM-family mask model: (crop, box + 2 points) -> mask.

    finers-rt train sam --cache CACHE --out RUN_DIR --steps 600

The model is segment-anything's own `Sam` (built by `finers_rt.export.sam_configs.build_sam`
from `FINERS_TINY_SAM`), so RUN_DIR/sam.pth is an ordinary segment-anything state dict and
RUN_DIR/sam_config.json the `--sam-config` file `finers-rt export sam|bundle` takes.
Prompts are what the pipeline sends: LPR's box (here the GT box, jittered) and its two points
(labels 1, 1). Loss (SAM paper style): focal + dice on the best of the multimask outputs, plus
MSE of the IoU head against the real IoU of every output.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from finers_rt.errors import InputError
from finers_rt.train import checkpoint as ckpt
from finers_rt.train.data import SampleCache

# A SAM small enough to train on a CPU: 2-block ViT (96 wide) at 256 px, 64-d prompt space.
FINERS_TINY_SAM = {"encoder_embed_dim": 96, "encoder_depth": 2, "encoder_num_heads": 2,
                   "encoder_global_attn_indexes": [1], "image_size": 256, "window_size": 8,
                   "prompt_embed_dim": 64, "mask_in_chans": 8, "decoder_mlp_dim": 256,
                   "decoder_num_heads": 2, "iou_head_hidden_dim": 64}


@dataclass(frozen=True)
class SamTrainConfig:
    cache_dir: str
    out_dir: str
    steps: int = 600
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 20
    box_jitter: float = 0.1
    save_every: int = 100
    log_every: int = 10
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")


def sam_config():
    from finers_rt.export.sam_configs import SamConfig

    return SamConfig.from_dict(dict(FINERS_TINY_SAM))


def sample_prompts(cache: SampleCache, rows: np.ndarray, size: int, jitter: float,
                   rng: np.random.Generator):
    """Images [B, 3, S, S] float (0..255), box [B, 4] and points [B, 2, 2] in the S frame,
    target masks [B, S/4, S/4] float: LPR crops resized to S (the crops are square)."""
    images, boxes, points, masks = [], [], [], []
    for row in rows:
        index, crop = divmod(int(row), cache.lpr_crops)
        meta = cache.entries[index]["lpr"][crop]
        image = torch.from_numpy(np.array(cache.lpr_images[row])).permute(2, 0, 1).float()
        scale = size / image.shape[-1]
        images.append(F.interpolate(image[None], size=(size, size), mode="bilinear",
                                    align_corners=False, antialias=True)[0])
        box = np.asarray(meta["box_stage"], dtype=np.float64)
        wh = np.array([box[2] - box[0], box[3] - box[1]] * 2)
        box = box + rng.uniform(-jitter, jitter, 4) * wh
        boxes.append(box * scale)
        points.append(np.asarray(meta["points_stage"], dtype=np.float64) * scale)
        mask = torch.from_numpy(np.array(cache.lpr_masks[row])).float()[None, None]
        masks.append(F.interpolate(mask, size=(size // 4, size // 4), mode="area")[0, 0])
    return (torch.stack(images), torch.tensor(np.array(boxes), dtype=torch.float32),
            torch.tensor(np.array(points), dtype=torch.float32), torch.stack(masks))


def sam_losses(sam, images, boxes, points, masks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask loss, iou loss, mean IoU of the best-scored mask) over the batch."""
    emb = sam.image_encoder(sam.preprocess(images))  # [B, C, E, E]
    mask_losses, iou_losses, ious = [], [], []
    for i in range(images.shape[0]):
        sparse, dense = sam.prompt_encoder(points=(points[i:i + 1], torch.ones(1, 2)),
                                           boxes=boxes[i:i + 1], masks=None)
        low_res, iou_pred = sam.mask_decoder(
            image_embeddings=emb[i:i + 1], image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)
        logits, target = low_res[0], masks[i][None].expand_as(low_res[0])  # [M, h, w]
        prob = torch.sigmoid(logits)
        focal = _focal(logits, target).mean(dim=(1, 2))
        dice = 1 - (2 * (prob * target).sum((1, 2)) + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)
        per_mask = 20 * focal + dice  # [M]
        hard = (logits > 0).float()
        real_iou = ((hard * (target > 0.5)).sum((1, 2)) /
                    ((hard + (target > 0.5).float()) > 0).float().sum((1, 2)).clamp(min=1))
        mask_losses.append(per_mask.min())
        iou_losses.append(F.mse_loss(iou_pred[0], real_iou.detach()))
        ious.append(real_iou[int(iou_pred[0].argmax())].detach())
    return torch.stack(mask_losses).mean(), torch.stack(iou_losses).mean(), torch.stack(ious).mean()


def _focal(logits, target, alpha: float = 0.25, gamma: float = 2.0):
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    return (alpha * target + (1 - alpha) * (1 - target)) * ce * (1 - p_t) ** gamma


def train_sam(cfg: SamTrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) SAM training; return {"step", "iou", "checkpoint", "seconds"}."""
    from finers_rt.export.sam_configs import build_sam, load_sam

    torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = SampleCache(cfg.cache_dir)
    config = sam_config()
    (run_dir / "sam_config.json").write_text(json.dumps(FINERS_TINY_SAM, indent=2) + "\n")
    state_path, weights = run_dir / "trainer_state.pt", run_dir / "sam.pth"
    state = ckpt.load_state(state_path) if state_path.is_file() else None
    torch.manual_seed(cfg.seed)
    sam = load_sam(weights, config) if state is not None else build_sam(config)
    opt = torch.optim.AdamW(sam.parameters(), lr=cfg.lr, weight_decay=0.01)
    rng = np.random.default_rng(cfg.seed)
    step = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        ckpt.restore_rng(rng, state["rng"][0])
        step = int(state["step"])
        log(f"resumed {run_dir} at step {step}")
    sam.train()
    n_rows = len(cache) * cache.lpr_crops
    t0, start, iou_ema = time.time(), step, None
    while step < cfg.steps:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        rows = rng.integers(0, n_rows, size=cfg.batch_size)
        images, boxes, points, masks = sample_prompts(cache, rows, config.image_size,
                                                      cfg.box_jitter, rng)
        mask_loss, iou_loss, iou = sam_losses(sam, images, boxes, points, masks)
        opt.zero_grad(set_to_none=True)
        (mask_loss + iou_loss).backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        opt.step()
        step += 1
        iou_ema = iou.item() if iou_ema is None else 0.9 * iou_ema + 0.1 * iou.item()
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = (step - start) / max(1e-9, time.time() - t0)
            ckpt.append_log(run_dir, {"step": step, "mask_loss": round(mask_loss.item(), 4),
                                      "iou_loss": round(iou_loss.item(), 4),
                                      "train_iou_ema": round(iou_ema, 4), "lr": lr})
            log(f"[sam] step {step}/{cfg.steps} mask loss {mask_loss.item():.3f} iou loss "
                f"{iou_loss.item():.3f} train IoU {iou_ema:.3f} {rate:.2f} it/s "
                f"ETA {(cfg.steps - step) / max(rate, 1e-9):.0f} s")
        if step % cfg.save_every == 0 or step == cfg.steps:
            tmp = weights.with_name("sam.pth.tmp")
            torch.save(sam.state_dict(), tmp)
            tmp.replace(weights)
            ckpt.save_state(state_path, {"step": step, "optimizer": opt.state_dict(),
                                         "rng": [ckpt.rng_state(rng)], "config": asdict(cfg)})
    return {"step": step, "iou": iou_ema, "checkpoint": str(weights), "seconds": time.time() - t0}


@torch.no_grad()
def evaluate_sam(checkpoint: str | Path, cache_dir: str | Path, limit: int = 64) -> dict[str, float]:
    """Held-out mask quality with GT prompts (no jitter): mean IoU of the mask the runtime
    would keep (highest predicted IoU among the multimask outputs) at 1/4 resolution."""
    from finers_rt.export.sam_configs import load_sam

    config = sam_config()
    sam = load_sam(checkpoint, config)
    cache = SampleCache(cache_dir)
    rows = np.arange(min(limit, len(cache))) * cache.lpr_crops
    images, boxes, points, masks = sample_prompts(cache, rows, config.image_size, 0.0,
                                                  np.random.default_rng(0))
    _, _, iou = sam_losses(sam, images, boxes, points, masks)
    return {"mean_iou": float(iou), "samples": len(rows)}
