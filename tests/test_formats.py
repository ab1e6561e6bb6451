"""Corpus formats: LLaVA / ShareGPT records, content parts in JSONL, streamed JSON arrays, Parquet with image bytes;
the same scores whatever the format, resume after kill -9, filter into each format."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ixc_engine.cli import main
from ixc_engine.corpus import LineError, parse_line
from ixc_engine.formats import jsonarray
from ixc_engine.formats.parts import MediaResolver
from ixc_engine.formats.records import parse_record
from ixc_engine.formats.source import detect_format, open_corpus
from ixc_engine.media.loader import MediaBytes, load_media, media_digest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _png(color, size=(96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _read(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ record forms

def test_llava_record_placeholders_roles_and_media_root(tmp_path):
    res = MediaResolver(base_dir=tmp_path)
    rec = {"id": "a1", "image": ["x/1.jpg", "x/2.jpg"], "video": "v.mp4", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\nCompare <video> with <image>, please."},
        {"from": "gpt", "value": "They differ."}]}
    s = parse_record(rec, 7, res)
    # the token is mapped, LLaVA's "\n" after it stays: the text is otherwise verbatim
    assert s.messages == [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "<ImageHere>\nCompare <ImageHere> with <ImageHere>, please."},
                          {"role": "assistant", "content": "They differ."}]
    assert s.media == [str(tmp_path / "x/1.jpg"), str(tmp_path / "v.mp4"), str(tmp_path / "x/2.jpg")]
    assert s.id == "a1"
    # LLaVA-Video writes the video's placeholder as <image>
    s = parse_record({"video": "clip.mp4", "conversations": [{"from": "human", "value": "<image>\nWhat happens?"},
                                                             {"from": "gpt", "value": "A dog runs."}]}, 3, res)
    assert s.media == [str(tmp_path / "clip.mp4")] and s.id == 3  # id defaults to the record index
    # no placeholder, one image: the template puts it in front
    s = parse_record({"image": "a.png", "conversations": [{"from": "user", "value": "Hi"},
                                                          {"from": "assistant", "value": "Yo"}]}, 1, res)
    assert s.messages[0]["content"] == "Hi" and s.media == [str(tmp_path / "a.png")]
    with pytest.raises(LineError, match="2 <image> and 0 <video> placeholders but the record lists 1 images"):
        parse_record({"id": "b", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]}, 1, res)
    with pytest.raises(LineError, match="'from' 'bing'") as exc:
        parse_record({"id": "c", "conversations": [{"from": "bing", "value": "x"}]}, 1, res)
    assert exc.value.sample_id == "c"
    with pytest.raises(LineError, match=r"conversations\[0\].value must be a string"):
        parse_record({"conversations": [{"from": "human", "value": ["x"]}]}, 1, res)
    with pytest.raises(LineError, match="never fetched over the network"):
        parse_record({"image": "https://x.org/a.jpg", "conversations": [{"from": "human", "value": "x"}]}, 1, res)


def test_jsonl_lines_take_content_parts_and_llava_records(tmp_path):
    uri = "data:image/png;base64," + base64.b64encode(_png((9, 99, 9))).decode()
    line = json.dumps({"id": "p", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Look: "},
                                     {"type": "image_url", "image_url": {"url": uri}},
                                     {"type": "image", "image": "pics/b.png"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Two."}]}]})
    s = parse_line(line, 1, tmp_path)
    assert s.messages == [{"role": "user", "content": "Look: <ImageHere><ImageHere>"},
                          {"role": "assistant", "content": "Two."}]
    assert isinstance(s.media[0], MediaBytes) and s.media[1] == str(tmp_path / "pics/b.png")
    with pytest.raises(LineError, match="never fetched"):
        parse_line(json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://a/b.png"}}]}]}), 1, tmp_path)
    s = parse_line(json.dumps({"id": 5, "image": "i.png", "conversations": [
        {"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok"}]}), 2, tmp_path)
    assert s.messages[0]["content"] == "<ImageHere>\nhi" and s.media == [str(tmp_path / "i.png")] and s.id == 5


def test_format_detection(tmp_path):
    (tmp_path / "a.json").write_text('  [{"id": 1}]')
    (tmp_path / "b.json").write_text('{"id": 1}\n{"id": 2}\n')  # JSON Lines under a .json name
    (tmp_path / "c.jsonl").write_text('[1]\n')
    pq.write_table(pa.table({"id": [1]}), tmp_path / "d.bin")
    assert detect_format(tmp_path / "a.json") == "json"
    assert detect_format(tmp_path / "b.json") == "jsonl"
    assert detect_format(tmp_path / "c.jsonl") == "jsonl"
    assert detect_format(tmp_path / "c.jsonl", "json") == "json"
    assert detect_format(tmp_path / "a.json", "llava") == "json"
    assert detect_format(tmp_path / "d.bin") == "parquet"
    (tmp_path / "e.json").write_text('{"not": "an array"}')
    with pytest.raises(ValueError, match="not a JSON array"):
        open_corpus(tmp_path / "e.json", "json")


# ------------------------------------------------------------------------------------------- JSON array streaming

def _rand_value(rng, depth=0):
    t = rng.random()
    if depth > 3 or t < 0.3:
        return rng.choice([1, -2.5e3, True, None, 'a"b\\c]}{[', "é中\n", "", "\\", 0, "<image>"])
    if t < 0.65:
        return [_rand_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["k", 'x"y', "[", "}"]) + str(i): _rand_value(rng, depth + 1) for i in range(rng.randint(0, 4))}


def test_json_array_scanner_agrees_with_json_module(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonarray, "_CHUNK", 5)  # every structure straddles read boundaries
    rng = random.Random(0)
    p = tmp_path / "a.json"
    for _ in range(200):
        arr = [_rand_value(rng) for _ in range(rng.randint(0, 6))]
        p.write_text(json.dumps(arr, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1, "\t"])))
        spans = list(jsonarray.iter_spans(p))
        data = p.read_bytes()
        assert [jsonarray.decode_span(s) for s in spans] == arr
        assert all(data[s.start:s.end] == s.data for s in spans)


@pytest.mark.parametrize("data, want", [
    (b'[{"a": 1}, {"a": tru}, {"b": 2}]', [{"a": 1}, "!invalid JSON: Expecting value", {"b": 2}]),
    (b'[{"a": 1}, {"a": 2', [{"a": 1}, "!file ends inside record"]),
    (b'[1, 2,]', [1, 2, "!trailing ','"]),
    (b'[1 2]', [1, "!expected ',' or ']' after record 1"]),
    (b'[1] x', [1, "!text after the closing ']'"]),
    (b'["abc', ["!ends inside a string"]),
    (b'[', ["!ends before the array's closing ']'"]),
    (b'[ \n', ["!ends before the array's closing ']'"]),
    (b'[1,', [1, "!ends before the array's closing ']'"]),
    (b'\xef\xbb\xbf [ ] ', []),
    (b'[{"a": "\\"]"}, "\xc3\xbf", {"b": "\xff"}]', [{"a": '"]'}, "\xff", "!not valid UTF-8"]),
])
def test_json_array_damage_is_confined_to_records(tmp_path, data, want):
    """A bad record is an error record (want: "!reason"); the records around it are read."""
    p = tmp_path / "a.json"
    p.write_bytes(data)
    got = []
    for s in jsonarray.iter_spans(p):
        try:
            got.append(jsonarray.decode_span(s))
        except ValueError as exc:
            got.append("!" + str(exc))
    assert jsonarray.count_elements(p) == len(want) == len(got)
    for g, w in zip(got, want):
        if isinstance(w, str) and w.startswith("!"):
            assert isinstance(g, str) and g.startswith("!") and w[1:] in g, (g, w)
        else:
            assert g == w


_RSS_PROBE = """
import json, sys
from ixc_engine.corpus import LineError
from ixc_engine.formats.source import open_corpus
import ixc_engine.formats.records  # imports done before the baseline

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(x.split()[1]) * 1024 for x in fh if x.startswith(key + ":"))

