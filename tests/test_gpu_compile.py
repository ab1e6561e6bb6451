"""Ahead-of-time compiles of every Triton kernel for sm_90a and sm_80 on a CPU (bench/compile_table.py): 0 spills in
bf16 on sm_90a, wgmma and a pipelined prefix loop in the attention kernel, no recompiles for per-batch integers.

conftest.py sets TRITON_INTERPRET=1 for the kernel tests, and Triton reads it once at import, so the compiles run in a
fresh process without it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from .conftest import REPO

pytest.importorskip("triton")

_SCRIPT = r"""
import importlib, json, sys
sys.path.insert(0, "bench")
import compile_table as ct
rows = ct.run(jobs=2)
specs = ct.all_specs()
out = {
    "rows": [{k: v for k, v in r.items() if k != "ptxas_log"} for r in rows],
    "specs": [{"name": s["name"], "module": s["module"], "dtype": s["dtype"], "per_batch": s["per_batch"],
               "constexprs": {k: v for k, v in s["constexprs"].items() if isinstance(v, (int, bool))},
               "fn": s["fn"].__name__} for s in specs],
    "specialised": {s["name"]: ct.specialised_per_batch(s) for s in specs},
    "launched": {m: ct.launched_kernels(importlib.import_module(m)) for m in ct.kernel_modules()},
    "modules": ct.kernel_modules(),
}
print("JSON" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("JSON"))
    return json.loads(line[4:])


def _rows(compiled, prefix, arch, dtype=None):
    rows = [r for r in compiled["rows"] if r["kernel"].startswith(prefix) and r["arch"] == arch
            and (dtype is None or r["dtype"] == dtype)]
    assert rows, f"no compiled row for {prefix} on {arch}"
    return rows


def test_every_kernel_module_and_kernel_has_specs(compiled):
    jit_files = [p for folder in ("kernels", "training") for p in sorted((REPO / folder).glob("*.py"))
                 if re.search(r"^\s*@triton\.jit", p.read_text(), re.MULTILINE)]
    stems = {m.rsplit(".", 1)[1] for m in compiled["modules"]}
    assert {p.stem for p in jit_files} <= stems, "a module with Triton kernels has no compile_specs()"
    covered = {(s["module"], s["fn"]) for s in compiled["specs"]}
    for module, names in compiled["launched"].items():
        for name in names:
            assert (module, name) in covered, f"{module}.{name} is launched but has no compile spec"


def test_every_spec_compiles_for_both_archs(compiled):
    for arch in ("sm_90a", "sm_80"):
        assert {r["kernel"] for r in compiled["rows"] if r["arch"] == arch} == {s["name"] for s in compiled["specs"]}


def test_no_spills_in_bf16_on_sm90a(compiled):
    bf16 = [s["name"] for s in compiled["specs"] if s["dtype"] == "bf16"]
    assert bf16
    for r in compiled["rows"]:
        if r["arch"] == "sm_90a" and r["kernel"] in bf16:
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{r['kernel']} spills: {r}"


def test_attention_uses_wgmma_and_a_pipelined_prefix_loop(compiled):
    (row,) = _rows(compiled, "paged_prefix_attn", "sm_90a", "bf16")
    assert row["wgmma"] > 0
    prefix = row["loops"][0]
    assert prefix["upper"] == "prefix_full", row["loops"]
    assert prefix["buffers"] >= 3, f"prefix loop not pipelined: {row['loops']}"
    assert prefix["async_waits"] and max(prefix["async_waits"]) >= 1, row["loops"]
    (row80,) = _rows(compiled, "paged_prefix_attn", "sm_80", "bf16")
    assert row80["mma"] > 0


def test_per_batch_integers_are_not_specialised(compiled):
    assert compiled["specialised"] == {s["name"]: [] for s in compiled["specs"]}
    per_batch = {s["fn"]: set(s["per_batch"]) for s in compiled["specs"]}
    # the ones the review found recompiling inside timed calls
    assert "stride_bt" in per_batch["_paged_prefix_attn_kernel"]
    assert "num_tokens" in per_batch["_write_kv_kernel"]
    assert "n_rows" in per_batch["_pool_score_fwd_kernel"]


def test_specs_follow_the_engine_and_wrapper_choices(compiled):
    from ixc_engine.engine.engine import EngineConfig

    attn = [s for s in compiled["specs"] if s["fn"] == "_paged_prefix_attn_kernel"]
    assert {s["constexprs"]["PAGE"] for s in attn} == {EngineConfig().block_size}
