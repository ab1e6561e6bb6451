"""Python API: score/compare/rank/best_of_n, prefix sharing equals no sharing, stats, bad input."""

from __future__ import annotations

import pytest
from PIL import Image

from ixc_engine.api import RewardEngine
from ixc_engine.engine.engine import EngineConfig
from ixc_engine.engine.sequence import SampleError

PROMPT = [{"role": "user", "content": "What is in the picture? Answer in detail, please. " * 3}]
CANDIDATES = ["A cat.", "A dog on a red sofa, sleeping.", "Nothing at all", "Two cars parked by a wall " * 4,
              "一只猫", "A cat."]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    img = Image.new("RGB", (640, 400), (30, 90, 200))
    for x in range(0, 640, 3):
        img.putpixel((x, (x * 7) % 400), (255, 255, 0))
    path = tmp_path_factory.mktemp("api") / "photo.png"
    img.save(path)
    return str(path)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_best_of_n_shares_prefix_exactly(tiny_ckpt, photo, pooling):
    shared = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", pooling=pooling)
    best, scores = shared.best_of_n(PROMPT, CANDIDATES, images=[photo])
    st = shared.stats()
    plain = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", pooling=pooling,
                                         config=EngineConfig(prefix_cache=False))
    alone = [plain.score([PROMPT + [{"role": "assistant", "content": c}]], [[photo]])[0] for c in CANDIDATES]
    assert scores == pytest.approx(alone, rel=1e-5, abs=1e-6)
    assert best == max(range(len(alone)), key=lambda i: (alone[i], -i))
    assert scores[0] == pytest.approx(scores[-1], rel=1e-6)  # identical candidates
    # the prompt + image (~1.3k tokens) is computed once; the other candidates reuse it
    assert st["prefix_tokens_reused"] >= (len(CANDIDATES) - 1) * 800
    assert st["tokens_computed"] + st["prefix_tokens_reused"] == st["tokens_requested"]
    assert st["media_encoded"] == 1 and st["media_requested"] == len(CANDIDATES)
    assert plain.stats()["prefix_tokens_reused"] == 0


def test_compare_and_rank(tiny_ckpt):
    eng = RewardEngine.from_pretrained(tiny_ckpt, device="cpu")
    convs = [PROMPT + [{"role": "assistant", "content": c}] for c in CANDIDATES[:4]]
    scores = eng.score(convs)
    order = eng.rank(convs)
    assert [scores[i] for i in order] == sorted(scores, reverse=True)
    assert eng.compare(convs[order[0]], convs[order[-1]]) is True
    assert eng.compare(convs[order[-1]], convs[order[0]]) is False


def test_cache_eviction_keeps_scores_exact(tiny_ckpt, photo):
    """A cache too small for the whole job must evict (LRU) and still give identical scores."""
    convs = [[{"role": "user", "content": f"question {i} " * 20}, {"role": "assistant", "content": "ok"}]
             for i in range(12)]
    small = RewardEngine.from_pretrained(tiny_ckpt, device="cpu",
                                         config=EngineConfig(kv_cache_tokens=512, max_batch_tokens=256, window=4))
    big = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", config=EngineConfig(prefix_cache=False))
    assert small.score(convs * 2) == pytest.approx(big.score(convs * 2), rel=1e-5, abs=1e-6)


def test_bad_inputs(tiny_ckpt, photo, tmp_path):
    eng = RewardEngine.from_pretrained(tiny_ckpt, device="cpu")
    with pytest.raises(SampleError, match="role"):
        eng.score([[{"role": "robot", "content": "hi"}]])
    with pytest.raises(SampleError, match="missing.png"):
        eng.score([PROMPT], [[str(tmp_path / "missing.png")]])
    with pytest.raises(SampleError, match="placeholder"):
        eng.score([PROMPT], [[photo, photo]])
    with pytest.raises(ValueError, match="image lists"):
        eng.score([PROMPT, PROMPT], [[photo]])
    with pytest.raises(ValueError, match="at least one candidate"):
        eng.best_of_n(PROMPT, [])
    long = [{"role": "user", "content": "word " * 400}]
    short = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", config=EngineConfig(max_length=200))
    with pytest.raises(SampleError, match="over max_length 200"):
        short.score([long])


