"""Fused SwiGLU gate: out = silu(a) * b over [T, I] rows (one read of a and b, one write).

The rounding follows torch's `F.silu(a) * b` in the input dtype: silu computed in fp32 and rounded, then the product
rounded. a, b and out may be column windows of wider buffers (unit column stride, any row stride). Inference only (no
backward): training runs the torch backend, whose FeedForward module is the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import resolve_backend
from ._meta import is_meta, nbytes, record_launch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None


def silu_mul_ref(a, b):
    return F.silu(a) * b


if triton is not None:

    @triton.jit
    def _silu_mul_kernel(a_ptr, b_ptr, o_ptr, n_rows, n_cols, stride_a, stride_b, stride_o,
                         BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        m = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        r64 = rows.to(tl.int64)[:, None]
        a = tl.load(a_ptr + r64 * stride_a + cols[None, :], mask=m, other=0.0)
        dt = a.dtype
        af = a.to(tl.float32)
        bf = tl.load(b_ptr + r64 * stride_b + cols[None, :], mask=m, other=0.0).to(tl.float32)
        s = (af / (1.0 + tl.exp(-af))).to(dt).to(tl.float32)
        tl.store(o_ptr + r64 * stride_o + cols[None, :], (s * bf).to(o_ptr.dtype.element_ty), mask=m)


def _blocks(on_gpu: bool) -> tuple[int, int, int]:
    return (4, 1024, 4) if on_gpu else (32, 512, 4)


def silu_mul(a, b, *, out=None, backend: str = "auto"):
    """silu(a) * b, written into `out` (allocated when None); a, b, out [T, I] with unit column stride."""
    if out is None:
        out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    for name, t in (("a", a), ("b", b), ("out", out)):
        if t.dim() != 2 or t.shape != a.shape or t.dtype != a.dtype or t.device != a.device or t.stride(1) != 1:
            raise ValueError(f"{name} must be [T, I] = {tuple(a.shape)} {a.dtype} on {a.device} with unit column "
                             f"stride, got {tuple(t.shape)} {t.dtype} on {t.device} strides {tuple(t.stride())}")
    if is_meta(a):
        record_launch("silu_mul", flops=0, nbytes=nbytes(a, b, out))
        return out
    backend = resolve_backend("silu_mul", backend, globals().get("_silu_mul_kernel"), a.device)
    if backend == "torch":
        return out.copy_(silu_mul_ref(a, b))
    T, n = a.shape
    if T == 0 or n == 0:
        return out
    bt, bc, warps = _blocks(a.is_cuda)
    _silu_mul_kernel[(triton.cdiv(T, bt), triton.cdiv(n, bc))](
        a, b, out, T, n, a.stride(0), b.stride(0), out.stride(0), BLOCK_T=bt, BLOCK_C=bc, num_warps=warps)
    return out


def compile_specs() -> list[dict]:
    """The launch configuration the engine uses at the 7B shapes in bf16 (I = 14336), for ahead-of-time compiles."""
    if triton is None:
        return []
    bt, bc, warps = _blocks(True)
    sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "o_ptr": "*bf16", "n_rows": "i32", "n_cols": "i32", "stride_a": "i32",
           "stride_b": "i32", "stride_o": "i32", "BLOCK_T": "constexpr", "BLOCK_C": "constexpr"}
    return [{"name": "silu_mul_bf16", "fn": _silu_mul_kernel, "signature": sig,
             "constexprs": {"BLOCK_T": bt, "BLOCK_C": bc}, "num_warps": warps, "num_stages": 1}]
