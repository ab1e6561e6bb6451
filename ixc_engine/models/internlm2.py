"""InternLM2 backbone with Partial LoRA (PLoRA) on image positions, over packed variable-length tokens.

Module and parameter names mirror the checkpoint (`model.layers.{i}.attention.wqkv.Plora_A.weight`, ...), so loading
is a plain name match. Tokens of all sequences are packed along dim 0 (`[T, H]`, no padding); the per-batch
`ForwardContext` says where each sequence starts, which positions are image tokens and where K/V pages live.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ixc_engine.config import ModelConfig


@dataclass(slots=True)
class KVCache:
    """Paged K/V storage for all layers: `k[layer]` is `[num_blocks, block_size, Hkv, D]`."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block_size: int


@dataclass(slots=True)
class ForwardContext:
    """What one packed forward needs besides the embeddings (built by the runner, read-only here).

    cu_seqlens: int32 [B+1] offsets of each sequence's NEW tokens in the packed batch.
    positions: int64 [T] absolute position of each new token (prefix_len + j).
    seq_lens_total: python ints, prefix + new tokens per sequence (decides the RoPE base).
    image_index: int64 [n_img] packed positions whose im_mask is true (PLoRA rows); None if there are none.
    kv_cache / block_tables / prefix_lens / slot_mapping: paged cache, set when K/V are cached or reused.
    backend: "torch" (reference ops) or "triton" (fused kernels; CUDA or the interpreter).
    parents: training's in-batch prefix sharing (no cache, autograd on): per sequence None, or (a, P) when its first
      P positions are those of the earlier sequence a of this batch, whose K/V it then attends to (positions of its
      new tokens start at P). Chosen and rejected replies of a preference pair share their prompt this way.
    """

    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    seq_lens_total: list[int]
    new_lens: list[int]
    image_index: torch.Tensor | None = None
    kv_cache: KVCache | None = None
    block_tables: torch.Tensor | None = None
    prefix_lens: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None
    backend: str = "torch"
    attn_plan: object = None  # built by the first layer, reused by the others (Triton backend)
    empty_prefix: tuple | None = None
    parents: list[tuple[int, int] | None] | None = None
    metadata_checked: bool = False  # the runner built cu_seqlens/block_tables/prefix_lens: skip the value checks (sync)

    @property
    def has_prefix(self) -> bool:
        return self.prefix_lens is not None and any(t > n for t, n in zip(self.seq_lens_total, self.new_lens))


class RMSNorm(nn.Module):
    """InternLM2 RMSNorm: normalize in fp32, cast back to the input dtype, then scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class PLoRALinear(nn.Module):
    """y = W x, plus B(A(x)) * scale on image positions only (`image_index`)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.Plora_A = nn.Linear(in_features, rank, bias=False)
        self.Plora_B = nn.Linear(rank, out_features, bias=False)
        self.scale = scale
        self.fused: torch.Tensor | None = None  # [out, rank + in]: B and W side by side (see fuse_b)
        self.b_first = True

    @torch.no_grad()
    def fuse_b(self, b_first: bool = True) -> None:
        """Store B next to W in one [out, rank + in] tensor ([B | W], or [W | B]) so that one GEMM over the row
        [a | x] (or [x | a]) gives W x + B a. `weight` and `Plora_B.weight` become views of it: names, loading and
        values are unchanged; the old storage is freed (one linear's worth of extra memory while it runs)."""
        if self.fused is not None:
            return
        w, b = self.weight, self.Plora_B.weight
        out, inp = w.shape
        r = b.shape[1]
        cat = torch.empty((out, r + inp), dtype=w.dtype, device=w.device)
        wv, bv = (cat[:, r:], cat[:, :r]) if b_first else (cat[:, :inp], cat[:, inp:])
        wv.copy_(w)
        bv.copy_(b)
        self.weight = nn.Parameter(wv, requires_grad=w.requires_grad)
        self.Plora_B.weight = nn.Parameter(bv, requires_grad=b.requires_grad)
        self.fused, self.b_first = cat, b_first

    def forward(self, x: torch.Tensor, image_index: torch.Tensor | None, fused: tuple | None = None) -> torch.Tensor:
        if fused is not None:  # the GPU path's layout: fused = (window, a_out, mask), see _plora_gemm
            return _plora_gemm(self, fused[0], x, fused[1], fused[2], image_index)
        y = F.linear(x, self.weight)
        if image_index is not None and image_index.numel():
            ranges = _row_ranges(image_index) if x.device.type == "cpu" and not torch.is_grad_enabled() else None
            if ranges is not None:  # image rows come in a few runs: views and in-place adds, no gather or scatter
                for a, b in ranges:
                    y[a:b].addmm_(self.Plora_A(x[a:b]), self.Plora_B.weight.t(), alpha=self.scale)
                return y
            delta = self.Plora_B(self.Plora_A(x.index_select(0, image_index)))
            if self.scale != 1.0:
                delta = delta * self.scale
            y = y.index_add(0, image_index, delta)
        return y


