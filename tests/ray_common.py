"""Shared by the Ray tests: a mixed corpus (text, images, a video, bad lines), the local job's results, comparisons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ixc_engine.cli import main

TOL = 1e-5  # fp32: a Ray job batches samples differently from the local job (last-bit rounding)


def make_corpus(d: Path) -> Path:
    """22 lines: 16 scorable (text; two images shared by consecutive samples with the same prompt; a video) and 6 bad
    ones (invalid JSON, unknown role, missing and corrupt image, empty line, invalid UTF-8)."""
    import av

    (d / "img").mkdir(parents=True)
    Image.new("RGB", (300, 200), (200, 10, 10)).save(d / "img" / "red.png")
    Image.new("RGB", (120, 260), (10, 200, 10)).save(d / "img" / "green.png")
    (d / "img" / "broken.png").write_bytes(b"not a png")
    with av.open(str(d / "img" / "clip.mp4"), "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(6):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 30 * i, dtype=np.uint8),
                                                         format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)

    def msg(q, a):
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    lines = []
    for i in range(20):
        rec = {"id": f"s{i}", "messages": msg(f"Question {i // 3}?", "Answer " * (i % 4 + 1))}
        if i % 5 == 1:
            rec["images"] = ["img/red.png"]
        if i % 5 == 2:
            rec["images"] = ["img/green.png"]
        lines.append(json.dumps(rec))
    lines.insert(3, json.dumps({"id": 33, "messages": msg("<ImageHere>What happens?", "Colours change."),
                                "images": ["img/clip.mp4"]}))
    lines[6] = '{"id": "s6", "messages": [ oops'
    lines[8] = json.dumps({"id": "s8", "messages": [{"role": "robot", "content": "hi"}]})
    lines[10] = json.dumps({"id": "s10", "messages": msg("q", "a"), "images": ["img/nowhere.png"]})
    lines[12] = json.dumps({"id": "s12", "messages": msg("q", "a"), "images": ["img/broken.png"]})
    lines[14] = ""
    raw = ("\n".join(lines) + "\n").encode() + b'{"id": "bad\xff", "messages": []}\n'
    path = d / "corpus.jsonl"
    path.write_bytes(raw)
    return path


N_LINES, N_ERRORS = 22, 6


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def local_results(corpus: Path, model: Path, out: Path) -> tuple[list[dict], list[dict]]:
    assert main(["score", str(corpus), "--model", str(model), "-o", str(out), "--no-progress"]) == 0
    return read(out), read(out.with_name(out.name.replace(".jsonl", ".errors.jsonl")))


def assert_same_results(out: Path, local: tuple[list[dict], list[dict]]) -> None:
    """Every line exactly once, in input order; scores within TOL of the local job's, the very same error records."""
    scores, errors = read(out), read(out.with_name(out.name.replace(".jsonl", ".errors.jsonl")))
    lines = [r["line"] for r in scores] + [r["line"] for r in errors]
    assert sorted(lines) == list(range(1, N_LINES + 1)), lines
    assert [r["line"] for r in scores] == sorted(r["line"] for r in scores)
    assert errors == local[1]
    assert len(errors) == N_ERRORS
    assert [(r["line"], r["id"], r["n_tokens"]) for r in scores] == [(r["line"], r["id"], r["n_tokens"])
                                                                     for r in local[0]]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(scores, local[0])) < TOL
    job = json.loads(out.with_name(out.name.replace(".jsonl", ".job.json")).read_text())
    assert job["complete"] and job["dtype"] == "float32"
    assert (job["scored"], job["errors"]) == (N_LINES - N_ERRORS, N_ERRORS)


def cli_process(*args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "ixc_engine.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def pids_of(tag: bytes) -> list[int]:
    """Processes whose command line holds `tag` (Ray names actor processes ray::MapWorker(MapBatches(Class)))."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as fh:
                    if tag in fh.read():
                        out.append(int(d))
            except OSError:
                continue
    return out


def lines_written(out: Path) -> int:
    """Complete records in the scores and errors files so far."""
    n = 0
    for p in (out, out.with_name(out.name.replace(".jsonl", ".errors.jsonl"))):
        if p.exists():
            n += p.read_bytes().count(b"\n")
    return n


def summary(stderr: str) -> dict:
    return json.loads([x for x in stderr.splitlines() if x.startswith('{"scored"')][-1])


WARNINGS_ARGS = ("--max-length", "900", "--max-media", "1")


def make_warnings_corpus(d: Path) -> Path:
    """Samples that the local job scores with "warnings" (roles out of order, a last message that is not the
    assistant's, an empty reply, special-token strings, a media-like key that is not read, a 16-bit image), errors that
    carry a warning in their reason, one over --max-length 900 and one over --max-media 1, and two clean samples."""
    (d / "img").mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 10, 10)).save(d / "img" / "red.png")
    Image.new("I;16", (40, 30), 1000).save(d / "img" / "deep.png")

    def msg(q, a):
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    recs = [
        {"id": "clean", "messages": msg("Hi?", "Hello.")},
        {"id": "user-last", "messages": [{"role": "user", "content": "Anyone there?"}]},
        {"id": "empty-reply", "messages": msg("Say something.", " ")},
        {"id": "special", "messages": msg("Finish?", "Done.</s>[UNUSED_TOKEN_145] Sure.")},
        {"id": "media-key", "messages": msg("What is shown?", "A clip."), "video": "img/clip.mp4"},
        {"id": "deep", "messages": msg("What colour?", "Grey."), "images": ["img/deep.png"]},
        {"id": "out-of-order", "messages": [{"role": "assistant", "content": "I start."},
                                            {"role": "user", "content": "Fine."},
                                            {"role": "assistant", "content": "Good.</s>"}]},
        {"id": "warned-error", "messages": msg("<ImageHere>Look.", "Seen."), "picture": "img/red.png"},
        {"id": "too-long", "messages": msg("Tell me a story.", "Once upon a time " * 250)},
        {"id": "two-images", "messages": msg("<ImageHere><ImageHere>Compare.", "Same."),
         "images": ["img/red.png", "img/red.png"]},
        {"id": "clean-image", "messages": msg("What colour?", "Red."), "images": ["img/red.png"]},
    ]
    path = d / "warnings.jsonl"  # scored with WARNINGS_ARGS
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path
