"""Python API: score/compare/rank/best_of_n, prefix sharing equals no sharing, stats, bad input."""

from __future__ import annotations

import pytest
from PIL import Image

from ixc_engine.api import RewardEngine
from ixc_engine.engine.engine import EngineConfig
from ixc_engine.engine.sequence import Sample, SampleError

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

    real_launch = ModelRunner.launch  # the engine queues batches with launch (an allocation fails there)

    def flaky(self, plans, **kw):  # pretend the device cannot hold more than two sequences at once
        if len(plans) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_launch(self, plans, **kw)

    monkeypatch.setattr(ModelRunner, "launch", flaky)
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


def _distinct_block_tokens(engine, convs, bs=16):
    """Tokens an ideal prefix cache computes: every distinct full block once, plus each sample's own partial tail."""
    preps = engine.engine.prepare([Sample(c, [], id=i) for i, c in enumerate(convs)])
    blocks, tails = set(), 0
    for p in preps:
        keys = p.content_keys()
        usable = (p.n_tokens - 1) // bs
        blocks |= {tuple(keys[: (j + 1) * bs]) for j in range(usable)}
        tails += p.n_tokens - usable * bs
    return len(blocks) * bs + tails


def test_a_conversation_scored_at_every_turn_computes_its_history_once(tiny_ckpt):
    """Each sample extends the previous one (shortest first, one window): the longest is the leader, so two waves
    cover the chain however deep it is (a fixed number of waves led by the shortest recomputed most of it)."""
    turns = [{"role": "user" if t % 2 == 0 else "assistant", "content": f"turn {t}: " + "words and more words " * 3}
             for t in range(15)]
    convs = [turns[: t + 1] for t in range(15)]
    eng = RewardEngine.from_pretrained(tiny_ckpt, device="cpu")
    scores = eng.score(convs)
    st = eng.stats()
    assert st["tokens_computed"] == _distinct_block_tokens(eng, convs)
    assert st["tokens_computed"] + st["prefix_tokens_reused"] == st["tokens_requested"]
    plain = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", config=EngineConfig(prefix_cache=False))
    assert scores == pytest.approx(plain.score(convs), rel=1e-5, abs=1e-6)


def test_eviction_drops_a_sequence_tail_before_its_shareable_head(tiny_ckpt):
    """Blocks are released tail first, so LRU eviction under pressure keeps the first blocks, which later samples
    with the same history can still match (a chain whose first block is gone never matches again)."""
    a = [{"role": "user", "content": "alpha beta gamma delta " * 42}]  # 177 tokens: 11 full blocks of 16
    b = [{"role": "user", "content": "something else entirely " * 30}]  # 7 blocks: one of a's is evicted
    cfg = EngineConfig(max_length=256, kv_cache_tokens=1)  # the smallest cache: one max-length sequence + 1 block
    eng = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", config=cfg)
    eng.score([a])
    eng.score([b])  # needs blocks: evicts some of a's
    before = eng.stats()["prefix_tokens_reused"]
    a2 = a + [{"role": "assistant", "content": "ok"}]
    got = eng.score([a2])
    assert eng.stats()["prefix_tokens_reused"] - before >= 128
    plain = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", config=EngineConfig(prefix_cache=False))
    assert got == pytest.approx(plain.score([a2]), rel=1e-5, abs=1e-6)


def test_media_encoded_counts_only_media_run_through_the_vit(tiny_ckpt, photo, tmp_path):
    other = tmp_path / "other.png"
    Image.new("RGB", (200, 120), (250, 10, 10)).save(other)
    # no prefix cache: the second call's first sample then needs the photo's embeddings again (from the runner's cache)
    eng = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", config=EngineConfig(prefix_cache=False))
    eng.score([PROMPT], [[photo]])
    st0 = eng.stats()
    eng.score([PROMPT, PROMPT], [[photo], [str(other)]])  # photo comes from the runner's embedding cache
    st1 = eng.stats()
    assert st1["media_encoded"] - st0["media_encoded"] == 1
    assert st1["media_requested"] - st0["media_requested"] == 2


def test_a_stream_keeps_its_hd_num_while_other_calls_use_another(tiny_ckpt, photo):
    samples = [Sample(PROMPT, [photo], id=i) for i in range(3)]
    eng = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", config=EngineConfig(window=1))
    alone = [r.n_tokens for r in eng.score_stream(samples, hd_num=1)]
    got = []
    for r in eng.score_stream(samples, hd_num=1):
        got.append(r.n_tokens)
        eng.score([PROMPT], [[photo]], hd_num=4)  # e.g. an RL loop scoring something else meanwhile
    assert got == alone


def test_the_token_budget_counts_tokens_to_compute_not_cached_ones(tiny_ckpt, photo):
    """Best-of-N: after the leader, the candidates' cached image prompt does not count against max_batch_tokens."""
    n_prompt = RewardEngine.from_pretrained(tiny_ckpt, device="cpu").score_stream(
        [Sample(PROMPT, [photo])]).__next__().n_tokens
    cfg = EngineConfig(max_batch_tokens=n_prompt + 64)  # one whole sample, or all candidates' new tokens
    eng = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", config=cfg)
    eng.best_of_n(PROMPT, [f"candidate {i}" for i in range(8)], images=[photo])
    assert eng.stats()["batches"] == 2


def test_score_stream_takes_samples_prepared_elsewhere_with_the_engines_settings(tiny_ckpt):
    """A PreparedSample made outside the engine (as the server's HTTP process does, with `preparation()`'s settings)
    scores as its Sample does, bare or in an (index, item) pair, mixed with Samples and errors."""
    from ixc_engine.engine.sequence import prepare_sample
    from ixc_engine.tokenizer import Tokenizer

    eng = RewardEngine.from_pretrained(tiny_ckpt, device="cpu")
    st = eng.engine.preparation()
    tok = Tokenizer.from_file(st["tokenizer_path"])
    samples = [Sample([{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer " * i}],
                      [], id=f"s{i}") for i in range(1, 5)]
    made = [prepare_sample(tok, s, hd_num=9, max_length=st["max_length"], max_media=st["max_media"],
                           max_pixels=st["max_pixels"], escape_special=st["escape_special"]) for s in samples]
    want = list(eng.score_stream(samples))
    mixed = [(0, made[0]), (1, samples[1]), (2, SampleError("bad line")), (3, made[2]), (4, made[3])]
    got = list(eng.score_stream(mixed))
    assert [r.index for r in got] == [0, 1, 2, 3, 4] and got[2].error == "bad line"
    assert [(r.id, r.n_tokens) for r in got[:2] + got[3:]] == [(r.id, r.n_tokens) for r in want]
    # other batches (and the prefix cache of the earlier calls) move fp32 sums in the last bits only
    assert [r.score for r in got[:2] + got[3:]] == pytest.approx([r.score for r in want], rel=1e-5, abs=1e-6)
    assert [r.score for r in eng.score_stream(made)] == pytest.approx([r.score for r in want], rel=1e-5, abs=1e-6)