path, mode = sys.argv[1], sys.argv[2]
try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets the peak (VmHWM) to the current resident size: imports' own peak does not count
except OSError as exc:
    print(json.dumps({"skip": f"cannot reset the peak RSS (/proc/self/clear_refs: {exc})"}))
    sys.exit(0)
base = status("VmRSS")
if mode == "stream":
    src = open_corpus(path, media_root="/")
    n = src.count()
    seen = [idx for idx, s in src.records() if not isinstance(s, LineError) and s.id == f"r{idx - 1}"]
    assert len(seen) == n, (len(seen), n)
else:
    with open(path) as fh:
        n = len(json.load(fh))
peak = status("VmHWM")
print(json.dumps({"records": n, "peak_over_baseline": max(peak - base, 0)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc (Linux)")
def test_big_llava_array_is_streamed_in_bounded_memory(tmp_path):
    """40,000 generated LLaVA records: peak RSS over the interpreter's baseline while counting and reading every
    record, against loading the same file whole with json.load (in fresh processes)."""
    n = 40_000
    p = tmp_path / "big.json"
    with open(p, "w") as fh:
        fh.write("[\n")
        for i in range(n):
            rec = {"id": f"r{i}", "image": f"coco/train2017/{i:012d}.jpg", "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown in this picture? Describe it in detail."},
                {"from": "gpt", "value": "A photograph of some objects on a table, " * 3 + str(i)}]}
            fh.write(("" if i == 0 else ",\n") + json.dumps(rec))
        fh.write("\n]\n")
    size = p.stat().st_size

    def probe(mode):
        res = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(p), mode], capture_output=True, text=True,
                             timeout=300, check=False)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        if "skip" in out:
            pytest.skip(out["skip"])
        return out

    stream, whole = probe("stream"), probe("whole")
    print(f"\nLLaVA array: {n} records, {size / 2**20:.1f} MiB; peak RSS over baseline: streamed "
          f"{stream['peak_over_baseline'] / 2**20:.1f} MiB, json.load {whole['peak_over_baseline'] / 2**20:.1f} MiB")
    assert stream["records"] == whole["records"] == n
    assert stream["peak_over_baseline"] < 8 * 2**20, "streaming must not hold the file"
    assert whole["peak_over_baseline"] > 3 * stream["peak_over_baseline"]  # holding the file would break the cap


