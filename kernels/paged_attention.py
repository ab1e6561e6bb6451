"""Paged prefix attention: new tokens attend to a cached prefix (through a block table) and causally to themselves.

Layout (one call covers B sequences packed along the token dim):
  q            [Tq, Hq, D] or grouped [Tq, Hkv, Hq/Hkv, D]  new tokens' queries (RoPE applied)
  k, v         [Tq, Hkv, D]                                   new tokens' keys/values (RoPE applied)
  k_cache      [num_blocks, block_size, Hkv, D]               paged cache holding the prefixes
  block_tables int32 [B, max_blocks]                          pages of each sequence's prefix, in order
  prefix_lens  int32 [B]                                      cached prefix length of each sequence
  cu_seqlens_q int32 [B+1]                                    new-token offsets of each sequence in q/k/v
New token i of sequence b sees prefix tokens 0..prefix_lens[b)-1 and new tokens 0..i of b.
Query head h reads kv head h // (Hq/Hkv). Softmax statistics and accumulation are fp32.

The grouped 4D q form exists because InternLM2's packed wqkv interleaves 4 query heads, 1 key and 1 value head per
kv group: the query slice of the projection output is [T, Hkv, 4, D] with a gap between groups, which no single
head stride can describe as [T, Hq, D]; accepting it avoids a copy per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._backend import resolve_backend
from ._meta import is_meta, nbytes, record_launch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without the gpu extra use the torch reference only
    triton = None
    tl = None

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
# Max fp32 score elements materialized per chunk by the reference (bounds CPU memory for long sequences).
_REF_CHUNK_ELEMS = 1 << 26


# --------------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _softmax_step(q, k, v, acc, m_i, l_i, qk_scale, valid, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                      F32_DOT: tl.constexpr):
        # One online-softmax update in base 2: s = (q . k) * scale * log2(e). k, v: [BLOCK_N, D].
        # fp32 inputs use 3xTF32 dots (tensor cores, ~fp32 accuracy); plain ieee fp32 dots spill registers badly.
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if F32_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="tf32x3")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        if MASKED:
            s = tl.where(valid, s, float("-inf"))
        # Every row of every tile has at least one valid key (see the loop bounds), so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if F32_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision="tf32x3")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        return acc, m_new, l_i

    # Per-batch integers are not specialised (a new value would recompile inside a timed call): the block-table row
    # stride (its width follows the longest prefix of the batch).
    @triton.jit(do_not_specialize=["stride_bt"])
    def _paged_prefix_attn_kernel(
        q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, o_ptr,
        bt_ptr, plen_ptr, cu_ptr, prog_ptr,
        stride_qt, stride_qkv, stride_qg,
        stride_kt, stride_kh, stride_vt, stride_vh,
        stride_kcb, stride_kcs, stride_kch,
        stride_vcb, stride_vcs, stride_vch,
        stride_ot, stride_oh, stride_bt,
        qk_scale,
        NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        UPCAST: tl.constexpr, F32_DOT: tl.constexpr,
    ):
        # Program = (query block of one sequence, kv head). Its tile has BLOCK_M tokens x GROUP_PAD query heads as
        # ROWS = BLOCK_M * GROUP_PAD rows (row r: token r // GROUP_PAD, head r % GROUP_PAD of the kv group), so each
        # K/V tile is loaded once for all query heads that share it.
        pid = tl.program_id(0)
        prog = pid // NUM_KV_HEADS
        kvh = pid % NUM_KV_HEADS
        seq = tl.load(prog_ptr + 2 * prog)
        if seq < 0:
            return
        q_start = tl.load(prog_ptr + 2 * prog + 1)
        tok0 = tl.load(cu_ptr + seq)
        seqlen = tl.load(cu_ptr + seq + 1) - tok0
        plen = tl.load(plen_ptr + seq)

        ROWS: tl.constexpr = BLOCK_M * GROUP_PAD
        r = tl.arange(0, ROWS)
        g = r % GROUP_PAD
        qpos = q_start + r // GROUP_PAD
        row_ok = (qpos < seqlen) & (g < GROUP)
        d = tl.arange(0, HEAD_DIM)
        qtok = (tok0 + qpos).to(tl.int64)
        q_ptrs = q_ptr + qtok[:, None] * stride_qt + kvh * stride_qkv + g[:, None] * stride_qg + d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)

        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        n = tl.arange(0, BLOCK_N)

        # Prefix: full tiles need no mask; positions map to (page, offset) through the block table per key row,
        # so BLOCK_N is independent of the page size.
        bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
        kc_head = kc_ptr + kvh * stride_kch
        vc_head = vc_ptr + kvh * stride_vch
        prefix_full = (plen // BLOCK_N) * BLOCK_N
        # The page ids of tile i+1 are loaded in iteration i: the K/V addresses then do not wait on a load of the same
        # iteration, so the software pipeliner can keep several K/V tiles in flight (>= 3 buffers).
        page = tl.load(bt_row + n // PAGE, mask=n < prefix_full, other=0).to(tl.int64)
        for start in range(0, prefix_full, BLOCK_N):
            off = (start + n) % PAGE
            kx = tl.load(kc_head + page[:, None] * stride_kcb + off[:, None] * stride_kcs + d[None, :])
            vx = tl.load(vc_head + page[:, None] * stride_vcb + off[:, None] * stride_vcs + d[None, :])
            nxt = start + BLOCK_N + n
            page = tl.load(bt_row + nxt // PAGE, mask=nxt < prefix_full, other=0).to(tl.int64)
            acc, m_i, l_i = _softmax_step(q, kx, vx, acc, m_i, l_i, qk_scale, row_ok[:, None], False, UPCAST, F32_DOT)
        if prefix_full < plen:
            pos = prefix_full + n
            pvalid = pos < plen
            page = tl.load(bt_row + pos // PAGE, mask=pvalid, other=0).to(tl.int64)
            off = pos % PAGE
            kx = tl.load(kc_head + page[:, None] * stride_kcb + off[:, None] * stride_kcs + d[None, :],
                         mask=pvalid[:, None], other=0.0)
            vx = tl.load(vc_head + page[:, None] * stride_vcb + off[:, None] * stride_vcs + d[None, :],
                         mask=pvalid[:, None], other=0.0)
            acc, m_i, l_i = _softmax_step(q, kx, vx, acc, m_i, l_i, qk_scale, pvalid[None, :], True, UPCAST, F32_DOT)

        # New tokens, causal. Tiles ending at or before the first query row are fully visible; the rest (at most
        # ceil(BLOCK_M / BLOCK_N) + 1 tiles) are masked. Each masked tile starts at or before q_start, so every row
        # keeps at least one valid key.
        k_seq = k_ptr + tok0.to(tl.int64) * stride_kt + kvh * stride_kh
        v_seq = v_ptr + tok0.to(tl.int64) * stride_vt + kvh * stride_vh
        causal_full = ((q_start + 1) // BLOCK_N) * BLOCK_N
        for start in range(0, causal_full, BLOCK_N):
            pos = (start + n).to(tl.int64)
            kx = tl.load(k_seq + pos[:, None] * stride_kt + d[None, :])
            vx = tl.load(v_seq + pos[:, None] * stride_vt + d[None, :])
            acc, m_i, l_i = _softmax_step(q, kx, vx, acc, m_i, l_i, qk_scale, row_ok[:, None], False, UPCAST, F32_DOT)
        causal_end = tl.minimum(q_start + BLOCK_M, seqlen)
        for start in range(causal_full, causal_end, BLOCK_N):
            pos = start + n
            kvalid = pos < seqlen
            pos64 = pos.to(tl.int64)
            kx = tl.load(k_seq + pos64[:, None] * stride_kt + d[None, :], mask=kvalid[:, None], other=0.0)
            vx = tl.load(v_seq + pos64[:, None] * stride_vt + d[None, :], mask=kvalid[:, None], other=0.0)
            valid = kvalid[None, :] & (pos[None, :] <= qpos[:, None])
            acc, m_i, l_i = _softmax_step(q, kx, vx, acc, m_i, l_i, qk_scale, valid, True, UPCAST, F32_DOT)

        out = acc / l_i[:, None]
        o_ptrs = o_ptr + qtok[:, None] * stride_ot + (kvh * GROUP + g)[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit(do_not_specialize=["num_tokens"])
    def _write_kv_kernel(
        k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, num_tokens,
        stride_kt, stride_kh, stride_vt, stride_vh,
        stride_kcb, stride_kcs, stride_kch,
        stride_vcb, stride_vcs, stride_vch,
        NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        slot = tl.load(slot_ptr + t, mask=t < num_tokens, other=-1)
        ok = slot >= 0
        page = slot // PAGE
        off = slot % PAGE
        h = tl.arange(0, HEADS_PAD)
        d = tl.arange(0, HEAD_DIM)
        t3 = t.to(tl.int64)[:, None, None]
        h3 = h[None, :, None]
        d3 = d[None, None, :]
        mask = ok[:, None, None] & (h3 < NUM_KV_HEADS)
        kx = tl.load(k_ptr + t3 * stride_kt + h3 * stride_kh + d3, mask=mask)
        vx = tl.load(v_ptr + t3 * stride_vt + h3 * stride_vh + d3, mask=mask)
        p3 = page[:, None, None]
        o3 = off[:, None, None]
        tl.store(kc_ptr + p3 * stride_kcb + o3 * stride_kcs + h3 * stride_kch + d3, kx, mask=mask)
        tl.store(vc_ptr + p3 * stride_vcb + o3 * stride_vcs + h3 * stride_vch + d3, vx, mask=mask)


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------
def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _check_tensor(name: str, t, ndim: int | tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        # ValueError (not TypeError) so that every bad argument raises one exception type, as the API promises.
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")


def _check_int32(name: str, t, ndim: int, device: torch.device) -> None:
    _check_tensor(name, t, ndim)
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


@dataclass(slots=True)
class _Shapes:
    num_tokens: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int
    num_seqs: int
    max_blocks: int


def _check_args(q, k, v, k_cache, v_cache, block_tables, prefix_lens, cu_seqlens_q, scale) -> _Shapes:
    """Shape, dtype, device and stride checks (no device sync)."""
    _check_tensor("q", q, (3, 4))
    _check_tensor("k", k, 3)
    _check_tensor("v", v, 3)
    _check_tensor("k_cache", k_cache, 4)
    _check_tensor("v_cache", v_cache, 4)
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q/k/v/caches must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have stride 1 on its last (head) dim, got strides {tuple(t.stride())}")
    tq, hkv, d = k.shape
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} differs from k shape {tuple(k.shape)}")
    if q.dim() == 4:
        if q.shape[0] != tq or q.shape[1] != hkv or q.shape[3] != d:
            raise ValueError(f"grouped q must be [Tq, Hkv, Hq/Hkv, D] = [{tq}, {hkv}, *, {d}], got {tuple(q.shape)}")
        hq = q.shape[1] * q.shape[2]
    else:
        if q.shape[0] != tq:
            raise ValueError(f"q has {q.shape[0]} tokens but k/v have {tq}")
        if q.shape[2] != d:
            raise ValueError(f"q head dim {q.shape[2]} differs from k/v head dim {d}")
        hq = q.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"number of query heads ({hq}) must be a positive multiple of kv heads ({hkv})")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache shape {tuple(k_cache.shape)} differs from v_cache shape {tuple(v_cache.shape)}")
    nb, bs, chkv, cd = k_cache.shape
    if chkv != hkv or cd != d:
        raise ValueError(f"k_cache must be [num_blocks, block_size, {hkv}, {d}] to match k, got {tuple(k_cache.shape)}")
    if not _is_pow2(bs) or bs < 16:
        raise ValueError(f"block size (k_cache.shape[1]) must be a power of two >= 16, got {bs}")
    _check_int32("block_tables", block_tables, 2, q.device)
    _check_int32("prefix_lens", prefix_lens, 1, q.device)
    _check_int32("cu_seqlens_q", cu_seqlens_q, 1, q.device)
    b = prefix_lens.shape[0]
    if cu_seqlens_q.shape[0] != b + 1:
        raise ValueError(
            f"cu_seqlens_q must have B+1 = {b + 1} entries (B from prefix_lens), got {cu_seqlens_q.shape[0]}"
        )
    if block_tables.shape[0] != b:
        raise ValueError(f"block_tables must have B = {b} rows (B from prefix_lens), got {block_tables.shape[0]}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    return _Shapes(tq, hq, hkv, d, nb, bs, b, block_tables.shape[1])


def _check_metadata_values(block_tables, prefix_lens, cu_seqlens_q, s: _Shapes) -> None:
    """Value checks of the int32 metadata; one device->host transfer."""
    if s.num_seqs == 0:
        if cu_seqlens_q[0].item() != 0 or s.num_tokens != 0:
            raise ValueError(f"with no sequences cu_seqlens_q must be [0] and Tq 0, got Tq={s.num_tokens}")
        return
    cu = cu_seqlens_q.long()
    pl = prefix_lens.long()
    nblk = (pl + s.block_size - 1) // s.block_size
    used = torch.arange(s.max_blocks, device=pl.device)[None, :] < nblk[:, None]
    bt = block_tables.long()
    flags = torch.stack([
        cu[0] != 0,
        (cu[1:] < cu[:-1]).any(),
        cu[-1] != s.num_tokens,
        (pl < 0).any(),
        (nblk > s.max_blocks).any(),
        (used & ((bt < 0) | (bt >= s.num_blocks))).any(),
    ]).tolist()
    messages = (
        "cu_seqlens_q[0] must be 0",
        "cu_seqlens_q must be non-decreasing",
        f"cu_seqlens_q[-1] must equal the number of new tokens Tq = {s.num_tokens}",
        "prefix_lens must be >= 0",
        f"block_tables is too narrow: some prefix_lens need more than {s.max_blocks} blocks of {s.block_size}",
        f"block_tables holds block ids outside [0, {s.num_blocks}) within a prefix",
    )
    for bad, msg in zip(flags, messages, strict=True):
        if bad:
            raise ValueError(msg)


# --------------------------------------------------------------------------------------------------------------------
# Plan: validated metadata and the program table, reusable across layers of one step
# --------------------------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class PagedAttentionPlan:
    """Launch plan for the Triton kernel of one batch's metadata (build once per step, reuse for every layer).

    programs: int32 [P, 2] of (sequence, first query position) per query block, longest work first; rows with
    sequence -1 are padding (P is a shape-only upper bound so building it needs no device sync).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    programs: torch.Tensor
    cu_seqlens_q: torch.Tensor
    prefix_lens: torch.Tensor
    block_tables: torch.Tensor


