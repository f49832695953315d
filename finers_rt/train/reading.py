"""Attention supervision of question reading (`train gse --read-attention W`).

Rounds 8-12 measured that the small LM carries the words of the question to the position
that writes the answer only slowly: the training-only `QueryHead` CE (chance 2.0) is still
~1.3 after 330 blank-image steps, with whole-word tokens or without, and a 4x or 12x higher LM
learning rate is slower, not faster (export/finers-tiny.md, twelfth round). Reading a word
~100 tokens back through the fixed prompt template is a routing problem: some attention head
at the reading position has to put its mass on the question's descriptive words.

This loss supervises that routing directly: for one head of one LM layer (default: head 0 of
layer 0, see below), at the last prompt position and at the position that writes
x1, -log of the attention mass on the tokens of the words that name the target's values
(colour / shape / pattern words the question uses for it, and the region words of its
description). The attention logits are recomputed from the layer's input exactly as the
layer computes them (RMSNorm, q/k projections with bias, multimodal RoPE, causal and padding
masks), so the loss trains the model's own attention; nothing is added to the model.

Routing alone was measured not to be enough (twelfth round): with the last layer's head 0
putting 99.7% of its mass on the words, a linear probe of its output read colour at 0.31 while
the words' own states give 0.97. So a second term trains what the head carries: the
training-only `QueryHead` (the readout of the final state) must also decode the named values
from this head's contribution, RMS-normalised by the LM's final norm. Even so, at the last
layer the reading stayed slow (QueryHead CE 1.27 after 250 steps); at layer 0 it reached 0.47
in 190 steps. Layer 0's values are computed from the token embeddings themselves, while every
later layer reads a residual stream in which layer 0 has already written vectors ~500x the
embeddings' norm (median token norm 0.65 -> 347 after layer 0), so the word identity reaches
them only indirectly.
"""

from __future__ import annotations

import math

import torch

from finers_rt.errors import InputError
from finers_rt.synth.questions import REGIONS
from finers_rt.train import dense


def named_words(query_labels: torch.Tensor, region_labels: torch.Tensor | None) -> list[list[str]]:
    """Per sample: the words naming the target's values (`dense.named_target_labels` order)
    and its region name ('top-left'), as they appear in questions."""
    out = []
    for b in range(query_labels.shape[0]):
        words = []
        for k, (_name, part) in enumerate(dense.ATTRIBUTE_GROUPS):
            value = int(query_labels[b, k])
            if value >= 0:
                words.append(dense.ATTRIBUTES[part.start + value])
        if region_labels is not None and int(region_labels[b]) >= 0:
            words.append(REGIONS[int(region_labels[b])])
        out.append(words)
    return out