# ---------------------------------------------------------------------------------------------------- Parquet

def test_parquet_rows_in_every_form(tmp_path):
    red = _png((200, 10, 10))
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(red)
    table = pa.table({
        "id": ["a", "b", "c", "d"],
        "messages": [
            [{"role": "user", "content": "<ImageHere>Colour?"}, {"role": "assistant", "content": "Red."}],
            None, None,
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]],
        "conversations": [None, json.dumps([{"from": "human", "value": "<image>\nColour?"},
                                            {"from": "gpt", "value": "Red."}]), "[not json", None],
        "images": [[{"bytes": red, "path": "red.png"}], [{"bytes": None, "path": "img/red.png"}], None, None],
        "source": ["x", "y", "x", "z"],
    })
    path = tmp_path / "c.parquet"
    pq.write_table(table, path, row_group_size=3)
    src = open_corpus(path)
    assert src.format == "parquet" and src.count() == 4
    recs = dict(src.records())
    assert isinstance(recs[1].media[0], MediaBytes) and recs[1].messages[0]["content"] == "<ImageHere>Colour?"
    assert recs[2].media == [str(tmp_path / "img" / "red.png")]
    assert recs[2].messages[0]["content"] == "<ImageHere>\nColour?"
    assert isinstance(recs[3], LineError) and "not JSON" in str(recs[3])
    assert recs[4].media == [] and recs[4].id == "d"
    # the bytes are the same image as the file: same digest (encoded once) and same crops
    assert media_digest(recs[1].media[0], 9) == media_digest(recs[2].media[0], 9)
    a, b = load_media(recs[1].media[0], 9), load_media(recs[2].media[0], 9)
    assert (a.h, a.w) == (b.h, b.w) and bool((a.pixel_values == b.pixel_values).all())
    assert [i for i, _ in src.records(start=3)] == [3, 4]
    assert [i for i, _ in src.records(shard=(1, 2))] == [2, 4]
    assert [o["source"] for _, o in src.objects()] == ["x", "y", "x", "z"]


