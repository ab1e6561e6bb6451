"""End-to-end bench tests on CPU (tiny model, fp32): the upstream-algorithm baseline computes the engine's scores,
pytest-benchmark entries, and same-run speed ratios that flag regressions whatever the machine's speed.

With --benchmark-disable (the project's addopts) each benchmark entry runs once as a plain test.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
from bench_e2e import build_model, corpus_samples, init_random_, prepared_flops, sample_flops, synthetic_photo
from upstream_baseline import UpstreamBaseline, dense_crops

from ixc_engine.api import RewardEngine
from ixc_engine.config import ModelConfig
from ixc_engine.engine.engine import EngineConfig
from ixc_engine.engine.sequence import Sample
from ixc_engine.models.reward_model import meta_model
from ixc_engine.tiny import PACKAGED_TOKENIZER, tiny_config
from ixc_engine.tokenizer import Tokenizer

CPU = torch.device("cpu")
PROMPT = [{"role": "user", "content": "What is happening in this picture? Tell me about the people and the cars."}]
REPLIES = [
    "Two people stand near a red car.",
    "A blue car is parked by a wooden table in the corner of the street, and nobody is there at all.",
    "Nothing.",
    "People walking in front of a glass building while a dog sits behind a tree near the road sign " * 2,
    "A mountain and water under a bright sky.",
    "A dark street at night, lit by one window.",
    "Three people sitting at a table.",
    "A car.",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", CPU, torch.float32, None, seed=3)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Small photos: 1 crop (841 image tokens) and 2x2 crops (2061), landscape and portrait."""
    d = tmp_path_factory.mktemp("e2e")
    sizes = [(500, 350), (300, 450), (800, 450), (560, 560), (420, 300)]
    return [str(synthetic_photo(d / f"p{i}.jpg", w, h, seed=i)) for i, (w, h) in enumerate(sizes)]


def engine(model, **kw) -> RewardEngine:
    return RewardEngine.from_model(model, PACKAGED_TOKENIZER, config=EngineConfig(**kw))


def baseline(model, batch_size=None) -> UpstreamBaseline:
    return UpstreamBaseline(model, Tokenizer.from_file(PACKAGED_TOKENIZER), hd_num=9, batch_size=batch_size)


def mixed_request(photos):
    """Image samples of several sizes, a text-only one, a system turn, an image placeholder mid-text, two images."""
    convs = [
        [{"role": "user", "content": "Describe it."}, {"role": "assistant", "content": REPLIES[1]}],
        [{"role": "user", "content": "And this one?"}, {"role": "assistant", "content": REPLIES[3]}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour is the sky?"},
         {"role": "assistant", "content": "Blue."}],
        [{"role": "user", "content": "Look: <ImageHere> what is it?"}, {"role": "assistant", "content": "A car."}],
        [{"role": "user", "content": "Compare <ImageHere> with <ImageHere>."},
         {"role": "assistant", "content": "The first is brighter."}],
        [{"role": "user", "content": "Tall photo."}, {"role": "assistant", "content": REPLIES[0]}],
    ]
    images = [[photos[0]], [photos[2]], None, [photos[3]], [photos[4], photos[0]], [photos[1]]]
    return convs, images


# --- the baseline computes what the engine computes -------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [None, 2])
def test_baseline_equals_engine(model, photos, batch_size):
    convs, images = mixed_request(photos)
    want = engine(model).score(convs, images)
    base = baseline(model, batch_size)
    got = base.score_conversations(convs, images)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert len({round(s, 4) for s in want}) == len(want)  # distinct scores: a mix-up of rows would show
    st = base.stats
    assert st.vit_calls == 6 and st.samples == 6  # one ViT call per image, none for the text-only sample
    assert st.padded_tokens > st.tokens  # right padding: different lengths in one batch


def test_baseline_equals_engine_mean_pooling(photos):
    m = build_model("tiny", CPU, torch.float32, None, seed=4)
    m.cfg.pooling = "mean"
    convs, images = mixed_request(photos)
    convs, images = convs[:3], images[:3]
    assert baseline(m).score_conversations(convs, images) == pytest.approx(
        engine(m).score(convs, images), rel=1e-4, abs=1e-4)


def test_baseline_equals_engine_real_head_grouping(photos):
    """4 query heads per KV head as in the release (the tiny default has 2), odd FFN width, PLoRA scale != 1."""
    cfg = tiny_config(num_attention_heads=8, num_key_value_heads=2, intermediate_size=88, plora_alpha=12)
    m = meta_model(cfg, cfg.plora_rank)
    m = m.to_empty(device=CPU)
    init_random_(m, seed=5)
    convs, images = mixed_request(photos)
    convs, images = convs[:3], images[:3]
    assert baseline(m, batch_size=2).score_conversations(convs, images) == pytest.approx(
        engine(m).score(convs, images), rel=1e-4, abs=1e-4)


def test_baseline_best_of_n_reencodes_every_candidate(model, photos):
    base = baseline(model, batch_size=3)
    scores = base.best_of_n(PROMPT, REPLIES[:4], images=[photos[0]])
    assert base.stats.vit_calls == 4 and base.stats.batches == 2
    _, want = engine(model).best_of_n(PROMPT, REPLIES[:4], images=[photos[0]])
    assert scores == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_baseline_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="batch_size"):
        baseline(model, batch_size=0)
    with pytest.raises(ValueError, match="images"):
        baseline(model).score_conversations([PROMPT], [None, None])


