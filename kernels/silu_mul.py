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

    @triton.jit(do_not_specialize=["n_rows"])
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


def compile_specs(cfg=None) -> list[dict]:
    """Launch configuration `silu_mul` picks on a GPU at the model `cfg`'s shapes (default: the released 7B,
    I = 14336), in bf16 and fp32, for ahead-of-time compile checks (see kernels/_specs.py). a, b are the contiguous
    w1/w3 outputs; out is the column window of the [a | g] buffer before w2 (row r + I, r the PLoRA rank, 256)."""
    if triton is None:
        return []
    from ixc_engine.config import ModelConfig

    from ._specs import kernel_spec, triton_type

    cfg = cfg or ModelConfig()
    inter, rank = cfg.intermediate_size, cfg.plora_rank or 256
    bt, bc, warps = _blocks(True)
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        t = triton_type(dtype)
        tag = "bf16" if dtype == torch.bfloat16 else "fp32"
        specs.append(kernel_spec(
            f"silu_mul[{tag}]", _silu_mul_kernel, pointers={"a_ptr": t, "b_ptr": t, "o_ptr": t},
            ints={"n_rows": 3301, "n_cols": inter, "stride_a": inter, "stride_b": inter, "stride_o": rank + inter},
            constexprs={"BLOCK_T": bt, "BLOCK_C": bc},
            num_warps=warps, num_stages=3, per_batch=("n_rows",), dtype=tag,  # num_stages: Triton's default
        ))
    return specs
