"""Fused CLIP quick_gelu: out = h * sigmoid(1.702 * h), one read and one write (in place allowed).

The rounding follows torch's `h * torch.sigmoid(1.702 * h)` in the input dtype: each of the three ops rounds its result.
Inference only (the vision tower is frozen, also in training; training runs the torch reference).
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


def quick_gelu_ref(h):
    return h * torch.sigmoid(1.702 * h)


if triton is not None:

    @triton.jit(do_not_specialize=["n"])
    def _quick_gelu_kernel(h_ptr, o_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        h = tl.load(h_ptr + offs, mask=m, other=0.0)
        dt = h.dtype
        hf = h.to(tl.float32)
        t = (1.702 * hf).to(dt).to(tl.float32)
        s = (1.0 / (1.0 + tl.exp(-t))).to(dt).to(tl.float32)
        tl.store(o_ptr + offs, (hf * s).to(o_ptr.dtype.element_ty), mask=m)


def _block(on_gpu: bool) -> tuple[int, int]:
    return (2048, 8) if on_gpu else (1 << 16, 4)


def quick_gelu(h, *, out=None, backend: str = "auto"):
    """quick_gelu of a contiguous tensor, into `out` (allocated when None; `out=h` works in place)."""
    if not h.is_contiguous():
        raise ValueError(f"h must be contiguous, got strides {tuple(h.stride())} for shape {tuple(h.shape)}")
    if out is None:
        out = torch.empty_like(h)
    if out.shape != h.shape or out.dtype != h.dtype or not out.is_contiguous() or out.device != h.device:
        raise ValueError(f"out must be a contiguous {tuple(h.shape)} {h.dtype} tensor on {h.device}")
    if is_meta(h):
        record_launch("quick_gelu", flops=0, nbytes=nbytes(h, out))
        return out
    backend = resolve_backend("quick_gelu", backend, globals().get("_quick_gelu_kernel"), h.device)
    if backend == "torch":
        return out.copy_(quick_gelu_ref(h))
    n = h.numel()
    if n == 0:
        return out
    block, warps = _block(h.is_cuda)
    _quick_gelu_kernel[(triton.cdiv(n, block),)](h, out, n, BLOCK=block, num_warps=warps)
    return out


def compile_specs(cfg=None) -> list[dict]:
    """Launch configuration `quick_gelu` picks on a GPU for the ViT MLP of the model `cfg` (default: the released
    CLIP ViT-L/14 at 560: 1601 tokens per crop, intermediate 4096), in bf16 and fp32, for ahead-of-time compile checks
    (see kernels/_specs.py). n (tokens of all crops of the batch times the intermediate size) changes per batch."""
    if triton is None:
        return []
    from ixc_engine.config import ModelConfig

    from ._specs import kernel_spec, triton_type

    vis = (cfg or ModelConfig()).vision
    block, warps = _block(True)
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        tag = "bf16" if dtype == torch.bfloat16 else "fp32"
        t = triton_type(dtype)
        specs.append(kernel_spec(
            f"quick_gelu[{tag}]", _quick_gelu_kernel, pointers={"h_ptr": t, "o_ptr": t},
            ints={"n": (vis.grid**2 + 1) * vis.intermediate_size}, constexprs={"BLOCK": block},
            num_warps=warps, num_stages=3, per_batch=("n",), dtype=tag,  # num_stages: Triton's default
        ))
    return specs
