"""Host pipeline: uint8 sub-crops normalised on the device equal the fp32 host path bit for bit, the pipelined batch
loop (batch k+1 queued before batch k's read-back) gives the same scores in the same order, and with workers the
first window is small."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ixc_engine.api import RewardEngine
from ixc_engine.engine.engine import EngineConfig, ScoringEngine
from ixc_engine.engine.runner import ModelRunner
from ixc_engine.engine.sequence import Sample
from ixc_engine.media.image import (
    MediaCrops,
    crops_from_canvas,
    hd_transform,
    normalize_uint8,
    process_image,
    to_tensor_normalized,
)

PROMPT = [{"role": "user", "content": "Describe the picture. " * 5}]
REPLIES = ["A cat.", "A dog on a red sofa, sleeping.", "Nothing", "Two cars parked by a wall " * 6, "一只猫",
           "A cat.", "Blue sky " * 9]


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(("size", "hd_num"), [((777, 523), 9), ((301, 950), 4), ((560, 560), 1)])
def test_uint8_crops_equal_the_fp32_normalisation(size, hd_num):
    img = _noise(*size, seed=hd_num)
    compact = process_image(img, hd_num)
    dense = crops_from_canvas(to_tensor_normalized(hd_transform(img, hd_num)))  # the previous fp32 path
    assert compact.compact and compact.sub_uint8.dtype == torch.uint8
    assert (compact.h, compact.w) == (dense.h, dense.w)
    assert torch.equal(compact.pixel_values, dense.pixel_values)
    # the global view (a bicubic resize of the normalised canvas) has no exact uint8 form: it stays fp32
    assert compact.global_view.dtype == torch.float32 and torch.equal(compact.global_view, dense.pixel_values[:1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_side_normalisation_equals_the_host_path(dtype):
    img = _noise(1000, 700, seed=3)
    compact = process_image(img, 6)
    dense = crops_from_canvas(to_tensor_normalized(hd_transform(img, 6)))
    runner = ModelRunner(model=None, device=torch.device("cpu"), dtype=dtype)
    got = runner.media_pixels(compact)
    assert got.dtype == dtype and torch.equal(got, dense.pixel_values.to(dtype))
    assert torch.equal(runner.media_pixels(dense), dense.pixel_values.to(dtype))
    every_byte = torch.arange(256, dtype=torch.uint8).repeat(3, 1).reshape(1, 3, 16, 16)
    ref = to_tensor_normalized(Image.fromarray(every_byte[0].permute(1, 2, 0).numpy()))
    assert torch.equal(normalize_uint8(every_byte)[0], ref)


def test_a_cpu_model_gets_dense_crops_and_the_same_scores(tiny_ckpt, photo, monkeypatch):
    """Inline preparation for a CPU model normalises the sub-crops once (dense float32), not once for the global view
    and again in the runner; the ViT input and the scores equal the compact path's bit for bit."""
    img = _noise(777, 523, seed=5)
    dense, compact = process_image(img, 9, compact=False), process_image(img, 9)
    assert not dense.compact and compact.compact
    assert torch.equal(dense.pixel_values, compact.pixel_values)
    eng = RewardEngine.from_pretrained(tiny_ckpt, device="cpu")
    prep = eng.engine.prepare(_samples(photo)[1:2])[0]
    assert not prep.media[0].compact
    got = [r.score for r in eng.score_stream(_samples(photo))]
    import ixc_engine.engine.sequence as seq

    real = seq.load_media
    monkeypatch.setattr(seq, "load_media", lambda *a, **kw: real(*a, **{**kw, "compact": True}))
    eng2 = RewardEngine.from_pretrained(tiny_ckpt, device="cpu")
    assert eng2.engine.prepare(_samples(photo)[1:2])[0].media[0].compact
    assert [r.score for r in eng2.score_stream(_samples(photo))] == got


def test_compact_crops_survive_pickling_to_workers():
    import pickle

    mc = process_image(_noise(600, 580, seed=1), 4)
    back = pickle.loads(pickle.dumps(mc))
    assert back.compact and torch.equal(back.pixel_values, mc.pixel_values) and (back.h, back.w) == (mc.h, mc.w)
    with pytest.raises(ValueError, match="either pixel_values"):
        MediaCrops(h=1, w=1)


def _samples(photo):
    return [Sample(PROMPT + [{"role": "assistant", "content": r}], [photo] if i % 3 else [], id=i)
            for i, r in enumerate(REPLIES)]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "noise.png"
    _noise(640, 400, seed=7).save(path)
    return str(path)


