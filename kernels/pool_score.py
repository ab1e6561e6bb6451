"""Fused final RMSNorm + scalar score head + per-sequence pooling.

For packed tokens ``hidden [T, H]`` of B sequences (``cu_seqlens [B+1]``) the per-token score is

    s_t = sum_h rmsnorm(x_t)_h * w_norm_h * w_head_h,   rmsnorm(x) = x * rsqrt(mean(x^2) + eps)

computed in fp32, then pooled per sequence: the last token's s (``mode="last"``), the mean of s
(``mode="mean"``, optionally continuing a cached prefix's partial sum and count) or every s_t
(``mode="token"``). The Triton path reads each needed row of ``hidden`` once and never writes a
normalized copy: ``s_t = r_t * sum_h x_th * u_h`` with ``u = w_norm * w_head`` and
``r_t = rsqrt(sum_h x_th^2 / H + eps)``, both sums taken in the same pass over H.

Backward, for a token with upstream gradient g (xhat = x * r):
    ds/dx_h = r * (u_h - xhat_h * s / H)      (r depends on x: dr/dx_h = -r^3 x_h / H)
    ds/dw_norm = xhat * w_head,  ds/dw_head = xhat * w_norm
so the kernel only needs the per-row r and s saved by the forward (2 floats per row) and
G = sum_t g_t * xhat_t, reduced as per-program partial sums and finished with a torch sum.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ._backend import BACKENDS, resolve_backend
from ._meta import is_meta, nbytes, record_launch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference path works without triton
    triton = None
    tl = None

__all__ = ["BACKENDS", "MODES", "KernelConfig", "default_config", "pool_score", "pool_score_ref"]

MODES = ("last", "mean", "token")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REF_DTYPES = _KERNEL_DTYPES + (torch.float64,)


# ----------------------------------------------------------------------------------------------
# Validation (shared by both backends)
# ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Checked:
    hidden: torch.Tensor  # [T, H], last-dim stride 1
    norm_weight: torch.Tensor  # [H], contiguous
    head_weight: torch.Tensor  # [H], contiguous (a differentiable view/copy of the caller's tensor)


def _check(hidden, norm_weight, head_weight, cu_seqlens, mode, eps, prefix_sum, prefix_count, dtypes,
           host=None) -> _Checked:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    for name, t in (("hidden", hidden), ("norm_weight", norm_weight), ("head_weight", head_weight),
                    ("cu_seqlens", cu_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [T, H], got shape {tuple(hidden.shape)}")
    T, H = hidden.shape
    if H == 0:
        raise ValueError("hidden must have a non-empty hidden dimension (H > 0)")
    dnames = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
    for name, t in (("hidden", hidden), ("norm_weight", norm_weight), ("head_weight", head_weight)):
        if t.dtype not in dtypes:
            raise ValueError(f"{name} dtype must be one of ({dnames}), got {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if tuple(norm_weight.shape) != (H,):
        raise ValueError(f"norm_weight must have shape [{H}] to match hidden [T, {H}], got {tuple(norm_weight.shape)}")
    if tuple(head_weight.shape) not in ((H,), (1, H)):
        raise ValueError(f"head_weight must have shape [1, {H}] or [{H}], got {tuple(head_weight.shape)}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [B+1] with B >= 0, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != hidden.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but hidden is on {hidden.device}")
    B = cu_seqlens.numel() - 1

    has_prefix = prefix_sum is not None or prefix_count is not None
    if has_prefix:
        if mode != "mean":
            raise ValueError(f"prefix_sum/prefix_count are only valid with mode='mean', got mode={mode!r}")
        if prefix_sum is None or prefix_count is None:
            raise ValueError("prefix_sum and prefix_count must be given together")
        for name, t in (("prefix_sum", prefix_sum), ("prefix_count", prefix_count)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != (B,):
                raise ValueError(f"{name} must have shape [{B}] (one per sequence), got {tuple(t.shape)}")
            if t.device != hidden.device:
                raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
        if prefix_sum.dtype not in dtypes:
            raise ValueError(f"prefix_sum dtype must be one of ({dnames}), got {prefix_sum.dtype}")
        if prefix_count.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"prefix_count must be int32 or int64, got {prefix_count.dtype}")

    if is_meta(hidden):  # the roofline model: meta tensors carry no values to check
        return _Checked(hidden, norm_weight, head_weight.reshape(H))
    # One host sync for the whole validation (cu_seqlens and, with prefixes, prefix_count), unless the caller has
    # them on the host already (`host`: cu_seqlens values followed by prefix_count's).
    if host is None:
        host = cu_seqlens if not has_prefix else torch.cat([cu_seqlens.long(), prefix_count.long()])
        host = host.tolist()
    elif len(host) != B + 1 + (B if has_prefix else 0):
        raise ValueError(f"host_metadata must hold the {B + 1} cu_seqlens values"
                         + (f" and the {B} prefix_count values" if has_prefix else "") + f", got {len(host)}")
    cu, counts = host[: B + 1], (host[B + 1 :] if has_prefix else None)
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens[0] must be 0, got {cu[0]}")
    if cu[-1] != T:
        raise ValueError(f"cu_seqlens[-1] must equal the number of tokens T={T}, got {cu[-1]}")
    lengths = [cu[b + 1] - cu[b] for b in range(B)]
    for b, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"cu_seqlens must be non-decreasing; cu_seqlens[{b + 1}]={cu[b + 1]} < "
                             f"cu_seqlens[{b}]={cu[b]}")
    if counts is not None:
        for b, c in enumerate(counts):
            if c < 0:
                raise ValueError(f"prefix_count must be >= 0, got prefix_count[{b}]={c}")
    for b, n in enumerate(lengths):
        if n == 0 and (counts is None or counts[b] == 0):
            what = "and prefix_count is 0" if counts is not None else "(no prefix given)"
            raise ValueError(f"sequence {b} is empty {what}: its score is undefined (mode={mode!r})")

    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    return _Checked(hidden, norm_weight.contiguous(), head_weight.reshape(H).contiguous())


# ----------------------------------------------------------------------------------------------
# Pure torch reference
# ----------------------------------------------------------------------------------------------


def pool_score_ref(hidden, norm_weight, head_weight, cu_seqlens, *, mode, eps=1e-5, prefix_sum=None,
                   prefix_count=None):
    """Pure-torch reference (autograd-differentiable); computes in fp32, or in fp64 when any input is fp64.

    Returns fp32 (fp64 with fp64 inputs): ``[B]`` for ``mode="last"``/``"mean"``, ``[T]`` for ``"token"``.
    """
    c = _check(hidden, norm_weight, head_weight, cu_seqlens, mode, eps, prefix_sum, prefix_count, _REF_DTYPES)
    tensors = [c.hidden, c.norm_weight, c.head_weight] + ([prefix_sum] if prefix_sum is not None else [])
    cdt = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    hidden = c.hidden[cu_seqlens[1:].long() - 1] if mode == "last" else c.hidden  # "last" reads B rows only
    x = hidden.to(cdt)
    r = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)  # [T, 1]
    s = (x * r * c.norm_weight.to(cdt)) @ c.head_weight.to(cdt)  # [T]
    if mode in ("token", "last"):
        return s
    B = cu_seqlens.numel() - 1
    lengths = torch.diff(cu_seqlens.long())
    seq_of_token = torch.repeat_interleave(torch.arange(B, device=s.device), lengths, output_size=s.numel())
    sums = torch.zeros(B, dtype=cdt, device=s.device).index_add(0, seq_of_token, s)
    counts = lengths.to(cdt)
    if prefix_sum is not None:
        sums = sums + prefix_sum.to(cdt)
        counts = counts + prefix_count.to(cdt)
    return sums / counts


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:

    # n_rows (and rows_per_prog below) change with every batch: not specialised, so a new value does not recompile.
    @triton.jit(do_not_specialize=["n_rows"])
    def _pool_score_fwd_kernel(
        x_ptr, stride_xt, wn_ptr, wh_ptr, idx_ptr, s_ptr, rstd_ptr, n_rows, H, eps,
        USE_IDX: tl.constexpr, STORE_RSTD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        # Rows [pid*BLOCK_T, +BLOCK_T) of the row list (token ids = idx[row] with USE_IDX, else row).
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < n_rows
        if USE_IDX:
            tok = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            tok = rows.to(tl.int64)
        row_ptr = x_ptr + tok * stride_xt
        sq = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
        dot = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            cmask = cols < H
            u = tl.load(wn_ptr + cols, mask=cmask, other=0.0).to(tl.float32) * tl.load(
                wh_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            x = tl.load(row_ptr[:, None] + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            x = x.to(tl.float32)
            sq += x * x
            dot += x * u[None, :]
        r = 1.0 / tl.sqrt(tl.sum(sq, axis=1) / H + eps)
        tl.store(s_ptr + rows, tl.sum(dot, axis=1) * r, mask=rmask)
        if STORE_RSTD:
            tl.store(rstd_ptr + rows, r, mask=rmask)

    @triton.jit
    def _segment_mean_kernel(s_ptr, cu_ptr, psum_ptr, pcnt_ptr, out_ptr, HAS_PREFIX: tl.constexpr,
                             BLOCK: tl.constexpr):
        # One program per sequence: out[b] = (prefix_sum[b] + sum(s[cu[b]:cu[b+1]])) / (prefix_count[b] + n_b).
        b = tl.program_id(0)
        start = tl.load(cu_ptr + b)
        end = tl.load(cu_ptr + b + 1)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for t0 in range(start, end, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            acc += tl.load(s_ptr + offs, mask=offs < end, other=0.0)
        total = tl.sum(acc, axis=0)
        count = (end - start).to(tl.float32)
        if HAS_PREFIX:
            total += tl.load(psum_ptr + b).to(tl.float32)
            count += tl.load(pcnt_ptr + b).to(tl.float32)
        tl.store(out_ptr + b, total / count)

    @triton.jit(do_not_specialize=["n_rows", "rows_per_prog"])
    def _pool_score_bwd_kernel(
        x_ptr, stride_xt, dx_ptr, stride_dxt, wn_ptr, wh_ptr, idx_ptr, g_ptr, s_ptr, rstd_ptr, part_ptr,
        n_rows, H, rows_per_prog,
        USE_IDX: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        # Program pid owns rows [pid*rows_per_prog, +rows_per_prog) of the row list. Outer loop over column
        # blocks so that the column partial sum G[cols] = sum_t g_t * xhat_t[cols] stays in registers.
        pid = tl.program_id(0)
        r_begin = pid * rows_per_prog
        r_end = tl.minimum(r_begin + rows_per_prog, n_rows)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            cmask = cols < H
            u = tl.load(wn_ptr + cols, mask=cmask, other=0.0).to(tl.float32) * tl.load(
                wh_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            gacc = tl.zeros([BLOCK_H], dtype=tl.float32)
            for r0 in range(r_begin, r_end, BLOCK_T):
                rows = r0 + tl.arange(0, BLOCK_T)
                rmask = rows < r_end
                if USE_IDX:
                    tok = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
                else:
                    tok = rows.to(tl.int64)
                g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
                r = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
                m = rmask[:, None] & cmask[None, :]
                x = tl.load(x_ptr + tok[:, None] * stride_xt + cols[None, :], mask=m, other=0.0).to(tl.float32)
                xhat = x * r[:, None]
                if COMPUTE_DX:
                    s_over_h = tl.load(s_ptr + rows, mask=rmask, other=0.0) / H
                    dx = (g * r)[:, None] * (u[None, :] - xhat * s_over_h[:, None])
                    tl.store(dx_ptr + tok[:, None] * stride_dxt + cols[None, :],
                             dx.to(dx_ptr.dtype.element_ty), mask=m)
                if COMPUTE_DW:
                    gacc += tl.sum(xhat * g[:, None], axis=0)
            if COMPUTE_DW:
                tl.store(part_ptr + pid * H + cols, gacc, mask=cmask)


@dataclass(slots=True, frozen=True)
class KernelConfig:
    """Launch parameters; ``pool_score`` picks them with :func:`default_config` (benchmarks may sweep them)."""

    fwd_block_t: int
    fwd_block_h: int
    fwd_warps: int
    bwd_block_t: int
    bwd_block_h: int
    bwd_warps: int
    bwd_programs: int  # upper bound on backward programs (each writes one [H] fp32 partial row)
    seg_block: int


def default_config(H: int, n_rows: int, device: torch.device) -> KernelConfig:
    """Block sizes for ``H`` columns and ``n_rows`` rows to score (T, or B in ``mode="last"``)."""
    hp2 = triton.next_power_of_2(H)
    if device.type != "cuda":
        # TRITON_INTERPRET: every program instance costs milliseconds, so few programs with big tiles.
        return KernelConfig(64, min(hp2, 1024), 4, 64, min(hp2, 1024), 4, 4, 1024)
    return _gpu_config(H, n_rows, torch.cuda.get_device_properties(device).multi_processor_count)


def _gpu_config(H: int, n_rows: int, sms: int) -> KernelConfig:
    hp2 = triton.next_power_of_2(H)
    block_h = min(hp2, 4096)
    # Few rows (mode="last"): one row per program for parallelism; many rows: ~8k elements per tile.
    block_t = 1 if n_rows < 8192 else max(1, min(4, 8192 // block_h))
    # Tiles up to 4k elements: 8 per thread (one 16-byte bf16 load); ptxas spills at 16 per thread (sm_90a, H=4096:
    # 64 registers and 4 bytes of spill with 8 warps; see bench/compile_table.py). Bigger tiles: 8 warps, >= 32 each.
    tile = block_t * block_h
    warps = min(16, max(4, tile // 256)) if tile <= 4096 else 8
    return KernelConfig(block_t, block_h, warps, 8, min(hp2, 512), 4, 4 * sms, 1024)


# ----------------------------------------------------------------------------------------------
# Autograd function and host wrapper
# ----------------------------------------------------------------------------------------------


def _launch_fwd(hidden, wn, wh, idx, n_rows, eps, store_rstd, cfg):
    dev = hidden.device
    s = torch.empty(n_rows, dtype=torch.float32, device=dev)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=dev) if store_rstd else None
    if n_rows > 0:
        grid = (triton.cdiv(n_rows, cfg.fwd_block_t),)
        _pool_score_fwd_kernel[grid](
            hidden, hidden.stride(0), wn, wh, idx if idx is not None else s, s, rstd if store_rstd else s,
            n_rows, hidden.shape[1], float(eps),
            USE_IDX=idx is not None, STORE_RSTD=store_rstd, BLOCK_T=cfg.fwd_block_t, BLOCK_H=cfg.fwd_block_h,
            num_warps=cfg.fwd_warps,
        )
    return s, rstd


class _PoolScoreFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, wn, wh, cu_seqlens, prefix_sum, prefix_count, mode, eps, cfg):
        T = hidden.shape[0]
        B = cu_seqlens.numel() - 1
        store_rstd = any(ctx.needs_input_grad[:3])
        idx = cu_seqlens[1:] - 1 if mode == "last" else None  # int32 [B] last-token rows
        s, rstd = _launch_fwd(hidden, wn, wh, idx, B if mode == "last" else T, eps, store_rstd, cfg)
        counts = None
        if mode == "token" or mode == "last":
            out = s
        else:
            out = torch.empty(B, dtype=torch.float32, device=hidden.device)
            has_prefix = prefix_sum is not None
            if B > 0:
                _segment_mean_kernel[(B,)](
                    s, cu_seqlens, prefix_sum if has_prefix else s, prefix_count if has_prefix else cu_seqlens,
                    out, HAS_PREFIX=has_prefix, BLOCK=cfg.seg_block,
                )
            counts = torch.diff(cu_seqlens).to(torch.float32)
            if has_prefix:
                counts = counts + prefix_count.to(torch.float32)
        ctx.mode, ctx.cfg = mode, cfg
        ctx.save_for_backward(hidden, wn, wh, cu_seqlens, s, rstd, idx, counts)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, wn, wh, cu_seqlens, s, rstd, idx, counts = ctx.saved_tensors
        need_dx, need_wn, need_wh = ctx.needs_input_grad[:3]
        need_psum = ctx.needs_input_grad[4]
        cfg, mode = ctx.cfg, ctx.mode
        T, H = hidden.shape
        g = grad_out.to(torch.float32).contiguous()
        if mode == "mean":
            g_seq = g / counts  # d mean_b / d s_t = 1 / count_b for every token t of sequence b
            g_rows = torch.repeat_interleave(g_seq, torch.diff(cu_seqlens.long()), output_size=T)
        else:
            g_rows = g  # token: [T]; last: [B], one per row of idx
        n_rows = g_rows.numel()
        dx = dwn = dwh = dpsum = None
        if need_dx:
            alloc = torch.zeros if mode == "last" else torch.empty
            dx = alloc((T, H), dtype=hidden.dtype, device=hidden.device)
        if need_dx or need_wn or need_wh:
            n_prog = min(triton.cdiv(n_rows, cfg.bwd_block_t), cfg.bwd_programs)
            need_dw = need_wn or need_wh
            part = torch.empty((max(n_prog, 1), H) if need_dw else (1,), dtype=torch.float32, device=hidden.device)
            if n_prog > 0:
                _pool_score_bwd_kernel[(n_prog,)](
                    hidden, hidden.stride(0), dx if need_dx else part, H, wn, wh,
                    idx if idx is not None else g_rows, g_rows, s, rstd, part,
                    n_rows, H, triton.cdiv(n_rows, n_prog),
                    USE_IDX=idx is not None, COMPUTE_DX=need_dx, COMPUTE_DW=need_dw,
                    BLOCK_T=cfg.bwd_block_t, BLOCK_H=cfg.bwd_block_h, num_warps=cfg.bwd_warps,
                )
            elif need_dw:
                part.zero_()
            if need_dw:
                G = part.sum(dim=0)  # [H] = sum_t g_t * xhat_t
                if need_wn:
                    dwn = (G * wh.to(torch.float32)).to(wn.dtype)
                if need_wh:
                    dwh = (G * wn.to(torch.float32)).to(wh.dtype)
        if need_psum:
            dpsum = g / counts
        return dx, dwn, dwh, None, dpsum, None, None, None, None


def _pool_score_triton(hidden, norm_weight, head_weight, cu_seqlens, *, mode, eps=1e-5, prefix_sum=None,
                       prefix_count=None, config: KernelConfig | None = None, host_metadata=None):
    c = _check(hidden, norm_weight, head_weight, cu_seqlens, mode, eps, prefix_sum, prefix_count, _KERNEL_DTYPES,
               host_metadata)
    T, H = c.hidden.shape
    B = cu_seqlens.numel() - 1
    cfg = config or default_config(H, B if mode == "last" else T, c.hidden.device)
    return _PoolScoreFn.apply(c.hidden, c.norm_weight, c.head_weight, cu_seqlens.contiguous(),
                              prefix_sum.contiguous() if prefix_sum is not None else None,
                              prefix_count.contiguous() if prefix_count is not None else None, mode, float(eps), cfg)


def _pool_score_meta(hidden, norm_weight, head_weight, cu_seqlens, *, mode, eps, prefix_sum, prefix_count):
    """Meta tensors (the roofline model, see _meta.py): record the forward launches, return an empty result.

    FLOPs 0: the reference's only product is a matrix-vector one, which torch.utils.flop_counter does not count (it
    is bandwidth-bound). Bytes: every input and output in full (mode="last" reads only B rows of hidden, so this
    over-counts it; the kernel is a few microseconds a batch either way)."""
    c = _check(hidden, norm_weight, head_weight, cu_seqlens, mode, eps, prefix_sum, prefix_count, _KERNEL_DTYPES)
    T = c.hidden.shape[0]
    B = cu_seqlens.numel() - 1
    s = torch.empty(B if mode == "last" else T, dtype=torch.float32, device=hidden.device)
    record_launch("pool_score", flops=0, nbytes=nbytes(c.hidden, c.norm_weight, c.head_weight, cu_seqlens, s))
    if mode != "mean":
        return s
    out = torch.empty(B, dtype=torch.float32, device=hidden.device)
    record_launch("pool_score_segment_mean", flops=0,
                  nbytes=nbytes(s, cu_seqlens, out, prefix_sum, prefix_count))
    return out


def pool_score(hidden, norm_weight, head_weight, cu_seqlens, *, mode, eps=1e-5, prefix_sum=None, prefix_count=None,
               backend="auto", host_metadata: list[int] | None = None):
    """Fused final RMSNorm + score head + pooling over packed sequences.

    hidden ``[T, H]`` (fp32/bf16/fp16, last-dim stride 1 or it is copied), norm_weight ``[H]``, head_weight
    ``[1, H]`` or ``[H]``, cu_seqlens int32 ``[B+1]``. Returns fp32 ``[B]`` (``mode="last"``: score of each
    sequence's last token; ``"mean"``: mean score over the sequence, continuing ``prefix_sum``/``prefix_count``
    when given) or fp32 ``[T]`` (``"token"``). Differentiable w.r.t. hidden, norm_weight, head_weight and
    prefix_sum. ``backend``: ``"auto"`` (the Triton kernel on CUDA, or on CPU when Triton's interpreter is on; the
    torch reference otherwise), ``"triton"``, ``"torch"``. ``host_metadata``: the values of cu_seqlens (then of
    prefix_count, when given) as host ints, for a caller that has them: the Triton path then validates with them
    instead of reading the device tensors back (a sync).

    Precision: with bf16/fp16 ``hidden`` the whole chain (normalize, times norm_weight, dot with the head) stays in
    fp32. Upstream rounds the normalized row to the input dtype before the weight multiply and the head matmul
    returns bf16; skipping those roundings moves scores by at most bf16 rounding, towards the fp32 result.
    """
    if is_meta(hidden):
        return _pool_score_meta(hidden, norm_weight, head_weight, cu_seqlens, mode=mode, eps=eps,
                                prefix_sum=prefix_sum, prefix_count=prefix_count)
    if isinstance(hidden, torch.Tensor):
        unsupported = None if hidden.dtype in _KERNEL_DTYPES else f"hidden dtype {hidden.dtype}"
        backend = resolve_backend("pool_score", backend, globals().get("_pool_score_fwd_kernel"), hidden.device,
                                  unsupported)
    elif backend not in BACKENDS:
        raise ValueError(f"pool_score: backend must be one of {BACKENDS}, got {backend!r}")
    else:
        backend = "torch"  # the reference's checks name what is wrong with `hidden`
    kwargs = {"mode": mode, "eps": eps, "prefix_sum": prefix_sum, "prefix_count": prefix_count}
    if backend == "torch":
        return pool_score_ref(hidden, norm_weight, head_weight, cu_seqlens, **kwargs)
    return _pool_score_triton(hidden, norm_weight, head_weight, cu_seqlens, **kwargs, host_metadata=host_metadata)


def compile_specs(cfg=None, max_batch_tokens: int = 16384, batch_seqs: int = 64) -> list[dict]:
    """Launch configurations `pool_score` picks on a GPU at the model `cfg`'s hidden size (default: the released 7B)
    in bf16 and fp32, for ahead-of-time compile checks (see kernels/_specs.py): scoring (mode "last" over
    `batch_seqs` rows, "mean" over a full token budget) and training (forward saving rstd, backward)."""
    from ixc_engine.config import ModelConfig

    from ._specs import kernel_spec, triton_type

    H = (cfg or ModelConfig()).hidden_size
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        t = triton_type(dtype)
        tag = "bf16" if dtype == torch.bfloat16 else "fp32"
        fwd_ptrs = {"x_ptr": t, "wn_ptr": t, "wh_ptr": t, "idx_ptr": "*i32", "s_ptr": "*fp32", "rstd_ptr": "*fp32"}
        for mode, n_rows, store in (("last", batch_seqs, False), ("mean", max_batch_tokens, False),
                                    ("last+rstd", batch_seqs, True)):
            cfg_k = _gpu_config(H, n_rows, sms=132)
            specs.append(kernel_spec(
                f"pool_score_fwd[{mode},{tag}]", _pool_score_fwd_kernel, pointers=fwd_ptrs,
                ints={"stride_xt": H, "n_rows": n_rows, "H": H}, floats=("eps",),
                constexprs={"USE_IDX": mode != "mean", "STORE_RSTD": store, "BLOCK_T": cfg_k.fwd_block_t,
                            "BLOCK_H": cfg_k.fwd_block_h},
                num_warps=cfg_k.fwd_warps, num_stages=3, per_batch=("n_rows",), dtype=tag,
            ))
        cfg_k = _gpu_config(H, batch_seqs, sms=132)
        specs.append(kernel_spec(
            f"pool_score_bwd[last,{tag}]", _pool_score_bwd_kernel,
            pointers={"x_ptr": t, "dx_ptr": t, "wn_ptr": t, "wh_ptr": t, "idx_ptr": "*i32", "g_ptr": "*fp32",
                      "s_ptr": "*fp32", "rstd_ptr": "*fp32", "part_ptr": "*fp32"},
            ints={"stride_xt": H, "stride_dxt": H, "n_rows": batch_seqs, "H": H, "rows_per_prog": 1},
            constexprs={"USE_IDX": True, "COMPUTE_DX": True, "COMPUTE_DW": True, "BLOCK_T": cfg_k.bwd_block_t,
                        "BLOCK_H": cfg_k.bwd_block_h},
            num_warps=cfg_k.bwd_warps, num_stages=3, per_batch=("n_rows", "rows_per_prog"), dtype=tag,
        ))
    specs.append(kernel_spec(
        "segment_mean[fp32]", _segment_mean_kernel,
        pointers={"s_ptr": "*fp32", "cu_ptr": "*i32", "psum_ptr": "*fp32", "pcnt_ptr": "*i64", "out_ptr": "*fp32"},
        constexprs={"HAS_PREFIX": True, "BLOCK": _gpu_config(H, max_batch_tokens, sms=132).seg_block},
        num_warps=4, num_stages=3, dtype="fp32",
    ))
    return specs
