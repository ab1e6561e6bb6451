"""The GPU code path (Triton kernels for attention and pooling) through the whole model, run by the interpreter."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from ixc_engine.api import RewardEngine
from ixc_engine.engine.engine import EngineConfig

PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]
REPLIES = ["Red, orange and yellow.", "Blue.", "Red, orange and yellow, then green."]


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_triton_backend_matches_reference(tiny_ckpt, prefix_cache):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton imported before TRITON_INTERPRET could be set")
    cfg = EngineConfig(prefix_cache=prefix_cache)
    ref = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", backend="torch", config=cfg)
    tri = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", backend="triton", config=EngineConfig(
        prefix_cache=prefix_cache))
    _, want = ref.best_of_n(PROMPT, REPLIES)
    _, got = tri.best_of_n(PROMPT, REPLIES)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    if prefix_cache:
        assert tri.stats()["prefix_tokens_reused"] > 0
