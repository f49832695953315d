"""The Qwen2.5-VL vision tower at ONE fixed grid, as an export-friendly torch module.

HF's vision forward computes rotary angles, the window permutation and the attention segment
lengths from `grid_thw` at run time (data-dependent shapes). Here they are computed once, by HF's
own `rot_pos_emb` / `get_window_index`, and stored as constant buffers and Python lists, so the
traced graph is static. Attention runs per group of equal-length segments (windows or the whole
image) and, inside a group, in query chunks sized to bound the score matrix memory.

Graph: in `pixel_values` float32 [num_patches, 3*T*P*P] -> out `image_embeds` float32
[num_image_tokens, out_hidden], in the processor's token order (what HF scatters into
`<|image_pad|>` positions).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

SCORE_BUDGET_BYTES = 256 * 1024 * 1024  # largest fp32 attention score block built at once


def _segment_groups(cu_seqlens: list[int]) -> list[tuple[int, list[int]]]:
    """Group segments [cu[i], cu[i+1]) by length: [(length, [start, ...]), ...] sorted by length."""
    groups: dict[int, list[int]] = {}
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if end > start:
            groups.setdefault(end - start, []).append(start)
    return sorted(groups.items())


class _StaticSegments(nn.Module):
    """Gather indices that turn a [N, ...] sequence into padded-free groups [n_seg, L, ...].

    `gather_i` for group i is a LongTensor [n_seg_i * L_i]; `restore` maps the concatenation of
    all groups back to the original order [N].
    """

    def __init__(self, cu_seqlens: list[int]):
        super().__init__()
        self.groups = _segment_groups(cu_seqlens)
        order = []
        for i, (length, starts) in enumerate(self.groups):
            idx = torch.tensor([s + j for s in starts for j in range(length)], dtype=torch.long)
            self.register_buffer(f"gather_{i}", idx, persistent=False)
            order.append(idx)
        restore = torch.argsort(torch.cat(order))
        self.register_buffer("restore", restore, persistent=False)

    def gather(self, i: int) -> torch.Tensor:
        return getattr(self, f"gather_{i}")


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention of q [n, heads, Lq, d] over k, v [n, heads, Lk, d] (float32 softmax)."""
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling  # [n, heads, Lq, Lk]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)  # [n, heads, Lq, d]


class _MultiHeadAttention(torch.autograd.Function):
    """`com.microsoft::MultiHeadAttention` (ONNX Runtime contrib op, one fused kernel, no mask):
    q [n, Lq, heads*d], k / v [n, Lk, heads*d] -> [n, Lq, heads*d]. The torch forward is the
    reference used while tracing (`_attend`)."""

    @staticmethod
    def forward(ctx, q, k, v, heads: int, scaling: float):
        n, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        dim = q.shape[2] // heads
        qh, kh, vh = (t.reshape(n, t.shape[1], heads, dim).transpose(1, 2) for t in (q, k, v))
        return _attend(qh, kh, vh, scaling).transpose(1, 2).reshape(n, lq, heads * dim)

    @staticmethod
    def symbolic(g, q, k, v, heads, scaling):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads, scale_f=scaling)
        out.setType(q.type())
        return out


def _plain_attention(q, k, v, heads: int, scaling: float) -> torch.Tensor:
    """`_MultiHeadAttention`'s maths in plain ONNX ops (MatMul, Softmax): for runtimes without
    ONNX Runtime's contrib ops (TensorRT)."""
    return _MultiHeadAttention.forward(None, q, k, v, heads, scaling)


