import os

os.environ["TRITON_INTERPRET"] = "1"

import math
from dataclasses import dataclass

import pytest
import torch
from ixc_engine.kernels.paged_attention import (
    paged_prefix_attention,
    paged_prefix_attention_ref,
    plan_paged_prefix_attention,
    write_kv_cache,
)

pytest.importorskip("triton")


@dataclass(slots=True)
class Case:
    block_size: int
    hq: int
    hkv: int
    d: int
    lens: tuple[int, ...]  # new tokens per sequence
    prefix: tuple[int, ...]  # cached prefix per sequence
    share: bool = False  # sequences with equal prefix_lens reuse the same pages
    block_m: int | None = None
    block_n: int | None = None


def make_inputs(c: Case, seed: int = 0, dtype=torch.float32):
    """Random packed inputs with a randomly permuted page pool; extra table columns hold junk ids."""
    g = torch.Generator().manual_seed(seed)
    bs = c.block_size
    need = [(p + bs - 1) // bs for p in c.prefix]
    max_blocks = max(need + [0]) + 1
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    rows, by_len, used = [], {}, 0
    for p, nb in zip(c.prefix, need, strict=True):
        if c.share and p in by_len:
            rows.append(list(by_len[p]))
            continue
        pages = perm[used:used + nb]
        used += nb
        by_len[p] = pages
        rows.append(pages)
    bt = torch.full((len(c.prefix), max_blocks), 10**6, dtype=torch.int32)  # junk past the prefix
    for i, pages in enumerate(rows):
        bt[i, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
    tq = sum(c.lens)
    q = torch.randn(tq, c.hq, c.d, generator=g).to(dtype)
    k = torch.randn(tq, c.hkv, c.d, generator=g).to(dtype)
    v = torch.randn(tq, c.hkv, c.d, generator=g).to(dtype)
    kc = torch.randn(num_blocks, bs, c.hkv, c.d, generator=g).to(dtype)
    vc = torch.randn(num_blocks, bs, c.hkv, c.d, generator=g).to(dtype)
    cu = torch.tensor([0] + [sum(c.lens[:i + 1]) for i in range(len(c.lens))], dtype=torch.int32)
    pl = torch.tensor(c.prefix, dtype=torch.int32)
    return q, k, v, kc, vc, bt, pl, cu


def naive_fp64(q, k, v, kc, vc, bt, pl, cu, scale):
    """Per sequence, per query head, per token: keys gathered slot by slot, softmax in fp64."""
    tq, hq, d = q.shape[0], q.shape[1] * (q.shape[2] if q.dim() == 4 else 1), q.shape[-1]
    q = q.reshape(tq, hq, d).double()
    hkv = k.shape[1]
    bs = kc.shape[1]
    out = torch.zeros(tq, hq, d, dtype=torch.float64)
    for b in range(pl.shape[0]):
        t0, t1, p = int(cu[b]), int(cu[b + 1]), int(pl[b])
        for h in range(hq):
            kvh = h // (hq // hkv)
            keys = [kc[int(bt[b, j // bs]), j % bs, kvh] for j in range(p)] + [k[t, kvh] for t in range(t0, t1)]
            vals = [vc[int(bt[b, j // bs]), j % bs, kvh] for j in range(p)] + [v[t, kvh] for t in range(t0, t1)]
            if not keys:
                continue
            kk = torch.stack(keys).double()
            vv = torch.stack(vals).double()
            for i in range(t1 - t0):
                s = kk[:p + i + 1] @ q[t0 + i, h] * scale
                w = torch.softmax(s, 0)
                out[t0 + i, h] = w @ vv[:p + i + 1]
    return out


CASES = {
    # prefix mid-block (37), none (0), exactly one block (16); length-1 segment
    "bs16_g2_mixed": Case(16, 4, 2, 32, (5, 40, 1), (37, 0, 16)),
    # many sequences of one new token each over prefixes around block boundaries, GQA 4
    "bs32_g4_many_len1": Case(32, 4, 1, 16, (1, 1, 1, 1, 1, 1, 7), (0, 32, 31, 33, 64, 1, 70)),
    # GQA 8, page size 64, prefix spanning 3 pages
    "bs64_g8": Case(64, 8, 1, 16, (33, 17), (64, 129)),
    # no prefix at all: plain causal varlen (MHA)
    "bs16_g1_no_prefix": Case(16, 2, 2, 32, (50, 3, 19), (0, 0, 0)),
    # tiles of 64 keys gather across 4 pages of 16; tiny query blocks (4 tokens x 4 heads = 16 rows)
    "bs16_wide_tiles": Case(16, 4, 1, 16, (21, 9), (50, 96), block_m=4, block_n=64),
    # tiles of 16 keys inside 64-key pages
    "bs64_narrow_tiles": Case(64, 2, 1, 32, (18, 30), (70, 5), block_m=16, block_n=16),
    # two candidates sharing the same prefix pages (+ a third sequence), and an empty segment
    "shared_prefix": Case(32, 4, 2, 16, (12, 0, 20, 3), (45, 45, 45, 8), share=True),
    # group of 3 (padded to 4 rows per token inside the kernel)
    "g3": Case(16, 6, 2, 16, (10, 25), (23, 0)),
    # 2-token query blocks x 8 heads: query blocks start at every residue of the key tile, exercising the
    # boundary between fully visible and masked causal tiles
    "tiny_query_blocks": Case(16, 8, 1, 16, (20,), (9,), block_m=2, block_n=16),
    # head dim 128 on tiny lengths
    "d128": Case(16, 2, 1, 128, (3, 2), (17, 0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference_and_naive(name):
    c = CASES[name]
    q, k, v, kc, vc, bt, pl, cu = make_inputs(c, seed=list(CASES).index(name))
    scale = 1.0 / math.sqrt(c.d)
    plan = plan_paged_prefix_attention(q, k, v, kc, vc, bt, pl, cu, scale=scale, block_m=c.block_m,
                                       block_n=c.block_n)
    out = paged_prefix_attention(q, k, v, kc, vc, bt, pl, cu, scale=scale, backend="triton", plan=plan)
    ref = paged_prefix_attention_ref(q, k, v, kc, vc, bt, pl, cu, scale=scale)
    exact = naive_fp64(q, k, v, kc, vc, bt, pl, cu, scale)
    assert out.shape == (q.shape[0], c.hq, c.d) and out.dtype == q.dtype
    torch.testing.assert_close(ref.double(), exact, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), exact, atol=1e-5, rtol=1e-5)
    err_ref = (ref.double() - exact).abs().max().item()
    err_ker = (out.double() - exact).abs().max().item()
    assert err_ker <= 2 * err_ref + 2e-6, (err_ker, err_ref)


def test_default_plan_and_auto_backend():
    c = CASES["bs16_g2_mixed"]
    q, k, v, kc, vc, bt, pl, cu = make_inputs(c, seed=3)
    out = paged_prefix_attention(q, k, v, kc, vc, bt, pl, cu, scale=0.2, backend="triton")
    ref = paged_prefix_attention_ref(q, k, v, kc, vc, bt, pl, cu, scale=0.2)
    auto = paged_prefix_attention(q, k, v, kc, vc, bt, pl, cu, scale=0.2)  # interpreter on: the kernel
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(auto, out, atol=0, rtol=0)


def test_auto_backend_takes_the_reference_for_head_dims_the_kernel_lacks():
    c = Case(16, 4, 2, 24, (5, 9), (17, 0))  # head dim 24: no power-of-two tile
    q, k, v, kc, vc, bt, pl, cu = make_inputs(c, seed=4)
    ref = paged_prefix_attention_ref(q, k, v, kc, vc, bt, pl, cu, scale=0.3)
    torch.testing.assert_close(paged_prefix_attention(q, k, v, kc, vc, bt, pl, cu, scale=0.3), ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="head dim 24"):
        paged_prefix_attention(q, k, v, kc, vc, bt, pl, cu, scale=0.3, backend="triton")


def test_non_contiguous_metadata():
    # Same values as contiguous tensors, other strides: column-strided block table, strided lens and offsets.
    c = CASES["bs16_g2_mixed"]
    q, k, v, kc, vc, bt, pl, cu = make_inputs(c, seed=6)
    ref = paged_prefix_attention_ref(q, k, v, kc, vc, bt, pl, cu, scale=0.2)
    wide = torch.full((bt.shape[0], 2 * bt.shape[1]), -7, dtype=torch.int32)
    wide[:, ::2] = bt
    pl2 = torch.stack([pl, torch.full_like(pl, -3)], 1)[:, 0]
    cu2 = torch.stack([cu, torch.full_like(cu, 99)], 1)[:, 0]
    assert not (wide[:, ::2].is_contiguous() or pl2.is_contiguous() or cu2.is_contiguous())
    out = paged_prefix_attention(q, k, v, kc, vc, wide[:, ::2], pl2, cu2, scale=0.2, backend="triton")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["llama", "internlm2_grouped"])
def test_strided_q_from_packed_qkv(layout):
    # q/k/v as views into one packed projection output, the way the model calls the kernel.
    c = Case(16, 4, 2, 16, (9, 22), (20, 32))
    _, _, _, kc, vc, bt, pl, cu = make_inputs(c, seed=5)
    tq, hq, hkv, d, gsz = sum(c.lens), c.hq, c.hkv, c.d, c.hq // c.hkv
    g = torch.Generator().manual_seed(11)
    if layout == "llama":
        qkv = torch.randn(tq, (hq + 2 * hkv) * d + 8, generator=g)  # padded rows: token stride != width
        q = qkv[:, :hq * d].view(tq, hq, d)
        k = qkv[:, hq * d:(hq + hkv) * d].view(tq, hkv, d)
        v = qkv[:, (hq + hkv) * d:(hq + 2 * hkv) * d].view(tq, hkv, d)
    else:
        qkv = torch.randn(tq, hkv, gsz + 2, d, generator=g)  # per kv group: gsz query heads, 1 key, 1 value
        q = qkv[:, :, :gsz]  # grouped [Tq, Hkv, G, D], no single head stride exists
        k = qkv[:, :, gsz]
        v = qkv[:, :, gsz + 1]
    assert not q.is_contiguous() and not k.is_contiguous()
    out = paged_prefix_attention(q, k, v, kc, vc, bt, pl, cu, scale=0.3, backend="triton")
    exact = naive_fp64(q, k, v, kc, vc, bt, pl, cu, 0.3)
    torch.testing.assert_close(out.double(), exact, atol=1e-5, rtol=1e-5)
    ref = paged_prefix_attention_ref(q, k, v, kc, vc, bt, pl, cu, scale=0.3)
    torch.testing.assert_close(ref.double(), exact, atol=1e-5, rtol=1e-5)


def test_bf16_under_interpreter_upcasts():
    c = Case(16, 4, 1, 16, (7, 12), (19, 0))
    q, k, v, kc, vc, bt, pl, cu = make_inputs(c, seed=9, dtype=torch.bfloat16)
    out = paged_prefix_attention(q, k, v, kc, vc, bt, pl, cu, scale=0.25, backend="triton")
    assert out.dtype == torch.bfloat16
    exact = naive_fp64(q, k, v, kc, vc, bt, pl, cu, 0.25)
    ref = paged_prefix_attention_ref(q, k, v, kc, vc, bt, pl, cu, scale=0.25)
    err_ref = (ref.double() - exact).abs().max().item()
    err_ker = (out.double() - exact).abs().max().item()
    assert err_ker <= 2 * err_ref + 1e-3, (err_ker, err_ref)


def test_prefix_in_cache_equals_all_new_tokens():
    # Attention of a full sequence computed at once must equal: write its first P tokens into the cache with
    # write_kv_cache, then attend with only the last N tokens as new ones.
    hq, hkv, d, bs, p, n = 4, 2, 16, 16, 41, 13
    g = torch.Generator().manual_seed(21)
    q = torch.randn(p + n, hq, d, generator=g)
    k = torch.randn(p + n, hkv, d, generator=g)
    v = torch.randn(p + n, hkv, d, generator=g)
    kc = torch.zeros(8, bs, hkv, d)
    vc = torch.zeros(8, bs, hkv, d)
    pages = torch.tensor([5, 2, 7], dtype=torch.int32)
    pos = torch.arange(p)
    slots = pages.long()[pos // bs] * bs + pos % bs
    write_kv_cache(k[:p], v[:p], kc, vc, slots, backend="triton")
    bt = pages[None, :]
    full = paged_prefix_attention(q, k, v, kc[:1], vc[:1], torch.zeros(1, 0, dtype=torch.int32),
                                  torch.zeros(1, dtype=torch.int32), torch.tensor([0, p + n], dtype=torch.int32),
                                  scale=0.25, backend="triton")
    tail = paged_prefix_attention(q[p:], k[p:], v[p:], kc, vc, bt, torch.tensor([p], dtype=torch.int32),
                                  torch.tensor([0, n], dtype=torch.int32), scale=0.25, backend="triton")
    torch.testing.assert_close(tail, full[p:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_write_kv_cache_round_trip(backend):
    tq, hkv, d, bs, nb = 23, 3, 16, 16, 6
    g = torch.Generator().manual_seed(4)
    packed = torch.randn(tq, hkv, 3, d, generator=g)
    k, v = packed[:, :, 1], packed[:, :, 2]  # strided views
    kc = torch.randn(nb, bs, hkv, d, generator=g)
    vc = torch.randn(nb, bs, hkv, d, generator=g)
    kc0, vc0 = kc.clone(), vc.clone()
    slots = torch.randperm(nb * bs, generator=g)[:tq]
    slots[[0, 7, 22]] = -1
    write_kv_cache(k, v, kc, vc, slots, backend=backend)
    flat_k, flat_v = kc.view(nb * bs, hkv, d), vc.view(nb * bs, hkv, d)
    written = slots >= 0
    torch.testing.assert_close(flat_k[slots[written]], k[written], atol=0, rtol=0)
    torch.testing.assert_close(flat_v[slots[written]], v[written], atol=0, rtol=0)
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[slots[written]] = False
    torch.testing.assert_close(flat_k[untouched], kc0.view(nb * bs, hkv, d)[untouched], atol=0, rtol=0)
    torch.testing.assert_close(flat_v[untouched], vc0.view(nb * bs, hkv, d)[untouched], atol=0, rtol=0)


def test_empty_batch():
    c = Case(16, 2, 1, 16, (0, 0), (5, 0))
    q, k, v, kc, vc, bt, pl, cu = make_inputs(c)
    for backend in ("torch", "triton"):
        out = paged_prefix_attention(q, k, v, kc, vc, bt, pl, cu, scale=1.0, backend=backend)
        assert out.shape == (0, 2, 16)


def test_plan_for_other_metadata_rejected():
    c = CASES["bs16_g2_mixed"]
    q, k, v, kc, vc, bt, pl, cu = make_inputs(c)
    plan = plan_paged_prefix_attention(q, k, v, kc, vc, bt, pl, cu, scale=1.0)
    with pytest.raises(ValueError, match="plan was built"):
        paged_prefix_attention(q, k, v, kc, vc, bt, pl.clone(), cu, scale=1.0, backend="triton", plan=plan)
    with pytest.raises(ValueError, match="block_m"):
        plan_paged_prefix_attention(q, k, v, kc, vc, bt, pl, cu, scale=1.0, block_m=3)
    with pytest.raises(ValueError, match="block_n"):
        plan_paged_prefix_attention(q, k, v, kc, vc, bt, pl, cu, scale=1.0, block_n=8)


def _bad(name):
    """Return (args, kwargs, message regex) for one malformed input, built from a valid case."""
    c = Case(16, 4, 2, 16, (5, 7), (20, 3))
    q, k, v, kc, vc, bt, pl, cu = make_inputs(c)
    a = {"q": q, "k": k, "v": v, "k_cache": kc, "v_cache": vc, "block_tables": bt, "prefix_lens": pl,
         "cu_seqlens_q": cu}
    kw = {"scale": 0.25}
    msg = {
        "dtype_mismatch": ("k", k.half(), "dtype"),
        "int_q": ("q", q.int(), "float16, bfloat16 or float32"),
        "heads_not_multiple": ("q", torch.randn(12, 3, 16), "multiple of kv heads"),
        "block_size_8": (("k_cache", "v_cache"), kc[:, :8].contiguous(), "power of two >= 16"),
        "block_size_24": (("k_cache", "v_cache"), torch.randn(4, 24, 2, 16), "power of two >= 16"),
        "block_tables_int64": ("block_tables", bt.long(), "block_tables must be int32"),
        "prefix_lens_int64": ("prefix_lens", pl.long(), "prefix_lens must be int32"),
        "cu_int64": ("cu_seqlens_q", cu.long(), "cu_seqlens_q must be int32"),
        "table_too_narrow": ("prefix_lens", torch.tensor([60, 3], dtype=torch.int32), "too narrow"),
        "cu_total": ("cu_seqlens_q", torch.tensor([0, 5, 11], dtype=torch.int32), "Tq = 12"),
        "cu_decreasing": ("cu_seqlens_q", torch.tensor([0, 13, 12], dtype=torch.int32), "non-decreasing"),
        "cu_start": ("cu_seqlens_q", torch.tensor([1, 5, 12], dtype=torch.int32), r"\[0\] must be 0"),
        "cu_count": ("cu_seqlens_q", torch.tensor([0, 12], dtype=torch.int32), "B\\+1"),
        "negative_prefix": ("prefix_lens", torch.tensor([-1, 3], dtype=torch.int32), ">= 0"),
        "block_id_out_of_range": ("block_tables", torch.full_like(bt, 999), "outside"),
        "q_last_dim_stride": ("q", torch.randn(12, 4, 32)[:, :, ::2], "stride 1"),
        "kv_shape": ("v", v[:, :1], "differs from k"),
        "cache_heads": ("v_cache", vc[:, :, :1], "v_cache shape"),
        "q_head_dim": ("q", torch.randn(12, 4, 8), "head dim"),
        "q_tokens": ("q", q[:11], "tokens"),
        "table_rows": ("block_tables", bt[:1], "rows"),
        "cache_1d": ("k_cache", kc.flatten(), "4 dims"),
        "not_tensor": ("prefix_lens", [20, 3], "torch.Tensor"),
    }
    if name == "scale":
        kw["scale"] = -1.0
        return a, kw, "scale"
    keys, val, pattern = msg[name]
    for key in (keys,) if isinstance(keys, str) else keys:
        a[key] = val
    return a, kw, pattern


BAD = ["dtype_mismatch", "int_q", "heads_not_multiple", "block_size_8", "block_size_24", "block_tables_int64",
       "prefix_lens_int64", "cu_int64", "table_too_narrow", "cu_total", "cu_decreasing", "cu_start", "cu_count",
       "negative_prefix", "block_id_out_of_range", "q_last_dim_stride", "kv_shape", "cache_heads", "q_head_dim",
       "q_tokens", "table_rows", "cache_1d", "not_tensor", "scale"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", BAD)
def test_bad_inputs_raise(name, backend):
    a, kw, pattern = _bad(name)
    with pytest.raises(ValueError, match=pattern):
        paged_prefix_attention(*a.values(), backend=backend, **kw)


def test_bad_backend_and_write_inputs():
    c = Case(16, 2, 1, 16, (4,), (0,))
    q, k, v, kc, vc, bt, pl, cu = make_inputs(c)
    with pytest.raises(ValueError, match="backend"):
        paged_prefix_attention(q, k, v, kc, vc, bt, pl, cu, scale=1.0, backend="cuda")
    with pytest.raises(ValueError, match="int64"):
        write_kv_cache(k, v, kc, vc, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="slot_mapping must be"):
        write_kv_cache(k, v, kc, vc, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="does not match"):
        write_kv_cache(k, v, kc[:, :, :, :8], vc[:, :, :, :8], torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="slots >="):
        write_kv_cache(k, v, kc, vc, torch.full((4,), kc.shape[0] * 16, dtype=torch.int64), backend="torch")
