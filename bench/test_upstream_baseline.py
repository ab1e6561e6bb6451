"""The baseline's GPU attention (flash attention per sequence over its real tokens, as upstream's flash_attention_2
path) equals its CPU eager attention (padded batch, additive causal + padding mask) on every real token."""

from __future__ import annotations

import math

import torch
from upstream_baseline import _flash_attention


def test_flash_path_equals_eager_on_real_tokens():
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, length, d = 3, 4, 2, 11, 8
    lens = [11, 4, 7]
    q = torch.randn(b, hq, length, d, generator=g)
    k = torch.randn(b, hkv, length, d, generator=g)
    v = torch.randn(b, hkv, length, d, generator=g)
    got = _flash_attention(q, k, v, lens)
    valid = torch.zeros(b, length, dtype=torch.bool)
    for i, n in enumerate(lens):
        valid[i, :n] = True
    keep = torch.tril(torch.ones(length, length, dtype=torch.bool))[None, None] & valid[:, None, None, :]
    mask = torch.zeros(b, 1, length, length).masked_fill_(~keep, torch.finfo(torch.float32).min)
    kk, vv = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    w = torch.softmax(q @ kk.transpose(2, 3) / math.sqrt(d) + mask, dim=-1)
    want = w @ vv
    for i, n in enumerate(lens):
        torch.testing.assert_close(got[i, :, :n], want[i, :, :n], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[i, :, n:], torch.zeros_like(got[i, :, n:]))