def _default_blocks(head_dim: int, group_pad: int, dtype: torch.dtype, on_gpu: bool) -> tuple[int, int, int, int]:
    """(block_m tokens, block_n keys, num_warps, num_stages); rows per tile = block_m * group_pad.

    GPU values are the usual flash-attention forward shapes for sm_90 (128 rows x 64 keys, 8 warps at D=128), not
    tuned on hardware yet; `python bench/bench_attention.py --sweep` times alternatives.
    """
    if not on_gpu:
        # Interpreter: cost is per program instance, so use big tiles.
        return max(1, 64 // group_pad), 32, 4, 1
    if dtype == torch.float32:
        # fp32 tiles take twice the registers and shared memory of bf16 ones.
        return max(1, 64 // group_pad), 32, 4, 2
    rows = 128 if 64 <= head_dim <= 128 else 64
    num_warps = 8 if head_dim >= 128 else 4
    return max(1, rows // group_pad), 64, num_warps, 3


def _build_programs(cu_seqlens_q, prefix_lens, num_tokens: int, block_m: int) -> torch.Tensor:
    b = prefix_lens.shape[0]
    dev = cu_seqlens_q.device
    # Upper bound on sum_b ceil(len_b / block_m): every sequence wastes less than one block.
    p = (num_tokens + block_m - 1) // block_m + b
    if b == 0 or p == 0:
        return torch.full((max(p, 1), 2), -1, dtype=torch.int32, device=dev)
    cu = cu_seqlens_q.long()
    lens = cu[1:] - cu[:-1]
    nblk = (lens + block_m - 1) // block_m
    ends = torch.cumsum(nblk, 0)
    pid = torch.arange(p, device=dev)
    seq = torch.searchsorted(ends, pid, right=True)
    valid = seq < b
    seq_c = seq.clamp(max=b - 1)
    start = (pid - (ends[seq_c] - nblk[seq_c])) * block_m
    # Longest first (keys seen = prefix + causal span) so the tail of the grid is short programs.
    work = torch.where(valid, prefix_lens.long()[seq_c] + start + block_m, torch.full_like(start, -1))
    order = torch.argsort(work, descending=True, stable=True)
    table = torch.stack([torch.where(valid, seq, -1), torch.where(valid, start, 0)], 1)[order]
    return table.to(torch.int32).contiguous()


def plan_paged_prefix_attention(q, k, v, k_cache, v_cache, block_tables, prefix_lens, cu_seqlens_q, *, scale=1.0,
                                block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                                num_stages: int | None = None, check_values: bool = True) -> PagedAttentionPlan:
    """Validate shapes and metadata values (one device sync) and build the Triton launch plan.

    check_values=False skips the value checks and so the sync: for callers that built the metadata themselves
    (the engine's runner), where a sync per batch would stall the host pipeline.

    Pass the result as `plan=` to `paged_prefix_attention` with the same metadata tensors to skip both the value
    checks and the table build on every layer. block_m (tokens per program, power of two), block_n (keys per
    tile, power of two >= 16), num_warps and num_stages override the defaults; block_m * next_pow2(Hq/Hkv) >= 16.
    """
    s = _check_args(q, k, v, k_cache, v_cache, block_tables, prefix_lens, cu_seqlens_q, scale)
    if check_values and not is_meta(q):  # meta tensors (the roofline model) carry no values to check
        _check_metadata_values(block_tables, prefix_lens, cu_seqlens_q, s)
    group_pad = _next_pow2(s.num_q_heads // s.num_kv_heads)
    dm, dn, dw, ds = _default_blocks(s.head_dim, group_pad, q.dtype, q.is_cuda)
    block_m = dm if block_m is None else block_m
    block_n = dn if block_n is None else block_n
    num_warps = dw if num_warps is None else num_warps
    num_stages = ds if num_stages is None else num_stages
    if not _is_pow2(block_m) or block_m * group_pad < 16:
        raise ValueError(f"block_m must be a power of two with block_m * {group_pad} >= 16, got {block_m}")
    if not _is_pow2(block_n) or block_n < 16:
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    programs = _build_programs(cu_seqlens_q, prefix_lens, s.num_tokens, block_m)
    return PagedAttentionPlan(block_m, block_n, num_warps, num_stages, programs, cu_seqlens_q, prefix_lens,
                              block_tables)


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------
def paged_prefix_attention(q, k, v, k_cache, v_cache, block_tables, prefix_lens, cu_seqlens_q, *, scale: float,
                           backend: str = "auto", plan: PagedAttentionPlan | None = None,
                           host_lens: tuple[list[int], list[int]] | None = None, out=None) -> torch.Tensor:
    """Attention of packed new tokens over their cached prefix pages and themselves (causal). Returns [Tq, Hq, D].

    backend: "auto" (the Triton kernel on CUDA, or on CPU when Triton's interpreter is on, for the head dims and
    dtypes it takes; the reference otherwise), "triton" (on CPU needs TRITON_INTERPRET=1 before import), "torch".
    plan: from `plan_paged_prefix_attention` on the same metadata tensors; skips the per-call metadata value checks.
    host_lens: (new tokens, prefix length) per sequence as python ints, the values of cu_seqlens_q's differences and
    prefix_lens. Only read on `meta` tensors (the roofline model, see _meta.py), which carry no values: the launch is
    then recorded with its FLOPs and bytes, and an empty result returned.
    out: a [Tq, Hq, D] tensor (unit stride on D, any token and head strides) to write the result into.
    """
    if out is not None:
        _check_out(out, q, k)
    if is_meta(q):
        res = _paged_prefix_attention_meta(q, k, v, k_cache, v_cache, block_tables, prefix_lens, cu_seqlens_q,
                                           scale, host_lens)
        return res if out is None else out
    unsupported = None  # bad dtypes and shapes are left to the argument checks of either path
    if isinstance(q, torch.Tensor) and q.dim() and (not _is_pow2(q.shape[-1]) or not 16 <= q.shape[-1] <= 256):
        unsupported = f"head dim {q.shape[-1]} (the kernel takes powers of two in [16, 256])"
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    backend = resolve_backend("paged_prefix_attention", backend, globals().get("_paged_prefix_attn_kernel"), device,
                              unsupported)
    if backend == "torch":
        res = paged_prefix_attention_ref(q, k, v, k_cache, v_cache, block_tables, prefix_lens, cu_seqlens_q,
                                         scale=scale)
        return res if out is None else out.copy_(res)
    s = _check_args(q, k, v, k_cache, v_cache, block_tables, prefix_lens, cu_seqlens_q, scale)
    if plan is None:
        plan = plan_paged_prefix_attention(q, k, v, k_cache, v_cache, block_tables, prefix_lens, cu_seqlens_q,
                                           scale=scale)
    elif (plan.cu_seqlens_q is not cu_seqlens_q or plan.prefix_lens is not prefix_lens
          or plan.block_tables is not block_tables):
        raise ValueError("plan was built for other metadata tensors (cu_seqlens_q, prefix_lens, block_tables)")
    # The kernel indexes the int32 metadata with unit strides (and block_tables with unit column stride).
    block_tables, prefix_lens, cu_seqlens_q = (t.contiguous() for t in (block_tables, prefix_lens, cu_seqlens_q))
    group = s.num_q_heads // s.num_kv_heads
    if out is None:
        out = torch.empty((s.num_tokens, s.num_q_heads, s.head_dim), dtype=q.dtype, device=q.device)
    if s.num_tokens == 0:
        return out
    if q.dim() == 4:
        sqt, sqkv, sqg = q.stride(0), q.stride(1), q.stride(2)
    else:
        sqt, sqkv, sqg = q.stride(0), q.stride(1) * group, q.stride(1)
    grid = (plan.programs.shape[0] * s.num_kv_heads,)
    _paged_prefix_attn_kernel[grid](
        q, k, v, k_cache, v_cache, out,
        block_tables, prefix_lens, cu_seqlens_q, plan.programs,
        sqt, sqkv, sqg,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), block_tables.stride(0),
        float(scale) * _LOG2E,
        NUM_KV_HEADS=s.num_kv_heads, GROUP=group, GROUP_PAD=_next_pow2(group), HEAD_DIM=s.head_dim,
        PAGE=s.block_size, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        UPCAST=not q.is_cuda, F32_DOT=q.dtype == torch.float32,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return out


def _check_out(out, q, k) -> None:
    hq = q.shape[1] * q.shape[2] if q.dim() == 4 else q.shape[1]
    want = (k.shape[0], hq, k.shape[2])
    if (not isinstance(out, torch.Tensor) or tuple(out.shape) != want or out.dtype != q.dtype
            or out.device != q.device or out.stride(-1) != 1):
        raise ValueError(f"out must be a {want} {q.dtype} tensor on {q.device} with unit stride on the head dim")


def paged_attention_flops(new_lens: list[int], prefix_lens: list[int], num_q_heads: int, head_dim: int) -> int:
    """Matmul FLOPs of the attended (query, key) pairs: QK^T and PV, 2 * D each per pair and query head.

    New token i of a sequence with prefix p sees p + i + 1 keys. The kernel skips tiles past the causal edge, so the
    masked part of its diagonal tiles (< BLOCK_M + BLOCK_N keys per row) is all it computes beyond this count."""
    pairs = sum(n * p + n * (n + 1) // 2 for n, p in zip(new_lens, prefix_lens, strict=True))
    return 4 * head_dim * num_q_heads * pairs


def _paged_prefix_attention_meta(q, k, v, k_cache, v_cache, block_tables, prefix_lens, cu_seqlens_q, scale,
                                 host_lens):
    s = _check_args(q, k, v, k_cache, v_cache, block_tables, prefix_lens, cu_seqlens_q, scale)
    if host_lens is None:
        raise ValueError("paged_prefix_attention on meta tensors needs host_lens=(new_lens, prefix_lens): meta "
                         "tensors carry no values")
    new, pre = (list(x) for x in host_lens)
    if len(new) != s.num_seqs or len(pre) != s.num_seqs or sum(new) != s.num_tokens:
        raise ValueError(f"host_lens must hold {s.num_seqs} new lengths summing to Tq = {s.num_tokens} and "
                         f"{s.num_seqs} prefix lengths, got {len(new)} (sum {sum(new)}) and {len(pre)}")
    out = torch.empty((s.num_tokens, s.num_q_heads, s.head_dim), dtype=q.dtype, device=q.device)
    # The paged caches count only the prefix rows this launch reads (the rest of the pool is not its input).
    cache_rows = sum(pre) * s.num_kv_heads * s.head_dim * k_cache.element_size()
    moved = nbytes(q, k, v, block_tables, prefix_lens, cu_seqlens_q, out) + 2 * cache_rows  # K and V pages
    record_launch("paged_prefix_attention", flops=paged_attention_flops(new, pre, s.num_q_heads, s.head_dim),
                  nbytes=moved)
    return out


def paged_prefix_attention_ref(q, k, v, k_cache, v_cache, block_tables, prefix_lens, cu_seqlens_q, *,
                               scale: float) -> torch.Tensor:
    """Pure torch: gather each prefix from its pages, append the new keys, masked softmax in fp32."""
    s = _check_args(q, k, v, k_cache, v_cache, block_tables, prefix_lens, cu_seqlens_q, scale)
    _check_metadata_values(block_tables, prefix_lens, cu_seqlens_q, s)
    group = s.num_q_heads // s.num_kv_heads
    hkv, d, bs = s.num_kv_heads, s.head_dim, s.block_size
    qg = q.reshape(s.num_tokens, hkv, group, d)
    out = torch.empty((s.num_tokens, hkv, group, d), dtype=q.dtype, device=q.device)
    cu = cu_seqlens_q.tolist()
    pls = prefix_lens.tolist()
    for b in range(s.num_seqs):
        t0, t1, p = cu[b], cu[b + 1], pls[b]
        n = t1 - t0
        if n == 0:
            continue
        nblk = (p + bs - 1) // bs
        pages = block_tables[b, :nblk].long()
        kk = torch.cat([k_cache[pages].reshape(nblk * bs, hkv, d)[:p], k[t0:t1]]).float()
        vv = torch.cat([v_cache[pages].reshape(nblk * bs, hkv, d)[:p], v[t0:t1]]).float()
        chunk = max(1, _REF_CHUNK_ELEMS // max(1, s.num_q_heads * (p + n)))
        keys = torch.arange(p + n, device=q.device)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            qc = qg[t0 + c0:t0 + c1].float()
            scores = torch.einsum("thgd,shd->hgts", qc, kk) * scale
            # query i (0-based among new tokens) sees keys j < p + i + 1
            allowed = keys[None, :] <= (p + torch.arange(c0, c1, device=q.device))[:, None]
            scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[t0 + c0:t0 + c1] = torch.einsum("hgts,shd->thgd", probs, vv).to(q.dtype)
    return out.reshape(s.num_tokens, s.num_q_heads, d)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, backend: str = "auto") -> None:
    """Write new tokens' k/v [Tq, Hkv, D] into the paged caches at flat slots (block * block_size + offset).

    slot_mapping: int64 [Tq], -1 skips a token. Triton on CUDA: one launch, no device sync (a torch masked index
    write would need a nonzero() sync to drop the -1 slots), also under Triton's interpreter; torch elsewhere.
    """
    _check_tensor("k", k, 3)
    _check_tensor("v", v, 3)
    _check_tensor("k_cache", k_cache, 4)
    _check_tensor("v_cache", v_cache, 4)
    _check_tensor("slot_mapping", slot_mapping, 1)
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} differs from k shape {tuple(k.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache shape {tuple(k_cache.shape)} differs from v_cache shape {tuple(v_cache.shape)}")
    if k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"k_cache [.., .., Hkv, D] = {tuple(k_cache.shape)} does not match k {tuple(k.shape)}")
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != k.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but k has {k.dtype}")
        if t.device != k.device:
            raise ValueError(f"{name} is on {t.device} but k is on {k.device}")
    if slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be int64, got {slot_mapping.dtype}")
    if slot_mapping.shape[0] != k.shape[0] or slot_mapping.device != k.device:
        raise ValueError(f"slot_mapping must be [{k.shape[0]}] on {k.device}, got {tuple(slot_mapping.shape)} "
                         f"on {slot_mapping.device}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have stride 1 on its last (head) dim, got strides {tuple(t.stride())}")
    nb, bs, hkv, d = k_cache.shape
    if is_meta(k):  # the roofline model: reads k, v and the slots, writes as many cache rows
        record_launch("write_kv_cache", flops=0, nbytes=2 * nbytes(k, v) + nbytes(slot_mapping))
        return
    unsupported = None if _is_pow2(d) else f"head dim {d} (the kernel takes powers of two)"
    backend = resolve_backend("write_kv_cache", backend, globals().get("_write_kv_kernel"), k.device, unsupported)
    if backend == "torch":
        sel = slot_mapping >= 0
        slots = slot_mapping[sel]
        if slots.numel() and int(slots.max()) >= nb * bs:
            raise ValueError(f"slot_mapping holds slots >= num_blocks * block_size = {nb * bs}")
        k_cache[slots // bs, slots % bs] = k[sel]
        v_cache[slots // bs, slots % bs] = v[sel]
        return
    tq = k.shape[0]
    if tq == 0:
        return
    block_t = _write_kv_block(hkv, d)
    _write_kv_kernel[(triton.cdiv(tq, block_t),)](
        k, v, k_cache, v_cache, slot_mapping.contiguous(), tq,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=hkv, HEADS_PAD=_next_pow2(hkv), HEAD_DIM=d, PAGE=bs, BLOCK_T=block_t,
    )


def _write_kv_block(num_kv_heads: int, head_dim: int) -> int:
    """Tokens per program of the KV write: ~4k elements per K (and V) tile."""
    return max(1, min(64, 4096 // (_next_pow2(num_kv_heads) * head_dim)))


def compile_specs(cfg=None, page: int = 16) -> list[dict]:
    """Launch configurations the host wrappers pick on a GPU for the model `cfg` (default: the released 7B), in bf16
    and fp32, for ahead-of-time compile checks (see kernels/_specs.py). page: the KV block size (the engine's default).
    Integer values are those the wrappers pass for InternLM2's layout (q, k after RoPE contiguous, v a slice of the
    packed wqkv output)."""
    from ixc_engine.config import ModelConfig

    from ._specs import kernel_spec, triton_type

    cfg = cfg or ModelConfig()
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    group = hq // hkv
    qkv_row = (hq + 2 * hkv) * d
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        t = triton_type(dtype)
        tag = "bf16" if dtype == torch.bfloat16 else "fp32"
        block_m, block_n, warps, stages = _default_blocks(d, _next_pow2(group), dtype, True)
        cache = {"stride_kcb": page * hkv * d, "stride_kcs": hkv * d, "stride_kch": d,
                 "stride_vcb": page * hkv * d, "stride_vcs": hkv * d, "stride_vch": d}
        specs.append(kernel_spec(
            f"paged_prefix_attn[{tag}]", _paged_prefix_attn_kernel,
            pointers={"q_ptr": t, "k_ptr": t, "v_ptr": t, "kc_ptr": t, "vc_ptr": t, "o_ptr": t,
                      "bt_ptr": "*i32", "plen_ptr": "*i32", "cu_ptr": "*i32", "prog_ptr": "*i32"},
            ints={"stride_qt": hq * d, "stride_qkv": group * d, "stride_qg": d,
                  "stride_kt": hkv * d, "stride_kh": d, "stride_vt": qkv_row, "stride_vh": (group + 2) * d,
                  **cache, "stride_ot": hq * d, "stride_oh": d, "stride_bt": 37},
            floats=("qk_scale",),
            constexprs={"NUM_KV_HEADS": hkv, "GROUP": group, "GROUP_PAD": _next_pow2(group), "HEAD_DIM": d,
                        "PAGE": page, "BLOCK_M": block_m, "BLOCK_N": block_n, "UPCAST": False,
                        "F32_DOT": dtype == torch.float32},
            num_warps=warps, num_stages=stages, per_batch=("stride_bt",), dtype=tag,
        ))
        specs.append(kernel_spec(
            f"write_kv[{tag}]", _write_kv_kernel,
            pointers={"k_ptr": t, "v_ptr": t, "kc_ptr": t, "vc_ptr": t, "slot_ptr": "*i64"},
            ints={"num_tokens": 3301, "stride_kt": hkv * d, "stride_kh": d, "stride_vt": qkv_row,
                  "stride_vh": (group + 2) * d, **cache},
            constexprs={"NUM_KV_HEADS": hkv, "HEADS_PAD": _next_pow2(hkv), "HEAD_DIM": d, "PAGE": page,
                        "BLOCK_T": _write_kv_block(hkv, d)},
            num_warps=4, num_stages=3, per_batch=("num_tokens",), dtype=tag,  # Triton's launch defaults
        ))
    return specs
