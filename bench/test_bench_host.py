"""pytest-benchmark entries for one host planning step (small workload; see bench_host.py for the full one).

Run: pytest bench/test_bench_host.py --benchmark-enable
"""

from __future__ import annotations

import pytest
from bench_host import make_workload, run_step

from ixc_engine.engine.host import get_host_core

pytestmark = pytest.mark.benchmark


@pytest.mark.parametrize("kind", ["cpp", "python"])
def test_host_planning_step(benchmark, kind):
    try:
        core = get_host_core(kind)
    except ImportError as exc:
        pytest.skip(str(exc))
    wl = make_workload(n_seqs=16, min_tokens=1000, max_tokens=2000, block_size=16, n_prompts=4, n_steps=2)
    bm = core.BlockManager(wl.num_blocks, wl.block_size)
    run_step(core, bm, wl.steps[0], wl)  # warm the prefix cache
    new_tokens = benchmark(run_step, core, bm, wl.steps[1], wl)
    assert 0 < new_tokens < sum(len(k) for k in wl.steps[1])
    assert bm.num_free() == wl.num_blocks  # every step releases what it took
