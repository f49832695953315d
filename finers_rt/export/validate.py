"""Parity of exported VLM graphs against the HF torch reference, before anything is published.

One real chat prompt with an image (a synthetic image at the stage size, a FineRS prompt):
vision embeddings vs HF's vision tower; prefill logits and K/V vs HF's forward; several decode
steps that feed the ORT decoder its own K/V and its own greedy tokens, logits vs HF with HF's
cache on the same tokens; greedy tokens vs HF `generate`. Errors are max absolute differences;
a miss raises `ExportParityError(graph, output, error, tolerance)`. Quantized logits are judged
with a tail allowance (`Tolerance.logit_gap_slope`, see `logits_error`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from finers_rt.errors import ExportParityError


@dataclass(frozen=True)
class Tolerance:
    """Max absolute errors allowed per precision (image_embeds, logits, K/V). With
    `logit_gap_slope` s > 0 a logit g nats below the reference top logit may be off by
    `logits + s * g` (`logits_error`)."""

    image_embeds: float
    logits: float
    kv: float
    logit_gap_slope: float = 0.0


# fp32 stays tight: top-2 logit margins of random models can be ~2e-3, so a looser bound would
# let greedy tokens flip silently. Quantized decoders are judged loosely + token agreement, and
# their allowance grows in the tail: a pointer model's coordinate logits reach 40+ nats below the
# top (log of ~0 attention mass), where int8 noise of 2 nats changes no decision but failed a
# plain absolute bound (measured: 2.05 on a logit 45 below the top, <= 0.11 within 10 of it).
TOLERANCES = {
    "fp32": Tolerance(image_embeds=1e-3, logits=1e-3, kv=1e-3),
    "int8": Tolerance(image_embeds=1e-3, logits=2.0, kv=1.0, logit_gap_slope=0.25),
    "int4": Tolerance(image_embeds=1e-3, logits=4.0, kv=2.0, logit_gap_slope=0.25),
}


def logits_error(got: np.ndarray, want: np.ndarray, slope: float = 0.0) -> tuple[float, float]:
    """(max absolute error, the error judged against `Tolerance.logits`) of logits [..., V].
    The judged error subtracts `slope` x each logit's gap below the reference top logit, so with
    a tolerance t and s = slope < 1 a token g nats below the top ends at least
    g (1 - s) - 2 t below it: only tokens within 2 t / (1 - s) of the top can change places,
    as with a plain bound of t; noise deep in the tail cannot."""
    err = np.abs(got - want)
    raw = float(err.max())
    if slope <= 0:
        return raw, raw
    gap = want.max(axis=-1, keepdims=True) - want
    return raw, float((err - slope * gap).max())


@dataclass
class ParityInputs:
    """The reference prompt: processor outputs for one image + text chat turn."""

    input_ids: torch.Tensor  # [1, S] int64
    attention_mask: torch.Tensor  # [1, S] int64
    pixel_values: torch.Tensor  # [num_patches, 1176] float32
    image_grid_thw: torch.Tensor  # [1, 3] int64


def _check(graph: str, output: str, error: float, tol: float, detail: str = "") -> float:
    if not np.isfinite(error) or error > tol:
        raise ExportParityError(graph, output, error, tol, detail)
    return float(error)


def _additive_mask(seq: int, past: int) -> np.ndarray:
    """Causal additive mask [1, 1, seq, past+seq]: 0 where attended, finfo.min elsewhere."""
    mask = np.full((seq, past + seq), np.finfo(np.float32).min, dtype=np.float32)
    for i in range(seq):
        mask[i, : past + i + 1] = 0.0
    return mask[None, None]


def apply_repetition_penalty(logits: np.ndarray, seen: list[int], penalty: float) -> np.ndarray:
    """HF `RepetitionPenaltyLogitsProcessor` on one row: logits [V] float32, seen token ids."""
    if penalty == 1.0:
        return logits
    out = logits.copy()
    ids = np.unique(np.asarray(seen, dtype=np.int64))
    vals = out[ids]
    out[ids] = np.where(vals < 0, vals * penalty, vals / penalty)
    return out


def _layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) [B, KV, T, D] of layer `layer` from an HF cache object."""
    entry = cache.layers[layer]
    return entry.keys, entry.values


