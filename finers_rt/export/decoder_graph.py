"""The Qwen2.5-VL language model as an export-friendly decoder step (embeddings in, last logits out).

Two K/V cache contracts (docs/bundle-format.md, manifest `kv_cache`):

`"shared"` (`SharedKvDecoderStep`, the default): one `com.microsoft::GroupQueryAttention` node per
layer reads and writes a preallocated `[batch, KV, max_len, D]` buffer in place (the runtime binds
`past_key_i` and `present_key_i` to the same memory), fused QKV and gate/up projections, M-RoPE
cos/sin computed once per step. See `SharedKvDecoderStep` for the interface.

`"concat"` (`DecoderStep`, format 1 bundles, portable to TensorRT): plain ONNX ops only. The wrapper
reuses the HF modules' weights and numerics (RMSNorm, M-RoPE rotary embedding, GQA, SiLU MLP) but
replaces HF's cache object and mask construction with plain tensors:

  in  inputs_embeds  float32 [batch, seq, H]
  in  position_ids   int64   [3, batch, seq]            M-RoPE (t, h, w) positions
  in  attention_mask float32 [batch, 1, seq, past+seq]  additive (0 attend, finfo.min masked)
  in  past_key_i / past_value_i float32 [batch, past, KV, D]   sequence-major cache of layer i
  out logits         float32 [batch, V]                 last position only
  out new_key_i / new_value_i float32 [batch, seq, KV, D]     K after rotary, V, new tokens only
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_multimodal_rotary_pos_emb


def decoder_io_names(num_kv_pairs: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of the decoder graph, in graph order."""
    past = [n for i in range(num_kv_pairs) for n in (f"past_key_{i}", f"past_value_{i}")]
    new = [n for i in range(num_kv_pairs) for n in (f"new_key_{i}", f"new_value_{i}")]
    return ["inputs_embeds", "position_ids", "attention_mask", *past], ["logits", *new]


