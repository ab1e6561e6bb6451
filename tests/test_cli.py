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
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
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


def test_parsing_arguments_imports_no_torch():
    """--help and argument errors come at once, and a Ctrl-C during start-up reaches main()'s handler: building the
    parser (every subcommand's) imports the standard library only, never torch or numpy."""
    code = ("import sys; from ixc_engine.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'ray', 'starlette', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


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


# ------------------------------------------------------------------------------------------------------------------
# Guard rails: nothing is overwritten, mixed up or merged by mistake


def _score(corpus, model, out, *extra):
    return main(["score", str(corpus), "--model", str(model), "-o", str(out), "--no-progress", *map(str, extra)])


def test_output_naming_the_corpus_or_a_foreign_file_is_refused(corpus, tiny_ckpt, tmp_path, capsys):
    copy = tmp_path / "c.jsonl"
    copy.write_bytes(corpus.read_bytes())
    for extra in ([], ["--restart"]):
        assert _score(copy, tiny_ckpt, copy, *extra) == 2
        assert "is the corpus" in capsys.readouterr().err
        assert copy.read_bytes() == corpus.read_bytes()
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"title": "my data"}\n')
    for extra in ([], ["--restart"]):
        assert _score(corpus, tiny_ckpt, notes, *extra) == 2
        assert "was not written by `ixc-engine score`" in capsys.readouterr().err
        assert notes.read_text() == '{"title": "my data"}\n'


def test_resume_refuses_another_job_and_a_changed_corpus(corpus, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert _score(corpus, tiny_ckpt, out) == 0
    job = json.loads((tmp_path / "s.job.json").read_text())
    assert job["complete"] and job["lines"] == 24 and job["scored"] == 18 and job["errors"] == 6
    assert _score(corpus, tiny_ckpt, out, "--hd-num", 4) == 2
    err = capsys.readouterr().err
    assert "another job" in err and "hd_num: 9 then, 4 now" in err
    # the same corpus path with other content, as if the file were replaced after a partial run
    lines = _read(out)
    out.write_text("".join(json.dumps(r) + "\n" for r in lines[:4]))
    changed = corpus.read_text().replace('"id": "s0"', '"id": "other"')
    saved = corpus.read_text()
    try:
        corpus.write_text(changed)
        assert _score(corpus, tiny_ckpt, out) == 2
        err = capsys.readouterr().err
        assert "line 1" in err and "'other'" in err and "--restart" in err
        assert len(_read(out)) == 4  # nothing appended
    finally:
        corpus.write_text(saved)
    assert _score(corpus, tiny_ckpt, out, "--hd-num", 4, "--restart") == 0
    assert json.loads((tmp_path / "s.job.json").read_text())["hd_num"] == 4


def test_finished_job_is_not_rescored(corpus, tiny_ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s.jsonl"
    assert _score(corpus, tiny_ckpt, out) == 0
    before = out.read_bytes()
    from ixc_engine.api import RewardEngine

    def no_load(*a, **k):
        raise AssertionError("a finished job must not load the model")

    monkeypatch.setattr(RewardEngine, "from_pretrained", no_load)
    assert _score(corpus, tiny_ckpt, out) == 0
    assert out.read_bytes() == before
    assert '"skipped_already_done": 24' in capsys.readouterr().out


def test_filter_refuses_scores_that_do_not_belong_to_the_corpus(corpus, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert _score(corpus, tiny_ckpt, out) == 0
    clean = tmp_path / "clean.jsonl"

    def filt(corp, scores, *extra):
        return main(["filter", str(corp), "--scores", str(scores), *extra, "-o", str(clean)])

    # another corpus: same length, other ids; and a longer one
    other = tmp_path / "other.jsonl"
    other.write_text(corpus.read_text().replace('"id": "s3"', '"id": "x3"'))
    assert filt(other, out, "--drop-fraction", "0.1") == 2
    assert "belong to another corpus" in capsys.readouterr().err
    longer = tmp_path / "longer.jsonl"
    longer.write_text(corpus.read_text() * 2)
    assert filt(longer, out, "--drop-fraction", "0.1") == 2
    assert "have neither a score" in capsys.readouterr().err
    assert not clean.exists()
    # an unfinished job
    job = json.loads((tmp_path / "s.job.json").read_text())
    (tmp_path / "s.job.json").write_text(json.dumps({**job, "complete": False}))
    assert filt(corpus, out, "--drop-fraction", "0.1") == 2
    assert "unfinished" in capsys.readouterr().err
    (tmp_path / "s.job.json").write_text(json.dumps(job))
    # output onto an input, a NaN threshold
    assert main(["filter", str(corpus), "--scores", str(out), "--min-score", "0", "-o", str(corpus)]) == 2
    assert "is the corpus" in capsys.readouterr().err
    assert filt(corpus, out, "--min-score", "nan") == 2
    assert "finite" in capsys.readouterr().err
    assert filt(corpus, out, "--drop-fraction", "0.5") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"lines": 24, "scored": 18, "kept": 9, "dropped_low_score": 9, "dropped_errors": 6,
                       "output": str(clean)}


def test_merge_refuses_missing_and_unfinished_shards(corpus, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    for i in range(3):
        assert _score(corpus, tiny_ckpt, out, "--shard", f"{i}/3") == 0
    shards = [tmp_path / f"m.shard{i}-of-3.jsonl" for i in range(3)]
    merged = tmp_path / "all.jsonl"
    assert main(["merge", "-o", str(merged), str(shards[0]), str(shards[2])]) == 2
    assert "1/3 missing" in capsys.readouterr().err
    job1 = tmp_path / "m.shard1-of-3.job.json"
    saved = job1.read_text()
    job1.write_text(json.dumps({**json.loads(saved), "complete": False}))
    assert main(["merge", "-o", str(merged), *map(str, shards)]) == 2
    assert "unfinished shard" in capsys.readouterr().err
    job1.write_text(saved)
    assert main(["merge", "-o", str(merged), *map(str, shards)]) == 0
    job = json.loads((tmp_path / "all.job.json").read_text())
    assert job["complete"] and job["shard"] == [0, 1] and job["lines"] == 24
    # filter takes the merged scores, not a single shard
    clean = tmp_path / "clean.jsonl"
    assert main(["filter", str(corpus), "--scores", str(shards[0]), "--min-score", "0", "-o", str(clean)]) == 2
    assert "merge" in capsys.readouterr().err
    assert main(["filter", str(corpus), "--scores", str(merged), "--drop-fraction", "0.2", "-o", str(clean)]) == 0


def test_json_error_column_and_byte_order_mark(tiny_ckpt, tmp_path):
    corpus = tmp_path / "c.jsonl"
    good = json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"}]})
    corpus.write_text("\ufeff" + good + "\n" + '{"id": "b", "messages": [] "x": 1}\n', encoding="utf-8")
    out = tmp_path / "s.jsonl"
    assert _score(corpus, tiny_ckpt, out) == 0
    assert [r["id"] for r in _read(out)] == ["a"]
    (err,) = _read(tmp_path / "s.errors.jsonl")
    assert err["line"] == 2 and "column 28" in err["error"]


@pytest.mark.parametrize("option", [["--max-length", "0"], ["--workers", "-1"], ["--max-batch-tokens", "0"],
                                    ["--window", "0"], ["--hd-num", "0"]])
def test_nonsense_numbers_are_rejected(option, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["score", "c.jsonl", "--model", "m", "-o", "o.jsonl", *option])
    assert exc.value.code == 2 and "must be >=" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("ixc-engine ")
