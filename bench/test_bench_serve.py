"""Serving bench entries on CPU (demo model, fp32, 1 torch thread): a pytest-benchmark entry for concurrent
/get_reward requests, and a same-run ratio that flags a batching regression whatever the machine's speed.

The server runs in a thread of this process (no model reload); the figures of record come from bench_serve.py, which
runs the server as its own process (see bench/README.md).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

from bench_serve import EXAMPLES, _drive, request_body, text_samples

from ixc_engine.api import RewardEngine
from ixc_engine.engine.engine import EngineConfig
from ixc_engine.serve.app import ServeConfig, create_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Server:
    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def samples():
    return text_samples(72, seed=5)


@pytest.fixture(scope="module")
def served_and_want(samples):
    """One engine: the expected scores first, in this thread; then it belongs to the server's scheduler thread.
    Prefix cache off: every round sends the same requests and must compute them again, not read them from the cache."""
    engine = RewardEngine.from_pretrained(EXAMPLES / "demo-model", device="cpu",
                                          config=EngineConfig(prefix_cache=False))
    want = engine.score([s.messages for s in samples])
    app = create_app(engine, ServeConfig(max_items=64))
    with _Server(app) as srv:
        yield srv, app.state.batcher, want


@pytest.fixture(scope="module")
def served(served_and_want):
    return served_and_want[:2]


@pytest.fixture(scope="module")
def want(served_and_want):
    return served_and_want[2]


@pytest.mark.benchmark(group="serve")
def test_bench_get_reward_concurrency_16_cpu(benchmark, served, samples, want):
    srv, _ = served
    bodies = [request_body(s, EXAMPLES) for s in samples[:48]]
    rewards, _, _ = benchmark.pedantic(lambda: asyncio.run(_drive(srv.url, bodies, 16)), rounds=3)
    assert rewards == pytest.approx(want[:48], rel=1e-5, abs=1e-5)


def test_concurrent_requests_are_batched_and_faster_than_one_at_a_time(served, samples, want):
    """Same server, same samples, interleaved: 16 requests in flight must beat 1 at a time by 1.5x (measured 2.8x on
    the busy 2-core development machine with client and server in one process), with batches > 2."""
    srv, batcher = served
    bodies = [request_body(s, EXAMPLES) for s in samples[48:]]
    best = {1: float("inf"), 16: float("inf")}
    batch = {}
    for _ in range(2):
        for c in (1, 16):
            b0, s0 = batcher.batches, batcher.samples_scored
            rewards, _, wall = asyncio.run(_drive(srv.url, bodies, c))
            assert rewards == pytest.approx(want[48:], rel=1e-5, abs=1e-5)
            best[c] = min(best[c], wall)
            batch[c] = (batcher.samples_scored - s0) / (batcher.batches - b0)
    print(f"24 requests: 1 in flight {best[1]:.3f} s, 16 in flight {best[16]:.3f} s; mean batch {batch[16]:.1f}")
    assert batch[1] == 1 and batch[16] > 2
    assert best[16] * 1.5 <= best[1], f"16 in flight {best[16]:.3f} s vs one at a time {best[1]:.3f} s"


def test_paired_rounds_check_the_rewards_and_report_each_pair(tmp_path):
    """`bench_serve.py --pairs`: a real `ixc-engine serve` process against direct scoring, round by round, every reward
    checked against the direct score (a mismatch stops the run), one ratio per round and their median."""
    import json

    from bench_serve import main

    out = tmp_path / "pairs.json"
    assert main(["--pairs", "2", "--text-n", "24", "--warmup", "4", "--concurrency", "8", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["concurrency"] == 8 and res["samples"] == 24 and len(res["rounds"]) == len(res["ratios"]) == 2
    assert all(r["direct"] > 0 and r["serve"] > 0 for r in res["rounds"])
    assert abs(res["median"] - sum(res["ratios"]) / 2) < 1e-12  # the median of two
