"""Fused NeoX RoPE for the query and key heads of InternLM2's packed wqkv output, in one launch.

qkv is the [T, Hkv, G + 2, D] view of the projection (per KV group: G query heads, then the key, then the value head).
Slots 0..G (queries and key) are rotated, the value slot is left alone:

    out[:D/2] = x1 * cos - x2 * sin,   out[D/2:] = x2 * cos + x1 * sin        (x1, x2: the two halves of D)

with cos/sin the [T, D] tables of models/internlm2.rope_cos_sin (both halves equal). Computed in fp32 and rounded once
(torch's reference rounds each product and the sum: the two differ by bf16 rounding, not at all in fp32). Returns q
[T, Hkv * G, D] and k [T, Hkv, D], contiguous. Inference only (no backward): training runs the torch reference.
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend
from ._meta import is_meta, nbytes, record_launch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None


def rope_qk_ref(qkv, cos, sin):
    """q, k rotated exactly as models/internlm2.apply_rope does it."""
    t, hkv, slots, d = qkv.shape
    g = slots - 2
    half = d // 2

    def rot(x):
        return x * cos[:, None, :] + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin[:, None, :]

    q = rot(qkv[:, :, :g].reshape(t, hkv * g, d))
    k = rot(qkv[:, :, g])
    return q, k


if triton is not None:

    @triton.jit(do_not_specialize=["n_rows"])
    def _rope_qk_kernel(x_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, n_rows,
                        stride_xt, stride_xh, stride_xs, stride_ct, stride_st,
                        GROUP: tl.constexpr, SLOTS_PAD: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr):
        # Program = (BLOCK_T tokens, one KV group): slots 0..GROUP-1 are queries, slot GROUP the key.
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        hkv = tl.program_id(1)
        n_kv = tl.num_programs(1)
        sl = tl.arange(0, SLOTS_PAD)
        j = tl.arange(0, HALF)
        rmask = rows < n_rows
        r64 = rows.to(tl.int64)
        m = rmask[:, None, None] & (sl <= GROUP)[None, :, None]
        base = x_ptr + r64[:, None, None] * stride_xt + hkv * stride_xh + sl[None, :, None] * stride_xs
        x1 = tl.load(base + j[None, None, :], mask=m, other=0.0)
        dt = x1.dtype
        x1 = x1.to(tl.float32)
        x2 = tl.load(base + HALF + j[None, None, :], mask=m, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + r64[:, None] * stride_ct + j[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + r64[:, None] * stride_st + j[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        o1 = (x1 * c[:, None, :] - x2 * s[:, None, :]).to(dt)
        o2 = (x2 * c[:, None, :] + x1 * s[:, None, :]).to(dt)
        # q out [T, Hkv, GROUP, D] contiguous; k out [T, Hkv, D]
        qm = rmask[:, None, None] & (sl < GROUP)[None, :, None]
        qb = q_ptr + r64[:, None, None] * (n_kv * GROUP * 2 * HALF) + (hkv * GROUP + sl[None, :, None]) * (2 * HALF)
        tl.store(qb + j[None, None, :], o1, mask=qm)
        tl.store(qb + HALF + j[None, None, :], o2, mask=qm)
        km = rmask[:, None, None] & (sl == GROUP)[None, :, None]
        kb = k_ptr + r64[:, None, None] * (n_kv * 2 * HALF) + hkv * (2 * HALF) + 0 * sl[None, :, None]
        tl.store(kb + j[None, None, :], o1, mask=km)
        tl.store(kb + HALF + j[None, None, :], o2, mask=km)


def _block_t(on_gpu: bool) -> int:
    return 4 if on_gpu else 64


def rope_qk(qkv, cos, sin, *, backend: str = "auto"):
    """(q [T, Hkv*G, D], k [T, Hkv, D]) from the [T, Hkv, G+2, D] projection view and [T, D] cos/sin tables."""
    if qkv.dim() != 4 or qkv.shape[2] < 3 or qkv.stride(3) != 1:
        raise ValueError(f"qkv must be [T, Hkv, G+2, D] with unit stride on D, got shape {tuple(qkv.shape)}")
    t, hkv, slots, d = qkv.shape
    g = slots - 2
    if d % 2 or cos.shape != (t, d) or sin.shape != (t, d) or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError(f"cos/sin must be [T, D] = [{t}, {d}] with unit column stride and D even, got "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    q = torch.empty((t, hkv * g, d), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((t, hkv, d), dtype=qkv.dtype, device=qkv.device)
    if is_meta(qkv):  # reads the query and key slots and the tables, writes q and k
        record_launch("rope_qk", flops=0, nbytes=2 * nbytes(q, k) + nbytes(cos, sin))
        return q, k
    half = d // 2
    unsupported = None if half & (half - 1) == 0 else f"head dim {d} (the kernel takes D/2 a power of two)"
    backend = resolve_backend("rope_qk", backend, globals().get("_rope_qk_kernel"), qkv.device, unsupported)
    if backend == "torch":
        rq, rk = rope_qk_ref(qkv, cos, sin)
        return q.copy_(rq), k.copy_(rk)
    if t == 0:
        return q, k
    bt = _block_t(qkv.is_cuda)
    _rope_qk_kernel[(triton.cdiv(t, bt), hkv)](
        qkv, cos, sin, q, k, t, qkv.stride(0), qkv.stride(1), qkv.stride(2), cos.stride(0), sin.stride(0),
        GROUP=g, SLOTS_PAD=triton.next_power_of_2(g + 1), HALF=half, BLOCK_T=bt, num_warps=4)
    return q, k


def compile_specs(cfg=None) -> list[dict]:
    """Launch configurations `rope_qk` picks on a GPU at the model `cfg`'s shapes (default: the released 7B: G = 4,
    D = 128), in bf16 and fp32, for ahead-of-time compile checks (see kernels/_specs.py). qkv is the
    [T, Hkv, G + 2, D] view of the contiguous wqkv output, cos/sin the contiguous [T, D] tables."""
    if triton is None:
        return []
    from ixc_engine.config import ModelConfig

    from ._specs import kernel_spec, triton_type

    cfg = cfg or ModelConfig()
    hkv, d = cfg.num_key_value_heads, cfg.head_dim
    g = cfg.num_attention_heads // hkv
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        t = triton_type(dtype)
        tag = "bf16" if dtype == torch.bfloat16 else "fp32"
        specs.append(kernel_spec(
            f"rope_qk[{tag}]", _rope_qk_kernel,
            pointers={"x_ptr": t, "cos_ptr": t, "sin_ptr": t, "q_ptr": t, "k_ptr": t},
            ints={"n_rows": 3301, "stride_xt": hkv * (g + 2) * d, "stride_xh": (g + 2) * d, "stride_xs": d,
                  "stride_ct": d, "stride_st": d},
            constexprs={"GROUP": g, "SLOTS_PAD": triton.next_power_of_2(g + 1), "HALF": d // 2,
                        "BLOCK_T": _block_t(True)},
            num_warps=4, num_stages=3, per_batch=("n_rows",), dtype=tag,  # num_stages: Triton's default
        ))
    return specs
