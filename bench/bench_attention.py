"""Paged prefix attention benchmark: `python bench/bench_attention.py`.

On CUDA (bf16, D=128, Hq=32, Hkv=8), two cases, each against a torch SDPA baseline measured in the same run:
  dense   causal varlen, no prefix (packed sequences of 2-9k tokens). Baseline: one flash-backend SDPA call per
          sequence, is_causal=True, on the same (query, key) pairs; k/v expanded to Hq heads outside the timed
          region when the flash backend refuses GQA (this favours the baseline).
  prefix  8 candidates x 300 new tokens sharing one 3000-token paged prefix. Baseline: gather the prefix pages
          (one batched index), concatenate the new k/v, one SDPA call over the batch with a lower-right causal
          mask; the gather and concatenation are timed, as an engine without a paged kernel must do them.
FLOPs = 4 * Hq * D * (attended (query, key) pairs): two matmuls (QK^T, PV) of 2 FLOPs per multiply-add, counting
only the pairs the causal mask keeps, identical for kernel and baseline. Times are medians (triton do_bench).
Timing and report lines come from bench/harness.py. On CPU: a small shape on the torch reference path, labelled
as such (no performance meaning).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
from harness import do_bench_median, report
from ixc_engine.kernels.paged_attention import (
    paged_prefix_attention,
    paged_prefix_attention_ref,
    plan_paged_prefix_attention,
)

# DESIGN.md's dense bf16 matmul figure for H100/H200, the ceiling TFLOP/s are reported against.
PEAK_TFLOPS = 790.0
FLOP_RULE = "FLOPs = 4 * Hq * D * attended (query, key) pairs (QK^T and PV, causal-kept pairs only)"


@dataclass(slots=True)
class AttnProblem:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    prefix_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    lens: list[int]
    prefixes: list[int]
    scale: float

    @property
    def args(self) -> tuple:
        return (self.q, self.k, self.v, self.k_cache, self.v_cache, self.block_tables, self.prefix_lens,
                self.cu_seqlens_q)

    def pairs(self) -> int:
        return sum(n * p + n * (n + 1) // 2 for n, p in zip(self.lens, self.prefixes, strict=True))

    def flops(self) -> float:
        return 4.0 * self.q.shape[1] * self.q.shape[2] * self.pairs()


@dataclass(slots=True)
class Timing:
    name: str
    ms: float
    tflops: float


def make_problem(lens, prefixes, *, hq=32, hkv=8, d=128, block_size=16, shared_prefix=False, dtype=torch.bfloat16,
                 device="cpu", seed=0) -> AttnProblem:
    """Packed new tokens of len(lens) sequences over prefixes stored in randomly permuted pages."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    need = [math.ceil(p / block_size) for p in prefixes]
    distinct = need[:1] if shared_prefix else need
    num_blocks = max(1, 2 * sum(distinct))
    perm = torch.randperm(num_blocks, generator=g)
    max_blocks = max(need + [0])
    bt = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    used = 0
    for i, nb in enumerate(need):
        if shared_prefix and i > 0:
            bt[i] = bt[0]
            continue
        bt[i, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    tq = sum(lens)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)

    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    return AttnProblem(rnd(tq, hq, d), rnd(tq, hkv, d), rnd(tq, hkv, d), rnd(num_blocks, block_size, hkv, d),
                       rnd(num_blocks, block_size, hkv, d), bt.to(device),
                       torch.tensor(prefixes, dtype=torch.int32, device=device), cu, list(lens), list(prefixes),
                       1.0 / math.sqrt(d))


def median_ms(fn, *, cuda: bool) -> float:
    return do_bench_median(fn, device="cuda" if cuda else "cpu")


def _timing(name: str, ms: float, prob: AttnProblem) -> Timing:
    return Timing(name, ms, prob.flops() / (ms * 1e-3) / 1e12)