def test_parquet_hf_chat_rows_with_payloadless_image_parts(tmp_path):
    """The `datasets` chat form: content parts whose image parts carry no payload, images in an Image column."""
    red, blue = _png((200, 10, 10)), _png((10, 10, 200))
    parts = lambda *p: list(p)
    table = pa.table({
        "messages": [
            [{"role": "user", "content": parts({"type": "image", "text": None}, {"type": "text", "text": "Which?"})},
             {"role": "assistant", "content": parts({"type": "text", "text": "Red."})}],
            [{"role": "user", "content": parts({"type": "text", "text": "A"}, {"type": "image", "text": None},
                                               {"type": "text", "text": "B"}, {"type": "image", "text": None})},
             {"role": "assistant", "content": parts({"type": "text", "text": "Two."})}],
            [{"role": "user", "content": parts({"type": "image", "text": None})},
             {"role": "assistant", "content": parts({"type": "text", "text": "?"})}]],
        "images": [[{"bytes": red, "path": None}], [{"bytes": red, "path": "r.png"}, {"bytes": blue, "path": "b.png"}],
                   []],
    })
    pq.write_table(table, tmp_path / "hf.parquet")
    recs = dict(open_corpus(tmp_path / "hf.parquet").records())
    assert recs[1].messages == [{"role": "user", "content": "<ImageHere>Which?"},
                                {"role": "assistant", "content": "Red."}]
    assert [m.data for m in recs[2].media] == [red, blue] and recs[2].messages[0]["content"] == \
        "A<ImageHere>B<ImageHere>"
    assert recs[1].id == 1  # no id column: the record index
    assert isinstance(recs[3], LineError) and "only 0 items" in str(recs[3])


# ------------------------------------------------------------------------------- one corpus in every format, scored

N_SAMPLES = 14


@pytest.fixture(scope="module")
def same_corpus(tmp_path_factory):
    """The same samples as JSONL, as a LLaVA JSON array, as JSONL with OpenAI content parts (data: URIs) and as
    Parquet with image bytes; record 6 is bad in every form (unknown speaker)."""
    d = tmp_path_factory.mktemp("same")
    (d / "media").mkdir()
    colours = [(200, 30, 30), (30, 160, 40), (30, 40, 200)]
    for k, c in enumerate(colours):
        (d / "media" / f"c{k}.png").write_bytes(_png(c, (120 + 30 * k, 80)))
    rows = []
    for i in range(N_SAMPLES):
        img = None if i % 3 == 2 else f"c{i % 3}.png"
        q, a = f"Question {i}: what colour?", "It is " + "quite " * (i % 4) + "red."
        role = "narrator" if i == 5 else "user"
        rows.append((f"s{i}", img, q, a, role))
    files = {}
    with open(d / "plain.jsonl", "w") as fh:
        for sid, img, q, a, role in rows:
            rec = {"id": sid, "messages": [{"role": role, "content": q}, {"role": "assistant", "content": a}]}
            if img:
                rec["images"] = [f"media/{img}"]
            fh.write(json.dumps(rec) + "\n")
    files["jsonl"] = d / "plain.jsonl"
    llava = []
    for sid, img, q, a, role in rows:
        rec = {"id": sid, "conversations": [{"from": "bard" if role == "narrator" else "human", "value": q},
                                            {"from": "gpt", "value": a}], "source": "llava"}
        if img:
            rec["image"] = img  # relative to --media-root d/media
        llava.append(rec)
    (d / "llava").mkdir()
    (d / "llava" / "data.json").write_text(json.dumps(llava, indent=2))
    files["json"] = d / "llava" / "data.json"
    with open(d / "parts.jsonl", "w") as fh:
        for sid, img, q, a, role in rows:
            content = [{"type": "text", "text": q}]
            if img:  # a single image in front of the prompt, as the plain form's placeholder-free image
                uri = "data:image/png;base64," + base64.b64encode((d / "media" / img).read_bytes()).decode()
                content = [{"type": "image_url", "image_url": {"url": uri}}, *content]
            fh.write(json.dumps({"id": sid, "messages": [{"role": role, "content": content},
                                                         {"role": "assistant", "content": a}]}) + "\n")
    files["parts"] = d / "parts.jsonl"
    # in the parts form the image placeholder sits inside the user message: give the other forms the same text
    # would change them, so the parts corpus is compared against a plain corpus with an explicit placeholder
    with open(d / "plain_ph.jsonl", "w") as fh:
        for sid, img, q, a, role in rows:
            rec = {"id": sid, "messages": [{"role": role, "content": ("<ImageHere>" if img else "") + q},
                                           {"role": "assistant", "content": a}]}
            if img:
                rec["images"] = [f"media/{img}"]
            fh.write(json.dumps(rec) + "\n")
    files["plain_ph"] = d / "plain_ph.jsonl"
    table = pa.table({
        "id": [r[0] for r in rows],
        "messages": [[{"role": role, "content": ("<ImageHere>" if img else "") + q},
                      {"role": "assistant", "content": a}] for _, img, q, a, role in rows],
        "images": [[{"bytes": (d / "media" / img).read_bytes(), "path": img}] if img else [] for _, img, *_ in rows],
        "source": ["hub"] * len(rows),
    })
    pq.write_table(table, d / "data.parquet", row_group_size=4)
    files["parquet"] = d / "data.parquet"
    return d, files


