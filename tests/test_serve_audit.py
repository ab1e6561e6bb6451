"""Regressions from the hostile-client audit of `ixc-engine serve`: bodies that used to give 500, and one bad sample
that used to fail every request sharing its engine batch."""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from ixc_engine.api import Sample
from ixc_engine.serve.batcher import Batcher, BatcherConfig
from tests.serve_support import ServerProcess, free_port
from tests.test_serve import engine, serve  # noqa: F401 - fixtures and helpers of the serving tests

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GOOD = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"
LONE = "<|im_start|>user\n\ud800hi<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"
# a sample for the --workers: text-only samples of small requests are prepared in the HTTP process, media in workers
PICTURED = {"query": ["<|im_start|>user\n<ImageHere>hi<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"],
            "images": [["data:image/png;base64," + base64.b64encode(
                (Path(__file__).resolve().parents[1] / "examples" / "images" / "img-000.png").read_bytes()).decode()]]}

HOSTILE = [  # (path, raw body, field the error must name or None, text the message must hold)
    ("/get_reward", b'{"query": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "nested too deeply"),
    ("/get_reward", b'{"query": ["x"], "labels": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}", None,
     "nested too deeply"),
    ("/get_reward", b'{"query": ["x"], "labels": [' + b"9" * 5000 + b"]}", None, "not valid JSON"),
    ("/get_reward", json.dumps({"query": [GOOD, LONE]}).encode(), "query[1]", "lone UTF-16 surrogate"),
    ("/get_reward", json.dumps({"query": [GOOD], "images": [["\udc00.png"]]}).encode(), "images[0][0]",
     "lone UTF-16 surrogate"),
    ("/v1/score", json.dumps({"conversations": [[{"role": "user", "content": "\udfffx"}]]}).encode(),
     "conversations[0][0].content", "lone UTF-16 surrogate"),
    # 50k path components: resolving took ~1 s here and grows quadratically (1 MB of 'a/': minutes)
    ("/get_reward", json.dumps({"query": [GOOD], "images": [["a/" * 50_000 + "x.png"]]}).encode(), "images[0][0]",
     "over the limit of 4096"),
    ("/pooling", json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///" + "a/" * 50_000}}]}]}).encode(), "messages",
     "over the limit of 4096"),
    ("/pooling", json.dumps({"input": "x", "\ud800": 1}).encode(), None, "lone UTF-16 surrogate"),
]


def test_hostile_json_bodies_get_400_naming_the_field_and_the_server_keeps_serving(engine, tmp_path):  # noqa: F811
    with serve(engine, media_root=tmp_path) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        for path, raw, field, text in HOSTILE:
            r = client.post(path, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400, (path, raw[:80], r.text[:300])
            err = r.json()["error"]
            assert text in err["message"], err
            if field is not None:
                assert err["param"] == field and err["message"].startswith(field + ":"), err
            assert client.post("/get_reward", json={"query": [GOOD]}).status_code == 200


class _RaisesOn:
    """The served engine, except that a batch holding a sample with id "poison" raises (as an engine bug would)."""

    def __init__(self, inner) -> None:
        self._engine = inner

    def score_stream(self, items, hd_num):
        items = list(items)
        if any(s.id == "poison" for _, s in items):
            raise RuntimeError("engine bug")
        return self._engine.score_stream(items, hd_num=hd_num)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def test_a_sample_the_engine_raises_on_fails_only_its_own_request(engine, demo_ref):  # noqa: F811
    """An engine exception used to fail every request of its batch with 500; now only the guilty one."""
    convs = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer " * (i + 1)}]
             for i in range(4)]
    want = demo_ref.score(convs)
    poison = Sample([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], [], id="poison")
    batcher = Batcher(_RaisesOn(engine), BatcherConfig(max_wait_ms=300))
    batcher.start()
    try:
        futs = [batcher.submit([Sample(c, [], id=0)], 9, 60) for c in convs[:2]]
        bad = batcher.submit([poison], 9, 60)
        futs += [batcher.submit([Sample(c, [], id=0)], 9, 60) for c in convs[2:]]
        got = [f.result(60)[0] for f in futs]
        with pytest.raises(RuntimeError, match="scoring failed: RuntimeError: engine bug"):
            bad.result(60)
    finally:
        batcher.stop()
    assert batcher.batches == 1  # they did share one engine call
    assert [g.error for g in got] == [None] * 4
    assert [g.score for g in got] == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_a_lone_surrogate_is_a_per_sample_error_of_the_engine(demo_ref):
    """In-process and in `ixc-engine score` too: the tokenizer used to raise an opaque pybind error for the batch."""
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
             [{"role": "user", "content": "hi \udc80"}, {"role": "assistant", "content": "yes"}]]
    res = list(demo_ref.score_stream([Sample(c, [], id=i) for i, c in enumerate(convs)]))
    assert res[0].error is None and res[0].score == pytest.approx(demo_ref.score(convs[:1])[0], abs=1e-5)
    assert "messages[0]['content'] holds a lone UTF-16 surrogate" in res[1].error and "surrogate" in res[1].error


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _descendants(pid: int) -> list[int]:
    """Children, grandchildren, ...: the engine process and its --workers processes."""
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_sigterm_stops_the_preprocessing_workers_too():
    """uvicorn re-raises SIGTERM after its graceful shutdown; that used to kill the server before engine.close(), so
    the --workers processes outlived it."""
    srv = ServerProcess(free_port(), "--workers", "1").start()
    kids: list[int] = []
    try:
        r = httpx.post(srv.url + "/get_reward", json=PICTURED, timeout=120)
        assert r.status_code == 200, r.text
        engine = _children(srv.proc.pid)
        kids = _descendants(srv.proc.pid)
        assert len(kids) > len(engine), "no worker process was started"  # the workers belong to the engine process
        srv.terminate()
        assert srv.proc.wait(60) in (0, -signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(map(_running, kids)):
            time.sleep(0.1)
        assert not [k for k in kids if _running(k)], f"workers {kids} outlived the server: {srv.log()[-2000:]}"
    finally:
        srv.kill()
        for k in kids:  # only the processes this test's server started
            if _running(k):
                os.kill(k, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_the_engine_process_and_its_workers_exit_when_the_server_is_killed():
    """SIGKILL leaves no clean-up to the server: its engine process sees the pipe close, finishes what it holds, stops
    its --workers and exits (no orphan keeps the model, or a GPU, after a crash)."""
    srv = ServerProcess(free_port(), "--workers", "1").start()
    kids: list[int] = []
    try:
        assert httpx.post(srv.url + "/get_reward", json=PICTURED, timeout=120).status_code == 200
        engine = _children(srv.proc.pid)
        kids = _descendants(srv.proc.pid)
        assert len(kids) > len(engine), "no worker process was started"  # the workers belong to the engine process
        srv.kill()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(map(_running, kids)):
            time.sleep(0.1)
        assert not [k for k in kids if _running(k)], f"{kids} outlived the killed server: {srv.log()[-2000:]}"
    finally:
        srv.kill()
        for k in kids:
            if _running(k):
                os.kill(k, signal.SIGKILL)


class _Odd(http.server.BaseHTTPRequestHandler):
    """Answers as proxies and other reward servers do: {"error": "text"} or an HTML page."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body = {"/str": (400, b'{"error": "bad thing"}'), "/list": (400, b"[1, 2]"),
                        "/html": (200, b"<html>gateway</html>")}[self.path.split("/v1")[0]]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_client_reports_odd_error_bodies_as_reward_server_errors():
    """A string "error" used to raise AttributeError, a non-JSON 200 a JSONDecodeError, from inside the client."""
    from ixc_engine.client import RewardClient, RewardServerError

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Odd)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        conv = [[{"role": "user", "content": "x"}]]
        for prefix, status, text in (("/str", 400, "bad thing"), ("/list", 400, "[1, 2]"), ("/html", 200, "not JSON")):
            with pytest.raises(RewardServerError, match=re.escape(text)) as info:
                RewardClient(base + prefix, retries=0).score(conv)
            assert info.value.status == status
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)