def test_pil_images_and_paths_agree(tiny_ckpt, photo):
    eng = RewardEngine.from_pretrained(tiny_ckpt, device="cpu")
    by_path = eng.score([PROMPT], [[photo]])
    by_pil = eng.score([PROMPT], [[Image.open(photo)]])
    assert by_path == pytest.approx(by_pil, rel=1e-6)


def test_worker_processes_give_the_same_scores(tiny_ckpt, photo):
    from ixc_engine.engine.sequence import Sample

    samples = [Sample(PROMPT + [{"role": "assistant", "content": c}], [photo] if i % 2 else [], id=i)
               for i, c in enumerate(CANDIDATES)]
    samples.insert(2, Sample([{"role": "robot", "content": "x"}], id="bad"))
    inline = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", config=EngineConfig(window=3))
    pooled = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", config=EngineConfig(window=3, workers=2))
    a, b = list(inline.score_stream(samples)), list(pooled.score_stream(samples))
    assert [(r.index, r.id, r.error is None) for r in a] == [(r.index, r.id, r.error is None) for r in b]
    assert [r.score for r in a if r.score is not None] == pytest.approx(
        [r.score for r in b if r.score is not None], rel=1e-5)
    assert a[2].error and "robot" in a[2].error


def test_out_of_memory_splits_the_batch_and_loses_nothing(tiny_ckpt, monkeypatch):
    import torch

    eng = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", config=EngineConfig(prefix_cache=False))
    convs = [PROMPT + [{"role": "assistant", "content": c}] for c in CANDIDATES]
    want = eng.score(convs)
    from ixc_engine.engine.runner import ModelRunner

    real_run = ModelRunner.run

    def flaky(self, plans, **kw):  # pretend the device cannot hold more than two sequences at once
        if len(plans) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_run(self, plans, **kw)

    monkeypatch.setattr(ModelRunner, "run", flaky)
    assert eng.score(convs) == pytest.approx(want, rel=1e-5)
    assert eng.stats()["oom_splits"] >= 2


def test_checkpoint_without_tokenizer_uses_the_packaged_one(tmp_path):
    from ixc_engine.tiny import init_tiny

    ckpt = init_tiny(tmp_path / "m", seed=1)
    with_tok = RewardEngine.from_pretrained(ckpt, device="cpu").score([PROMPT])
    (ckpt / "tokenizer.model").unlink()
    with pytest.warns(UserWarning, match="packaged InternLM2 tokenizer"):
        eng = RewardEngine.from_pretrained(ckpt, device="cpu")
    assert eng.score([PROMPT]) == pytest.approx(with_tok, rel=1e-6)


def test_nested_sharing_runs_each_shared_prefix_once(tiny_ckpt, photo):
    """A short sample that diverges early must not stop longer samples from sharing their longer common prefix."""
    from ixc_engine.engine.sequence import Sample

    short = [{"role": "user", "content": "What is in the picture?"}, {"role": "assistant", "content": "No idea."}]
    long_q = [{"role": "user", "content": "What is in the picture? Describe every detail you can see. " * 40}]
    convs = [short] + [long_q + [{"role": "assistant", "content": c}] for c in CANDIDATES[:4]]
    samples = [Sample(c, [photo], id=i) for i, c in enumerate(convs)]
    shared = RewardEngine.from_pretrained(tiny_ckpt, device="cpu")
    res = list(shared.score_stream(samples))
    plain = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", config=EngineConfig(prefix_cache=False))
    assert [r.score for r in res] == pytest.approx([r.score for r in plain.score_stream(samples)], rel=1e-5, abs=1e-6)
    n = [r.n_tokens for r in res]
    assert n[1] - n[0] > 400  # the long question is long
    # everything once: about the longest sample, plus the short sample's own tail and the other answers (+ rounding
    # to blocks); sharing only the prefix common to all five would recompute the long question three more times
    assert shared.stats()["tokens_computed"] <= n[1] + 4 * 64
