"""GRPO on a GSE or LPR stage with the FineRS rewards, on top of an SFT checkpoint.

    finers-rt train rl --stage lpr --init RUN_LPR/checkpoint --cache CACHE --out RUN_DIR
    finers-rt train rl --stage gse --init RUN_GSE/checkpoint --lpr RUN_LPR/checkpoint ...

Per step and prompt: sample a group of G answers (temperature T), score each with the stage's
reward (`rewards.py`), advantage = (r - mean) / (std + eps) within the group, and minimise
-advantage * (mean log-prob of the answer's tokens) (on-policy, one update per batch, so the
PPO ratio is 1). Groups whose rewards are all equal carry no signal and are counted, not used.
For GSE the target region is the locate-informed retrospective one (`retrospective.py`),
chosen once per sample with the frozen LPR model and kept in the trainer state.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from finers_rt.errors import InputError
from finers_rt.train import checkpoint as ckpt
from finers_rt.train.batch import Collator
from finers_rt.train.data import SampleCache, gse_prompt, lpr_prompt
from finers_rt.train.evaluate import generate_texts
from finers_rt.train.rewards import gse_reward, lpr_reward


@dataclass(frozen=True)
class GrpoConfig:
    stage: str
    init: str
    cache_dir: str
    out_dir: str
    lpr: str | None = None
    steps: int = 100
    prompts_per_step: int = 2
    group_size: int = 4
    temperature: float = 1.0
    lr: float = 1e-5
    max_new_tokens: int = 96
    retro_per_axis: int = 3
    save_every: int = 20
    log_every: int = 1
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.stage not in ("gse", "lpr"):
            raise InputError(f"stage must be 'gse' or 'lpr', got '{self.stage}'")
        if self.group_size < 2:
            raise InputError(f"group_size must be >= 2 (GRPO compares answers), got {self.group_size}")
        if self.stage == "gse" and not self.lpr:
            raise InputError("GRPO on GSE needs --lpr (the LPR checkpoint that picks GSE's "
                             "retrospective target region)")


def sequence_logprobs(model, seqs: torch.Tensor, n_prompt: int, pixel_values: torch.Tensor,
                      grid_thw: torch.Tensor, end_ids: list[int]) -> torch.Tensor:
    """Mean log-prob [G] of each answer (tokens after the prompt, through the first end id).
    seqs [G, P + T] int64; pixel_values / grid_thw of ONE image (repeated for the group)."""
    group = seqs.shape[0]
    answer = seqs[:, n_prompt:]
    is_end = torch.zeros_like(answer, dtype=torch.bool)
    for end in end_ids:
        is_end |= answer == end
    after_end = (torch.cumsum(is_end.long(), dim=1) - is_end.long()) > 0
    answer_mask = (~after_end).float()  # [G, T] includes the end token itself
    attention = torch.cat([torch.ones(group, n_prompt, dtype=torch.long), answer_mask.long()], 1)
    out = model(input_ids=seqs, attention_mask=attention,
                pixel_values=pixel_values.repeat(group, 1), image_grid_thw=grid_thw.repeat(group, 1))
    logits = out.logits[:, n_prompt - 1:-1].float()  # predicts answer tokens
    logp = torch.gather(F.log_softmax(logits, -1), 2, answer[..., None])[..., 0]
    return (logp * answer_mask).sum(1) / answer_mask.sum(1).clamp(min=1)


def group_advantages(rewards: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """(r - mean) / (std + eps) within one group [G]; all zeros when the rewards are equal."""
    std = float(rewards.std())
    if std < 1e-8:
        return np.zeros_like(rewards)
    return (rewards - rewards.mean()) / (std + eps)


class _Task:
    """One stage's prompt, image and reward for cache entry i (GSE: retrospective target)."""

    def __init__(self, cfg: GrpoConfig, cache: SampleCache, retro: dict[int, list[float]]):
        self.cfg, self.cache, self.retro = cfg, cache, retro
        self.scorer = None
        if cfg.stage == "gse":
            from finers_rt.export.checkpoints import load_reference
            from finers_rt.train.retrospective import model_scorer

            lpr_model, lpr_processor = load_reference(cfg.lpr)
            self.scorer = model_scorer(lpr_model, Collator(lpr_processor), cfg.max_new_tokens)

    def example(self, i: int, crop: int) -> tuple[np.ndarray, str, Callable[[str], float]]:
        entry, cache = self.cache.entries[i], self.cache
        record = entry["record"]
        if self.cfg.stage == "lpr":
            row = cache.lpr_row(i, crop)
            meta, mask = entry["lpr"][crop], np.asarray(cache.lpr_masks[row])
            return (np.asarray(cache.lpr_images[row]), lpr_prompt(record),
                    lambda text: lpr_reward(text, record, meta["box_stage"], mask)["total"])
        target = self._retro_target(i)
        side = cache.sizes.region_side_stage()
        return (cache.gse_image(i), gse_prompt(record),
                lambda text: gse_reward(text, record, target, entry["gse"]["gt_box_stage"],
                                        side)["total"])

    def _retro_target(self, i: int) -> list[float]:
        if i not in self.retro:
            from finers_rt.synth import generate_scene
            from finers_rt.train.retrospective import choose_target_region

            entry = self.cache.entries[i]
            scene = int(entry["record"]["image_path"].split("_")[-1].split(".")[0])
            image, _ = generate_scene(int(self.cache.seed), scene, self.cache.sizes.scene_size_wh)
            region, _ = choose_target_region(image, entry["record"], self.cache.sizes,
                                             self.scorer, self.cfg.retro_per_axis)
            self.retro[i] = list(region)
        return self.retro[i]


