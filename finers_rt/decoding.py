"""The decode loop of a VLM stage: greedy or top-p token choice with HF's repetition penalty,
stop on eos ids or a stop string, one `VlmStage.decode_stepper` call per token (numpy only)."""

from __future__ import annotations

import numpy as np


class DecodeLoop:
    """The decode loop state: per-row ids seen so far (for the repetition penalty) and stop state."""

    def __init__(self, stage, buffer, prompt_ids: np.ndarray, rope_delta: int,
                 stop_at: str | None, temperature: float, top_p: float, seed: int | None):
        self.stage, self.buffer, self.rope_delta = stage, buffer, rope_delta
        self.stop_at, self.temperature, self.top_p = stop_at, temperature, top_p
        self.rng = np.random.default_rng(seed)
        self.penalty = float(stage.manifest.generation.repetition_penalty)
        self.eos = set(int(t) for t in stage.manifest.special_tokens.eos_token_ids)
        pad = stage.manifest.special_tokens.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(self.eos)))
        unique_prompt = set(int(t) for t in np.unique(prompt_ids))
        self.seen = [set(unique_prompt) for _ in range(buffer.batch)]  # ids in the prompt + generated
        self.seen_ids = [np.fromiter(sorted(unique_prompt), dtype=np.int64) for _ in range(buffer.batch)]
        self._ends_stop: dict[int, bool] = {}  # token id -> its text holds stop_at's last character

    def run(self, logits: np.ndarray, max_new: int) -> tuple[list[list[int]], list[str]]:
        """Pick a token per row from `logits [B, V]`, stop rows on eos / stop string, and run one
        decode step (the stage's `decode_stepper`) until every row stopped or `max_new` tokens. Stopped rows are fed
        the pad id (their outputs are ignored)."""
        batch = self.buffer.batch
        tokens: list[list[int]] = [[] for _ in range(batch)]
        reasons = ["max_new_tokens"] * batch
        active = [True] * batch
        penalised = self.penalty != 1.0
        advance = self.stage.decode_stepper(self.buffer, self.rope_delta)
        for step in range(max_new):
            next_ids = self.pick(logits)  # [B] int64
            for row, token in enumerate(next_ids.tolist()):
                if not active[row]:
                    next_ids[row] = self.pad_id
                    continue
                tokens[row].append(token)
                if token not in self.seen[row]:
                    self.seen[row].add(token)
                    if penalised:
                        self.seen_ids[row] = np.append(self.seen_ids[row], token)
                reason = self.stop_reason(token, tokens[row])
                if reason:
                    reasons[row], active[row] = reason, False
            if step == max_new - 1 or not any(active):
                break
            logits = advance(next_ids)
        return tokens, reasons

    def stop_reason(self, token: int, row_tokens: list[int]) -> str:
        if token in self.eos:
            return "eos"
        if self.stop_at and self._may_end_stop(token):
            window = row_tokens[-(len(self.stop_at) + 8):]
            if self.stop_at in self.stage.tokenizer.decode(window, skip_special_tokens=False):
                return "stop_string"
        return ""

    def _may_end_stop(self, token: int) -> bool:
        """False when `token` cannot complete the stop string: its text lacks the stop string's last
        character. Only for an ASCII last character (a byte-level token then holds that byte whole);
        otherwise always True. Per token id, decoded once."""
        last = self.stop_at[-1]
        if not last.isascii():
            return True
        hit = self._ends_stop.get(token)
        if hit is None:
            hit = self._ends_stop[token] = last in self.stage.tokenizer.decode([token], skip_special_tokens=False)
        return hit

    def pick(self, logits: np.ndarray) -> np.ndarray:
        """Repetition penalty (HF RepetitionPenaltyLogitsProcessor) then argmax or top-p sampling."""
        logits = np.asarray(logits, dtype=np.float32)  # [B, V], owned: the backend made it for this step
        if self.penalty != 1.0:
            penalty = np.float32(self.penalty)
            for row, ids in enumerate(self.seen_ids):  # gather / scatter over the seen ids only
                scores = logits[row, ids]
                logits[row, ids] = np.where(scores < 0, scores * penalty, scores / penalty)
        if self.temperature <= 0.0:
            return np.argmax(logits, axis=-1).astype(np.int64, copy=False)
        return np.array([sample_top_p(row / self.temperature, self.top_p, self.rng) for row in logits],
                        dtype=np.int64)


def sample_top_p(logits: np.ndarray, top_p: float, rng: np.random.Generator) -> int:
    """Sample from softmax(logits) restricted to the smallest set with cumulative prob >= top_p."""
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, top_p)) + 1]
    kept = probs[keep] / probs[keep].sum()
    return int(keep[rng.choice(keep.size, p=kept)])
