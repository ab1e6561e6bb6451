"""pytest-benchmark entries for paged prefix attention: small shapes, reference path on CPU, Triton on GPU."""

import pytest
import torch
from bench_attention import check_against_baseline, dense_baseline, make_problem, prefix_baseline
from ixc_engine.kernels.paged_attention import (
    paged_prefix_attention,
    paged_prefix_attention_ref,
    plan_paged_prefix_attention,
    write_kv_cache,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32


def _sync(out):
    if CUDA:
        torch.cuda.synchronize()
    return out


def _problem(lens, prefixes, shared):
    if CUDA:
        return make_problem(lens, prefixes, shared_prefix=shared, device=DEVICE, dtype=DTYPE)
    return make_problem(lens, prefixes, hq=8, hkv=2, d=32, shared_prefix=shared, dtype=DTYPE)


SHAPES = {
    # GPU: the bench_attention.py prefix case; CPU: a few tokens of it
    "prefix_shared": (([300] * 8, [3000] * 8, True), ([24] * 4, [100] * 4, True)),
    "dense_varlen": (([2048, 1000, 3000], [0, 0, 0], False), ([40, 17, 60], [0, 0, 0], False)),
}


@pytest.mark.benchmark(group="paged_attention")
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bench_paged_prefix_attention(benchmark, shape):
    prob = _problem(*SHAPES[shape][0 if CUDA else 1])
    if CUDA:
        plan = plan_paged_prefix_attention(*prob.args, scale=prob.scale)
        out = benchmark(lambda: _sync(paged_prefix_attention(*prob.args, scale=prob.scale, plan=plan)))
    else:
        out = benchmark(lambda: paged_prefix_attention(*prob.args, scale=prob.scale, backend="torch"))
    ref = paged_prefix_attention_ref(*prob.args, scale=prob.scale)
    tol = 2e-2 if CUDA else 1e-6
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    benchmark.extra_info["gflop"] = prob.flops() / 1e9
    benchmark.extra_info["backend"] = "triton" if CUDA else "torch reference"


@pytest.mark.benchmark(group="paged_attention_baseline")
@pytest.mark.skipif(not CUDA, reason="flash SDPA baselines need CUDA")
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bench_sdpa_baseline(benchmark, shape):
    prob = _problem(*SHAPES[shape][0])
    fn, desc = (prefix_baseline if shape == "prefix_shared" else dense_baseline)(prob)
    benchmark(lambda: _sync(fn()))
    benchmark.extra_info["gflop"] = prob.flops() / 1e9
    benchmark.extra_info["baseline"] = desc


@pytest.mark.benchmark(group="paged_attention")
def test_bench_write_kv_cache(benchmark):
    tq, hkv, d, bs = (2400, 8, 128, 16) if CUDA else (64, 2, 32, 16)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(tq, hkv, d, generator=g).to(DEVICE, DTYPE)
    v = torch.randn(tq, hkv, d, generator=g).to(DEVICE, DTYPE)
    nb = 2 * tq // bs + 1
    kc = torch.zeros(nb, bs, hkv, d, device=DEVICE, dtype=DTYPE)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(nb * bs, generator=g)[:tq].to(DEVICE)
    benchmark(lambda: _sync(write_kv_cache(k, v, kc, vc, slots)))
    torch.testing.assert_close(kc.view(-1, hkv, d)[slots], k, atol=0, rtol=0)


@pytest.mark.parametrize("dense", [True, False])
def test_baselines_compute_the_same_attention(dense):
    # The SDPA baselines (math backend here, flash on GPU) must do the work the kernel does, or the speed-up is void.
    prob = (make_problem([20, 9, 33], [0, 0, 0], hq=8, hkv=2, d=32, dtype=torch.float32) if dense else
            make_problem([12] * 3, [40] * 3, hq=8, hkv=2, d=32, shared_prefix=True, dtype=torch.float32))
    fn, _ = (dense_baseline if dense else prefix_baseline)(prob, allowed=(("math",),))
    assert check_against_baseline(prob, fn(), dense=dense) < 1e-5
