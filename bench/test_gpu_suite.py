"""The first-GPU-run script works end to end before any GPU sees it: its CPU dry run (tiny shapes, Triton
interpreter) runs every part, writes the JSON and the markdown rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
BENCH = Path(__file__).resolve().parent


def test_gpu_suite_dry_run(tmp_path):
    out, md = tmp_path / "suite.json", tmp_path / "suite.md"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--dry-run", "--json", str(out), "--md",
                           str(md)], cwd=BENCH.parent, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(out.read_text())
    parts = summary["parts"]
    assert set(parts) == {"parity", "pool_score", "attention", "e2e", "training", "roofline"}
    failed = {k: v["error"] for k, v in parts.items() if "error" in v}
    assert not failed, failed
    assert parts["parity"]["ok"], parts["parity"]
    assert len(parts["pool_score"]["cases"]) == 3 and all(c["kernel_ms"] > 0 for c in parts["pool_score"]["cases"])
    assert len(parts["attention"]["cases"]) == 2
    assert parts["e2e"]["corpus_tokens_per_s"] > 0 and parts["e2e"]["bon_on_over_off"] > 0
    assert set(parts["training"]["step_ms"]) >= {"BT step fused pool_score", "critic step unfused head"}
    roof = parts["roofline"]
    assert roof.get("absent") or "compare" in roof
    text = md.read_text()
    assert "| part | measured | target |" in text and "dry run" in text and text.count("\n|") >= 10