def word_positions(input_ids: torch.Tensor, end: torch.Tensor, words: list[list[str]],
                   tokenizer) -> torch.Tensor:
    """[B, S] bool: every position (before `end[b]`, inclusive) where the token sequence of
    ' word' starts or continues, for the sample's words. Works for any tokenizer (a word in
    fragments marks all of its fragments)."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    cache: dict[str, list[int]] = {}
    for b, sample_words in enumerate(words):
        row = input_ids[b, : int(end[b]) + 1].tolist()
        for word in sample_words:
            ids = cache.get(word)
            if ids is None:
                ids = cache[word] = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            n = len(ids)
            for start in range(len(row) - n + 1):
                if row[start:start + n] == ids:
                    mask[b, start:start + n] = True
    return mask


def attention_logits(hf_model, layer_input: torch.Tensor, batch, layer: int, head: int,
                     rows: torch.Tensor, positions: torch.Tensor,
                     with_output: bool = False):
    """[R, P, S] pre-softmax attention logits of `head` in LM layer `layer` for the queries of
    sample `rows[r]` at `positions[r, p]` ([R, P]), masked (-inf) where that query cannot
    attend (future keys, padding); recomputed from the layer's input as the layer does it,
    for those rows and query positions only. With `with_output`, also the head's contribution
    to the residual stream there ([R, P, H]: its attention-weighted values through its slice
    of the output projection)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_multimodal_rotary_pos_emb

    lm = hf_model.model.language_model
    block = lm.layers[layer]
    attn = block.self_attn
    section = attn.rope_scaling["mrope_section"]
    x = block.input_layernorm(layer_input[rows])                         # [R, S, H]
    n_rows, seq, _ = x.shape
    hd = attn.head_dim
    kv_head = head // attn.num_key_value_groups
    position_ids, _ = hf_model.model.get_rope_index(
        batch.input_ids[rows], batch.image_grid_thw[rows], None, None, batch.attention_mask[rows])
    cos, sin = lm.rotary_emb(x, position_ids)                            # [3, R, S, hd]
    k = attn.k_proj(x).view(n_rows, seq, -1, hd)[:, :, kv_head][:, None]  # [R, 1, S, hd]
    k, _ = apply_multimodal_rotary_pos_emb(k, k, cos, sin, section)
    at = torch.arange(n_rows, device=x.device)[:, None]
    q = attn.q_proj(x[at, positions]).view(n_rows, -1, attn.config.num_attention_heads, hd)
    q = q[:, :, head][:, None]                                           # [R, 1, P, hd]
    q, _ = apply_multimodal_rotary_pos_emb(q, q, cos[:, at, positions], sin[:, at, positions],
                                           section)
    logits = torch.einsum("rpd,rsd->rps", q[:, 0], k[:, 0]) / math.sqrt(hd)
    idx = torch.arange(seq, device=x.device)
    allowed = (idx <= positions[..., None]) & batch.attention_mask[rows].bool()[:, None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    if not with_output:
        return logits
    values = attn.v_proj(x).view(n_rows, seq, -1, hd)[:, :, kv_head]     # [R, S, hd]
    mixed = torch.einsum("rps,rsd->rpd", torch.softmax(logits, dim=-1), values)
    return logits, mixed @ attn.o_proj.weight[:, head * hd:(head + 1) * hd].T


def routed_parameters(hf_model, layer: int = 0) -> list:
    """The value and output projections of the supervised layer: what the routed head carries
    is a read-out of the words, trained like the training-only heads at --head-lr (the
    layer-0 run that learned to read used this; at the last layer it made no measurable
    difference against the LM's rate, twelfth round)."""
    lm = hf_model.model.language_model
    attn = lm.layers[layer % len(lm.layers)].self_attn
    return [*attn.v_proj.parameters(), *attn.o_proj.parameters()]


def reading_losses(hf_model, hidden_states, batch, collator, x1: torch.Tensor,
                   query_head=None, layer: int = 0, head: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention loss, value loss) at the last prompt position and at x1 of every sample
    that names a word. Attention: mean -log(attention mass on the named words). Value (when
    `query_head`, a `dense.QueryHead`, is given): that head's CE on the supervised head's
    contribution, RMS-normalised by the LM's final norm, so the same readout that reads the
    final state reads the words out of this head (the routed head must also carry them).
    Both 0 (with a graph) when no sample names a word."""
    if batch.query_labels is None:
        raise InputError("--read-attention needs the questions' named-value labels (GSE cache)")
    lm = hf_model.model.language_model
    layer = layer % len(lm.layers)
    heads = lm.layers[layer].self_attn.config.num_attention_heads
    if not 0 <= head < heads:
        raise InputError(f"--read-attention head must be in [0, {heads}), got {head}")
    words = named_words(batch.query_labels, batch.region_labels)
    target = word_positions(batch.input_ids, batch.answer_pos, words, collator.tokenizer)
    has = target.any(dim=1)
    zero = hidden_states[layer].sum() * 0
    if not bool(has.any()):
        return zero, zero
    rows = torch.nonzero(has).flatten()
    positions = torch.stack([batch.answer_pos[rows], x1[rows]], dim=1)    # [R, 2]
    logits, output = attention_logits(hf_model, hidden_states[layer], batch, layer, head, rows,
                                      positions, with_output=True)
    on_words = logits.masked_fill(~target[rows][:, None, :], float("-inf"))
    attention = (torch.logsumexp(logits, dim=-1) - torch.logsumexp(on_words, dim=-1)).mean()
    value = zero
    if query_head is not None:
        normed = lm.norm(output.reshape(-1, output.shape[-1]))            # [R * 2, H]
        value = query_head.states_loss(normed, batch.query_labels[rows].repeat_interleave(2, 0))
    return attention, value