def check_vision(vision_session, model, inputs: ParityInputs, tol: Tolerance) -> tuple[np.ndarray, float]:
    """Run the ORT vision graph; return (image_embeds [N, H], max abs error vs HF)."""
    embeds = vision_session.run(None, {"pixel_values": inputs.pixel_values.numpy()})[0]
    with torch.no_grad():
        ref = model.model.visual(inputs.pixel_values, grid_thw=inputs.image_grid_thw)
    ref = getattr(ref, "pooler_output", ref).numpy()
    if embeds.shape != ref.shape:
        raise ExportParityError("vision", "image_embeds", float("inf"), tol.image_embeds,
                                f"shape {embeds.shape} != reference {ref.shape}")
    err = float(np.abs(embeds - ref).max())
    return embeds, _check("vision", "image_embeds", err, tol.image_embeds)


def num_kv_pairs(decoder_session) -> int:
    """Number of (past_key_i, past_value_i) inputs of a decoder session (layers + any extra pairs)."""
    return sum(arg.name.startswith("past_key_") for arg in decoder_session.get_inputs())


def is_shared_kv(decoder_session) -> bool:
    """True for the kv_cache "shared" contract (head-major past, present out, no mask input)."""
    return any(arg.name == "seqlens_k" for arg in decoder_session.get_inputs())


def _step_feeds(session, embeds, position_ids, cache, past):
    """Feeds of one decoder run after `past` cached positions; `cache` is the per-pair K/V list
    ([1, past, KV, D] for "concat", [1, KV, past, D] for "shared"). Plain run: no shared buffer."""
    seq = embeds.shape[1]
    feeds = {"inputs_embeds": embeds, "position_ids": position_ids}
    if is_shared_kv(session):
        feeds["seqlens_k"] = np.array([past + seq - 1], dtype=np.int32)
        feeds["total_sequence_length"] = np.array(past + seq, dtype=np.int32)
    else:
        feeds["attention_mask"] = _additive_mask(seq, past)
    for i in range(len(cache) // 2):
        feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = cache[2 * i], cache[2 * i + 1]
    return feeds


def _next_cache(session, cache, outs):
    """The cache after a run: "shared" returns past + new (present), "concat" only the new K/V."""
    if is_shared_kv(session):
        return list(outs[1:])
    return [np.concatenate([c, n], axis=1) for c, n in zip(cache, outs[1:])]


def _ort_prefill(decoder_session, num_pairs, kv_shape, embeds, position_ids):
    shape = (1, kv_shape[0], 0, kv_shape[1]) if is_shared_kv(decoder_session) else (1, 0, *kv_shape)
    cache = [np.zeros(shape, dtype=np.float32)] * (2 * num_pairs)
    return decoder_session.run(None, _step_feeds(decoder_session, embeds, position_ids, cache, 0))


def check_decoder(decoder_session, model, inputs: ParityInputs, image_embeds: np.ndarray,
                  embed_tokens: np.ndarray, steps: int, penalty: float, tol: Tolerance) -> dict:
    """Prefill + `steps` decode steps on ORT vs HF. Returns measured errors and the ORT tokens."""
    cfg = model.config.text_config
    layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    ids = inputs.input_ids[0].numpy()
    embeds = embed_tokens[ids].astype(np.float32)[None]  # [1, S, H]
    embeds[0, ids == model.config.image_token_id] = image_embeds
    with torch.no_grad():
        pos, deltas = model.model.get_rope_index(inputs.input_ids, inputs.image_grid_thw, None,
                                                 inputs.attention_mask)
        ref = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                    pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw,
                    use_cache=True)
    outs = _ort_prefill(decoder_session, num_kv_pairs(decoder_session), (kv_heads, head_dim), embeds,
                        pos.numpy())
    raw, judged = logits_error(outs[0], ref.logits[:, -1].numpy(), tol.logit_gap_slope)
    result = {"prefill_logits_max_abs_err": raw,
              "prefill_logits_judged_err": _check("decoder", "logits", judged, tol.logits, "prefill")}
    kv_err = 0.0
    shared = is_shared_kv(decoder_session)
    prefix = "present" if shared else "new"
    for i in range(layers):  # pairs beyond the HF layers have no reference
        ref_k, ref_v = _layer_kv(ref.past_key_values, i)  # [B, KV, T, D]
        for name, got, want in ((f"{prefix}_key_{i}", outs[1 + 2 * i], ref_k),
                                (f"{prefix}_value_{i}", outs[2 + 2 * i], ref_v)):
            err = float(np.abs(got - (want if shared else want.transpose(1, 2)).numpy()).max())
            kv_err = max(kv_err, _check("decoder", name, err, tol.kv, "prefill"))
    result["prefill_kv_max_abs_err"] = kv_err
    result.update(_decode_loop(decoder_session, model, outs, ref, ids, embed_tokens,
                               int(deltas.reshape(-1)[0]), steps, penalty, tol))
    return result