def _score(corpus, model, out, *extra):
    assert main(["score", str(corpus), "--model", str(model), "-o", str(out), "--no-progress", "--window", "4",
                 *map(str, extra)]) == 0
    return _read(out), _read(out.with_name(out.name.removesuffix(".jsonl") + ".errors.jsonl"))


@pytest.fixture(scope="module")
def scored(same_corpus, tiny_ckpt, tmp_path_factory):
    d, files = same_corpus
    out = tmp_path_factory.mktemp("scored")
    res = {}
    for name, path in files.items():
        extra = ["--media-root", d / "media"] if name == "json" else []
        res[name] = _score(path, tiny_ckpt, out / f"{name}.jsonl", *extra)
    return out, res


def test_identical_content_scores_identically_in_every_format(scored):
    _, res = scored
    key = lambda rows: [(r["line"], r["id"], r["n_tokens"], r["score"]) for r in rows]
    assert len(res["jsonl"][0]) == N_SAMPLES - 1
    assert key(res["json"][0]) == key(res["jsonl"][0])  # LLaVA JSON array == plain JSONL, bit for bit
    assert key(res["parts"][0]) == key(res["plain_ph"][0])  # content parts with data: URIs == paths
    assert key(res["parquet"][0]) == key(res["plain_ph"][0])  # Parquet image bytes == image files
    assert any(r["n_tokens"] > 841 for r in res["parquet"][0])  # the images are in the sequences
    for name, (_, errors) in res.items():
        assert [(e["line"], e["id"]) for e in errors] == [(6, "s5")], name
    assert "'from' 'bard'" in res["json"][1][0]["error"]


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_resume_after_kill_9(fmt, same_corpus, scored, tiny_ckpt, tmp_path):
    d, files = same_corpus
    ref_rows, ref_errors = scored[1][fmt]
    out = tmp_path / "killed.jsonl"
    extra = ["--media-root", str(d / "media")] if fmt == "json" else []
    cmd = [sys.executable, "-m", "ixc_engine.cli", "score", str(files[fmt]), "--model", str(tiny_ckpt), "-o",
           str(out), "--no-progress", "--window", "1", *extra]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 4):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(out.read_text().splitlines())
    assert 4 <= partial < N_SAMPLES - 1, "the job should have been killed part-way"
    with open(out, "a") as fh:
        fh.write('{"id": "s9", "sco')  # a torn last line
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr
    got = _read(out)
    assert [(r["line"], r["id"], r["n_tokens"]) for r in got] == [(r["line"], r["id"], r["n_tokens"])
                                                                   for r in ref_rows]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in ref_rows], rel=1e-5, abs=1e-6)
    assert _read(tmp_path / "killed.errors.jsonl") == ref_errors