def _record(monkeypatch):
    events = []
    real_launch, real_finish = ModelRunner.launch, ModelRunner.finish

    def launch(self, plans, **kw):
        events.append(("launch", tuple(p.sample.id for p in plans)))
        return real_launch(self, plans, **kw)

    def finish(self, pending):
        events.append(("finish", tuple(p.sample.id for p in pending.plans)))
        return real_finish(self, pending)

    monkeypatch.setattr(ModelRunner, "launch", launch)
    monkeypatch.setattr(ModelRunner, "finish", finish)
    return events


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_the_pipelined_loop_gives_identical_scores_and_order(tiny_ckpt, photo, monkeypatch, prefix_cache):
    cfg = EngineConfig(max_batch_tokens=900, prefix_cache=prefix_cache)
    eng = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", config=cfg)
    events = _record(monkeypatch)
    piped = list(eng.score_stream(_samples(photo)))
    launches = [e for e in events if e[0] == "launch"]
    assert len(launches) >= 3, events
    # batch k+1 is launched before batch k is read back
    first_finish = next(k for k, e in enumerate(events) if e[0] == "finish")
    assert [e[0] for e in events[:first_finish]] == ["launch", "launch"], events

    # the same batches, each read back before the next launch
    real_run_batch = ScoringEngine._run_batch

    def sequential(self, *args):
        for finish in real_run_batch(self, *args):
            finish()
        return []

    eng2 = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", config=cfg)
    events.clear()
    monkeypatch.setattr(ScoringEngine, "_run_batch", sequential)
    plain = list(eng2.score_stream(_samples(photo)))
    assert [e[0] for e in events] == ["launch", "finish"] * len(launches)
    assert [(r.index, r.id) for r in piped] == [(r.index, r.id) for r in plain] == [(i, i) for i in range(7)]
    assert [r.score for r in piped] == [r.score for r in plain]  # bit-identical: same batches, same arithmetic
    assert eng.stats()["tokens_computed"] == eng2.stats()["tokens_computed"]


def test_mean_pooling_with_the_cache_reads_each_batch_back_before_the_next(tiny_ckpt, photo, monkeypatch):
    eng = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", pooling="mean",
                                       config=EngineConfig(max_batch_tokens=900))
    events = _record(monkeypatch)
    assert all(r.error is None for r in eng.score_stream(_samples(photo)))
    kinds = [e[0] for e in events]
    assert len(kinds) >= 6 and kinds == ["launch", "finish"] * (len(kinds) // 2)


def test_with_workers_the_first_window_is_small(tiny_ckpt):
    samples = [Sample(PROMPT, id=i) for i in range(30)]
    pooled = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", config=EngineConfig(window=16, workers=2))
    inline = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", config=EngineConfig(window=16))
    assert [len(w) for w in pooled.engine._windows(samples)] == [ScoringEngine.FIRST_WINDOW, 16, 6]
    assert [len(w) for w in inline.engine._windows(samples)] == [16, 14]


def test_kernels_take_host_metadata_instead_of_reading_it_back():
    from ixc_engine.kernels.paged_attention import paged_prefix_attention, plan_paged_prefix_attention
    from ixc_engine.kernels.pool_score import pool_score

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 32, generator=g)
    wn, wh = torch.randn(32, generator=g), torch.randn(32, generator=g)
    cu = torch.tensor([0, 5, 20, 37], dtype=torch.int32)
    pc, ps = torch.tensor([0, 16, 3]), torch.randn(3, generator=g)
    for mode, kw, host in (("last", {}, [0, 5, 20, 37]), ("token", {}, [0, 5, 20, 37]),
                           ("mean", {"prefix_sum": ps, "prefix_count": pc}, [0, 5, 20, 37, 0, 16, 3])):
        want = pool_score(hidden, wn, wh, cu, mode=mode, backend="triton", **kw)
        got = pool_score(hidden, wn, wh, cu, mode=mode, backend="triton", host_metadata=host, **kw)
        assert torch.equal(got, want), mode
    with pytest.raises(ValueError, match="host_metadata"):
        pool_score(hidden, wn, wh, cu, mode="mean", backend="triton", host_metadata=[0, 5, 20, 37], prefix_sum=ps,
                   prefix_count=pc)

    q, k, v = (torch.randn(9, h, 16, generator=g) for h in (4, 2, 2))
    kc, vc = torch.randn(4, 16, 2, 16, generator=g), torch.randn(4, 16, 2, 16, generator=g)
    tables = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    plens = torch.tensor([20, 5], dtype=torch.int32)
    cuq = torch.tensor([0, 4, 9], dtype=torch.int32)
    args = (q, k, v, kc, vc, tables, plens, cuq)
    checked = plan_paged_prefix_attention(*args, scale=0.25)
    trusted = plan_paged_prefix_attention(*args, scale=0.25, check_values=False)
    assert torch.equal(trusted.programs, checked.programs)
    assert torch.equal(paged_prefix_attention(*args, scale=0.25, backend="triton", plan=trusted),
                       paged_prefix_attention(*args, scale=0.25, backend="triton", plan=checked))


class WorkerKiller(Image.Image):
    """A picture whose decoding kills the process that touches it (as an out-of-memory kill would)."""

    def convert(self, *args, **kwargs):
        import os

        os._exit(3)


@pytest.mark.slow  # starts three worker pools (each spawned worker imports torch)
def test_a_sample_that_kills_workers_is_an_error_and_the_others_are_scored(tiny_ckpt, photo):
    killer = WorkerKiller()
    killer.__setstate__(Image.new("RGB", (64, 64)).__getstate__())
    samples = _samples(photo)[:4]
    samples.insert(1, Sample(PROMPT + [{"role": "assistant", "content": "x"}], [killer], id="killer"))
    pooled = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", config=EngineConfig(window=3, workers=1))
    inline = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", config=EngineConfig(window=3))
    try:
        got = list(pooled.score_stream(samples))
    finally:
        pooled.close()
    want = list(inline.score_stream([s for s in samples if s.id != "killer"]))
    assert [r.id for r in got] == [0, "killer", 1, 2, 3]
    assert got[1].score is None and "killed a worker process twice" in got[1].error
    assert [r.score for r in got if r.id != "killer"] == pytest.approx([r.score for r in want], rel=1e-5)