def _decode_loop(session, model, outs, ref, ids, embed_tokens, delta, steps, penalty, tol):
    """Greedy decode on ORT with its own cache and tokens; HF (prefill output `ref`) follows the
    same tokens. Also counts steps where ORT's and torch's greedy choice agree."""
    cache = list(outs[1:])  # per K/V: [1, T, KV, D] ("concat") or [1, KV, T, D] ("shared")
    logits, seen, tokens, max_err, max_judged = outs[0][0], list(ids.tolist()), [], 0.0, 0.0
    agree = []  # per step: ORT argmax == torch argmax on the same history (teacher-forced)
    ref_cache, ref_logits = ref.past_key_values, ref.logits[0, -1].numpy()
    total = len(ids)
    for step in range(steps):
        token = int(np.argmax(apply_repetition_penalty(logits, seen, penalty)))
        agree.append(token == int(np.argmax(apply_repetition_penalty(ref_logits, seen, penalty))))
        tokens.append(token)
        seen.append(token)
        position = np.full((3, 1, 1), total + delta, dtype=np.int64)
        feeds = _step_feeds(session, embed_tokens[[token]].astype(np.float32)[None], position, cache, total)
        outs = session.run(None, feeds)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([[token]]), past_key_values=ref_cache,
                        attention_mask=torch.ones(1, total + 1, dtype=torch.long),
                        position_ids=torch.from_numpy(position),
                        cache_position=torch.tensor([total]), use_cache=True)
        ref_cache = ref.past_key_values
        ref_logits = ref.logits[0, -1].numpy()
        err, judged = logits_error(outs[0], ref.logits[:, -1].numpy(), tol.logit_gap_slope)
        max_err = max(max_err, err)
        max_judged = max(max_judged, _check("decoder", "logits", judged, tol.logits,
                                            f"decode step {step + 1}"))  # >= 0: the top has gap 0
        cache = _next_cache(session, cache, outs)
        logits, total = outs[0][0], total + 1
    tokens.append(int(np.argmax(apply_repetition_penalty(logits, seen, penalty))))
    agree.append(tokens[-1] == int(np.argmax(apply_repetition_penalty(ref_logits, seen, penalty))))
    return {"decode_logits_max_abs_err": max_err, "decode_logits_judged_err": max_judged,
            "decode_steps_checked": steps, "tokens": tokens,
            "top1_agreement_with_torch": sum(agree) / len(agree)}


def reference_greedy_tokens(model, inputs: ParityInputs, num_tokens: int) -> list[int]:
    """HF `generate` greedy tokens (applies the checkpoint's generation_config, e.g. repetition
    penalty); eos is disabled so exactly `num_tokens` come back."""
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None
    config.do_sample, config.max_new_tokens = False, num_tokens
    config.top_k = config.top_p = config.temperature = None
    with torch.no_grad():
        out = model.generate(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                             pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw,
                             generation_config=config)
    return out[0, inputs.input_ids.shape[1]:].tolist()
