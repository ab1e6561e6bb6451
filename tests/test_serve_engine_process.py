"""The engine in a process of its own (`ProcessBatcher`, what `ixc-engine serve` runs): answers equal to
`RewardEngine.score`, admission and cancellation in the server process, draining on stop, a clear error when the model
cannot be loaded, and a server that says so (503, /health 503) when the engine process dies. Also the batcher's wait
rule (max-wait counted from the oldest sample's arrival)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from ixc_engine.api import Sample, ScoreResult
from ixc_engine.engine.engine import EngineConfig
from ixc_engine.serve.app import ServeConfig, create_app
from ixc_engine.serve.batcher import Batcher, BatcherConfig, QueueFull, ShuttingDown
from ixc_engine.serve.engine_process import EngineProcessError, EngineSpec, ProcessBatcher, TextPreparer
from tests.serve_support import DEMO, ServerProcess, ServerThread, free_port
from tests.test_serve import conversations, query

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spec(**kw) -> EngineSpec:
    return EngineSpec(model=str(DEMO), device="cpu", config=EngineConfig(), threads=1, **kw)


@pytest.fixture(scope="module")
def pbatcher():
    b = ProcessBatcher(spec(), BatcherConfig(max_wait_ms=20, max_queue=40))
    b.start()
    yield b
    b.stop()


def samples(convs) -> list[Sample]:
    return [Sample(c, [], id=i) for i, c in enumerate(convs)]


def test_process_batcher_answers_equal_engine_score_and_admits_in_this_process(pbatcher, demo_ref):
    convs = conversations(30, seed=41)
    want = demo_ref.score(convs)
    assert pbatcher.spec.info == {"device": "cpu", "dtype": "float32", "preparation": demo_ref.engine.preparation()}
    b0 = pbatcher.batches
    futs = [pbatcher.submit(samples(convs[i:i + 3]), 9, 60) for i in range(0, 30, 3)]  # 10 requests of 3
    got = [r for f in futs for r in f.result(60)]
    assert [r.score for r in got] == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert all(isinstance(r, ScoreResult) and r.error is None and r.n_tokens > 0 for r in got)
    deadline = time.monotonic() + 10
    while pbatcher.samples_scored < 30 and time.monotonic() < deadline:  # the batch counters arrive after the answers
        time.sleep(0.01)
    assert pbatcher.depth == 0 and pbatcher.samples_scored >= 30 and pbatcher.batches > b0
    assert pbatcher.submit([], 9, 60).result() == []
    # admission is decided here: over max_queue (40) samples in flight is QueueFull at once
    big = pbatcher.submit(samples(conversations(35, seed=42)), 9, 60)
    with pytest.raises(QueueFull, match="limit is 40"):
        pbatcher.submit(samples(convs[:6]), 9, 60)
    assert len(big.result(60)) == 35 and pbatcher.depth == 0
    deadline = time.monotonic() + 10
    while pbatcher.samples_scored < 65 and time.monotonic() < deadline:  # its batch counters follow the answers
        time.sleep(0.01)
    assert pbatcher.samples_scored == 65


def test_text_samples_prepared_in_the_server_process_give_the_engines_results(pbatcher, demo_ref):
    """Small text-only requests are prepared here (TextPreparer, with the settings the engine process told): exactly
    the engine's own preparation, warnings included; a sample with media, one that fails to prepare (too long) and a
    large request go as they are, and the engine's results (scores, warnings, errors) are the same either way."""
    from ixc_engine.engine.sequence import PreparedSample

    prep = TextPreparer(pbatcher.spec.info["preparation"])
    convs = conversations(4, seed=45)
    odd = [
        Sample(convs[0], [], id="plain"),
        Sample(convs[1], [], id="warned", warnings=["key 'img' is not read"]),
        Sample([{"role": "user", "content": "Say [UNUSED_TOKEN_145] please"},
                {"role": "assistant", "content": "No."}], [], id="special"),
        Sample([{"role": "user", "content": "word " * 20000}, {"role": "assistant", "content": "Long."}], [],
               id="too long"),
        Sample([{"role": "user", "content": "<ImageHere>What is it?"}, {"role": "assistant", "content": "A cat."}],
               ["missing.jpg"], id="media"),
        Sample([{"role": "robot", "content": "Hi"}], [], id="bad role"),
    ]
    made = prep(odd, 9)
    engine_made = demo_ref.engine.prepare(odd[:3], 9)
    assert made[:3] == engine_made and all(isinstance(m, PreparedSample) for m in made[:3])
    assert made[1].warnings == engine_made[1].warnings and len(made[1].warnings) == 1
    assert made[3:] == odd[3:]  # too long, media, invalid: the engine prepares them and reports their errors
    many = [Sample(c, [], id=i) for i, c in enumerate(conversations(TextPreparer.MAX_SAMPLES + 1, seed=46))]
    assert prep(many, 9) == many  # a big request does not hold up the event loop
    limit = TextPreparer.MAX_CHARS
    sized = [Sample([{"role": "user", "content": "a" * (limit - 1)}, {"role": "assistant", "content": "b"}], []),
             Sample([{"role": "user", "content": "a" * limit}, {"role": "assistant", "content": "b"}], [])]
    made_sized = prep(sized, 9)
    assert isinstance(made_sized[0], PreparedSample) and made_sized[1] is sized[1]  # nor does a long text
    odd_content = Sample([{"role": "user", "content": ["not", "a", "string"]}, {"role": "assistant", "content": "b"}],
                         [])
    assert prep([odd_content], 9) == [odd_content]
    got = pbatcher.submit(odd, 9, 60).result(60)
    want = list(demo_ref.score_stream(odd))
    assert [(r.id, r.n_tokens, r.error, r.warnings) for r in got] == [
        (r.id, r.n_tokens, r.error, r.warnings) for r in want]
    assert [r.score is None for r in got] == [r.score is None for r in want] == [False] * 3 + [True] * 3
    assert [r.score for r in got[:3]] == pytest.approx([r.score for r in want[:3]], rel=1e-5, abs=1e-5)
    assert got[3].error and "over max_length" in got[3].error and got[4].error and got[5].error


