"""bench_e2e's multi-dtype summary (medians, same-run ratios, score agreement) and its Kendall tau."""

from __future__ import annotations

import pytest
from bench_e2e import Row, kendall_tau, mid_config, summarize


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)


def test_mid_config_is_the_issue_shape():
    cfg = mid_config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.num_kv_groups) == (1024, 4, 128, 4)
    assert (cfg.vision.hidden_size, cfg.vision.num_hidden_layers, cfg.vision.grid) == (256, 4, 40)


def test_summary_medians_and_ratios():
    def row(scorer, secs, scores=None, gpu=None):
        extra = {"scores": scores} if scores else {}
        if gpu is not None:
            extra["gpu_seconds"] = gpu
        return Row("corpus end-to-end", scorer, secs, 6, 1200, 6 / secs, 1200 / secs, mfu=1.0 / secs, extra=extra)

    rows = [row("engine fp32", s, [1.0, 2.0, 3.0], g) for s, g in ((10, 8), (12, 9), (30, 20))]
    rows += [row("engine bf16", s, [1.01, 2.02, 2.9], g) for s, g in ((5, 3), (4, 3), (6, 4))]
    rows += [row("upstream baseline fp32", s) for s in (25, 24, 26)]
    out = summarize(rows, {"fp32": 1.0, "bf16": 3.0}, ["fp32", "bf16"])
    ratio = {r["what"]: r for r in out["ratios"]}
    assert ratio["engine bf16 vs fp32"]["ratio"] == pytest.approx(12 / 5)  # medians, not means
    assert ratio["engine bf16 vs fp32"]["runner_ratio"] == pytest.approx(9 / 3)
    assert ratio["engine fp32 vs upstream baseline fp32"]["ratio"] == pytest.approx(25 / 12)
    assert ratio["engine bf16 vs upstream baseline fp32"]["ratio"] == pytest.approx(25 / 5)
    agree = out["agreement"][0]
    assert agree["kendall_tau"] == 1.0 and agree["max_rel_diff"] == pytest.approx(0.1 / 3)
