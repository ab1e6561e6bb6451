"""CLI: score (errors file, ordering, resume after kill -9), filter, merge of shards, init-tiny, --help."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from ixc_engine.cli import main


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ixc_engine.cli", *map(str, args)], capture_output=True, text=True,
                          check=False, timeout=timeout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "img").mkdir()
    Image.new("RGB", (300, 200), (200, 10, 10)).save(d / "img" / "red.png")
    (d / "img" / "broken.png").write_bytes(b"not a png")
    good = lambda i: {"id": f"s{i}", "messages": [{"role": "user", "content": f"Question number {i}?"},
                                                  {"role": "assistant", "content": "Answer " * (i % 5 + 1)}]}
    lines = []
    for i in range(24):
        rec = good(i)
        if i % 6 == 1:
            rec["images"] = ["img/red.png"]
        if i == 4:
            rec["conversation"] = rec.pop("messages")  # alias
        lines.append(json.dumps(rec))
    lines[7] = '{"id": "s7", "messages": [ oops'
    lines[9] = json.dumps({"id": "s9", "messages": [{"role": "robot", "content": "hi"}]})
    lines[11] = json.dumps({"id": "s11", "messages": good(11)["messages"], "images": ["img/nowhere.png"]})
    lines[13] = json.dumps({"id": "s13", "messages": good(13)["messages"], "images": ["img/broken.png"]})
    lines[15] = json.dumps({"id": "s15"})
    lines[17] = ""
    path = d / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_score_errors_and_order(corpus, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    assert main(["score", str(corpus), "--model", str(tiny_ckpt), "-o", str(out), "--no-progress",
                 "--window", "5"]) == 0
    scores, errors = _read(out), _read(tmp_path / "scores.errors.jsonl")
    assert sorted([r["line"] for r in scores] + [r["line"] for r in errors]) == list(range(1, 25))
    assert [r["line"] for r in scores] == sorted(r["line"] for r in scores)
    reasons = {r["line"]: r["error"] for r in errors}
    assert set(reasons) == {8, 10, 12, 14, 16, 18}
    assert "invalid JSON" in reasons[8] and "robot" in reasons[10] and "nowhere.png" in reasons[12]
    assert "broken.png" in reasons[14] and "messages" in reasons[16] and "empty line" in reasons[18]
    assert {r["id"] for r in errors if r["line"] in (10, 12, 14, 16)} == {"s9", "s11", "s13", "s15"}
    assert all(isinstance(r["score"], float) and r["n_tokens"] > 0 for r in scores)
    assert next(r for r in scores if r["id"] == "s1")["n_tokens"] > 841  # the image is in the sequence
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["scored"] == 18 and summary["errors"] == 6


def test_resume_after_kill(corpus, tiny_ckpt, tmp_path):
    ref = tmp_path / "ref.jsonl"
    assert _cli("score", corpus, "--model", tiny_ckpt, "-o", ref, "--no-progress").returncode == 0
    out = tmp_path / "killed.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ixc_engine.cli", "score", str(corpus), "--model", str(tiny_ckpt),
                             "-o", str(out), "--no-progress", "--window", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(out.read_text().splitlines())
    assert 5 <= partial < 18, "the job should have been killed part-way"
    with open(out, "a") as fh:  # a torn write, as a kill mid-line would leave
        fh.write('{"id": "s2', )
    res = _cli("score", corpus, "--model", tiny_ckpt, "-o", out, "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr
    got, want = _read(out), _read(ref)
    # same lines, ids and token counts, no duplicates; scores equal up to fp32 rounding (batch composition differs)
    assert [(r["line"], r["id"], r["n_tokens"]) for r in got] == [(r["line"], r["id"], r["n_tokens"]) for r in want]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], rel=1e-5, abs=1e-6)
    assert _read(tmp_path / "killed.errors.jsonl") == _read(tmp_path / "ref.errors.jsonl")


def test_shards_merge_to_the_single_run(corpus, tiny_ckpt, tmp_path):
    single = tmp_path / "single.jsonl"
    assert main(["score", str(corpus), "--model", str(tiny_ckpt), "-o", str(single), "--no-progress"]) == 0
    out = tmp_path / "sharded.jsonl"
    for i in range(3):
        assert main(["score", str(corpus), "--model", str(tiny_ckpt), "-o", str(out), "--shard", f"{i}/3",
                     "--no-progress"]) == 0
    shards = [tmp_path / f"sharded.shard{i}-of-3.jsonl" for i in range(3)]
    assert main(["merge", "-o", str(out), *map(str, shards)]) == 0
    a, b = _read(out), _read(single)
    assert [r["line"] for r in a] == [r["line"] for r in b]
    assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], rel=1e-5)
    assert [r["line"] for r in _read(tmp_path / "sharded.errors.jsonl")] == [8, 10, 12, 14, 16, 18]


def test_filter(corpus, tiny_ckpt, tmp_path):
    scores = tmp_path / "s.jsonl"
    assert main(["score", str(corpus), "--model", str(tiny_ckpt), "-o", str(scores), "--no-progress"]) == 0
    rows = _read(scores)
    clean = tmp_path / "clean.jsonl"
    assert main(["filter", str(corpus), "--scores", str(scores), "--drop-fraction", "0.5", "-o", str(clean)]) == 0
    kept = [json.loads(x)["id"] for x in clean.read_text().splitlines()]
    top = sorted(rows, key=lambda r: -r["score"])[: len(rows) // 2]
    assert sorted(kept) == sorted(r["id"] for r in top)
    threshold = sorted(r["score"] for r in rows)[3]
    assert main(["filter", str(corpus), "--scores", str(scores), "--min-score", str(threshold), "-o",
                 str(clean)]) == 0
    assert len(clean.read_text().splitlines()) == sum(r["score"] >= threshold for r in rows)


def test_help_and_bad_arguments(tmp_path, capsys):
    res = _cli("score", "--help")
    assert res.returncode == 0 and "--max-batch-tokens" in res.stdout and "resumes" in res.stdout
    assert main(["score", str(tmp_path / "none.jsonl"), "--model", "x", "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["score", "c.jsonl", "--model", "m", "-o", "o", "--shard", "3/2"])


def test_init_tiny(tmp_path):
    assert main(["init-tiny", str(tmp_path / "m"), "--dtype", "bfloat16"]) == 0
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json", "tokenizer.model"]


def test_torchrun_environment_selects_the_shard(corpus, tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "tr.jsonl"
    assert main(["score", str(corpus), "--model", str(tiny_ckpt), "-o", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    lines = [r["line"] for r in _read(tmp_path / "tr.shard1-of-2.jsonl")]
    assert lines and all(ln % 2 == 0 for ln in lines)


def test_ctrl_c_then_resume(corpus, tiny_ckpt, tmp_path):
    out = tmp_path / "int.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "ixc_engine.cli", "score", str(corpus), "--model", str(tiny_ckpt),
                             "-o", str(out), "--no-progress", "--window", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "run the same command again to resume" in err
    res = _cli("score", corpus, "--model", tiny_ckpt, "-o", out, "--no-progress")
    assert res.returncode == 0, res.stderr
    lines = [r["line"] for r in _read(out)] + [r["line"] for r in _read(tmp_path / "int.errors.jsonl")]
    assert sorted(lines) == list(range(1, 25))