# ----------------------------------------------------------------------------------------------------------- baselines
def _sdpa(q, k, v, backends: tuple[str, ...], **kw):
    """SDPA on [B, H, L, D] restricted to the named backends ("flash", "efficient", "math")."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    with sdpa_kernel([names[b] for b in backends]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)


def _pick_sdpa(q, k, v, group: int, allowed: list[tuple[str, ...]], **kw):
    """First (backends, GQA mode) that runs: flash before efficient, native GQA before k/v expanded to Hq heads."""
    for backends in allowed:
        for gqa in ("native", "expand"):
            try:
                if gqa == "native":
                    _sdpa(q, k, v, backends, enable_gqa=True, **kw)
                else:
                    _sdpa(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), backends, **kw)
                return backends, gqa
            except (RuntimeError, TypeError):
                continue
    raise RuntimeError(f"no SDPA backend among {allowed} runs these shapes")


def dense_baseline(prob: AttnProblem, allowed=(("flash",),)):
    """Per-sequence flash SDPA, inputs laid out [1, H, L, D] before timing. Returns (fn, description).

    allowed: SDPA backend sets to try in order; ("math",) lets CPU tests check the baseline computes the same thing.
    """
    cu = prob.cu_seqlens_q.tolist()
    group = prob.q.shape[1] // prob.k.shape[1]
    qs, ks, vs = [], [], []
    for b in range(len(prob.lens)):
        sl = slice(cu[b], cu[b + 1])
        qs.append(prob.q[sl].transpose(0, 1)[None].contiguous())
        ks.append(prob.k[sl].transpose(0, 1)[None].contiguous())
        vs.append(prob.v[sl].transpose(0, 1)[None].contiguous())
    kw = {"is_causal": True, "scale": prob.scale}
    backends, gqa = _pick_sdpa(qs[0], ks[0], vs[0], group, list(allowed), **kw)
    if gqa == "expand":  # outside the timed region: favours the baseline
        ks = [x.repeat_interleave(group, dim=1) for x in ks]
        vs = [x.repeat_interleave(group, dim=1) for x in vs]
    else:
        kw["enable_gqa"] = True

    def run():
        return [_sdpa(a, b, c, backends, **kw) for a, b, c in zip(qs, ks, vs, strict=True)]

    return run, f"one {'/'.join(backends)} SDPA call per sequence, is_causal, GQA {gqa}"


def prefix_baseline(prob: AttnProblem, allowed=(("flash",), ("flash", "efficient"))):
    """Gather prefix pages + concat + one batched SDPA with a lower-right causal mask (equal-length candidates)."""
    from torch.nn.attention.bias import causal_lower_right

    n, p = prob.lens[0], prob.prefixes[0]
    if any(x != n for x in prob.lens) or any(x != p for x in prob.prefixes):
        raise ValueError("prefix_baseline needs equal new lengths and equal prefix lengths")
    b, hq, d = len(prob.lens), prob.q.shape[1], prob.q.shape[2]
    hkv, bs = prob.k.shape[1], prob.k_cache.shape[1]
    group = hq // hkv
    nblk = math.ceil(p / bs)
    pages = prob.block_tables[:, :nblk].long()
    q4 = prob.q.view(b, n, hq, d).transpose(1, 2)
    kw = {"attn_mask": causal_lower_right(n, p + n), "scale": prob.scale}

    def gather(cache, new):
        pref = cache[pages].reshape(b, nblk * bs, hkv, d)[:, :p]
        return torch.cat([pref, new.view(b, n, hkv, d)], 1).transpose(1, 2)

    backends, gqa = _pick_sdpa(q4, gather(prob.k_cache, prob.k), gather(prob.v_cache, prob.v), group,
                               list(allowed), **kw)

    def run():
        kk, vv = gather(prob.k_cache, prob.k), gather(prob.v_cache, prob.v)
        if gqa == "native":
            return _sdpa(q4, kk, vv, backends, enable_gqa=True, **kw)
        return _sdpa(q4, kk.repeat_interleave(group, 1), vv.repeat_interleave(group, 1), backends, **kw)

    return run, f"gather pages + cat + one batched {'/'.join(backends)} SDPA (lower-right causal), GQA {gqa} (timed)"


# ------------------------------------------------------------------------------------------------------------- cases
def bench_kernel(prob: AttnProblem, **overrides) -> list[Timing]:
    plan = plan_paged_prefix_attention(*prob.args, scale=prob.scale, **overrides)
    cuda = prob.q.is_cuda
    kw = {"scale": prob.scale, "backend": "triton"}
    reused = median_ms(lambda: paged_prefix_attention(*prob.args, plan=plan, **kw), cuda=cuda)
    fresh = median_ms(lambda: paged_prefix_attention(*prob.args, **kw), cuda=cuda)
    cfg = f"bm={plan.block_m} bn={plan.block_n} w={plan.num_warps} s={plan.num_stages}"
    return [_timing(f"triton, plan reused ({cfg})", reused, prob),
            _timing("triton, plan built per call (1 sync)", fresh, prob)]


def sweep(prob: AttnProblem, title: str):
    """Time the kernel over a small grid of launch shapes (rows per tile = block_m * next_pow2(Hq/Hkv))."""
    from triton.runtime.errors import OutOfResources

    print(f"\n== sweep: {title}")
    group_pad = 1 << max(0, (prob.q.shape[1] // prob.k.shape[1] - 1).bit_length())
    for rows in (64, 128):
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    bm = max(1, rows // group_pad)
                    try:
                        plan = plan_paged_prefix_attention(*prob.args, scale=prob.scale, block_m=bm, block_n=block_n,
                                                           num_warps=warps, num_stages=stages)
                        ms = median_ms(lambda p=plan: paged_prefix_attention(*prob.args, scale=prob.scale, plan=p,
                                                                             backend="triton"), cuda=True)
                    except (OutOfResources, RuntimeError) as exc:  # shape does not fit this GPU
                        print(f"   rows={rows:3d} bn={block_n:3d} w={warps} s={stages}: failed ({type(exc).__name__})")
                        continue
                    t = _timing("", ms, prob)
                    print(f"   rows={rows:3d} bn={block_n:3d} w={warps} s={stages}: "
                          f"{ms:8.3f} ms {t.tflops:7.1f} TFLOP/s")


def check_against_baseline(prob: AttnProblem, baseline_out, dense: bool) -> float:
    out = paged_prefix_attention(*prob.args, scale=prob.scale)
    if dense:
        base = torch.cat([o[0].transpose(0, 1) for o in baseline_out])
    else:
        base = baseline_out.transpose(1, 2).reshape(out.shape)
    return (out.float() - base.float()).abs().max().item()


def print_case(title: str, prob: AttnProblem, base_desc: str, base: Timing, kernels: list[Timing], err: float):
    print(f"\n== {title}")
    print(f"   new tokens {sum(prob.lens)} in {len(prob.lens)} seqs, prefix lens {sorted(set(prob.prefixes))}, "
          f"Hq={prob.q.shape[1]} Hkv={prob.k.shape[1]} D={prob.q.shape[2]} block_size={prob.k_cache.shape[1]}, "
          f"{prob.q.dtype}, {prob.flops() / 1e9:.1f} GFLOP")
    print(f"   baseline: {base_desc}")
    report(f"   baseline, {base.ms:.3f} ms", base.tflops, "TFLOP/s", ceiling=PEAK_TFLOPS)
    for t in kernels:
        report(f"   {t.name}, {t.ms:.3f} ms", t.tflops, "TFLOP/s", ceiling=PEAK_TFLOPS, baseline=base.tflops)
    print(f"   max |kernel - baseline| = {err:.3e}")


def cuda_cases(block_size: int) -> dict[str, AttnProblem]:
    dev = torch.device("cuda")
    dense = {
        "dense causal varlen, 4 x 4096": [4096] * 4,
        "dense causal varlen, mixed 2k-9k (64k tokens)": [9000, 2048, 5000, 7000, 3000, 6000, 8192, 4000, 9000,
                                                          2500, 8800],
    }
    cases = {t: make_problem(lens, [0] * len(lens), block_size=block_size, device=dev) for t, lens in dense.items()}
    cases["paged prefix, 8 candidates x 300 new over a shared 3000-token prefix"] = make_problem(
        [300] * 8, [3000] * 8, block_size=block_size, shared_prefix=True, device=dev)
    return cases


def run_cuda(block_size: int, do_sweep: bool):
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print(f"{FLOP_RULE}; ceiling {PEAK_TFLOPS:.0f} TFLOP/s (DESIGN.md dense bf16 figure)")
    for title, prob in cuda_cases(block_size).items():
        dense = max(prob.prefixes) == 0
        fn, desc = (dense_baseline if dense else prefix_baseline)(prob)
        base = _timing("baseline", median_ms(fn, cuda=True), prob)
        print_case(title, prob, desc, base, bench_kernel(prob), check_against_baseline(prob, fn(), dense=dense))
        if do_sweep:
            sweep(prob, title)
        del prob, fn
        torch.cuda.empty_cache()


def run_cpu(block_size: int):
    print("No GPU present: timing the torch reference path on CPU, fp32, small shape (not a performance figure).")
    print(FLOP_RULE)
    prob = make_problem([64, 64], [128, 128], hq=8, hkv=2, d=64, block_size=block_size, shared_prefix=True,
                        dtype=torch.float32)
    ms = median_ms(lambda: paged_prefix_attention_ref(*prob.args, scale=prob.scale), cuda=False)
    t = _timing("torch reference", ms, prob)
    print(f"   {t.name}: 2 x 64 new tokens over a shared 128-token prefix, Hq=8 Hkv=2 D=64: "
          f"{t.ms:.3f} ms, {t.tflops * 1e3:.2f} GFLOP/s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-size", type=int, default=16, help="KV cache page size (power of two >= 16)")
    ap.add_argument("--sweep", action="store_true", help="also time a grid of kernel launch shapes (GPU only)")
    args = ap.parse_args(argv)
    if torch.cuda.is_available():
        run_cuda(args.block_size, args.sweep)
    else:
        run_cpu(args.block_size)


if __name__ == "__main__":
    main()
