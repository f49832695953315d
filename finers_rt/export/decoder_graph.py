"""The Qwen2.5-VL language model as an export-friendly decoder step (embeddings in, last logits out).

The wrapper reuses the HF modules' weights and numerics (RMSNorm, M-RoPE rotary embedding, GQA,
SiLU MLP) but replaces HF's cache object and mask construction with plain tensors:

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

    def forward(self, inputs_embeds, position_ids, attention_mask, *past):
        cos, sin = self.lm.rotary_emb(inputs_embeds, position_ids)  # [3, B, S, D] each
        h = inputs_embeds
        new = []
        for i, layer in enumerate(self.lm.layers):
            h, nk, nv = self._layer(layer, h, cos, sin, attention_mask, past[2 * i], past[2 * i + 1])
            new += [nk, nv]
        return (self._head(h), *new)

    def _head(self, h):
        """Final norm + lm_head on the last position: [B, S, H] -> logits [B, V]."""
        last = self.lm.norm(h[:, -1:, :])  # [B, 1, H]
        return self.lm_head(last)[:, 0, :]  # [B, V]


def export_decoder(model: nn.Module, path: str, opset: int, step: DecoderStep | None = None) -> None:
    """Trace `step` (default `DecoderStep(model)`) to ONNX at `path` with dynamic batch / seq / past."""
    step = (step or DecoderStep(model)).eval()
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
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is deprecated but handles these static/dynamic graphs reliably
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(step, (embeds, pos, mask, *kv), path, input_names=in_names,
                          output_names=out_names, dynamic_axes=axes, opset_version=opset,
                          dynamo=False, do_constant_folding=True)