def test_sharded_json_array_merges_to_the_single_run(same_corpus, scored, tiny_ckpt, tmp_path):
    d, files = same_corpus
    out = tmp_path / "sh.jsonl"
    for i in range(2):
        assert main(["score", str(files["json"]), "--model", str(tiny_ckpt), "-o", str(out), "--no-progress",
                     "--media-root", str(d / "media"), "--shard", f"{i}/2"]) == 0
    assert main(["merge", "-o", str(out), str(tmp_path / "sh.shard0-of-2.jsonl"),
                 str(tmp_path / "sh.shard1-of-2.jsonl")]) == 0
    want = scored[1]["json"][0]
    got = _read(out)
    assert [r["line"] for r in got] == [r["line"] for r in want]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], rel=1e-5)


def test_filter_writes_each_format_and_round_trips(same_corpus, scored, tmp_path):
    d, files = same_corpus
    out_dir, res = scored
    for fmt in ("json", "parquet", "jsonl"):
        rows = res[fmt][0]
        ranked = sorted(rows, key=lambda r: (r["score"], r["line"]))
        keep = sorted(r["line"] for r in ranked[4:])
        dst = tmp_path / f"clean.{ 'jsonl' if fmt == 'jsonl' else fmt}"
        assert main(["filter", str(files[fmt]), "--scores", str(out_dir / f"{fmt}.jsonl"), "--drop-fraction",
                     str(4 / len(rows)), "-o", str(dst)]) == 0
        clean = open_corpus(dst, media_root=d / "media")
        assert clean.format == fmt
        ids = {r["line"]: r["id"] for r in rows}
        assert [s.id for _, s in clean.records()] == [ids[ln] for ln in keep], fmt
        if fmt == "json":  # each kept record's original text, byte for byte
            orig = {s.index: s.data for s in jsonarray.iter_spans(files[fmt])}
            assert [s.data for s in jsonarray.iter_spans(dst)] == [orig[ln] for ln in keep]
            assert json.loads(dst.read_text()) == [json.loads(orig[ln]) for ln in keep]
        elif fmt == "parquet":
            src_t, got_t = pq.read_table(files[fmt]), pq.read_table(dst)
            assert got_t.schema == src_t.schema and got_t.schema.metadata == src_t.schema.metadata
            assert got_t.to_pylist() == src_t.take([ln - 1 for ln in keep]).to_pylist()
        else:
            lines = files[fmt].read_bytes().splitlines(keepends=True)
            assert dst.read_bytes() == b"".join(lines[ln - 1] for ln in keep)


def test_damaged_json_array_gives_error_records_and_every_record_is_accounted_for(tiny_ckpt, tmp_path):
    good = lambda i: json.dumps({"id": f"g{i}", "conversations": [{"from": "human", "value": f"Q{i}?"},
                                                                  {"from": "gpt", "value": "A."}]})
    text = "[\n" + ",\n".join([good(0), '{"id": "bad", "conversations": [{"from": "human", "value": tru}]}', good(2),
                               '"just a string"', good(4)]) + ',\n{"id": "torn", "conv'  # killed while writing
    corpus = tmp_path / "damaged.json"
    corpus.write_text(text)
    scores, errors = _score(corpus, tiny_ckpt, tmp_path / "s.jsonl")
    assert [(r["line"], r["id"]) for r in scores] == [(1, "g0"), (3, "g2"), (5, "g4")]
    reasons = {e["line"]: e["error"] for e in errors}
    assert sorted(reasons) == [2, 4, 6]
    assert "invalid JSON" in reasons[2] and "expected a JSON object" in reasons[4]
    assert "file ends inside" in reasons[6]
    job = json.loads((tmp_path / "s.job.json").read_text())
    assert job["lines"] == 6 and job["complete"] and job["scored"] == 3 and job["errors"] == 3