def test_flop_rule_counts():
    """The counting rule on the real shape, against hand arithmetic (MODEL.md: ~2 x 7-8e9 FLOPs per LLM token)."""
    cfg = ModelConfig(plora_rank=256)
    per_layer = 4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336
    f = sample_flops(cfg, 256, n_tokens=100, image_grids=[])
    assert f.llm == 2 * 32 * per_layer * 100
    assert f.attention == 4 * 32 * 128 * 32 * 100 * 101 / 2
    assert f.vit == f.plora == f.projector == 0
    img = sample_flops(cfg, 256, n_tokens=900, image_grids=[(1, 1)])  # 841 image tokens, 2 crops
    assert img.plora == 2 * 32 * 256 * (10240 + 8192 + 3 * 18432) * 841
    assert img.projector == 2 * (4096 * 4096 * 2) * 841
    per_crop = 24 * (2 * (4 * 1024**2 + 2 * 1024 * 4096) * 1601 + 4 * 1601**2 * 1024) + 2 * 1600 * 3 * 196 * 1024
    assert img.vit == 2 * per_crop
    assert 1.3e10 < 2 * 32 * per_layer < 1.5e10


def test_corpus_samples_are_distinct_and_sized(tmp_path, model):
    samples = corpus_samples(tmp_path, 4, seed=0, sources=[])
    preps = engine(model, prefix_cache=False).engine.prepare(samples)
    assert len({p.media_digests[0] for p in preps}) == 4  # no two photos alike: no dedup in a corpus run
    assert [p.n_tokens > 841 for p in preps] == [True] * 4
    assert prepared_flops(model.cfg, 8, preps).total > 0


# --- pytest-benchmark entries --------------------------------------------------------------------------------
def _score_fresh(model, convs, images, **cfg) -> Callable[[], tuple[tuple, dict]]:
    """pedantic setup: a fresh engine per round, so the prefix cache starts cold every time."""
    return lambda: ((engine(model, **cfg), convs, images), {})


@pytest.mark.benchmark(group="e2e-corpus")
def test_bench_engine_score_cpu(benchmark, model, photos):
    convs, images = mixed_request(photos)
    out = benchmark.pedantic(lambda e, c, i: e.score(c, i), setup=_score_fresh(model, convs, images), rounds=3)
    assert len(out) == len(convs)


@pytest.mark.benchmark(group="e2e-corpus")
def test_bench_baseline_score_cpu(benchmark, model, photos):
    convs, images = mixed_request(photos)
    base = baseline(model)
    out = benchmark.pedantic(base.score_conversations, args=(convs, images), rounds=3)
    assert len(out) == len(convs)


@pytest.mark.benchmark(group="e2e-best-of-n")
@pytest.mark.parametrize("prefix_cache", [True, False], ids=["sharing-on", "sharing-off"])
def test_bench_best_of_n_cpu(benchmark, model, photos, prefix_cache):
    def setup():
        return (engine(model, prefix_cache=prefix_cache),), {}

    best, scores = benchmark.pedantic(lambda e: e.best_of_n(PROMPT, REPLIES, images=[photos[2]]), setup=setup,
                                      rounds=3)
    assert len(scores) == len(REPLIES) and 0 <= best < len(REPLIES)


# --- regression flags: ratios measured in the same run ------------------------------------------------------------
def _min_times(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Best of `reps` wall times of each callable, run interleaved (A B A B ...) so that load drifts hit all alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def test_engine_not_slower_than_upstream_baseline(model, photos):
    """Same CPU, same weights, same prepared samples (preprocessing excluded on both sides): the engine must not lose to
    the upstream algorithm. Measured ratios on the development machine: ~5x (see bench/RESULTS.md)."""
    convs, images = mixed_request(photos)
    samples = [Sample(c, list(i or []), id=k) for k, (c, i) in enumerate(zip(convs[:4], images[:4]))]
    preps = engine(model, prefix_cache=False).engine.prepare(samples)
    base = baseline(model)
    base_preps = dense_crops(preps)  # upstream's float32 crops, also made before timing
    t = _min_times({
        "engine": lambda: engine(model).engine.score_prepared(preps),
        "baseline": lambda: base.score_prepared(base_preps),
    }, reps=3)
    assert t["engine"] <= t["baseline"], (
        f"engine {t['engine']:.3f} s vs upstream-algorithm baseline {t['baseline']:.3f} s"
    )


def test_best_of_n_sharing_computes_less_and_is_not_slower(model, photos):
    """Sharing on: the prompt and image are computed once (stats), and the request is not slower than sharing off."""
    stats = {}

    def run(prefix_cache):
        eng = engine(model, prefix_cache=prefix_cache)
        eng.best_of_n(PROMPT, REPLIES, images=[photos[2]])
        stats[prefix_cache] = eng.stats()

    t = _min_times({"on": lambda: run(True), "off": lambda: run(False)}, reps=5)
    on, off = stats[True], stats[False]
    assert on["tokens_requested"] == off["tokens_requested"] == off["tokens_computed"]
    assert on["tokens_computed"] + on["prefix_tokens_reused"] == on["tokens_requested"]
    # the 2061-token image prompt is computed once instead of len(REPLIES) times
    assert on["prefix_tokens_reused"] >= (len(REPLIES) - 1) * 2061
    assert on["tokens_computed"] < off["tokens_computed"] / 3
    print(f"best-of-{len(REPLIES)} on CPU: sharing on {t['on']:.3f} s, off {t['off']:.3f} s")
    assert t["on"] <= t["off"], f"sharing on {t['on']:.3f} s vs off {t['off']:.3f} s"
