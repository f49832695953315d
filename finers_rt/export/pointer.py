"""FinersPointerQwen2_5_VL: Qwen2.5-VL whose coordinate-token logits get a pointer term.

Why: Qwen2.5-VL carries position only in rotary encodings, which shape attention scores but
never reach the values an answer token reads, so a small LM that knows WHICH image token holds
the target still cannot say WHERE it is as a number. The pointer reads positions directly.

How (the same rule in HF and in the exported decoder graph, see `pointer_kv`/`pointer_logits`):
- every token i (prefill and decode) gets pointer keys k_i = W_k(final normed hidden_i), two
  heads (x, y; one key shared by both in a "joint" pointer, see below), and a pointer value
  holding its grid cell taken ONLY from the M-RoPE position ids (t, h, w): col = w - t,
  row = h - t (text tokens have t = h = w, so they sit in cell (0, 0); their learned keys keep
  them out of the way). Keys/values are cached as ONE extra K/V pair
  with the LM layers' per-pair shape: key heads 0/1 = x/y keys, value head 0/1 = one-hot of the
  column/row (so plain attention, HF's or the fused GroupQueryAttention op, yields p_col/p_row;
  at most head_dim cells per axis: 64 x 28 px = 1792 px for finers-tiny).
- at every position t, queries q_x, q_y = W_q(h_t) attend causally over the cached pointer keys;
  p_col[c] = attention mass on tokens of column c (p_row likewise);
- logits = lm_head(h_t), and for every coordinate token v:
  logit_v += g_x(h_t) * log(p_col . W[v] + eps) + g_y(h_t) * log(p_row . W[v] + eps),
  where W[v] spreads value v over the two nearest cell centres (cell = patch * merge pixels of
  the stage image) and g = softplus gates (the model learns which axis the next token is).
The output is still ordinary vocabulary logits, so the runtime decodes FineRS text unchanged.
A "joint" pointer (settings `joint: true`) uses ONE key and ONE query for both axes: p_col and
p_row are then the column and row marginals of a single attention over the tokens, so x and y
follow the same token (with separate x/y attentions, two look-alikes give four equally likely
(x, y) pairs). Its token attention can be trained directly (CE on the target's image token).
The graph is the same either way: the shared key/query are written into heads 0 and 1.
An "extent" pointer (settings `extent: true`) writes each token's learned extent(h_i) (half
width / height, in cells) into the last value slot of each axis, so the same attention also
returns the attended token's extent; the learned shift adds extent_scale(h_t) times it, so a
box edge can sit half the object's size from the cell the pointer found.
A "readout" pointer (settings `readout: R`) writes each token's learned readout(h_i) (R values
per axis head) into the R value slots before the extent's, so the same attention also returns
the attended token's readout r_t; every non-coordinate logit then gets
readout_out(r_t * readout_scale(h_t)): the answer's words can read what the token the pointer
attends holds (the target's colour), not only where it is.
The HF config carries a `finers_pointer` dict; stock checkpoints (no dict) load the stock class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.cache_utils import DynamicLayer

from finers_rt.errors import ArtifactError
from finers_rt.export.decoder_graph import DecoderStep, SharedKvDecoderStep, _GroupQueryAttention

POINTER_KEY = "finers_pointer"
POINTER_EPS = 1e-6


def pointer_settings(coord_ids_values: dict[int, int], cell_px: int, max_value: int,
                     joint: bool = False, cell_keys: bool = False,
                     extent: bool = False, readout: int = 0) -> dict[str, Any]:
    """The `finers_pointer` config dict for a tokenizer's coordinate tokens {id: value};
    `joint`: one attention (shared key and query) for both axes; `cell_keys`: every token's
    pointer key also gets a learned vector of its column and one of its row; `extent`: every
    token's pointer value also carries a learned extent; `readout`: that many value slots per
    axis carry a learned readout of the token, read out into the words' logits (see
    `PointerHead`)."""
    ids = sorted(coord_ids_values)
    out = {"version": 1, "coord_token_ids": ids,
           "coord_values": [int(coord_ids_values[i]) for i in ids],
           "cell_px": int(cell_px), "num_cells": int(max_value) // int(cell_px) + 1,
           "eps": POINTER_EPS, "shift": True, "joint": bool(joint)}
    if cell_keys:
        out["cell_keys"] = True
    if extent:
        out["extent"] = True
    if readout:
        out["readout"] = int(readout)
    return out


def cell_weights(settings: dict[str, Any], vocab_size: int, num_cells: int | None = None) -> torch.Tensor:
    """[C, V] float32: column v spreads coordinate value v linearly over the two nearest cell
    centres (cell c covers [c * cell, (c + 1) * cell) px; past the last centre: the last cell);
    zero columns for other tokens. C = num_cells (default: the settings')."""
    cell = float(settings["cell_px"])
    cells = int(num_cells or settings["num_cells"])
    out = torch.zeros(cells, vocab_size, dtype=torch.float32)
    for tid, value in zip(settings["coord_token_ids"], settings["coord_values"]):
        pos = (value - cell / 2) / cell
        lo = int(pos // 1)
        frac = pos - lo
        if lo < 0:
            out[0, tid] = 1.0
        elif lo >= cells - 1:
            out[cells - 1, tid] = 1.0
        else:
            out[lo, tid] = 1.0 - frac
            out[lo + 1, tid] = frac
    return out


def coordinate_mask(settings: dict[str, Any], vocab_size: int) -> torch.Tensor:
    """[V] float32: 1 for coordinate tokens, 0 elsewhere."""
    mask = torch.zeros(vocab_size, dtype=torch.float32)
    mask[torch.tensor(settings["coord_token_ids"], dtype=torch.long)] = 1.0
    return mask


class PointerHead(nn.Module):
    """The pointer's weights and constant maps (built from the settings, not saved)."""

    def __init__(self, hidden: int, num_kv_heads: int, head_dim: int, vocab_size: int,
                 settings: dict[str, Any]):
        super().__init__()
        if num_kv_heads < 2:
            raise ArtifactError("the pointer needs at least 2 K/V heads (x and y keys)")
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        # a cell is a one-hot slot of a pointer value vector, so at most head_dim cells per axis
        self.num_cells = min(int(settings["num_cells"]), head_dim)
        self.eps = float(settings.get("eps", POINTER_EPS))
        # joint: one key / query for both axes (p_col, p_row = marginals of one attention)
        self.joint = bool(settings.get("joint", False))
        heads = 1 if self.joint else 2
        self.key = nn.Linear(hidden, heads * head_dim)
        self.query = nn.Linear(hidden, heads * head_dim)
        self.gate = nn.Linear(hidden, 2)
        # optional learned shift (in cells) of each axis distribution: a GSE region's x1 sits
        # 1.5 cells left of the target the pointer finds, a box edge half a width away
        self.shift = nn.Linear(hidden, 2) if settings.get("shift") else None
        # optional learned extent ("extent"): every token's value also holds extent(h_i), its
        # half width / height in cells, in the last slot of value heads 0 / 1 (so one slot
        # fewer for cells); the attention returns the attended token's extent with the cell
        # distribution, and the shift adds extent_scale(h_t) * that extent: a box edge can sit
        # half the object's size from its centre, not a fixed distance
        self.extent = self.extent_scale = None
        if settings.get("extent"):
            if self.shift is None:
                raise ArtifactError("the pointer extent moves the learned shift: it needs \"shift\"")
            self.num_cells = min(self.num_cells, head_dim - 1)
            self.extent = nn.Linear(hidden, 2)
            self.extent_scale = nn.Linear(hidden, 2)
        # optional learned readout ("readout": R): every token's value also holds readout(h_i),
        # R slots per axis head just before the extent's slot (so R fewer slots for cells);
        # the attention returns the attended token's readout r_t, and every non-coordinate
        # logit gets readout_out(r_t * readout_scale(h_t)): the response's words can say what
        # the attended token holds (its colour, shape, pattern), the way the coordinates say
        # where it is. readout_out starts at zero (outputs unchanged when it is added).
        self.readout = self.readout_scale = self.readout_out = None
        self.readout_dims = int(settings.get("readout", 0) or 0)
        tail = 1 if self.extent is not None else 0
        if self.readout_dims:
            r = self.readout_dims
            if r < 1 or head_dim - tail - r < 2:
                raise ArtifactError(f"pointer readout of {r} slots does not fit a value of "
                                    f"{head_dim} slots")
            self.num_cells = min(self.num_cells, head_dim - tail - r)
            self.readout = nn.Linear(hidden, 2 * r)
            self.readout_scale = nn.Linear(hidden, 2 * r)
            self.readout_out = nn.Linear(2 * r, vocab_size, bias=False)
        self.readout_start = head_dim - tail - self.readout_dims
        # optional learned key term per column and per row of a token's cell ("cell_keys"):
        # the key then says where the token is, not only what its state holds, so a query can
        # ask for "the top-left of the image" (cell_key[0] = columns, cell_key[1] = rows)
        self.cell_key = (nn.Parameter(torch.zeros(2, self.num_cells, head_dim))
                         if settings.get("cell_keys") else None)
        # training only (never saved): the first `tied_dims` key / query dims are trained by
        # their own losses (`train.tie`); in training mode the pointer's attention reads them
        # without passing its gradient back, so the token CE cannot bend what they mean
        self.tied_dims = 0
        self.register_buffer("cell_map", cell_weights(settings, vocab_size, self.num_cells),
                             persistent=False)
        self.register_buffer("coord_mask", coordinate_mask(settings, vocab_size), persistent=False)
        self.register_buffer("cells", torch.arange(self.num_cells, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("slots", torch.arange(head_dim, dtype=torch.float32), persistent=False)
        # the value slots that hold cells (the extent and the readout sit after them)
        self.register_buffer("cell_slots", self.slots < self.num_cells, persistent=False)


def pointer_heads(head: PointerHead, projection: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, H] -> the (x, y) pointer keys or queries [B, S, 2, D] of `projection`
    (`head.key` or `head.query`); a joint pointer's one projection serves both axes."""
    bsz, seq = hidden.shape[0], hidden.shape[1]
    out = _read_tied(head, projection(hidden))
    if head.joint:
        return out[:, :, None, :].expand(bsz, seq, 2, head.head_dim)
    return out.view(bsz, seq, 2, head.head_dim)


def _read_tied(head: PointerHead, t: torch.Tensor) -> torch.Tensor:
    """`t` [..., D] as the pointer's attention reads it: in training, its first `tied_dims`
    dims detached (the tie's own losses train them); unchanged otherwise."""
    if not (head.training and head.tied_dims):
        return t
    return torch.cat([t[..., :head.tied_dims].detach(), t[..., head.tied_dims:]], dim=-1)


def pointer_cells(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids [3, B, S] (t, h, w) -> [B, S, 2] float (col = w - t, row = h - t)."""
    pos = position_ids.to(torch.float32)
    return torch.stack([pos[2] - pos[0], pos[1] - pos[0]], dim=-1)


def pointer_kv(head: PointerHead, hidden: torch.Tensor, position_ids: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(key, value) of new tokens, each [B, S, KV, D] (sequence-major, the graph's layout):
    key heads 0/1 = x/y pointer keys; value head 0 = one-hot of the token's column, head 1 =
    one-hot of its row (D slots); other heads 0. Attention with these values returns the
    distribution over cells directly, so any attention kernel (HF, plain ops, fused GQA) works."""
    bsz, seq = hidden.shape[0], hidden.shape[1]
    keys = pointer_heads(head, head.key, hidden)
    cells = pointer_cells(position_ids)  # [B, S, 2]
    if head.cell_key is not None:
        keys = keys + _read_tied(head, cell_key_terms(head, cells))[:, :, None, :]
    values = ((cells[..., None] == head.slots) & head.cell_slots).to(hidden.dtype)
    if head.extent is not None:  # the last slot of each axis holds the extent
        values = values + _in_slots(head, head.extent(hidden)[..., None], head.head_dim - 1)
    if head.readout is not None:  # R slots per axis, from readout_start
        ro = head.readout(hidden).view(bsz, seq, 2, head.readout_dims)
        values = values + _in_slots(head, ro, head.readout_start)
    pad = head.num_kv_heads - 2
    if pad:
        keys = torch.cat([keys, keys.new_zeros(bsz, seq, pad, head.head_dim)], dim=2)
        values = torch.cat([values, values.new_zeros(bsz, seq, pad, head.head_dim)], dim=2)
    return keys, values


def _in_slots(head: PointerHead, part: torch.Tensor, start: int) -> torch.Tensor:
    """part [B, S, 2, n] -> [B, S, 2, D]: zero except value slots start .. start + n - 1."""
    return F.pad(part, (start, head.head_dim - start - part.shape[-1]))


def cell_key_terms(head: PointerHead, cells: torch.Tensor) -> torch.Tensor:
    """cells [..., 2] float (column, row) -> [..., D]: the learned column + row key terms
    (indices clamped to the table; text tokens sit in cell (0, 0))."""
    index = cells.clamp(0, head.num_cells - 1).to(torch.long)
    return head.cell_key[0][index[..., 0]] + head.cell_key[1][index[..., 1]]


def pointer_axis_probs(head: PointerHead, hidden: torch.Tensor, keys: torch.Tensor,
                       values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, H], keys/values [B, T, KV, D] (cached + new), additive mask [B, 1, S, T]
    -> p_axis [B, 2, S, C]: column (x) and row (y) distributions of the queries' attention."""
    return pointer_attention(head, hidden, keys, values, mask)[..., :head.num_cells]


def split_pointer_output(head: PointerHead, out: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The pointer attention's output [B, 2, S, D] -> (p_axis [B, 2, S, C], the attended
    extent [B, 2, S], the attended readout [B, S, 2R]; None for a pointer without one)."""
    extent = out[..., head.head_dim - 1] if head.extent is not None else None
    readout = None
    if head.readout is not None:
        r, start = head.readout_dims, head.readout_start
        part = out[..., start:start + r]  # [B, 2, S, R]
        readout = part.permute(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], 2 * r)
    return out[..., :head.num_cells], extent, readout


def pointer_attention(head: PointerHead, hidden: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Like `pointer_axis_probs` but the whole attention output [B, 2, S, D] (cells first,
    the attended extent in slot D - 1 when the pointer has one)."""
    q = pointer_heads(head, head.query, hidden).transpose(1, 2)  # [B, 2, S, D]
    k = keys[:, :, 0:2, :].transpose(1, 2)  # [B, 2, T, D]
    scores = torch.matmul(q, k.transpose(2, 3)) * head.head_dim ** -0.5 + mask  # [B, 2, S, T]
    probs = torch.softmax(scores, dim=-1)
    if head.training and head.joint:
        head.last_token_probs = probs[:, 0]  # [B, S, T], for the training-only joint loss
    if head.training and head.readout is not None:
        head.last_probs = probs  # [B, 2, S, T], for the training-only readout attention loss
    return torch.matmul(probs, values[:, :, 0:2, :].transpose(1, 2))


def pointer_bonus(head: PointerHead, hidden: torch.Tensor, p_axis: torch.Tensor,
                  extent: torch.Tensor | None = None,
                  readout: torch.Tensor | None = None) -> torch.Tensor:
    """hidden [B, S, H], p_axis [B, 2, S, C], extent [B, 2, S] (the attended extent; pointers
    with one), readout [B, S, 2R] (the attended readout; pointers with one) -> the additive
    logits [B, S, V]: on coordinates
    g_x * log(p_col . W[v] + eps) + g_y * log(p_row . W[v] + eps), after the learned shift;
    on every other token (readout pointers) readout_out(readout * readout_scale(hidden))."""
    if head.shift is not None:
        shift = head.shift(hidden)  # [B, S, 2]
        if head.extent is not None:
            shift = shift + head.extent_scale(hidden) * extent.permute(0, 2, 1)
        p_axis = shift_cells(p_axis, shift, head.cells)
    if head.training:
        head.last_axis_probs = p_axis  # for the training-only dense axis loss
    logp = torch.log(torch.matmul(p_axis, head.cell_map) + head.eps)  # [B, 2, S, V]
    gates = F.softplus(head.gate(hidden)).permute(2, 0, 1)[..., None]  # [2, B, S, 1]
    bonus = (gates[0] * logp[:, 0] + gates[1] * logp[:, 1]) * head.coord_mask
    if head.readout is not None:
        words = head.readout_out(readout * head.readout_scale(hidden))  # [B, S, V]
        bonus = bonus + words * (1.0 - head.coord_mask)
    return bonus


def pointer_logits(head: PointerHead, hidden: torch.Tensor, base_logits: torch.Tensor,
                   keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, H] (final normed), base_logits [B, S, V], keys/values [B, T, KV, D] (all
    cached + new pointer K/V), mask additive [B, 1, S, T] -> logits [B, S, V]."""
    p_axis, extent, readout = split_pointer_output(
        head, pointer_attention(head, hidden, keys, values, mask))
    return base_logits + pointer_bonus(head, hidden, p_axis, extent, readout)


def shift_cells(p_axis: torch.Tensor, shift: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """p_axis [B, 2, S, C], shift [B, S, 2] (cells), cells [C] = 0..C-1 -> [B, 2, S, C]:
    p'[c] = (1 - f) p[c + k] + f p[c + k + 1] with shift = k + f (k integer, 0 <= f < 1), zero
    outside the grid: the distribution moves `shift` cells down, linearly between cells."""
    delta = shift.permute(0, 2, 1)[..., None]  # [B, 2, S, 1]
    k = torch.floor(delta)
    frac = delta - k
    last = p_axis.shape[-1] - 1
    index = cells + k  # [B, 2, S, C]

    def take(i):
        inside = ((i >= 0) & (i <= last)).to(p_axis.dtype)
        return torch.gather(p_axis, -1, i.clamp(0, last).long()) * inside

    return (1.0 - frac) * take(index) + frac * take(index + 1.0)


def causal_additive_mask(attention_mask: torch.Tensor | None, bsz: int, seq: int, total: int,
                         dtype: torch.dtype, device) -> torch.Tensor:
    """[B, 1, S, T] additive mask: new token s (at total - seq + s) sees keys <= itself that the
    2-D padding mask [B, T] (1 = real token) keeps."""
    q_pos = torch.arange(total - seq, total, device=device)[:, None]
    allowed = torch.arange(total, device=device)[None, :] <= q_pos  # [S, T]
    allowed = allowed[None, None].expand(bsz, 1, seq, total)
    if attention_mask is not None and attention_mask.dim() == 2:
        allowed = allowed & attention_mask[:, None, None, -total:].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


class FinersPointerQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL + the in-model pointer; its pointer K/V live in the HF cache at layer index
    num_hidden_layers, so `generate` works unchanged."""

    def __init__(self, config):
        super().__init__(config)
        settings = getattr(config, POINTER_KEY, None)
        if not settings:
            raise ArtifactError(f"a pointer checkpoint needs '{POINTER_KEY}' in its config")
        text = config.text_config
        self.pointer = PointerHead(text.hidden_size, text.num_key_value_heads,
                                   text.hidden_size // text.num_attention_heads,
                                   text.vocab_size, settings)
        self.post_init()

    def _position_ids(self, input_ids, attention_mask, image_grid_thw, past_key_values,
                      cache_position, seq: int, bsz: int) -> torch.Tensor:
        """[3, B, S] M-RoPE positions, the way Qwen2_5_VLModel computes them when not given."""
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past == 0 or self.model.rope_deltas is None:
            pos, deltas = self.model.get_rope_index(input_ids, image_grid_thw, None,
                                                    attention_mask=attention_mask)
            self.model.rope_deltas = deltas
            return pos
        start = cache_position[0] if cache_position is not None else past
        pos = torch.arange(seq, device=self.model.rope_deltas.device).view(1, 1, -1).expand(3, bsz, -1)
        return pos + (start + self.model.rope_deltas).view(1, -1, 1)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, pixel_values=None,
                image_grid_thw=None, cache_position=None, logits_to_keep=0, **kwargs):
        kwargs.pop("return_dict", None)
        seq_src = input_ids if input_ids is not None else inputs_embeds
        bsz, seq = seq_src.shape[0], seq_src.shape[1]
        if position_ids is None:
            position_ids = self._position_ids(input_ids, attention_mask, image_grid_thw,
                                              past_key_values, cache_position, seq, bsz)
        mrope = position_ids[1:] if position_ids.shape[0] == 4 else position_ids
        out = self.model(input_ids=input_ids, pixel_values=pixel_values,
                         image_grid_thw=image_grid_thw, position_ids=position_ids,
                         attention_mask=attention_mask, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, return_dict=True,
                         cache_position=cache_position, **kwargs)
        hidden = out.last_hidden_state
        keys, values = pointer_kv(self.pointer, hidden, mrope)
        cache = out.past_key_values
        if cache is not None and (use_cache is None or use_cache):
            layer = self.config.text_config.num_hidden_layers
            while len(cache.layers) <= layer:
                cache.layers.append(DynamicLayer())
            k_all, v_all = cache.update(keys.transpose(1, 2), values.transpose(1, 2), layer)
            keys, values = k_all.transpose(1, 2), v_all.transpose(1, 2)
        total = keys.shape[1]
        mask = causal_additive_mask(attention_mask, bsz, seq, total, hidden.dtype, hidden.device)
        logits = pointer_logits(self.pointer, hidden, self.lm_head(hidden), keys, values, mask)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLCausalLMOutputWithPast

        return Qwen2_5_VLCausalLMOutputWithPast(
            logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states,
            attentions=out.attentions, rope_deltas=out.rope_deltas)


def _settings_of(hf_dir: str | Path) -> dict[str, Any]:
    """The `finers_pointer` dict of an HF folder's config.json ({} when none or unreadable)."""
    try:
        return json.loads((Path(hf_dir) / "config.json").read_text()).get(POINTER_KEY) or {}
    except (OSError, ValueError, AttributeError):
        return {}


def has_pointer(hf_dir: str | Path) -> bool:
    """Whether the HF folder's config.json carries the pointer settings."""
    return bool(_settings_of(hf_dir))


def is_joint(hf_dir: str | Path) -> bool:
    """Whether the HF folder's pointer is a joint one (one attention for both axes)."""
    return bool(_settings_of(hf_dir).get("joint", False))


def has_cell_keys(hf_dir: str | Path) -> bool:
    """Whether the HF folder's pointer keys carry the learned per-cell terms."""
    return bool(_settings_of(hf_dir).get("cell_keys", False))


def has_extent(hf_dir: str | Path) -> bool:
    """Whether the HF folder's pointer values carry the learned extent."""
    return bool(_settings_of(hf_dir).get("extent", False))


def readout_dims(hf_dir: str | Path) -> int:
    """How many value slots per axis the HF folder's pointer readout has (0: none)."""
    return int(_settings_of(hf_dir).get("readout", 0) or 0)


def model_class_for(hf_dir: str | Path):
    """FinersPointerQwen2_5_VL for pointer checkpoints, the stock HF class otherwise."""
    return FinersPointerQwen2_5_VL if has_pointer(hf_dir) else Qwen2_5_VLForConditionalGeneration


def load_vlm(hf_dir: str | Path, **kwargs):
    """`from_pretrained` with the class the folder's config asks for."""
    return model_class_for(hf_dir).from_pretrained(str(hf_dir), **kwargs)


def add_pointer(src_dir: str | Path, out_dir: str | Path, cell_px: int | None = None,
                joint: bool | None = None, seed: dict[str, torch.Tensor] | None = None,
                cell_keys: bool | None = None, extent: bool | None = None,
                readout: int | None = None) -> Path:
    """Write `src_dir` (a finers-tiny-style checkpoint with coordinate tokens) as a pointer
    checkpoint at `out_dir` with the current pointer settings: same weights, fresh weights for
    the pointer parts the source lacks (all of them for a stock checkpoint; the shift for a
    pointer checkpoint written before it existed). `joint`: make the pointer joint (True) or
    per-axis (False); None keeps the source's kind (per-axis for a stock source). Switching
    kind gives fresh key / query weights, or `seed`'s: a state dict with "key.weight",
    "key.bias", "query.weight", "query.bias" of one head (e.g. the training-only
    `batch.PointerHead`, which scores image tokens the same way), used where its shapes fit.
    `cell_keys`: add (True, zero-initialised) or drop (False) the learned per-cell key terms;
    None keeps the source's. `extent`: add (True, zero-initialised, so the model's outputs
    are unchanged) or drop (False) the learned extent; None keeps the source's. `readout`: give
    the pointer a readout of that many slots per axis (its output projection zero, so the
    outputs are unchanged), 0 drops it, None keeps the source's."""
    from transformers import AutoConfig, AutoTokenizer

    from finers_rt.train.checkpoint import copy_processor_files
    from finers_rt.train.model import COORD_MAX, coordinate_token_map

    src, out = Path(src_dir), Path(out_dir)
    config = AutoConfig.from_pretrained(str(src))
    coords = coordinate_token_map(AutoTokenizer.from_pretrained(str(src)))
    if not coords:
        raise ArtifactError(f"{src} has no coordinate tokens; the pointer needs them")
    old = getattr(config, POINTER_KEY, None) or {}
    if cell_px is None:
        vision = config.vision_config
        cell_px = old.get("cell_px") or vision.patch_size * vision.spatial_merge_size
    was_joint = bool(old.get("joint", False))
    joint = was_joint if joint is None else bool(joint)
    switched = bool(old) and joint != was_joint
    had_cells = bool(old.get("cell_keys", False))
    cell_keys = had_cells if cell_keys is None else bool(cell_keys)
    had_extent = bool(old.get("extent", False))
    extent = had_extent if extent is None else bool(extent)
    had_readout = int(old.get("readout", 0) or 0)
    readout = had_readout if readout is None else int(readout)
    if readout < 0:
        raise ArtifactError(f"pointer readout slots must be >= 0, got {readout}")
    # adding or dropping the extent or readout changes how many cells the value (and so the
    # per-cell key table) covers: the learned table is carried over row by row
    resized_cells = (extent != had_extent or readout != had_readout) and had_cells and cell_keys
    old_cell_key = _saved_cell_key(src) if resized_cells else None
    setattr(config, POINTER_KEY, pointer_settings(coords, cell_px, COORD_MAX, joint=joint,
                                                  cell_keys=cell_keys, extent=extent,
                                                  readout=readout))
    # a kind switch changes the key / query shapes: those two start fresh (or from `seed`)
    model = FinersPointerQwen2_5_VL.from_pretrained(
        str(src), config=config, dtype=torch.float32,
        ignore_mismatched_sizes=switched or readout != had_readout or resized_cells)
    if cell_keys and not had_cells:  # new parameters: zero, whatever the loader left there
        with torch.no_grad():
            model.pointer.cell_key.zero_()
    if old_cell_key is not None:  # the cells both tables cover keep their terms, new ones 0
        with torch.no_grad():
            table = model.pointer.cell_key
            n = min(table.shape[1], old_cell_key.shape[1])
            table.zero_()
            table[:, :n] = old_cell_key[:, :n].to(table.dtype)
    if extent and not had_extent:
        with torch.no_grad():
            for layer in (model.pointer.extent, model.pointer.extent_scale):
                layer.weight.zero_()
                layer.bias.zero_()
    if readout and readout != had_readout:  # new (or resized): the words' logits unchanged
        with torch.no_grad():
            head = model.pointer
            head.readout_out.weight.zero_()
            head.readout_scale.weight.zero_()
            head.readout_scale.bias.fill_(1.0)
            torch.nn.init.normal_(head.readout.weight, std=0.02)
            head.readout.bias.zero_()
    if seed is not None and joint:
        head = model.pointer
        with torch.no_grad():
            for name in ("key.weight", "key.bias", "query.weight", "query.bias"):
                target = head.get_parameter(name)
                if name not in seed or tuple(seed[name].shape) != tuple(target.shape):
                    raise ArtifactError(f"the pointer seed's '{name}' does not fit this model "
                                        f"(wants shape {tuple(target.shape)})")
                target.copy_(seed[name])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    copy_processor_files(src, out)
    return out


def _saved_cell_key(src: Path) -> torch.Tensor:
    """The per-cell key table [2, C, D] saved in checkpoint folder `src`."""
    from safetensors import safe_open

    files = sorted(src.glob("*.safetensors"))
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name.endswith("pointer.cell_key"):
                    return f.get_tensor(name)
    raise ArtifactError(f"{src} says it has per-cell pointer keys but no saved "
                        f"'pointer.cell_key' in {[p.name for p in files]}")


def decoder_step_for(model, kv_cache: str = "shared"):
    """The export wrapper of `model` for a K/V contract: a pointer step for pointer models, else
    None (the exporter's default step)."""
    if not isinstance(model, FinersPointerQwen2_5_VL):
        return None
    return SharedKvPointerStep(model) if kv_cache == "shared" else PointerDecoderStep(model)


class PointerDecoderStep(DecoderStep):
    """"concat" contract: `DecoderStep` + the pointer: one extra K/V pair (index
    num_hidden_layers, same per-pair shape [B, seq, KV, D]) in and out, and pointer-modified
    last-position logits. The LM's additive mask [B, 1, S, T] is the pointer's mask too."""

    def __init__(self, model):
        super().__init__(model)
        self.pointer = model.pointer
        self.num_kv_pairs = self.num_layers + 1

    def forward(self, inputs_embeds, position_ids, attention_mask, *past):
        h, new = self._layers(inputs_embeds, position_ids, attention_mask, past)
        hidden = self.lm.norm(h)  # [B, S, H]: every new token gets its pointer key
        pk, pv = pointer_kv(self.pointer, hidden, position_ids)
        keys = torch.cat([past[2 * self.num_layers], pk], dim=1)
        values = torch.cat([past[2 * self.num_layers + 1], pv], dim=1)
        last = hidden[:, -1:, :]
        logits = pointer_logits(self.pointer, last, self.lm_head(last), keys, values,
                                attention_mask[:, :, -1:, :])
        return (logits[:, 0, :], *new, pk, pv)


class SharedKvPointerStep(SharedKvDecoderStep):
    """"shared" contract: the pointer pair is read and written in place by one more
    GroupQueryAttention node (query heads = KV heads, heads 0/1 the x/y queries, no rotary),
    whose output for the last position IS the (column, row) distribution (one-hot values)."""

    def __init__(self, model):
        super().__init__(model)
        self.pointer = model.pointer
        self.num_kv_pairs = self.num_layers + 1

    def forward(self, inputs_embeds, position_ids, seqlens_k, total, *past):
        h, present = self._layers(inputs_embeds, position_ids, seqlens_k, total, past)
        hidden = self.lm.norm(h)
        bsz, seq = hidden.shape[0], hidden.shape[1]
        kv, dim = self.num_kv_heads, self.head_dim
        keys, values = pointer_kv(self.pointer, hidden, position_ids)  # [B, S, KV, D]
        q = pointer_heads(self.pointer, self.pointer.query, hidden).reshape(bsz, seq, 2 * dim)
        if kv > 2:
            q = torch.cat([q, q.new_zeros(bsz, seq, (kv - 2) * dim)], dim=-1)
        out, present_k, present_v = _GroupQueryAttention.apply(
            q, keys.reshape(bsz, seq, kv * dim), values.reshape(bsz, seq, kv * dim),
            past[2 * self.num_layers], past[2 * self.num_layers + 1], seqlens_k, total, kv, kv,
            float(dim ** -0.5))
        last = out[:, -1, :2 * dim].reshape(bsz, 2, 1, dim)  # heads 0 / 1 (x, y), last position
        p_axis, extent, readout = split_pointer_output(self.pointer, last)
        h_last = hidden[:, -1:, :]
        logits = self.lm_head(h_last) + pointer_bonus(self.pointer, h_last, p_axis, extent, readout)
        return (logits[:, 0, :], *present, present_k, present_v)