def _group_losses(model, collator: Collator, task: _Task, cfg: GrpoConfig,
                  rng: np.random.Generator, end_ids: list[int]):
    """Sample a group per prompt, score it, and build the policy-gradient losses.

    Returns (losses: list of scalar tensors, rewards seen: list of float, flat group count)."""
    losses, rewards_seen, flat = [], [], 0
    for _ in range(cfg.prompts_per_step):
        i, crop = int(rng.integers(len(task.cache))), int(rng.integers(task.cache.lpr_crops))
        image, text, reward_fn = task.example(i, crop)
        model.eval()
        texts, seqs, n_prompt = generate_texts(model, collator, image, text, cfg.max_new_tokens,
                                               cfg.group_size, cfg.temperature)
        rewards = np.array([reward_fn(t) for t in texts])
        rewards_seen.extend(rewards.tolist())
        adv = group_advantages(rewards)
        if not adv.any():
            flat += 1
            continue
        model.train()
        batch = collator([image], [text], [""])
        logp = sequence_logprobs(model, seqs, n_prompt, batch.pixel_values,
                                 batch.image_grid_thw, end_ids)
        losses.append(-(torch.tensor(adv, dtype=torch.float32) * logp).mean())
    return losses, rewards_seen, flat


def train_grpo(cfg: GrpoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) GRPO; return {"step", "reward", "checkpoint", "seconds"}."""
    from finers_rt.export.checkpoints import load_processor
    from finers_rt.export.pointer import load_vlm

    torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "trainer_state.pt"
    state = ckpt.load_state(state_path) if state_path.is_file() else None
    src = run_dir / "checkpoint" if state is not None else Path(cfg.init)
    if not (src / "config.json").is_file():
        raise InputError(f"--init must be an HF checkpoint folder (SFT output), got '{cfg.init}'")
    model = load_vlm(src, dtype=torch.float32)
    collator = Collator(load_processor(src))
    cache = SampleCache(cfg.cache_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    step, retro = 0, {}
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        ckpt.restore_rng(rng, state["rng"][0])
        step, retro = int(state["step"]), {int(k): v for k, v in state["retro"].items()}
        log(f"resumed {run_dir} at step {step}")
    task = _Task(cfg, cache, retro)
    end_ids = [collator.end_id, collator.pad_id]
    t0, start = time.time(), step
    while step < cfg.steps:
        losses, rewards_seen, flat = _group_losses(model, collator, task, cfg, rng, end_ids)
        if losses:
            opt.zero_grad(set_to_none=True)
            torch.stack(losses).mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        step += 1
        mean_r = float(np.mean(rewards_seen))
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = (step - start) / max(1e-9, time.time() - t0)
            ckpt.append_log(run_dir, {"step": step, "reward": mean_r, "flat_groups": flat,
                                      "updated": bool(losses)})
            log(f"[rl {cfg.stage}] step {step}/{cfg.steps} reward {mean_r:.3f} flat groups "
                f"{flat}/{cfg.prompts_per_step} ETA {(cfg.steps - step) / max(rate, 1e-9):.0f} s")
        if step % cfg.save_every == 0 or step == cfg.steps:
            ckpt.save_hf(model, src, run_dir / "checkpoint")
            src = run_dir / "checkpoint"
            ckpt.save_state(state_path, {"step": step, "optimizer": opt.state_dict(),
                                         "rng": [ckpt.rng_state(rng)], "retro": retro,
                                         "config": asdict(cfg)})
    return {"step": step, "reward": mean_r, "checkpoint": str(run_dir / "checkpoint"),
            "seconds": time.time() - t0}
