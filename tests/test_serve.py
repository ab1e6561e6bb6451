"""`ixc-engine serve` against a real uvicorn server on 127.0.0.1, driven by an async HTTP client (httpx)."""

from __future__ import annotations

import asyncio
import base64
import random

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from PIL import Image

from ixc_engine.api import RewardEngine
from ixc_engine.serve.app import ServeConfig, create_app
from ixc_engine.serve.batcher import BatcherConfig
from ixc_engine.serve.chat import render_chat
from tests.serve_support import DEMO, ServerThread

WORDS = ["red", "blue", "green", "square", "circle", "triangle", "two", "three", "small", "large", "the", "a", "is",
         "on", "left", "right", "of", "and", "with", "near", "picture", "shows", "there"]


def sentence(rng: random.Random, lo: int = 2, hi: int = 14) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        conv = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.2 else []
        conv += [{"role": "user", "content": sentence(rng) + " " + sentence(rng)},
                 {"role": "assistant", "content": sentence(rng, 1, 30)}]
        out.append(conv)
    return out


def query(conv: list[dict], k: int) -> str:
    """As a policy decodes it: both marker spellings, with or without <s> and an EOS."""
    return render_chat(conv, spelling=("xcomposer", "internlm2")[k % 2], bos=k % 3 == 0,
                       eos=("", "</s>", "</s></s>")[k % 3])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine():
    eng = RewardEngine.from_pretrained(DEMO, device="cpu")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def ref(demo_ref):
    """A second engine for expected values: the served one belongs to its scheduler thread."""
    return demo_ref


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    rng = random.Random(7)
    for i, (w, h) in enumerate([(800, 450), (120, 90)]):
        im = Image.new("RGB", (w, h), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        for _ in range(30):
            x, y = rng.randrange(w - 20), rng.randrange(h - 20)
            im.paste((rng.randrange(256), rng.randrange(256), rng.randrange(256)), (x, y, x + 20, y + 20))
        im.save(root / f"img{i}.png")
    return root


def serve(engine, **kw):
    bcfg = BatcherConfig(**{k: kw.pop(k) for k in ("max_wait_ms", "max_queue", "max_gather") if k in kw})
    return ServerThread(create_app(engine, ServeConfig(model_name="demo", batcher=bcfg, **kw)))


def data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


async def _post_all(url: str, bodies: list, path: str = "/get_reward", headers=None) -> list:
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(client.post(path, json=b, headers=headers) for b in bodies))


def post_all(url, bodies, path="/get_reward", headers=None):
    return asyncio.run(_post_all(url, bodies, path, headers))


# --- the Done-when checks ---------------------------------------------------------------------------------------------
def test_256_concurrent_get_reward_requests_equal_engine_score(engine, ref):
    convs = conversations(256, seed=1)
    want = ref.score(convs)
    assert len({round(w, 3) for w in want}) > 240  # distinct rewards: a mix-up between requests would show
    with serve(engine, max_wait_ms=20) as srv:
        b = srv.server.config.app.state.batcher
        resp = post_all(srv.url, [{"query": [query(c, k)], "prompts": ["ignored"], "labels": [None]}
                                  for k, c in enumerate(convs)])
        batches, samples = b.batches, b.samples_scored
    assert [r.status_code for r in resp] == [200] * 256
    got = [r.json() for r in resp]
    assert all(len(g["rewards"]) == 1 and g["rewards"] == g["scores"] and g["extra_logs"] == {} for g in got)
    rewards = [g["rewards"][0] for g in got]
    assert rewards == pytest.approx(want, rel=1e-5, abs=1e-5)
    print(f"256 requests: {samples} samples in {batches} engine calls")
    assert samples == 256  # none lost, none scored twice
    assert samples / batches > 1, f"{batches} engine calls for 256 samples"


def test_8_candidates_as_8_concurrent_requests_compute_the_image_prompt_once(engine, ref, media_root):
    prompt = [{"role": "user", "content": "<ImageHere>Describe the shapes in the picture."}]
    rng = random.Random(3)
    cands = [sentence(rng, 3, 20) for _ in range(8)]
    convs = [[*prompt, {"role": "assistant", "content": c}] for c in cands]
    _, want = ref.best_of_n(prompt, cands, images=[str(media_root / "img0.png")])
    # the ideal: the shared prefix once, then each candidate's own tokens
    from ixc_engine.api import Sample

    preps = ref.engine.prepare([Sample(c, [str(media_root / "img0.png")]) for c in convs])
    keys = [p.content_keys() for p in preps]
    shared = 0
    while all(len(k) > shared and k[shared] == keys[0][shared] for k in keys):
        shared += 1
    assert shared > 2000  # the image (5 crops at hd_num 9) and the question
    ideal = shared + sum(len(k) - shared for k in keys)
    with serve(engine, media_root=media_root, max_wait_ms=5) as srv:
        before = engine.stats()
        resp = post_all(srv.url, [{"query": [query(c, k)], "images": [["img0.png"]]} for k, c in enumerate(convs)])
        after = engine.stats()
    assert [r.status_code for r in resp] == [200] * 8
    assert [r.json()["rewards"][0] for r in resp] == pytest.approx(want, rel=1e-5, abs=1e-5)
    computed = after["tokens_computed"] - before["tokens_computed"]
    print(f"8 candidates: {computed} tokens computed, ideal {ideal}, no sharing {sum(map(len, keys))}")
    assert after["tokens_requested"] - before["tokens_requested"] == sum(len(k) for k in keys)
    assert computed <= 1.10 * ideal, f"computed {computed} tokens, ideal {ideal} (no sharing: {sum(map(len, keys))})"