class DecoderStep(nn.Module):
    """One prefill or decode step of the HF text model + lm_head with an explicit K/V cache.

    `num_kv_pairs` is the number of (past_key_i, past_value_i) graph inputs and (new_key_i,
    new_value_i) outputs; every pair has the same per-pair shape. For a stock model it is
    `num_hidden_layers` (pair i = layer i); a subclass that adds cached tensors of the same shape
    raises it. `forward` = rotary once, one `_layer` call per layer, then `_head`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lm = model.model.language_model
        self.lm_head = model.lm_head
        cfg = self.lm.config
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_pairs = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.mrope_section = list(cfg.rope_scaling["mrope_section"])

    def _layer(self, layer, h, cos, sin, mask, past_k, past_v):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        bsz, seq = x.shape[0], x.shape[1]
        q = attn.q_proj(x).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_multimodal_rotary_pos_emb(q, k, cos, sin, self.mrope_section)  # [B, h, S, D]
        new_k, new_v = k.transpose(1, 2), v.transpose(1, 2)  # [B, S, KV, D]
        k_all = torch.cat([past_k, new_k], dim=1).transpose(1, 2)  # [B, KV, T, D]
        v_all = torch.cat([past_v, new_v], dim=1).transpose(1, 2)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k_all = k_all.repeat_interleave(groups, dim=1)  # [B, heads, T, D]
            v_all = v_all.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k_all.transpose(2, 3)) * attn.scaling + mask  # [B, heads, S, T]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v_all).transpose(1, 2).reshape(bsz, seq, -1)  # [B, S, heads*D]
        h = h + attn.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, new_k, new_v

    def _layers(self, inputs_embeds, position_ids, attention_mask, past):
        """The LM layers over `past` (pairs 0..L-1): (last hidden state, [new K, V per layer])."""
        cos, sin = self.lm.rotary_emb(inputs_embeds, position_ids)  # [3, B, S, D] each
        h = inputs_embeds
        new = []
        for i, layer in enumerate(self.lm.layers):
            h, nk, nv = self._layer(layer, h, cos, sin, attention_mask, past[2 * i], past[2 * i + 1])
            new += [nk, nv]
        return h, new

    def forward(self, inputs_embeds, position_ids, attention_mask, *past):
        h, new = self._layers(inputs_embeds, position_ids, attention_mask, past)
        return (self._head(h), *new)

    def _head(self, h):
        """Final norm + lm_head on the last position: [B, S, H] -> logits [B, V]."""
        last = self.lm.norm(h[:, -1:, :])  # [B, 1, H]
        return self.lm_head(last)[:, 0, :]  # [B, V]


class _GroupQueryAttention(torch.autograd.Function):
    """`com.microsoft::GroupQueryAttention` (ONNX Runtime contrib op), causal, no rotary inside.

    q [B, S, N*D], k / v [B, S, KV*D] (rotary applied), past_k / past_v [B, KV, P, D],
    seqlens_k int32 [B] (= past length + S - 1), total int32 [] (= past length + S).
    Returns (out [B, S, N*D], present_k, present_v [B, KV, P+S, D]). The torch forward is the
    reference used while tracing; ORT runs the fused kernel, which with past and present bound to
    ONE buffer of max_len positions writes the new K/V at [past, past+S) in place.
    """

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total, num_heads: int, kv_heads: int, scale: float):
        bsz, seq = q.shape[0], q.shape[1]
        dim = past_k.shape[-1]
        k_all = torch.cat([past_k, k.view(bsz, seq, kv_heads, dim).transpose(1, 2)], dim=2)  # [B, KV, T, D]
        v_all = torch.cat([past_v, v.view(bsz, seq, kv_heads, dim).transpose(1, 2)], dim=2)
        groups = num_heads // kv_heads
        qh = q.view(bsz, seq, num_heads, dim).transpose(1, 2)  # [B, N, S, D]
        keys, values = k_all.repeat_interleave(groups, dim=1), v_all.repeat_interleave(groups, dim=1)
        scores = torch.matmul(qh, keys.transpose(2, 3)) * scale  # [B, N, S, T]
        total_len, past = k_all.shape[2], k_all.shape[2] - seq
        causal = torch.arange(total_len)[None, :] > (past + torch.arange(seq))[:, None]
        probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        out = torch.matmul(probs, values).transpose(1, 2).reshape(bsz, seq, num_heads * dim)
        return out, k_all, v_all

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total, num_heads, kv_heads, scale):
        out, present_k, present_v = g.op(
            "com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k, total,
            num_heads_i=num_heads, kv_num_heads_i=kv_heads, scale_f=scale, outputs=3)
        out.setType(q.type())  # rank and dtype for the exporter's shape inference
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return out, present_k, present_v


class SharedKvDecoderStep(DecoderStep):
    """The decoder step of the "shared" K/V contract (format 2):

      in  inputs_embeds  float32 [batch, seq, H]
      in  position_ids   int64   [3, batch, seq]         M-RoPE (t, h, w) positions
      in  seqlens_k      int32   [batch]                 past + seq - 1 (filled length - 1)
      in  total_sequence_length int32 []                 past + seq
      in  past_key_i / past_value_i float32 [batch, KV, past_max, D]   head-major cache of pair i
      out logits         float32 [batch, V]              last position only
      out present_key_i / present_value_i float32 [batch, KV, present, D]

    Causal attention over the first `total_sequence_length` positions (no mask input). Bound to one
    buffer (past_max = present = max_len) the op writes the new K/V in place; fed plainly, `past`
    holds exactly the cached positions and `present` is past + new (used by validation).
    Per layer: RMSNorm, ONE QKV MatMul, rotary on q and k (cos/sin of v's heads are 1/0, exact),
    GroupQueryAttention, o_proj, RMSNorm, ONE gate/up MatMul, SiLU, down_proj.

    Extra K/V pairs (a subclass raising `num_kv_pairs`): the runtime binds `present_*_i` to the same
    memory as `past_*_i` for EVERY pair, so each extra present pair must also be produced by a
    GroupQueryAttention node (the only op here that writes into the bound buffer in place);
    otherwise export that model with kv_cache "concat".
    """

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.qkv = nn.ModuleList()
        self.gate_up = nn.ModuleList()
        for layer in self.lm.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.qkv.append(_fused_linear([attn.q_proj, attn.k_proj, attn.v_proj]))
            self.gate_up.append(_fused_linear([mlp.gate_proj, mlp.up_proj]))
        rotary = self.lm.rotary_emb
        dim, half = self.head_dim, self.head_dim // 2
        section = torch.cat([torch.full((n,), axis, dtype=torch.long)
                             for axis, n in enumerate(self.mrope_section)])  # [D/2] axis of each freq
        self.register_buffer("section_axis", section, persistent=False)  # [D/2]
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)  # [D/2]
        self.attention_scaling = float(rotary.attention_scaling)
        # per-column factors of the fused q|k|v output that give cos / sin on q and k columns and
        # (1, 0) on v columns (exact: x*1 + y*0 = x)
        heads = self.num_heads + 2 * self.num_kv_heads
        col = torch.arange(heads * dim)
        within = col % dim
        rotated = col < (self.num_heads + self.num_kv_heads) * dim
        # rotate_half of every q and k head as ONE Split + ONE Concat (halves swapped; the v block
        # passes through and gets sin 0): far cheaper in ORT than a Gather on the last axis
        self.rotary_halves = [half] * (2 * (self.num_heads + self.num_kv_heads)) + [self.num_kv_heads * dim]
        self.register_buffer("cos_keep", rotated.float(), persistent=False)
        self.register_buffer("cos_fill", (~rotated).float(), persistent=False)
        sign = torch.where(within < half, -1.0, 1.0)  # rotate_half's sign, folded into sin
        self.register_buffer("sin_sign", torch.where(rotated, sign, 0.0), persistent=False)

    def _rope(self, position_ids):
        """cos, sin [B, S, (heads+2*KV)*D] over the fused q|k|v columns: M-RoPE on q and k heads,
        (1, 0) on v heads; sin carries rotate_half's sign. Same values as HF's rotary_emb +
        apply_multimodal_rotary_pos_emb (elementwise, same products)."""
        pos = position_ids.float().index_select(0, self.section_axis)  # [D/2, B, S]
        freqs = pos.permute(1, 2, 0) * self.inv_freq  # [B, S, D/2]; HF's emb = cat(freqs, freqs)
        cos, sin = freqs.cos(), freqs.sin()  # cos / sin of each half of each head, computed once
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        halves = 2 * (self.num_heads + 2 * self.num_kv_heads)
        cos = cos.repeat(1, 1, halves) * self.cos_keep + self.cos_fill
        sin = sin.repeat(1, 1, halves) * self.sin_sign
        return cos, sin

    def _shared_layer(self, i, h, cos, sin, seqlens_k, total, past_k, past_v):
        """One layer on [B, S, H] with flat [B, S, heads*D] q|k|v (no reshapes, no shape ops)."""
        layer = self.lm.layers[i]
        attn = layer.self_attn
        qkv = self.qkv[i](layer.input_layernorm(h))  # [B, S, (heads+2*KV)*D]
        halves = qkv.split(self.rotary_halves, dim=-1)
        swapped = torch.cat([halves[j ^ 1] for j in range(len(halves) - 1)] + [halves[-1]], dim=-1)
        qkv = qkv * cos + swapped * sin
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                             self.num_kv_heads * self.head_dim], dim=-1)
        out, present_k, present_v = _GroupQueryAttention.apply(
            q, k, v, past_k, past_v, seqlens_k, total, self.num_heads, self.num_kv_heads, float(attn.scaling))
        h = h + attn.o_proj(out)
        gate, up = self.gate_up[i](layer.post_attention_layernorm(h)).chunk(2, dim=-1)
        h = h + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        return h, present_k, present_v

    def _layers(self, inputs_embeds, position_ids, seqlens_k, total, past):
        """The LM layers over `past` (pairs 0..L-1): (last hidden state, [present K, V per layer])."""
        cos, sin = self._rope(position_ids)
        h = inputs_embeds
        present = []
        for i in range(self.num_layers):
            h, pk, pv = self._shared_layer(i, h, cos, sin, seqlens_k, total, past[2 * i], past[2 * i + 1])
            present += [pk, pv]
        return h, present

    def forward(self, inputs_embeds, position_ids, seqlens_k, total, *past):
        h, present = self._layers(inputs_embeds, position_ids, seqlens_k, total, past)
        return (self._head(h), *present)

    def io_names(self) -> tuple[list[str], list[str]]:
        past = [n for i in range(self.num_kv_pairs) for n in (f"past_key_{i}", f"past_value_{i}")]
        present = [n for i in range(self.num_kv_pairs) for n in (f"present_key_{i}", f"present_value_{i}")]
        return ["inputs_embeds", "position_ids", "seqlens_k", "total_sequence_length", *past], ["logits", *present]

    def example_inputs(self):
        """(args, input names, output names, dynamic axes) for tracing."""
        bsz, seq, past = 1, 3, 2
        embeds = torch.randn(bsz, seq, self.lm.config.hidden_size)
        pos = torch.arange(past, past + seq).view(1, 1, seq).expand(3, bsz, seq).contiguous()
        seqlens = torch.full((bsz,), past + seq - 1, dtype=torch.int32)
        total = torch.tensor(past + seq, dtype=torch.int32)
        kv = [torch.randn(bsz, self.num_kv_heads, past, self.head_dim) for _ in range(2 * self.num_kv_pairs)]
        in_names, out_names = self.io_names()
        axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "position_ids": {1: "batch", 2: "seq"},
                "seqlens_k": {0: "batch"}, "logits": {0: "batch"}}
        axes.update({n: {0: "batch", 2: "past"} for n in in_names[4:]})
        axes.update({n: {0: "batch", 2: "present"} for n in out_names[1:]})
        return (embeds, pos, seqlens, total, *kv), in_names, out_names, axes


def _fused_linear(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the concatenation of `linears`' outputs (same weights)."""
    fused = nn.Linear(linears[0].in_features, sum(l.out_features for l in linears),
                      bias=linears[0].bias is not None)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([l.weight for l in linears], dim=0))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([l.bias for l in linears], dim=0))
    return fused