def _segmented_attention(q, k, v, segments: _StaticSegments, heads: int, dim: int,
                         scaling: float, fused: bool = True) -> torch.Tensor:
    """q, k, v [N, heads, dim] -> [N, heads, dim], attention only inside each segment: one
    attention per group of equal-length segments (batch = segments) and query chunk, as
    `com.microsoft::MultiHeadAttention` when `fused`, else in plain ONNX ops."""
    outs = []
    for i, (length, starts) in enumerate(segments.groups):
        idx = segments.gather(i)
        qg, kg, vg = (t.index_select(0, idx).reshape(len(starts), length, heads * dim)
                      for t in (q, k, v))  # [n_seg, L, heads*d]
        rows = max(1, SCORE_BUDGET_BYTES // (4 * len(starts) * heads * length))
        attend = _MultiHeadAttention.apply if fused else _plain_attention
        chunks = [attend(qg[:, r:r + rows], kg, vg, heads, scaling) for r in range(0, length, rows)]
        out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
        outs.append(out.reshape(len(starts) * length, heads, dim))
    merged = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    return merged.index_select(0, segments.restore)


class StaticVisionTower(nn.Module):
    """HF `Qwen2_5_VisionTransformerPretrainedModel` specialised to one `grid_thw` (shares weights).

    forward(pixel_values [num_patches, C*T*P*P] float32) -> image_embeds [num_patches/4, out_hidden].
    `fused_attention=False` writes attention in plain ONNX ops (portable, e.g. TensorRT).
    """

    def __init__(self, visual: nn.Module, grid_thw: tuple[int, int, int], fused_attention: bool = True):
        super().__init__()
        self.visual = visual
        self.fused_attention = bool(fused_attention)
        grid = torch.tensor([list(grid_thw)], dtype=torch.long)
        unit = visual.spatial_merge_unit
        with torch.no_grad():
            rotary = visual.rot_pos_emb(grid)  # [N, head_dim/2]
            window_index, cu_window = visual.get_window_index(grid)
        n = rotary.shape[0]
        rotary = rotary.reshape(n // unit, unit, -1)[window_index].reshape(n, -1)
        emb = torch.cat((rotary, rotary), dim=-1)  # [N, head_dim]
        self.register_buffer("cos", emb.cos()[:, None, :].float(), persistent=False)  # [N, 1, hd]
        self.register_buffer("sin", emb.sin()[:, None, :].float(), persistent=False)
        self.register_buffer("window_index", window_index.long(), persistent=False)
        self.register_buffer("reverse_index", torch.argsort(window_index).long(), persistent=False)
        cu_window = sorted(set(int(c) for c in cu_window))
        self.window_segments = _StaticSegments(cu_window)
        self.full_segments = _StaticSegments([0, n])
        self.full_blocks = set(int(i) for i in visual.fullatt_block_indexes)
        self.num_patches = n
        # the patch embedding is a Conv3d whose kernel equals its stride over one flattened patch:
        # the same dot products as ONE MatMul [N, C*T*P*P] x [C*T*P*P, hidden] (ORT's Conv3d is slow)
        proj = visual.patch_embed.proj
        weight = proj.weight.detach().float().reshape(proj.out_channels, -1)  # [hidden, C*T*P*P]
        self.register_buffer("patch_weight_t", weight.t().contiguous(), persistent=False)
        bias = None if proj.bias is None else proj.bias.detach().float()
        self.register_buffer("patch_bias", bias, persistent=False)

    def _attention(self, attn: nn.Module, x: torch.Tensor, segments: _StaticSegments) -> torch.Tensor:
        n = x.shape[0]
        qkv = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [N, heads, hd]
        q = q * self.cos + _rotate_half(q) * self.sin
        k = k * self.cos + _rotate_half(k) * self.sin
        out = _segmented_attention(q, k, v, segments, attn.num_heads, attn.head_dim, attn.scaling,
                                   self.fused_attention)
        return attn.proj(out.reshape(n, -1))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        unit = visual.spatial_merge_unit
        h = torch.matmul(pixel_values, self.patch_weight_t)  # [N, hidden] = visual.patch_embed
        if self.patch_bias is not None:
            h = h + self.patch_bias
        n, hidden = self.num_patches, h.shape[-1]
        h = h.reshape(n // unit, unit, hidden).index_select(0, self.window_index).reshape(n, hidden)
        for i, blk in enumerate(visual.blocks):
            segments = self.full_segments if i in self.full_blocks else self.window_segments
            h = h + self._attention(blk.attn, blk.norm1(h), segments)
            h = h + blk.mlp(blk.norm2(h))
        h = visual.merger(h)  # [N/unit, out_hidden]
        return h.index_select(0, self.reverse_index)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def export_vision(visual: nn.Module, grid_thw: tuple[int, int, int], path: str, opset: int,
                  fused_attention: bool = True) -> None:
    """Trace `StaticVisionTower(visual, grid_thw, fused_attention)` to ONNX at `path` (external
    data if > 2 GB)."""
    tower = StaticVisionTower(visual, grid_thw, fused_attention).eval()
    t, gh, gw = grid_thw
    patch_dim = visual.patch_embed.in_channels * visual.patch_embed.temporal_patch_size \
        * visual.patch_embed.patch_size ** 2
    example = torch.zeros(t * gh * gw, patch_dim, dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is deprecated but handles these static/dynamic graphs reliably
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(tower, (example,), path, input_names=["pixel_values"],
                          output_names=["image_embeds"], opset_version=opset, dynamo=False,
                          do_constant_folding=True)