def _row_ranges(index: torch.Tensor, max_runs: int = 64) -> list[tuple[int, int]] | None:
    """Sorted unique row indices as [start, end) runs, or None when they are not sorted or form too many runs."""
    if index.numel() == 1:
        i = int(index)
        return [(i, i + 1)]
    step = torch.diff(index)
    if bool((step <= 0).any()):
        return None
    breaks = (step != 1).nonzero().flatten().tolist()
    if len(breaks) >= max_runs:
        return None
    starts = [0] + [b + 1 for b in breaks]
    ends = [b + 1 for b in breaks] + [index.numel()]
    return [(int(index[s]), int(index[e - 1]) + 1) for s, e in zip(starts, ends)]


def rope_cos_sin(positions: torch.Tensor, bases: torch.Tensor, head_dim: int, dtype: torch.dtype):
    """cos/sin `[T, D]` for NeoX-style RoPE; `bases` is the per-token base (dynamic NTK is per sequence)."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (bases.float()[:, None] ** exponent[None, :])  # [T, D/2]
    freqs = positions.float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[T, heads, D]`; rotate_half over the two halves of D."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def varlen_causal_attention_ref(q, k, v, cu_seqlens: list[int], scale: float,
                                parents: list[tuple[int, int] | None] | None = None) -> torch.Tensor:
    """Per-sequence causal SDPA over packed tokens (q `[T, Hq, D]`, k/v `[T, Hkv, D]`); GQA by head repetition.

    parents (see ForwardContext): sequence b with (a, P) attends to the first P keys/values of sequence a, then
    causally to its own. split/cat (not slice assignment) so that the backward does not build a full-size gradient
    per sequence; the shared prefix's K/V get the gradients of every sequence that reads them.
    """
    lens = [e - s for s, e in itertools.pairwise(cu_seqlens)]
    groups = q.shape[1] // k.shape[1]
    ks, vs = k.split(lens), v.split(lens)
    outs = []
    for b, (qb, kb, vb) in enumerate(zip(q.split(lens), ks, vs)):
        if qb.shape[0] == 0:
            outs.append(qb)
            continue
        parent = parents[b] if parents is not None else None
        mask = None
        if parent is not None:
            a, p = parent
            if not (0 <= a < b and 0 < p <= lens[a]):
                raise ValueError(f"sequence {b}: parent {parent} must be an earlier sequence with >= P tokens")
            kb, vb = torch.cat([ks[a][:p], kb]), torch.cat([vs[a][:p], vb])
            n = qb.shape[0]  # new token i sees the P prefix keys and its own tokens 0..i
            mask = torch.arange(p + n, device=q.device)[None, :] <= p + torch.arange(n, device=q.device)[:, None]
        if torch.is_grad_enabled() or groups == 1:
            kb = kb.transpose(0, 1).repeat_interleave(groups, dim=0)
            vb = vb.transpose(0, 1).repeat_interleave(groups, dim=0)
            gqa = {}
        else:  # inference: SDPA shares each K/V head with its query group, no repeated copy
            kb, vb, gqa = kb.transpose(0, 1), vb.transpose(0, 1), {"enable_gqa": True}
        ob = F.scaled_dot_product_attention(qb.transpose(0, 1)[None], kb[None], vb[None], attn_mask=mask,
                                            is_causal=mask is None, scale=scale, **gqa)
        outs.append(ob[0].transpose(0, 1))
    return torch.cat(outs)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rank: int) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.groups = cfg.num_kv_groups
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.wqkv = PLoRALinear(cfg.hidden_size, qkv_out, rank, cfg.plora_scale)
        self.wo = PLoRALinear(self.num_heads * self.head_dim, cfg.hidden_size, rank, cfg.plora_scale)

    def forward(self, x, cos, sin, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
        T = x.shape[0]
        # wqkv rows are grouped per KV head: [q_0..q_{g-1}, k, v] blocks of head_dim rows for each of the Hkv groups.
        qkv = self.wqkv(x, ctx.image_index).view(T, self.num_kv_heads, self.groups + 2, self.head_dim)
        q = qkv[:, :, : self.groups].reshape(T, self.num_heads, self.head_dim)
        k = qkv[:, :, -2]
        v = qkv[:, :, -1]
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        scale = self.head_dim**-0.5
        attn = _attention(q, k, v, ctx, layer_idx, scale)
        return self.wo(attn.reshape(T, self.num_heads * self.head_dim), ctx.image_index)


def _attention(q, k, v, ctx: ForwardContext, layer_idx: int, scale: float, out=None) -> torch.Tensor:
    from ixc_engine.kernels.paged_attention import (
        paged_prefix_attention,
        plan_paged_prefix_attention,
        write_kv_cache,
    )

    cache = ctx.kv_cache
    if cache is not None and ctx.slot_mapping is not None:
        write_kv_cache(k, v, cache.k[layer_idx], cache.v[layer_idx], ctx.slot_mapping, backend=ctx.backend)
    if ctx.parents is not None and ctx.has_prefix:
        raise ValueError("in-batch prefix parents and a paged KV cache prefix cannot be combined")
    if not ctx.has_prefix and (ctx.backend != "triton" or q.requires_grad or ctx.parents is not None):
        # the Triton kernel has no backward and no in-batch parents: training takes the differentiable SDPA path
        o = varlen_causal_attention_ref(q, k, v, ctx.cu_seqlens.tolist(), scale, ctx.parents)
        return o if out is None else out.copy_(o)
    if ctx.has_prefix:
        kc, vc, tables, prefix = cache.k[layer_idx], cache.v[layer_idx], ctx.block_tables, ctx.prefix_lens
    else:  # varlen causal attention: the same kernel with empty prefixes (metadata made once per forward)
        if ctx.empty_prefix is None:
            n = ctx.cu_seqlens.shape[0] - 1
            ctx.empty_prefix = (q.new_empty((1, 16, k.shape[1], k.shape[2])),
                                torch.zeros((n, 1), dtype=torch.int32, device=q.device),
                                torch.zeros(n, dtype=torch.int32, device=q.device))
        kc, tables, prefix = ctx.empty_prefix
        vc = kc
    if ctx.backend == "triton" and ctx.attn_plan is None:  # one metadata check + work table for all layers
        ctx.attn_plan = plan_paged_prefix_attention(q, k, v, kc, vc, tables, prefix, ctx.cu_seqlens, scale=scale,
                                                    check_values=not ctx.metadata_checked)
    # host copies of the lengths: read only on meta tensors (bench/roofline.py), which carry no values
    prefix_host = [t - n for t, n in zip(ctx.seq_lens_total, ctx.new_lens)] if ctx.has_prefix else None
    prefix_host = prefix_host or [0] * len(ctx.new_lens)
    return paged_prefix_attention(q, k, v, kc, vc, tables, prefix, ctx.cu_seqlens, scale=scale, backend=ctx.backend,
                                  plan=ctx.attn_plan, host_lens=(ctx.new_lens, prefix_host), out=out)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, rank: int) -> None:
        super().__init__()
        self.w1 = PLoRALinear(cfg.hidden_size, cfg.intermediate_size, rank, cfg.plora_scale)
        self.w3 = PLoRALinear(cfg.hidden_size, cfg.intermediate_size, rank, cfg.plora_scale)
        self.w2 = PLoRALinear(cfg.intermediate_size, cfg.hidden_size, rank, cfg.plora_scale)

    def forward(self, x: torch.Tensor, image_index: torch.Tensor | None) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x, image_index)) * self.w3(x, image_index), image_index)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rank: int) -> None:
        super().__init__()
        self.attention = Attention(cfg, rank)
        self.feed_forward = FeedForward(cfg, rank)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, ctx: ForwardContext, layer_idx: int, fused: tuple | None = None):
        """fused = (previous layer's output not yet added, PLoRA row mask): the GPU path's fused layer, which returns
        (residual stream, this layer's output); see _fused_layer."""
        if fused is not None:
            return _fused_layer(self, x, fused[0], cos, sin, ctx, layer_idx, fused[1])
        x = x + self.attention(self.attention_norm(x), cos, sin, ctx, layer_idx)
        return x + self.feed_forward(self.ffn_norm(x), ctx.image_index)


class InternLM2Model(nn.Module):
    """Embeddings, decoder layers and the final norm (applied by the score kernel, not here)."""

    def __init__(self, cfg: ModelConfig, rank: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rank) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def rope_tables(self, ctx: ForwardContext, dtype: torch.dtype):
        device = ctx.positions.device
        bases = [self.cfg.rope_base(total) for total in ctx.seq_lens_total]
        if all(b == bases[0] for b in bases):
            per_token = torch.full((ctx.positions.shape[0],), bases[0], dtype=torch.float64, device=device)
        else:
            # built on the host (its lengths are host ints) and copied without a stream sync
            per_token = torch.repeat_interleave(torch.tensor(bases, dtype=torch.float64), torch.tensor(ctx.new_lens))
            if device.type == "cuda":
                per_token = per_token.pin_memory()
            per_token = per_token.to(device, non_blocking=True)
        return rope_cos_sin(ctx.positions, per_token, self.cfg.head_dim, dtype)

    def fuse_for_inference(self) -> None:
        """Lay out the PLoRA weights for the GPU path's fused forward (see `_fused_layer`); the torch path and
        training use the same parameters unchanged (they become views)."""
        for layer in self.layers:
            att, ffn = layer.attention, layer.feed_forward
            for lin in (att.wqkv, att.wo, ffn.w1, ffn.w2):
                lin.fuse_b(b_first=True)
            ffn.w3.fuse_b(b_first=False)

    def forward(self, embeds: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """embeds `[T, H]` -> last layer's hidden states `[T, H]` (before the final norm)."""
        cos, sin = self.rope_tables(ctx, embeds.dtype)
        if self._fused_path(embeds, ctx):
            return self._forward_fused(embeds, cos, sin, ctx)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, ctx, i)
        return x

    def _fused_path(self, embeds: torch.Tensor, ctx: ForwardContext) -> bool:
        """The fused kernels have no backward and no in-batch parents: inference on the Triton backend only."""
        return (ctx.backend == "triton" and ctx.parents is None and not torch.is_grad_enabled()
                and all(layer.attention.wqkv.fused is not None for layer in self.layers))

    def _forward_fused(self, embeds: torch.Tensor, cos, sin, ctx: ForwardContext) -> torch.Tensor:
        t = embeds.shape[0]
        idx = ctx.image_index
        n_img = 0 if idx is None else idx.shape[0]
        mask = None
        if n_img and 2 * n_img >= t:
            # Mostly image rows (a corpus of photos): PLoRA on every row, with A x zeroed on text rows, is one GEMM
            # over [A x | x] per linear and needs no gather or scatter; B times a zero row adds exactly nothing.
            scale = self.layers[0].attention.wqkv.scale
            mask = torch.zeros((t, 1), dtype=embeds.dtype, device=embeds.device).index_fill_(0, idx, scale)
        x, delta = embeds, None
        for i, layer in enumerate(self.layers):
            x, delta = layer(x, cos, sin, ctx, i, fused=(delta, mask))
        return x + delta


def _plora_gemm(lin: PLoRALinear, window, xin, a_out, mask, image_index):
    """W x + B A x on image rows, for the fused forward.

    Dense (mask given, [T, 1] = scale on image rows, 0 elsewhere): a = (A x) * mask is written into a_out, the column
    window next to x in `window` ([a | x] or [x | a], matching lin.fused), then one GEMM of window by lin.fused.
    Otherwise W x, plus B A x added in place on the image rows (gathered) when there are any."""
    if mask is not None:
        torch.mm(xin, lin.Plora_A.weight.t(), out=a_out)
        a_out.mul_(mask)
        return F.linear(window, lin.fused)
    y = F.linear(xin, lin.weight)
    if image_index is not None and image_index.numel():
        delta = lin.Plora_B(lin.Plora_A(xin.index_select(0, image_index)))
        y.index_add_(0, image_index, delta if lin.scale == 1.0 else delta * lin.scale)
    return y


def _fused_layer(layer: DecoderLayer, x, delta, cos, sin, ctx: ForwardContext, layer_idx: int, mask):
    """One decoder layer on the GPU path: returns (residual stream, this layer's FFN output not yet added).

    The residual add of the previous layer's output is fused into this layer's first RMSNorm; each norm writes its
    rows next to the PLoRA A product they feed ([a | n] buffers), SiLU*mul writes next to w2's A product, attention
    next to wo's, so the PLoRA B product comes out of the base GEMM (see _plora_gemm)."""
    from ixc_engine.kernels.add_rms_norm import add_rms_norm
    from ixc_engine.kernels.rope import rope_qk
    from ixc_engine.kernels.silu_mul import silu_mul

    att, ffn = layer.attention, layer.feed_forward
    be, idx = ctx.backend, ctx.image_index
    t, h = x.shape
    r = att.wqkv.Plora_A.weight.shape[0]
    buf = x.new_empty((t, r + h))
    x, n = add_rms_norm(x, delta, layer.attention_norm.weight, layer.attention_norm.eps, out=buf[:, r:], backend=be)
    qkv = att.wqkv(n, idx, fused=(buf, buf[:, :r], mask)).view(t, att.num_kv_heads, att.groups + 2, att.head_dim)
    q, k = rope_qk(qkv, cos, sin, backend=be)
    hq_d = att.num_heads * att.head_dim
    obuf = x.new_empty((t, r + hq_d))
    o = obuf[:, r:]
    _attention(q, k, qkv[:, :, -1], ctx, layer_idx, att.head_dim**-0.5, out=o.view(t, att.num_heads, att.head_dim))
    d_att = att.wo(o, idx, fused=(obuf, obuf[:, :r], mask))

    fbuf = x.new_empty((t, r + h + r))  # [a1 | n | a3]: w1 reads [a1 | n], w3 reads [n | a3]
    x, n = add_rms_norm(x, d_att, layer.ffn_norm.weight, layer.ffn_norm.eps, out=fbuf[:, r:r + h], backend=be)
    y1 = ffn.w1(n, idx, fused=(fbuf[:, :r + h], fbuf[:, :r], mask))
    y3 = ffn.w3(n, idx, fused=(fbuf[:, r:], fbuf[:, r + h:], mask))
    inter = y1.shape[1]
    gbuf = x.new_empty((t, r + inter))
    g = silu_mul(y1, y3, out=gbuf[:, r:], backend=be)
    return x, ffn.w2(g, idx, fused=(gbuf, gbuf[:, :r], mask))