def test_a_cancelled_request_is_skipped_and_frees_its_queue_places(pbatcher):
    s0 = pbatcher.samples_scored
    fut = pbatcher.submit(samples(conversations(5, seed=44)), 9, 60)
    assert fut.cancel()  # at once: the engine process gets the cancellation within its 20 ms wait for company
    assert len(pbatcher.submit(samples(conversations(2, seed=43)), 9, 60).result(60)) == 2
    deadline = time.monotonic() + 10
    while (pbatcher.depth or pbatcher.samples_scored < s0 + 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pbatcher.depth == 0  # the engine process answered the cancellation: its 5 places are free again
    assert pbatcher.samples_scored == s0 + 2  # and did not score them


def test_a_job_with_megabytes_of_inline_media_is_sent_off_the_calling_thread(pbatcher, demo_ref, tmp_path):
    import random

    from PIL import Image

    from ixc_engine.media.loader import MediaBytes
    from ixc_engine.serve import engine_process

    rng = random.Random(47)
    path = tmp_path / "noise.png"
    Image.frombytes("RGB", (700, 600), bytes(rng.randrange(256) for _ in range(700 * 600 * 3))).save(path)
    data = path.read_bytes()
    assert len(data) > engine_process.BIG_JOB_BYTES
    conv = [{"role": "user", "content": "<ImageHere>What is it?"}, {"role": "assistant", "content": "Noise."}]
    want = demo_ref.score([conv], images=[[str(path)]], hd_num=1)
    assert pbatcher._sender is None
    fut = pbatcher.submit([Sample(conv, [MediaBytes(data, "image")])], 1, 60)
    assert pbatcher._sender is not None  # handed to the sender thread
    assert [r.score for r in fut.result(60)] == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_stop_drains_then_the_engine_process_exits(pbatcher, demo_ref):
    """The last test of the module's engine process: stops it."""
    b, pid = pbatcher, pbatcher.pid
    convs = conversations(40, seed=45)
    futs = [b.submit(samples([c]), 9, 60) for c in convs]
    b.stop()
    assert [f.result(0)[0].score for f in futs] == pytest.approx(demo_ref.score(convs), rel=1e-5, abs=1e-5)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ShuttingDown):
        b.submit(samples(convs[:1]), 9, 10)


def test_a_model_that_cannot_load_is_a_clear_error(tmp_path):
    b = ProcessBatcher(EngineSpec(model=str(tmp_path / "nope"), device="cpu", threads=1))
    with pytest.raises(EngineProcessError, match=r"cannot load the model .*nope"):
        b.start()
    assert not b.alive
    with pytest.raises(ShuttingDown):
        b.submit(samples(conversations(1)), 9, 10)


def test_the_server_says_503_when_the_engine_process_died():
    b = ProcessBatcher(spec(), BatcherConfig(max_wait_ms=2000))
    b.start()
    app = create_app(None, ServeConfig(model_name="demo", batcher=b.cfg), batcher=b)
    one = {"query": [query(conversations(1, seed=46)[0], 0)]}
    with ServerThread(app) as srv:
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"
        answer: dict = {}
        t = threading.Thread(target=lambda: answer.update(r=httpx.post(srv.url + "/get_reward", json=one, timeout=60)))
        t.start()
        while b.depth == 0:  # queued in the engine process (which waits 2 s for company)
            time.sleep(0.01)
        os.kill(b.pid, signal.SIGKILL)
        t.join(60)
        r = answer["r"]
        assert r.status_code == 500 and "engine process exited unexpectedly" in r.json()["error"]["message"]
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "error"
        r = httpx.post(srv.url + "/get_reward", json=one)
        assert r.status_code == 503 and "engine process" in r.json()["error"]["message"]


