"""Fused residual add + InternLM2 RMSNorm (one read of x and delta, one write of the sum and of the normalized rows).

    r = x + delta                        (rounded to the input dtype, as torch's add)
    n = w * (r * rsqrt(mean(r^2) + eps)) (normalized in fp32 from the rounded r, cast to the dtype, then times w)

`add_rms_norm(x, delta, weight, eps, out=...)` returns r (x itself when delta is None) and writes n into `out`, which
may be a column window of a wider buffer (the GPU path writes n next to the PLoRA A product, see models/internlm2.py).
Inference only (no backward): training runs the torch backend, whose RMSNorm module is the reference below.
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


def add_rms_norm_ref(x, delta, weight, eps: float):
    """(r, n) exactly as `x + delta` then `RMSNorm` (models/internlm2.py) compute them."""
    r = x if delta is None else x + delta
    rf = r.float()
    n = weight * (rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps)).to(r.dtype)
    return r, n


if triton is not None:

    @triton.jit(do_not_specialize=["n_rows"])
    def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, r_ptr, n_ptr, n_rows, H, eps,
                             stride_x, stride_d, stride_r, stride_n,
                             HAS_DELTA: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_H)
        rmask = rows < n_rows
        m = rmask[:, None] & (cols < H)[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=m, other=0.0)
        dt = x.dtype
        xf = x.to(tl.float32)
        if HAS_DELTA:
            d = tl.load(d_ptr + rows64 * stride_d + cols[None, :], mask=m, other=0.0).to(tl.float32)
            r = (xf + d).to(dt)
            tl.store(r_ptr + rows64 * stride_r + cols[None, :], r, mask=m)
            xf = r.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / H + eps)
        w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
        nrm = (xf * rstd[:, None]).to(dt).to(tl.float32) * w[None, :]
        tl.store(n_ptr + rows64 * stride_n + cols[None, :], nrm.to(n_ptr.dtype.element_ty), mask=m)


def _blocks(H: int, on_gpu: bool) -> tuple[int, int, int]:
    """(rows per program, padded H, warps): one row per program on a GPU (H = 4096 fp32 values in registers)."""
    bh = triton.next_power_of_2(H)
    if not on_gpu:
        return max(1, 4096 // bh), bh, 4
    return 1, bh, 8 if bh >= 2048 else 4


def _check(x, delta, weight, out):
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D [T, H] with unit column stride, got shape {tuple(x.shape)}")
    for name, t in (("delta", delta), ("out", out)):
        if t is not None and (t.shape != x.shape or t.stride(1) != 1 or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} must be [T, H] = {tuple(x.shape)} {x.dtype} on {x.device} with unit column "
                             f"stride, got {tuple(t.shape)} {t.dtype} on {t.device} strides {tuple(t.stride())}")
    if weight.shape != (x.shape[1],) or weight.device != x.device:
        raise ValueError(f"weight must be [{x.shape[1]}] on {x.device}, got {tuple(weight.shape)} on {weight.device}")


def add_rms_norm(x, delta, weight, eps: float, *, out=None, backend: str = "auto"):
    """Returns r = x + delta (x when delta is None) and writes rmsnorm(r) * weight into `out` (allocated when None).

    Returns (r, out). x, delta, out: [T, H] with unit column stride (any row stride); weight [H]."""
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _check(x, delta, weight, out)
    r = x if delta is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    if is_meta(x):
        record_launch("add_rms_norm", flops=0, nbytes=nbytes(x, delta, weight, out) + (nbytes(r) if delta is not None
                                                                                         else 0))
        return r, out
    backend = resolve_backend("add_rms_norm", backend, globals().get("_add_rms_norm_kernel"), x.device)
    if backend == "torch":
        rr, n = add_rms_norm_ref(x, delta, weight, eps)
        if delta is not None:
            r.copy_(rr)
        out.copy_(n)
        return r, out
    T, H = x.shape
    if T == 0:
        return r, out
    bt, bh, warps = _blocks(H, x.is_cuda)
    _add_rms_norm_kernel[(triton.cdiv(T, bt),)](
        x, delta if delta is not None else x, weight, r, out, T, H, float(eps),
        x.stride(0), delta.stride(0) if delta is not None else 0, r.stride(0), out.stride(0),
        HAS_DELTA=delta is not None, BLOCK_T=bt, BLOCK_H=bh, num_warps=warps,
    )
    return r, out


def compile_specs(cfg=None) -> list[dict]:
    """Launch configurations `add_rms_norm` picks on a GPU at the model `cfg`'s shapes (default: the released 7B), in
    bf16 and fp32, for ahead-of-time compile checks (see kernels/_specs.py). Strides are those of the fused decoder
    layer (models/internlm2._fused_layer): x, delta and r contiguous [T, H]; n written into the [a | n] buffer before
    wqkv (row r + H) or the [a1 | n | a3] buffer before w1/w3 (row 2r + H), r the PLoRA rank (256 in the release).
    The first layer's call has no delta (the wrapper then passes x and stride 0)."""
    if triton is None:
        return []
    from ixc_engine.config import ModelConfig

    from ._specs import kernel_spec, triton_type

    cfg = cfg or ModelConfig()
    h, rank = cfg.hidden_size, cfg.plora_rank or 256
    bt, bh, warps = _blocks(h, on_gpu=True)
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        t = triton_type(dtype)
        tag = "bf16" if dtype == torch.bfloat16 else "fp32"
        for label, has_delta, stride_n in (("attn", True, rank + h), ("ffn", True, 2 * rank + h),
                                           ("first", False, rank + h)):
            specs.append(kernel_spec(
                f"add_rms_norm[{label},{tag}]", _add_rms_norm_kernel,
                pointers={"x_ptr": t, "d_ptr": t, "w_ptr": t, "r_ptr": t, "n_ptr": t},
                ints={"n_rows": 3301, "H": h, "stride_x": h, "stride_d": h if has_delta else 0, "stride_r": h,
                      "stride_n": stride_n},
                floats=("eps",), constexprs={"HAS_DELTA": has_delta, "BLOCK_T": bt, "BLOCK_H": bh},
                num_warps=warps, num_stages=3, per_batch=("n_rows",), dtype=tag,  # num_stages: Triton's default
            ))
    return specs
