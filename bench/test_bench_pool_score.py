"""pytest-benchmark entries for pool_score: the torch reference path on CPU, the Triton kernel on GPU.

With --benchmark-disable (the project's addopts) each entry runs once as a plain test.
"""

import pytest
import torch
from bench_pool_score import eager_baseline, make_problem
from harness import do_bench_median, measure_copy_bandwidth, report
from ixc_engine.kernels.pool_score import MODES, pool_score

CUDA = torch.cuda.is_available()


def _sync(out):
    if CUDA:
        torch.cuda.synchronize()
    return out


@pytest.mark.benchmark(group="pool_score")
@pytest.mark.parametrize("mode", MODES)
def test_bench_pool_score_reference_cpu(benchmark, mode):
    p = make_problem(1024, 256, 8, dtype=torch.float32, device="cpu", seed=1)
    out = benchmark(pool_score, p.hidden, p.norm_weight, p.head_weight, p.cu_seqlens, mode=mode, backend="torch")
    assert out.shape == ((p.T,) if mode == "token" else (p.B,))
    torch.testing.assert_close(out, eager_baseline(p, mode), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.benchmark(group="pool_score")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B", [32, 256])
def test_bench_pool_score_triton_gpu(benchmark, mode, B):
    p = make_problem(65536, 4096, B, dtype=torch.bfloat16, device="cuda", seed=1)
    args = (p.hidden, p.norm_weight, p.head_weight, p.cu_seqlens)
    out = benchmark(lambda: _sync(pool_score(*args, mode=mode, backend="triton")))
    ref = pool_score(*args, mode=mode, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_harness_helpers_on_cpu():
    ms = do_bench_median(lambda: torch.ones(1000).sum(), device="cpu", warmup_ms=1, rep_ms=5)
    assert ms > 0
    assert measure_copy_bandwidth("cpu", nbytes=1 << 20) > 0
    line = report("x", 50.0, "GB/s", ceiling=100.0, baseline=25.0)
    assert "50.0% of ceiling" in line and "2.00x baseline" in line