@pytest.mark.parametrize("flags", [(), ("--single-process",)], ids=["engine-process", "single-process"])
def test_the_cli_serves_equal_rewards_with_and_without_the_engine_process(flags, demo_ref):
    convs = conversations(6, seed=48)
    srv = ServerProcess(free_port(), *flags).start()
    try:
        rs = [httpx.post(srv.url + "/get_reward", json={"query": [query(c, k)]}, timeout=60) for k, c in
              enumerate(convs)]
        deadline = time.monotonic() + 10
        while True:  # the engine process reports a batch's counters just after its answers
            metrics = httpx.get(srv.url + "/metrics").text
            if "ixc_samples_total{outcome=\"scored\"} 6.0" in metrics or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        srv.terminate()
        srv.proc.wait(60)
    assert [r.json()["rewards"][0] for r in rs] == pytest.approx(demo_ref.score(convs), rel=1e-5, abs=1e-5)
    assert "ixc_samples_total{outcome=\"scored\"} 6.0" in metrics
    assert ("engine process" in srv.log()) == (not flags)  # the start-up line says where the engine runs


class _SlowEngine:
    """Stands in for RewardEngine in the Batcher: each engine call takes `seconds`; records when calls start/end."""

    class engine:  # the attribute path the Batcher reads (engine.engine.cfg.window)
        class cfg:
            window = 64

    def __init__(self, seconds: float) -> None:
        self.seconds, self.calls = seconds, []

    def stats(self) -> dict:
        return {"tokens_computed": 0, "prefix_tokens_reused": 0}

    def score_stream(self, items, hd_num):
        t0 = time.monotonic()
        time.sleep(self.seconds)
        self.calls.append((t0, time.monotonic(), len(items)))
        return iter([ScoreResult(n, None, 1.0, 1) for n, _ in items])


def test_samples_that_queued_while_the_engine_was_busy_do_not_wait_again():
    """max_wait counts from the oldest sample's arrival: B arrives while A is scored, so by the time A is done B has
    waited longer than max_wait and goes at once (waiting again would idle the engine between batches under load)."""
    eng = _SlowEngine(0.8)
    infos = []
    b = Batcher(eng, BatcherConfig(max_wait_ms=300), on_batch=infos.append)
    b.start()
    try:
        one = [Sample([{"role": "user", "content": "x"}])]
        time.sleep(0.2)  # the scheduler idles on an empty queue
        a = b.submit(one, 9, 30)
        time.sleep(0.5)  # A is being scored (0.3 s wait + 0.8 s call)
        c = b.submit(one, 9, 30)
        a.result(10), c.result(10)
    finally:
        b.stop()
    (_, a_end, _), (b_start, _, _) = eng.calls
    assert b_start - a_end < 0.2, f"B waited {b_start - a_end:.3f} s more after A (max_wait 0.3 s)"
    # what /metrics reports as ixc_scheduler_idle_seconds and ixc_scheduler_gather_seconds
    assert infos[0].idle_s >= 0.15 and 0.25 <= infos[0].gather_s < 0.6, infos[0]
    assert infos[1].idle_s < 0.1 and infos[1].gather_s < 0.1, infos[1]


def test_a_burst_after_idle_is_scored_in_two_calls_a_single_big_request_in_one():
    """Many one-sample requests arriving together on an idle engine: two calls (the first half's answers go out while
    the second half is scored); a lone request of many samples, or a few requests: one call."""
    eng = _SlowEngine(0.3)
    b = Batcher(eng, BatcherConfig(max_wait_ms=200))
    b.start()
    one = [Sample([{"role": "user", "content": "x"}])]
    try:
        futs = [b.submit(one, 9, 30) for _ in range(20)]  # within one max-wait: one burst
        assert all(len(f.result(10)) == 1 for f in futs)
        assert [n for _, _, n in eng.calls] == [10, 10]
        time.sleep(0.3)  # idle again
        assert len(b.submit(one * 40, 9, 30).result(10)) == 40
        futs = [b.submit(one, 9, 30) for _ in range(15)]  # under 2 x SPLIT_MIN_REQUESTS requests
        assert all(len(f.result(10)) == 1 for f in futs)
    finally:
        b.stop()
    assert [n for _, _, n in eng.calls] == [10, 10, 40, 15]