BAD = [  # (path, body or raw bytes, status, text the error must hold)
    ("/get_reward", b"{not json", 400, "not valid JSON"),
    ("/get_reward", b"\xff\xfe", 400, "JSON"),
    ("/get_reward", [1, 2], 400, "JSON object"),
    ("/get_reward", {}, 400, "query: required"),
    ("/get_reward", {"query": "text"}, 400, "query: must be a list"),
    ("/get_reward", {"query": ["<|im_start|>user\nhi<|im_end|>\n", 5]}, 400, "query[1]: must be a string"),
    ("/get_reward", {"query": ["plain text, no markers"]}, 400, "query[0]: no InternLM2 chat markers"),
    ("/get_reward", {"query": ["<|im_start|>bot\nhi<|im_end|>\n"]}, 400, "query[0]: messages[0]['role'] is 'bot'"),
    ("/get_reward", {"query": ["<|im_start|>user\nhi<|im_end|>\nstray<|im_start|>assistant\nx"]}, 400,
     "text between messages"),
    ("/get_reward", {"query": ["<|im_start|>user\nhi"], "images": []}, 400, "images: has 0 entries"),
    ("/get_reward", {"query": ["<|im_start|>user\nhi"], "images": [["../outside.png"]]}, 400,
     "outside the media root"),
    ("/get_reward", {"query": ["<|im_start|>user\nhi"], "images": [["/etc/passwd"]]}, 400, "outside the media root"),
    ("/get_reward", {"query": ["<|im_start|>user\nhi"], "images": [["http://example.com/a.png"]]}, 400,
     "never fetched"),
    ("/get_reward", {"query": ["<|im_start|>user\nhi"], "images": [["data:image/png;base64,@@@"]]}, 400,
     "not valid base64"),
    ("/get_reward", {"query": ["<|im_start|>user\nhi"], "images": [["data:image/png;base64,aGVsbG8="]]}, 400,
     "cannot decode image"),
    ("/get_reward", {"query": ["<|im_start|>user\nhi"], "images": [["img1.png", "img1.png"]]}, 400,
     "placeholder"),
    ("/get_reward", {"query": ["<|im_start|>user\nhi"], "images": [["missing.png"]]}, 400, "no such file"),
    ("/get_reward", {"query": ["<|im_start|>user\nhi"] * 9}, 413, "over the limit of 8 per request"),
    ("/get_reward", {"query": ["<|im_start|>user\nhi"], "images": [["img1.png"] * 3]}, 413, "media items"),
    ("/get_reward", b"x" * 5000, 413, "over the limit"),
    ("/pooling", {"model": "other", "input": "x"}, 404, "does not exist"),
    ("/pooling", {"input": "x", "messages": []}, 400, "exactly one of"),
    ("/pooling", {}, 400, "exactly one of"),
    ("/pooling", {"input": [[1, 2, 3]]}, 400, "token-id inputs"),
    ("/pooling", {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "unknown type 'audio'"),
    ("/pooling", {"messages": [{"role": "bot", "content": "x"}]}, 400, "messages: messages[0]['role'] is 'bot'"),
    ("/pooling", {"input": ["<|im_start|>user\nx<|im_end|>\n", "<|im_start|>bot\nx"]}, 400, "input[1]: messages[0]"),
    ("/pooling", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "s3://b/k"}}]}]},
     400, "never fetched"),
    ("/v1/score", {"conversations": [[{"role": "user", "content": "x"}]], "hd_num": 0}, 400, "hd_num"),
    ("/v1/score", {"conversations": {"a": 1}}, 400, "conversations: must be a list"),
    ("/v1/best_of_n", {"messages": [{"role": "user", "content": "x"}], "candidates": []}, 400, "at least one"),
    ("/v1/best_of_n", {"messages": [{"role": "user", "content": "x"}], "candidates": ["a", 3]}, 400,
     "candidates[1]"),
    ("/v1/best_of_n", {"messages": [{"role": "bot", "content": "x"}], "candidates": ["a"]}, 400, "candidates[0]"),
]