KV_CACHES = ("shared", "concat")


def export_decoder(model: nn.Module, path: str, opset: int, step: DecoderStep | None = None,
                   kv_cache: str = "shared") -> None:
    """Trace `step` (default: `SharedKvDecoderStep(model)` for kv_cache "shared", `DecoderStep(model)`
    for "concat") to ONNX at `path` with dynamic batch / seq / past."""
    if kv_cache not in KV_CACHES:
        raise ValueError(f"unknown kv_cache '{kv_cache}', expected one of {list(KV_CACHES)}")
    if step is None:
        step = SharedKvDecoderStep(model) if kv_cache == "shared" else DecoderStep(model)
    step = step.eval()
    if isinstance(step, SharedKvDecoderStep):
        args, in_names, out_names, axes = step.example_inputs()
    else:
        args, in_names, out_names, axes = _concat_example_inputs(step)
    _trace(step, args, path, in_names, out_names, axes, opset)


def _concat_example_inputs(step: DecoderStep):
    """(args, input names, output names, dynamic axes) of the "concat" contract."""
    cfg = step.lm.config
    bsz, seq, past = 1, 3, 2
    embeds = torch.randn(bsz, seq, cfg.hidden_size)
    pos = torch.arange(past, past + seq).view(1, 1, seq).expand(3, bsz, seq).contiguous()
    mask = torch.zeros(bsz, 1, seq, past + seq)
    kv = [torch.randn(bsz, past, step.num_kv_heads, step.head_dim) for _ in range(2 * step.num_kv_pairs)]
    in_names, out_names = decoder_io_names(step.num_kv_pairs)
    axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "position_ids": {1: "batch", 2: "seq"},
            "attention_mask": {0: "batch", 2: "seq", 3: "total"}, "logits": {0: "batch"}}
    axes.update({n: {0: "batch", 1: "past"} for n in in_names[3:]})
    axes.update({n: {0: "batch", 1: "seq"} for n in out_names[1:]})
    return (embeds, pos, mask, *kv), in_names, out_names, axes


def _trace(step, args, path, in_names, out_names, axes, opset) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is deprecated but handles these static/dynamic graphs reliably
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(step, args, path, input_names=in_names,
                          output_names=out_names, dynamic_axes=axes, opset_version=opset,
                          dynamo=False, do_constant_folding=True)
