"""Fuzz (issue 9): seeded random corpora mixing good lines and broken lines of every kind the CLI must survive.

Invariant: exit 0; every input line in exactly one output file, each file in input order; every output line strict
JSON; good lines scored, broken ones error records; a good line's score equals scoring it alone (fp32, 1e-5); `filter`
keeps exact byte slices; and the same after kill -9 at random points and a resume."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ixc_engine.cli import main

from .test_hardening import _strict

U = lambda t: {"role": "user", "content": t}
A = lambda t: {"role": "assistant", "content": t}
ALPHABET = "abc xyz 0123 é ü ß 中文 😀 \t \u2028 \r \\ \" / <ImageHere?> [UNUSED]"


def _text(rng: random.Random, n: int = 12) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, n)))


GOOD = ["text", "system", "image", "image_ph", "crlf", "cr_ws", "warn_last", "warn_empty", "warn_special",
        "warn_order", "warn_key", "int_id", "null_id", "no_id"]


def _good(rng: random.Random, k: int, kind: str) -> tuple[bytes, str]:
    """A line that must be scored (maybe with warnings)."""
    msgs = [U(_text(rng)), A(_text(rng))]
    rec: dict = {"id": f"g{k}", "messages": msgs}
    if kind == "system":
        rec["messages"] = [{"role": "system", "content": _text(rng)}, *msgs]
    elif kind == "image":
        rec["images"] = [rng.choice(["img/red.png", "img/blue.jpg"])]
    elif kind == "image_ph":
        rec["messages"] = [U("look: <ImageHere> " + _text(rng)), A(_text(rng))]
        rec["images"] = "img/red.png"
    elif kind == "warn_last":
        rec["messages"] = [*msgs, U(_text(rng))]
    elif kind == "warn_empty":
        rec["messages"] = [msgs[0], A("")]
    elif kind == "warn_special":
        rec["messages"] = [msgs[0], A("ok[UNUSED_TOKEN_145]\n</s>[UNUSED_TOKEN_130]")]
    elif kind == "warn_order":
        rec["messages"] = [A(_text(rng)), *msgs]
    elif kind == "warn_key":
        rec["image"] = "img/red.png"
    elif kind == "int_id":
        rec["id"] = rng.randint(-10**12, 10**12)
    elif kind == "null_id":
        rec["id"] = None
    elif kind == "no_id":
        del rec["id"]
    raw = json.dumps(rec, ensure_ascii=rng.random() < 0.5).encode()
    if kind == "crlf":
        return raw + b"\r\n", kind
    if kind == "cr_ws":
        return raw.replace(b", ", b",\r ", 1) + b"\n", kind
    return raw + b"\n", kind


BROKEN = {
    "truncated": lambda r, k: json.dumps({"id": k, "messages": [U("q"), A("a")]}).encode()[: r.randint(1, 30)],
    "bad_utf8": lambda r, k: b'{"id": "b", "messages": "\xff\xfe\xc3"}',
    "nul": lambda r, k: b'{"id": "n"\x00, "messages": []}',
    "empty": lambda r, k: b"",
    "blank": lambda r, k: b"  \t ",
    "not_object": lambda r, k: r.choice([b"[1, 2]", b"42", b'"text"', b"null"]),
    "no_messages": lambda r, k: b'{"id": "x"}',
    "messages_str": lambda r, k: b'{"messages": "hello"}',
    "role": lambda r, k: json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(),
    "content_type": lambda r, k: json.dumps({"messages": [{"role": "user", "content": {"text": "a"}}]}).encode(),
    "surrogate_content": lambda r, k: b'{"messages": [{"role": "user", "content": "q\\udbff"}, '
                                      b'{"role": "assistant", "content": "a"}]}',
    "surrogate_id": lambda r, k: b'{"id": "\\ud800x", "messages": [{"role": "user", "content": "q"}]}',
    "surrogate_path": lambda r, k: b'{"messages": [{"role": "user", "content": "q"}], "images": ["\\udc00.png"]}',
    "long_name": lambda r, k: json.dumps({"messages": [U("q"), A("a")], "images": ["n" * 300 + ".png"]}).encode(),
    "missing_image": lambda r, k: json.dumps({"messages": [U("q"), A("a")], "images": ["img/none.png"]}).encode(),
    "corrupt_image": lambda r, k: json.dumps({"messages": [U("q"), A("a")], "images": ["img/broken.png"]}).encode(),
    "extension": lambda r, k: json.dumps({"messages": [U("q"), A("a")], "images": ["img/red.tiff"]}).encode(),
    "nan_id": lambda r, k: r.choice([b"NaN", b"Infinity", b"-Infinity"]).join(
        [b'{"id": ', b', "messages": [{"role": "user", "content": "q"}]}']),
    "odd_id": lambda r, k: r.choice([b"1.5", b"true", b"[1]", b'{"a": 1}']).join(
        [b'{"id": ', b', "messages": [{"role": "user", "content": "q"}]}']),
    "huge_int": lambda r, k: b'{"id": ' + b"9" * 4400 + b"}",
    "deep": lambda r, k: b"[" * 50000,
    "placeholder_no_media": lambda r, k: json.dumps({"messages": [U("<ImageHere>what?"), A("red")]}).encode(),
    "placeholder_typo": lambda r, k: json.dumps({"messages": [U("<ImageHere>what?"), A("red")],
                                                 "image": "img/red.png"}).encode(),
    "placeholder_mismatch": lambda r, k: json.dumps({"messages": [U("<ImageHere><ImageHere>"), A("x")],
                                                     "images": ["img/red.png"]}).encode(),
    "several_no_placeholder": lambda r, k: json.dumps({"messages": [U("q"), A("x")],
                                                       "images": ["img/red.png", "img/blue.jpg"]}).encode(),
    "too_long": lambda r, k: json.dumps({"messages": [U("word " * 2000), A("x")]}).encode(),
}


def make_corpus(seed: int, n: int, d: Path) -> tuple[Path, list[tuple[bytes, bool, str]]]:
    rng = random.Random(seed)
    # every kind at least once, the rest drawn at random (half good, half broken), in random order
    kinds = GOOD + sorted(BROKEN)
    kinds += [rng.choice(GOOD) if rng.random() < 0.5 else rng.choice(sorted(BROKEN)) for _ in range(n - len(kinds))]
    rng.shuffle(kinds)
    lines: list[tuple[bytes, bool, str]] = []
    for k, kind in enumerate(kinds):
        if kind in GOOD:
            raw, kind = _good(rng, k, kind)
            lines.append((raw, True, kind))
        else:
            lines.append((BROKEN[kind](rng, k) + rng.choice([b"\n", b"\r\n"]), False, kind))
    if rng.random() < 0.5:  # no final newline
        lines[-1] = (lines[-1][0].removesuffix(b"\n"), *lines[-1][1:])
    path = d / f"corpus{seed}.jsonl"
    path.write_bytes(b"".join(raw for raw, _, _ in lines))
    return path, lines


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    (d / "img").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(d / "img" / "red.png")
    Image.new("RGB", (30, 50), (10, 10, 200)).save(d / "img" / "blue.jpg")
    (d / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    Image.new("RGB", (8, 8)).save(d / "img" / "red.tiff")
    return d


@pytest.fixture(scope="module")
def alone(tiny_ckpt):
    """Score of one corpus line scored on its own (a fresh batch of one)."""
    from ixc_engine.api import RewardEngine
    from ixc_engine.corpus import parse_line

    eng = RewardEngine.from_pretrained(tiny_ckpt, device="cpu")
    cache: dict = {}

    def score(raw: bytes, line_no: int, base: Path) -> float:
        key = (raw, base)
        if key not in cache:
            sample = parse_line(raw.decode("utf-8"), line_no, base)
            (r,) = eng.score_stream([sample])
            assert r.error is None, r.error
            cache[key] = r.score
        return cache[key]

    return score


def check(out: Path, lines, corpus: Path, alone) -> dict[int, float]:
    """The invariant; returns {line: score}."""
    errors_file = out.with_name(out.name.removesuffix(".jsonl") + ".errors.jsonl")
    scores = [_strict(x) for x in out.read_bytes().split(b"\n") if x]
    errors = [_strict(x) for x in errors_file.read_bytes().split(b"\n") if x]
    s_lines, e_lines = [r["line"] for r in scores], [r["line"] for r in errors]
    assert s_lines == sorted(s_lines) and e_lines == sorted(e_lines)
    assert sorted(s_lines + e_lines) == list(range(1, len(lines) + 1))  # each line exactly once
    got = {r["line"]: r["score"] for r in scores}
    for ln, (raw, good, kind) in enumerate(lines, 1):
        assert (ln in got) == good, (ln, kind, raw[:80], next((r["error"] for r in errors if r["line"] == ln), None))
        if good:
            assert got[ln] == pytest.approx(alone(raw, ln, corpus.parent), rel=1e-5, abs=1e-6), (ln, kind)
    return got


def test_fuzz_random_corpora(tiny_ckpt, media_dir, alone, tmp_path):
    corpus, lines = make_corpus(seed=11, n=70, d=media_dir)
    out = tmp_path / "s.jsonl"
    rc = main(["score", str(corpus), "--model", str(tiny_ckpt), "-o", str(out), "--no-progress", "--max-length",
               "1500", "--window", "16", "--max-batch-tokens", "1024"])
    assert rc == 0
    got = check(out, lines, corpus, alone)
    assert {kind for _, _, kind in lines} == set(GOOD) | set(BROKEN)
    clean = tmp_path / "clean.jsonl"
    assert main(["filter", str(corpus), "--scores", str(out), "--min-score=-1e30", "-o", str(clean)]) == 0
    assert clean.read_bytes() == b"".join(raw for ln, (raw, _, _) in enumerate(lines, 1) if ln in got)


def _records_on_disk(out: Path) -> int:
    n = 0
    for p in (out, out.with_name(out.name.removesuffix(".jsonl") + ".errors.jsonl")):
        if p.exists():
            n += p.read_bytes().count(b"\n")
    return n


def test_fuzz_kill_9_and_resume(tiny_ckpt, media_dir, alone, tmp_path):
    rng = random.Random(5)
    corpus, lines = make_corpus(seed=23, n=90, d=media_dir)
    out = tmp_path / "k.jsonl"
    cmd = [sys.executable, "-m", "ixc_engine.cli", "score", str(corpus), "--model", str(tiny_ckpt), "-o", str(out),
           "--no-progress", "--max-length", "1500", "--window", "8", "--max-batch-tokens", "512"]
    kills = part_way = 0
    for _ in range(2):
        if _records_on_disk(out) >= len(lines):
            break
        target = _records_on_disk(out) + rng.randint(3, 15)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and _records_on_disk(out) < target:
            time.sleep(0.01)
        time.sleep(rng.random() * 0.05)  # anywhere: mid-batch, mid-write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        part_way += _records_on_disk(out) < len(lines)
    assert kills >= 1 and part_way >= 1, "no kill landed part-way"
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    check(out, lines, corpus, alone)