def test_every_bad_request_gets_its_4xx_and_the_server_keeps_serving(engine, media_root):
    (media_root.parent / "outside.png").write_bytes((media_root / "img1.png").read_bytes())
    good = {"query": ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"]}

    async def run(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            for path, body, status, text in BAD:
                if isinstance(body, bytes):
                    r = await client.post(path, content=body)
                else:
                    r = await client.post(path, json=body)
                assert r.status_code == status, (path, body, r.text)
                err = r.json()["error"]
                assert text in err["message"], (path, body, err)
                assert err["code"] == status
                assert (await client.post("/get_reward", json=good)).status_code == 200
            r = await client.get("/nope")
            assert r.status_code == 404 and "/get_reward" in r.json()["error"]["message"]
            assert (await client.get("/get_reward")).status_code == 405
            assert (await client.post("/health")).status_code == 405
            reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
            writer.write(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Length: 9999999\r\n\r\n{}")
            await writer.drain()
            head = await reader.readline()  # answered from the header alone, before any body arrives
            writer.close()
            assert b" 413 " in head
            assert (await client.get("/health")).json()["status"] == "ok"

    with serve(engine, media_root=media_root, max_items=8, max_media=2, max_body_bytes=4096) as srv:
        asyncio.run(run(srv.url))


def test_bearer_auth(engine):
    good = {"query": ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyes"]}
    with serve(engine, api_key="s3cret") as srv:
        rs = post_all(srv.url, [good] * 4, headers=None)
        assert {r.status_code for r in rs} == {401}
        assert rs[0].headers["www-authenticate"] == "Bearer"
        assert post_all(srv.url, [good], headers={"Authorization": "Bearer wrong"})[0].status_code == 401
        assert post_all(srv.url, [good], headers={"Authorization": "Basic s3cret"})[0].status_code == 401
        assert post_all(srv.url, [good], headers={"Authorization": "Bearer s3cret"})[0].status_code == 200
        assert httpx.get(srv.url + "/health").status_code == 200  # probes need no key
        assert httpx.get(srv.url + "/metrics").status_code == 401


def test_full_queue_answers_503_with_retry_after(engine):
    one = {"query": ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyes"]}
    with serve(engine, max_queue=2, max_items=2, max_wait_ms=400) as srv:
        rs = post_all(srv.url, [one] * 12)
        codes = [r.status_code for r in rs]
        assert set(codes) == {200, 503} and codes.count(200) <= 6, codes
        busy = [r for r in rs if r.status_code == 503]
        assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "server_busy" for r in busy)
        assert post_all(srv.url, [one])[0].status_code == 200  # and it serves again once the queue drained


def test_request_deadline_gives_504(engine):
    one = {"query": ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyes"]}
    with serve(engine, max_wait_ms=600, request_timeout_s=0.1) as srv:
        r = post_all(srv.url, [one])[0]
        assert r.status_code == 504 and "deadline" in r.json()["error"]["message"]
        assert httpx.get(srv.url + "/health").status_code == 200


# --- endpoint schemas -------------------------------------------------------------------------------------------------
def test_pooling_schema_and_images(engine, ref, media_root):
    img = media_root / "img1.png"
    conv = [{"role": "user", "content": "What is shown?"}, {"role": "assistant", "content": "Small squares."}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is shown?"},
                                          {"type": "image_url", "image_url": {"url": data_uri(img)}}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Small squares."}]}]
    want_img = ref.score([[{"role": "user", "content": "What is shown?<ImageHere>"}, conv[1]]], images=[[str(img)]])
    texts = conversations(3, seed=5)
    want_txt = ref.score(texts)
    with serve(engine, media_root=media_root) as srv:
        r1, r2 = post_all(srv.url, [{"model": "demo", "messages": parts}], "/pooling") + post_all(
            srv.url, [{"input": [query(c, k) for k, c in enumerate(texts)]}], "/pooling")
        file_parts = [{**parts[0], "content": [parts[0]["content"][0],
                                               {"type": "image_url", "image_url": {"url": f"file://{img}"}}]}, parts[1]]
        r3 = post_all(srv.url, [{"messages": file_parts}], "/pooling")[0]
        models = httpx.get(srv.url + "/v1/models").json()
    for r in (r1, r2, r3):
        assert r.status_code == 200, r.text
        j = r.json()
        assert set(j) >= {"id", "object", "created", "model", "data", "usage"} and j["object"] == "list"
        assert j["model"] == "demo" and j["usage"]["prompt_tokens"] == j["usage"]["total_tokens"] > 0
        assert all(d["object"] == "pooling" and d["index"] == i for i, d in enumerate(j["data"]))
    assert [d["data"][0] for d in r1.json()["data"]] == pytest.approx(want_img, rel=1e-5, abs=1e-5)
    assert [d["data"][0] for d in r3.json()["data"]] == pytest.approx(want_img, rel=1e-5, abs=1e-5)
    assert [d["data"][0] for d in r2.json()["data"]] == pytest.approx(want_txt, rel=1e-5, abs=1e-5)
    assert models["object"] == "list" and models["data"][0]["id"] == "demo"


def test_native_score_and_best_of_n(engine, ref, media_root):
    convs = conversations(3, seed=9)
    bad = [{"role": "robot", "content": "x"}]
    with serve(engine, media_root=media_root) as srv:
        r = post_all(srv.url, [{"conversations": [convs[0], bad, convs[1], convs[2]],
                                "images": [None, None, None, ["img1.png"]], "hd_num": 4}], "/v1/score")[0].json()
        prompt = [{"role": "user", "content": "Which shape?"}]
        b = post_all(srv.url, [{"messages": prompt, "candidates": ["A circle.", "Two squares."],
                                "images": ["img1.png"]}], "/v1/best_of_n")[0].json()
        empty = post_all(srv.url, [{"query": []}])[0].json()
        metrics = httpx.get(srv.url + "/metrics").text
    want = ref.score([convs[0], convs[1], convs[2]], images=[None, None, [str(media_root / "img1.png")]], hd_num=4)
    assert r["scores"][0] == pytest.approx(want[0], rel=1e-5) and r["scores"][2:] == pytest.approx(want[1:], rel=1e-5)
    assert r["scores"][1] is None and "robot" in r["errors"][1] and r["errors"][0] is None
    assert r["n_tokens"][1] is None and all(isinstance(n, int) for n in r["n_tokens"][::2])
    best, scores = ref.best_of_n(prompt, ["A circle.", "Two squares."], images=[str(media_root / "img1.png")])
    assert b["best"] == best and b["scores"] == pytest.approx(scores, rel=1e-5)
    assert empty == {"rewards": [], "scores": [], "extra_logs": {}}
    for name in ("ixc_requests_total", "ixc_samples_total", "ixc_tokens_computed_total",
                 "ixc_prefix_tokens_reused_total", "ixc_batch_size_bucket", "ixc_queue_depth",
                 "ixc_request_latency_seconds_bucket", "ixc_scheduler_idle_seconds_total",
                 "ixc_scheduler_gather_seconds_total"):
        assert name in metrics


def test_reward_client_against_the_server(engine, ref, media_root):
    from ixc_engine.client import RewardClient, RewardServerError

    convs = conversations(5, seed=11)
    with serve(engine, media_root=media_root, api_key="k") as srv:
        c = RewardClient(srv.url, api_key="k", batch_size=2)
        assert c.score(convs) == pytest.approx(ref.score(convs), rel=1e-5)
        assert c.get_reward([query(x, 1) for x in convs]) == pytest.approx(ref.score(convs), rel=1e-5)
        img = media_root / "img1.png"
        prompt = [{"role": "user", "content": "Which shape?"}]
        want = ref.best_of_n(prompt, ["A.", "B."], images=[str(img)])
        assert RewardClient(srv.url, api_key="k", embed_media=True).best_of_n(prompt, ["A.", "B."], images=img) == \
            (want[0], pytest.approx(want[1], rel=1e-5))
        assert c.best_of_n(prompt, ["A.", "B."], images="img1.png")[0] == want[0]
        with pytest.raises(RewardServerError, match="conversation 1: .*robot"):
            c.score([convs[0], [{"role": "robot", "content": "x"}]])
        with pytest.raises(RewardServerError, match="HTTP 401") as e:
            RewardClient(srv.url, retries=3).score(convs[:1])
        assert e.value.status == 401
    with pytest.raises(RewardServerError, match="unreachable after 3 attempts"):
        RewardClient(srv.url, retries=2, backoff=0.01, timeout=2).score(convs[:1])


def test_pooling_video_url(engine, ref, tmp_path):
    pytest.importorskip("av")
    from tests.test_media_video import write_video

    video = tmp_path / "clip.mp4"
    write_video(video, 8, 4)
    uri = "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()
    parts = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": uri}},
                                          {"type": "text", "text": "What happens?"}]},
             {"role": "assistant", "content": "The colour changes."}]
    want = ref.score([[{"role": "user", "content": "<ImageHere>What happens?"}, parts[1]]], images=[[str(video)]])
    with serve(engine) as srv:
        r = post_all(srv.url, [{"messages": parts}], "/pooling")[0]
    assert r.status_code == 200, r.text
    assert [d["data"][0] for d in r.json()["data"]] == pytest.approx(want, rel=1e-5, abs=1e-5)
