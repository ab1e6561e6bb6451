"""Limits a client meets: --max-connections (a connection beyond the limit gets 503, the others are still served)
and RewardClient splitting a batch that the server refuses as too large."""

from __future__ import annotations

import http.client
import json
import random
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.importorskip("httpx")

from ixc_engine.client import RewardClient, RewardServerError
from tests.serve_support import ServerProcess, free_port
from tests.test_serve import conversations, engine, media_root, query, sentence, serve  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ask(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", "/get_reward", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, r.read()


def test_connections_over_max_connections_get_503_and_the_server_keeps_serving(demo_ref):
    conv = conversations(1, seed=51)[0]
    want = demo_ref.score([conv])[0]
    body = json.dumps({"query": [query(conv, 0)]}).encode()
    port = free_port()
    srv = ServerProcess(port, "--max-connections", "2").start()
    conns = []

    def connect() -> http.client.HTTPConnection:
        conns.append(http.client.HTTPConnection("127.0.0.1", port, timeout=60))
        return conns[-1]

    try:
        a, b = connect(), connect()
        for c in (a, b):  # two kept-alive connections, idle between requests: both count
            status, data = _ask(c, body)
            assert status == 200 and json.loads(data)["rewards"][0] == pytest.approx(want, rel=1e-5, abs=1e-5)
        c = connect()
        status, data = _ask(c, body)
        assert status == 503, data  # the third is refused, and the server closes it ...
        c.close()
        # ... (until the server has seen it closed, it counts: a request on any connection then would get 503 too)
        time.sleep(0.5)
        for c in (a, b):
            assert _ask(c, body)[0] == 200  # ... while the two are still served
        a.close()
        deadline = time.monotonic() + 10
        while True:  # once the server has seen a's close, a new connection is served again
            status, _ = _ask(connect(), body)
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 200
        assert _ask(b, body)[0] == 200
    finally:
        for c in conns:
            c.close()
        srv.kill()
    assert "Traceback" not in srv.log()


def test_default_max_connections_stays_below_the_open_file_limit(monkeypatch):
    import resource

    from ixc_engine.serve import cli

    for soft, want in ((1024, 1024 - cli.RESERVED_FILES), (1 << 20, cli.DEFAULT_MAX_CONNECTIONS),
                       (resource.RLIM_INFINITY, cli.DEFAULT_MAX_CONNECTIONS), (100, 1)):
        monkeypatch.setattr(resource, "getrlimit", lambda _which, soft=soft: (soft, resource.RLIM_INFINITY))
        assert cli.default_max_connections() == want


def test_reward_client_splits_what_the_server_refuses_as_too_many_items(engine, demo_ref):  # noqa: F811
    convs = conversations(10, seed=52)
    want = demo_ref.score(convs)
    rng = random.Random(53)
    prompt = [{"role": "user", "content": "Name a shape and its colour."}]
    cands = [sentence(rng, 2, 9) for _ in range(7)]
    want_best = demo_ref.best_of_n(prompt, cands)
    with serve(engine, max_items=3) as srv:  # a real server: 413 for more than 3 items per request
        c = RewardClient(srv.url, batch_size=64)
        assert c.score(convs) == pytest.approx(want, rel=1e-5, abs=1e-5)  # in input order
        assert c.attempts == 1 + 4  # refused once, then 3 + 3 + 3 + 1
        assert c.get_reward([query(x, k) for k, x in enumerate(convs)]) == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert c.attempts == 5 + 4  # the server's limit is kept: no second refusal
        best, scores = c.best_of_n(prompt, cands)
        assert best == want_best[0] and scores == pytest.approx(want_best[1], rel=1e-5, abs=1e-5)
        results = RewardClient(srv.url).score_results([convs[0], [{"role": "robot", "content": "x"}], *convs[1:5]])
        assert [r[0] for r in results[:1] + results[2:]] == pytest.approx(want[:5], rel=1e-5, abs=1e-5)
        assert results[1][0] is None and "robot" in results[1][2]  # a per-item error stays in its place


def test_reward_client_halves_a_body_over_the_size_limit_and_raises_what_cannot_be_split(engine, demo_ref,  # noqa: F811
                                                                                         media_root):  # noqa: F811
    rng = random.Random(54)
    convs = [[{"role": "user", "content": " ".join(sentence(rng, 8, 14) for _ in range(6))},
              {"role": "assistant", "content": sentence(rng, 4, 12)}] for _ in range(9)]
    sizes = [len(json.dumps(c)) for c in convs]
    assert 350 < min(sizes) and max(sizes) < 700 and sum(sizes) > 2 * 1500  # 2-3 per request fit
    want = demo_ref.score(convs)
    with serve(engine, max_body_bytes=1500, media_root=media_root, max_media=1) as srv:
        c = RewardClient(srv.url)
        assert c.score(convs) == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert c.attempts > 3  # refused, then halves (of halves) until each part fits
        long = [{"role": "user", "content": "x " * 1000}, {"role": "assistant", "content": "y"}]
        c = RewardClient(srv.url)
        with pytest.raises(RewardServerError, match="HTTP 413") as e:  # one conversation over the limit alone
            c.score([long])
        assert e.value.status == 413 and c.attempts == 1
        c = RewardClient(srv.url)
        with pytest.raises(RewardServerError, match="media items, over the limit of 1 per item"):
            c.score(convs[:2], images=[None, ["img0.png", "img1.png"]])  # too many media in one item: not split
        assert c.attempts == 1


def test_reward_client_splits_a_body_of_megabytes_the_server_refuses(engine, demo_ref, tmp_path):  # noqa: F811
    """Bodies past the socket buffers: the server reads an oversized body (up to 4x its limit) before answering 413,
    so the client sees the 413 instead of a connection reset, halves the batch, and keeps to the limit it learnt."""
    from PIL import Image

    rng = random.Random(55)
    paths = []
    for i in range(8):  # noise PNGs of ~1 MB: 1.3 MB each as data: URIs, 10.7 MB in one body
        path = tmp_path / f"noise{i}.png"
        Image.frombytes("RGB", (640, 540), rng.randbytes(640 * 540 * 3)).save(path)
        paths.append(path)
    assert all(p.stat().st_size > 900_000 for p in paths)
    convs = [[{"role": "user", "content": "<ImageHere>What is it?"}, {"role": "assistant", "content": f"Noise {i}."}]
             for i in range(8)]
    want = demo_ref.score(convs, images=[[str(p)] for p in paths], hd_num=1)
    with serve(engine, max_body_bytes=3 << 20, max_items=64) as srv:
        c = RewardClient(srv.url, embed_media=True, retries=0)
        got = c.score(convs, images=[[p] for p in paths], hd_num=1)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert c.attempts == 1 + 4  # 10.7 MB refused (413 seen), then 2 images (2.7 MB) per request, learnt
        assert c.score(convs[:4], images=[[p] for p in paths[:4]], hd_num=1) == pytest.approx(want[:4], rel=1e-5,
                                                                                                abs=1e-5)
        assert c.attempts == 5 + 2  # split before sending: no second refusal
