"""The roofline model (bench/roofline.py): the meta-tensor hooks of the Triton wrappers count what their torch
references count, never fewer bytes than their inputs and outputs, and the whole model runs on this CPU."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from ixc_engine.kernels._meta import nbytes
from ixc_engine.kernels.paged_attention import paged_attention_flops, paged_prefix_attention, write_kv_cache
from ixc_engine.kernels.pool_score import pool_score, pool_score_ref
from roofline import Assumptions, Op, Recorder, attention_pairs, main, op_seconds, render
from torch.utils.flop_counter import FlopCounterMode

META = torch.device("meta")


def _meta(*ts):
    return [t.to(META) for t in ts]


def _attention_case(new, pre, hq=4, hkv=2, d=16, bs=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    tq = sum(new)
    q = torch.randn(tq, hq, d, generator=g, dtype=dtype)
    k = torch.randn(tq, hkv, d, generator=g, dtype=dtype)
    v = torch.randn(tq, hkv, d, generator=g, dtype=dtype)
    max_blocks = max(1, max((p + bs - 1) // bs for p in pre))
    nb = len(new) * max_blocks
    kc = torch.randn(nb, bs, hkv, d, generator=g, dtype=dtype)
    vc = torch.randn(nb, bs, hkv, d, generator=g, dtype=dtype)
    bt = torch.arange(nb, dtype=torch.int32).reshape(len(new), max_blocks)
    pl = torch.tensor(pre, dtype=torch.int32)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, kc, vc, bt, pl, cu


def _rowwise_attention(q, k, v, kc, vc, bt, pl, cu, scale):
    """The attended (query, key) pairs only: new token i of a sequence with prefix p against its p + i + 1 keys."""
    hkv, d = k.shape[1], k.shape[2]
    group = q.shape[1] // hkv
    outs = []
    for b in range(pl.shape[0]):
        t0, t1, p = int(cu[b]), int(cu[b + 1]), int(pl[b])
        nblk = (p + kc.shape[1] - 1) // kc.shape[1]
        pages = bt[b, :nblk].long()
        kk = torch.cat([kc[pages].reshape(-1, hkv, d)[:p], k[t0:t1]]).repeat_interleave(group, 1)
        vv = torch.cat([vc[pages].reshape(-1, hkv, d)[:p], v[t0:t1]]).repeat_interleave(group, 1)
        for i in range(t1 - t0):
            keys = p + i + 1
            s = torch.bmm(q[t0 + i][:, None, :], kk[:keys].permute(1, 2, 0)) * scale  # [Hq, 1, keys]
            outs.append(torch.bmm(s.softmax(-1), vv[:keys].transpose(0, 1))[:, 0])  # [Hq, D]
    return torch.stack(outs)


@pytest.mark.parametrize(("new", "pre"), [([5, 1, 17], [0, 0, 0]), ([3, 20], [7, 33]), ([1], [50])])
def test_attention_hook_flops_equal_flop_counter_on_attended_pairs(new, pre):
    args = _attention_case(new, pre)
    with FlopCounterMode(display=False) as fc:
        want_out = _rowwise_attention(*args, scale=0.25)
    assert paged_attention_flops(new, pre, args[0].shape[1], args[0].shape[2]) == fc.get_total_flops()
    # the reference it stands for computes the same attention
    ref = paged_prefix_attention(*args, scale=0.25, backend="torch")
    torch.testing.assert_close(ref, want_out, rtol=1e-5, atol=1e-5)
    margs = _meta(*args)
    rec = Recorder()
    with rec:
        out = paged_prefix_attention(*margs, scale=0.25, backend="triton", host_lens=(new, pre))
    assert out.shape == ref.shape and out.is_meta
    (op,) = [o for o in rec.ops if o.name == "paged_prefix_attention"]
    assert op.flops == fc.get_total_flops()
    q, k, v, kc, _, bt, pl, cu = args
    touched = 2 * sum(pre) * kc.shape[2] * kc.shape[3] * kc.element_size()  # cache rows read (K and V)
    assert op.nbytes >= nbytes(q, k, v, bt, pl, cu, ref) + touched


def test_attention_hook_needs_host_lengths():
    args = _meta(*_attention_case([4], [0]))
    with pytest.raises(ValueError, match="host_lens"):
        paged_prefix_attention(*args, scale=1.0, backend="triton")
    with pytest.raises(ValueError, match="host_lens"):
        paged_prefix_attention(*args, scale=1.0, backend="triton", host_lens=([3], [0]))


def test_write_kv_hook_bytes():
    k = torch.randn(7, 2, 16)
    v = torch.randn(7, 2, 16)
    kc = torch.zeros(4, 16, 2, 16)
    slots = torch.arange(7, dtype=torch.int64)
    margs = _meta(k, v, kc, kc.clone(), slots)
    rec = Recorder()
    with rec:
        write_kv_cache(*margs, backend="triton")
    (op,) = rec.ops
    assert op.name == "write_kv_cache" and op.flops == 0
    assert op.nbytes >= nbytes(k, v, slots) + nbytes(k, v)  # reads k, v, slots; writes as many cache rows


@pytest.mark.parametrize("mode", ["last", "mean", "token"])
def test_pool_score_hook(mode):
    h = torch.randn(11, 24)
    wn, wh = torch.randn(24), torch.randn(1, 24)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    with FlopCounterMode(display=False) as fc:
        want = pool_score_ref(h, wn, wh, cu, mode=mode)
    margs = _meta(h, wn, wh, cu)
    rec = Recorder()
    with rec:
        got = pool_score(*margs, mode=mode, backend="triton")
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_meta
    assert sum(op.flops for op in rec.ops) == fc.get_total_flops()
    assert rec.ops[0].name == "pool_score"
    assert rec.ops[0].nbytes >= nbytes(h, wn, wh, cu, torch.empty(want.shape[0] if mode == "last" else 11))


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_is_recorded_as_flash(causal):
    q = torch.randn(2, 3, 10, 8)
    with FlopCounterMode(display=False) as fc:  # the math the flash kernel does (all pairs)
        torch.matmul(torch.matmul(q, q.transpose(-1, -2)).softmax(-1), q)
    mq = q.to(META)
    rec = Recorder()
    with torch.inference_mode(), rec:
        out = F.scaled_dot_product_attention(mq, mq, mq, is_causal=causal)
    assert out.shape == q.shape
    (op,) = rec.ops
    assert op.name == "sdpa_flash"
    pairs = attention_pairs(10, 10, causal)
    assert op.flops == 2 * 2 * 3 * (8 + 8) * pairs
    if not causal:
        assert op.flops == fc.get_total_flops()
    assert op.nbytes >= 4 * nbytes(q)


def test_op_time_rule():
    a = Assumptions()
    assert op_seconds(Op("mm", "base_gemm", int(7e12), 0), a, "H100") == pytest.approx(0.01)
    assert op_seconds(Op("add", "glue", 0, int(2.68e9)), a, "H100") == pytest.approx(1e-3)
    assert op_seconds(Op("add", "glue", 0, 10), a, "H200") == a.launch_floor_s


@pytest.fixture(scope="module")
def release_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("roofline") / "roofline.json"
    assert main(["--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_roofline_runs_the_release_shape(release_model):
    out = release_model
    assert set(out) >= {"H100", "H200", "assumptions", "ceiling_tokens_per_s"}
    assert out["ceiling_tokens_per_s"] == pytest.approx(790e12 / (2 * (6.98e9 + 0.604e9)), rel=2e-3)
    for gpu in ("H100", "H200"):
        c = out[gpu]["corpus"]
        assert c["label"] == "model"
        assert c["tokens"] > 12 * 2500 and c["samples"] == 12
        assert sum(p["us_per_token"] for p in c["parts"].values()) == pytest.approx(c["us_per_token"])
        assert c["tokens_per_s"] == pytest.approx(1e6 / c["us_per_token"])
        assert c["parts"]["base_gemm"]["flops"] / c["tokens"] == pytest.approx(2 * 6.98e9, rel=0.01)
        # PLoRA A + B on every row of the mostly-image batches (B times zero on the text rows)
        assert c["parts"]["plora_gemm"]["flops"] / c["tokens"] == pytest.approx(2 * 0.604e9, rel=0.01)
        assert c["parts"]["attention"]["launches"] > 0 and c["parts"]["vit"]["flops"] > 0
        assert c["launches_per_decoder_layer"] > 5
        assert 0 < c["host_over_device"]
        assert out[gpu]["bon8"]["on_over_off"] > 1
        assert out[gpu]["baseline_corpus"]["us_per_token"] > 0
    # an H200 only moves bytes faster
    assert out["H200"]["corpus"]["us_per_token"] < out["H100"]["corpus"]["us_per_token"]
    printed = render(out)
    assert "MODEL" in printed and printed.count("model:") >= 8


def test_the_model_meets_issue_10s_targets(release_model):
    """What the code must keep the model saying (issue 10): >= 60% of the ceiling on the corpus on an H100 and
    best-of-8 sharing on/off >= 4x. The host share is measured on the machine that runs this, so it is printed by
    the script but not asserted here."""
    h100 = release_model["H100"]
    assert h100["corpus"]["pct_of_ceiling"] >= 60
    assert h100["bon8"]["on_over_off"] >= 4
    assert h100["corpus"]["us_per_token"] < h100["baseline_corpus"]["us_per_token"]
    assert h100["corpus"]["launches_per_decoder_layer"] <= 25
