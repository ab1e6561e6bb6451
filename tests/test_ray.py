"""`score --ray` on a local Ray instance (2 CPUs, started and stopped here): equal to the local job, exactly once when
a scoring actor is killed mid-job, resumable after the driver is killed; and the stage row format."""

from __future__ import annotations

import itertools
import json
import os
import signal
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("av")

import ixc_engine.integrations.ray as ray_integration
from ixc_engine.cli import main
from ixc_engine.integrations.ray import decode_prepared, encode_prepared, feed_window, sample_rows
from tests.ray_common import (
    N_LINES,
    TOL,
    WARNINGS_ARGS,
    assert_same_results,
    cli_process,
    lines_written,
    local_results,
    make_corpus,
    make_warnings_corpus,
    pids_of,
    read,
    summary,
)


@pytest.fixture(scope="module")
def cluster():
    """One Ray instance for the module (start-up takes seconds): its GCS address, for drivers in subprocesses."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=400 << 20, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_ckpt):
    d = tmp_path_factory.mktemp("ray")
    corpus = make_corpus(d / "data")
    return corpus, tiny_ckpt, local_results(corpus, tiny_ckpt, d / "local" / "scores.jsonl")


def test_prepared_rows_round_trip(job, tokenizer):
    from ixc_engine.corpus import read_corpus
    from ixc_engine.engine.sequence import PreparedSample, Sample, prepare_sample

    corpus, _, _ = job
    items = dict(read_corpus(corpus))
    rows = list(sample_rows(items.items()))
    assert [r["index"] for r in rows] == list(range(1, N_LINES + 1))
    assert json.loads(rows[6]["sample"])["error"].startswith("invalid JSON")  # a parse error crosses as an error row
    for line, compact in itertools.product((1, 2, 4), (True, False)):  # text, image, video; both crop forms
        p = prepare_sample(tokenizer, items[line], hd_num=9, max_length=16384, compact_media=compact)
        meta, tokens, pixels = encode_prepared(p)
        assert isinstance(tokens, bytes) and isinstance(pixels, bytes)  # plain buffers, no pickled objects
        # compact crops cross as the float32 global view plus uint8 sub-crops: 4 + h*w bytes per pixel, not 4 (1+h*w)
        per_pixel = sum(4 + m.h * m.w if compact else 4 * (1 + m.h * m.w) for m in p.media)
        assert len(pixels) == per_pixel * 3 * 560 * 560
        q = decode_prepared(json.loads(meta), tokens, pixels)
        assert isinstance(q, PreparedSample) and (q.id, q.pieces, q.media_digests, q.n_tokens) == (
            p.id, p.pieces, p.media_digests, p.n_tokens)
        assert [(m.h, m.w, m.kind, m.compact) for m in q.media] == [(m.h, m.w, m.kind, compact) for m in p.media]
        for a, b in zip(q.media, p.media):
            assert np.array_equal(a.pixel_values.numpy(), b.pixel_values.numpy())
        assert np.array_equal(q.content_keys(), p.content_keys())
    alone = Sample([{"role": "user", "content": "Alone?"}], warnings=["key 'img' is not read"])
    warned = prepare_sample(tokenizer, alone, hd_num=9, max_length=16384)
    meta, tokens, pixels = encode_prepared(warned)
    assert len(warned.warnings) == 2 and decode_prepared(json.loads(meta), tokens, pixels).warnings == warned.warnings


def test_ray_job_equals_local_job(cluster, job, tmp_path, capsys):
    corpus, model, local = job
    out = tmp_path / "scores.jsonl"
    assert main(["score", str(corpus), "--model", str(model), "-o", str(out), "--ray", "--ray-batch-size", "3",
                 "--no-progress"]) == 0
    assert_same_results(out, local)
    s = summary(capsys.readouterr().out)
    assert (s["scored"], s["errors"], s["duplicates_dropped"]) == (16, 6, 0)
    # Neighbours share prefixes inside the scoring actor (the system prompt at least); every scored token is either
    # computed or reused.
    assert s["prefix_tokens_reused"] > 0
    assert s["tokens_computed"] + s["prefix_tokens_reused"] == sum(r["n_tokens"] for r in local[0])
    # The finished job is not redone, by --ray or locally: the job file is the same.
    assert main(["score", str(corpus), "--model", str(model), "-o", str(out), "--no-progress"]) == 0
    assert summary(capsys.readouterr().out)["skipped_already_done"] == N_LINES


def test_driver_streams_the_corpus_in_bounded_windows(cluster, job, tmp_path, capsys, monkeypatch):
    """The driver reads the corpus as Ray asks for more: at every record it reads, at most (ahead + 1) windows are
    read and not yet written (so never the whole corpus in memory), and Ray holds at most `ahead` windows."""
    from ixc_engine.cli import build_parser
    from ixc_engine.formats.source import open_corpus
    from ixc_engine.integrations.ray import cmd_score_ray

    corpus, model, local = job
    out = tmp_path / "scores.jsonl"
    read_ahead = []

    def reader(path, shard):
        for k, (ln, item) in enumerate(open_corpus(path).records(shard=shard), 1):
            read_ahead.append(k - lines_written(out))
            yield ln, item

    args = build_parser().parse_args(["score", str(corpus), "--model", str(model), "-o", str(out), "--ray",
                                      "--ray-batch-size", "2", "--no-progress"])
    assert cmd_score_ray(args, reader=reader) == 0
    assert_same_results(out, local)
    feed = summary(capsys.readouterr().out)["feed"]
    assert (feed["window"], feed["windows"], feed["ahead"]) == (2, 11, 8)  # 2 * (1 preparation + 1 scoring) + 4
    assert 0 < feed["max_records_in_ray"] <= feed["ahead"] * feed["window"] < N_LINES
    assert len(read_ahead) == N_LINES and max(read_ahead) <= (feed["ahead"] + 1) * feed["window"] + 1 < N_LINES
    # A byte budget smaller than one window: one window at a time, and the job still completes. (It hung about one run
    # in seven, and once in CI, while a fetch actor could hold several windows and ran a later one first.)
    monkeypatch.setattr(ray_integration, "FEED_BYTES", 1)
    args.restart = True
    assert cmd_score_ray(args, reader=reader) == 0
    assert_same_results(out, local)
    assert summary(capsys.readouterr().out)["feed"]["max_records_in_ray"] == 2


def test_feed_window_sizes():
    assert feed_window(22, 2) == 2  # small jobs: one batch per window
    assert feed_window(200_000, 64) == 256  # about 1000 windows
    assert feed_window(10_000_000, 64) == 1024  # capped: the driver's memory does not grow with the corpus
    assert feed_window(100, 5000) == 5000  # never less than one batch


def test_changed_corpus_found_while_streaming_ends_the_job_with_its_reason(cluster, tiny_ckpt, tmp_path, capsys):
    """The resume check runs in the feed's thread (as the corpus is read): its error reaches the command, which
    fails with it (nothing written for the changed line) instead of hanging or reporting Ray's failure."""
    corpus = tmp_path / "c.jsonl"
    recs = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(6)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "scores.jsonl"
    base = ["score", str(corpus), "--model", str(tiny_ckpt), "-o", str(out), "--no-progress"]
    assert main(base) == 0
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:4]))  # as if killed after 4 lines
    recs[2]["id"] = "changed"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in recs))
    capsys.readouterr()
    assert main([*base, "--ray", "--ray-batch-size", "2"]) == 2
    assert "line 3 of" in (err := capsys.readouterr().err) and "the corpus changed since the first run" in err
    assert len(read(out)) == 4


def _wait_for(cond, proc, timeout=240.0, poll=0.02):
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"driver ended early (rc {proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(poll)


def test_killed_scoring_actor_is_restarted_and_nothing_doubles(cluster, job, tmp_path):
    corpus, model, local = job
    out = tmp_path / "scores.jsonl"
    before = set(pids_of(b"MapBatches(Score)"))
    proc = cli_process("score", corpus, "--model", model, "-o", out, "--ray", "--ray-address", cluster,
                       "--ray-batch-size", "2", "--no-progress")
    # Kill the scoring actor once it has delivered a batch and while it scores the next one (Ray titles its process
    # ray::MapWorker(MapBatches(Score)).submit during a batch).
    busy = b"MapBatches(Score)).submit"
    _wait_for(lambda: lines_written(out) >= 1 and set(pids_of(busy)) - before, proc, poll=0.002)
    victim = min(set(pids_of(busy)) - before)
    at_kill = lines_written(out)
    os.kill(victim, signal.SIGKILL)
    restarted = set()
    while proc.poll() is None and not restarted:  # Ray starts a new scoring actor process
        restarted = set(pids_of(b"MapBatches(Score)")) - before - {victim}
        time.sleep(0.02)
    out_text, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert at_kill < N_LINES, "the job ended before the kill"
    assert restarted, "no new scoring actor was seen after the kill"
    assert_same_results(out, local)
    assert summary(out_text)["duplicates_dropped"] == 0


def test_killed_driver_resumes_without_rescoring(cluster, job, tmp_path, capsys):
    corpus, model, local = job
    out = tmp_path / "scores.jsonl"
    args = ["score", str(corpus), "--model", str(model), "-o", str(out), "--ray", "--ray-batch-size", "2",
            "--no-progress"]
    proc = cli_process(*args, "--ray-address", cluster)
    _wait_for(lambda: lines_written(out) >= 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    done = lines_written(out)  # complete records (a torn last line is cut and redone by the resumed job)
    assert 4 <= done < N_LINES
    job_file = json.loads(out.with_name("scores.job.json").read_text())
    assert not job_file["complete"]
    assert main(args) == 0  # the same command (in this process, on the module's Ray instance)
    s = summary(capsys.readouterr().out)
    assert s["skipped_already_done"] == done and s["scored"] + s["errors"] == N_LINES - done
    assert_same_results(out, local)


def test_ray_options_need_ray(job, tmp_path, capsys):
    corpus, model, _ = job
    assert main(["score", str(corpus), "--model", str(model), "-o", str(tmp_path / "s.jsonl"), "--ray-actors",
                 "2"]) == 2
    assert "--ray-actors needs --ray" in capsys.readouterr().err
    assert main(["score", str(corpus), "--model", str(model), "-o", str(tmp_path / "s.jsonl"), "--ray", "--workers",
                 "2"]) == 2
    assert "use --ray-prep-cpus" in capsys.readouterr().err


def test_ray_reads_every_local_format_with_in_memory_media(cluster, tiny_ckpt, tmp_path, capsys):
    """A LLaVA JSON array whose picture is a data: URI, and Parquet with image bytes: the same records as the local
    job (the encoded bytes cross the object store; nothing is written to disk)."""
    import base64
    import io

    from PIL import Image

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    buf = io.BytesIO()
    Image.new("RGB", (90, 60), (10, 120, 200)).save(buf, format="PNG")
    png = buf.getvalue()
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Blue."}]
    records = [{"id": "t", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
               {"id": "p", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                                     {"type": "text", "text": "What colour?"}]},
                                        {"role": "assistant", "content": "Blue."}]},
               {"id": "bad", "conversations": [{"from": "narrator", "value": "?"}]}]
    corpora = {"json": tmp_path / "c.json", "parquet": tmp_path / "c.parquet"}
    corpora["json"].write_text(json.dumps(records))
    pq.write_table(pa.table({"id": ["a", "b"], "conversations": [json.dumps(conv)] * 2,
                             "image": [{"bytes": png, "path": "x.png"}, {"bytes": png, "path": "y.png"}]}),
                   corpora["parquet"])
    for fmt, corpus in corpora.items():
        local, remote = tmp_path / f"{fmt}-local.jsonl", tmp_path / f"{fmt}-ray.jsonl"
        assert main(["score", str(corpus), "--model", str(tiny_ckpt), "-o", str(local), "--no-progress"]) == 0
        assert main(["score", str(corpus), "--model", str(tiny_ckpt), "-o", str(remote), "--ray", "--no-progress"]) == 0
        a, b = read(local), read(remote)
        assert [(r["line"], r["id"], r["n_tokens"]) for r in a] == [(r["line"], r["id"], r["n_tokens"]) for r in b]
        assert a and max(abs(x["score"] - y["score"]) for x, y in zip(a, b)) < TOL
        err = lambda p: read(p.with_name(p.name.replace(".jsonl", ".errors.jsonl")))
        assert err(local) == err(remote)
    capsys.readouterr()


@pytest.mark.parametrize("flag", [None, "--strict", "--escape-special-tokens"])
def test_ray_lines_equal_local_lines_with_warnings_strict_and_escaping(cluster, tiny_ckpt, tmp_path, capsys, flag):
    """Every record of a --ray job is the local job's record: the same keys (the "warnings" list included), the same
    warnings and errors, scores within TOL; --strict and --escape-special-tokens act exactly as locally."""
    corpus = make_warnings_corpus(tmp_path / "data")
    extra = [*WARNINGS_ARGS, *([flag] if flag else [])]
    files = {}
    for name, more in (("local", []), ("ray", ["--ray", "--ray-batch-size", "4"])):
        out = tmp_path / name / "scores.jsonl"
        assert main(["score", str(corpus), "--model", str(tiny_ckpt), "-o", str(out), "--no-progress", *extra,
                     *more]) == 0
        files[name] = (read(out), read(out.with_name("scores.errors.jsonl")),
                       json.loads(out.with_name("scores.job.json").read_text()), summary(capsys.readouterr().out))
    (ls, le, lj, lsum), (rs, re_, rj, rsum) = files["local"], files["ray"]
    assert [sorted(r) for r in rs] == [sorted(r) for r in ls]
    assert [{k: v for k, v in r.items() if k != "score"} for r in rs] == [
        {k: v for k, v in r.items() if k != "score"} for r in ls]
    assert ls and max(abs(a["score"] - b["score"]) for a, b in zip(ls, rs)) < TOL
    assert re_ == le
    assert (rj["strict"], rj["escape_special_tokens"]) == (lj["strict"], lj["escape_special_tokens"]) == (
        flag == "--strict", flag == "--escape-special-tokens")
    assert (rsum["scored"], rsum["errors"], rsum["warnings"]) == (lsum["scored"], lsum["errors"], lsum["warnings"])
    # The corpus does what it is for: warnings in scores and in error reasons, each option changing the outcome.
    warned = {r["id"] for r in ls if r.get("warnings")}
    reasons = {r["id"]: r["error"] for r in le}
    assert "over max_length 900" in reasons["too-long"] and "--max-media" in reasons["two-images"]
    assert "key 'picture' is not read" in reasons["warned-error"]
    if flag == "--strict":
        assert not warned and reasons["deep"].startswith("rejected by --strict: ") and "16-bit" in reasons["deep"]
    else:
        assert {"user-last", "empty-reply", "media-key", "deep", "out-of-order"} <= warned
        assert ("special" in warned) == (flag is None)
    # A job file written by one resumes under the other; another --strict / --escape-special-tokens is refused.
    other = next(x for x in ("--strict", "--escape-special-tokens") if x != flag)
    assert main(["score", str(corpus), "--model", str(tiny_ckpt), "-o", str(tmp_path / "ray" / "scores.jsonl"),
                 "--no-progress", "--ray", *WARNINGS_ARGS, other]) == 2
    assert "holds the results of another job" in capsys.readouterr().err


REPO = Path(__file__).resolve().parents[1]


def _readme_pipeline() -> str:
    """The Python block of README's "In your own Ray Data pipeline", as written (dedented)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("**In your own Ray Data pipeline**", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    return textwrap.dedent(block)


@pytest.mark.parametrize("form", ["readme", "issue (concurrency=N)"])
def test_readme_pipeline_runs_as_written_without_deprecation_warnings(cluster, tmp_path, capsys, form):
    """The README's pipeline, on the first records of examples/corpus.jsonl with the demo model, gives the local job's
    scores; in the README's form (compute=ActorPoolStrategy) Ray raises no deprecation warning, and the issue's
    form (concurrency=N) still runs."""
    from ray.util.annotations import RayDeprecationWarning

    corpus = tmp_path / "corpus.jsonl"
    lines = []
    for raw in (REPO / "examples" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:5]:
        rec = json.loads(raw)
        rec["images"] = [str(REPO / "examples" / p) for p in rec.get("images", [])]
        lines.append(json.dumps(rec))
    corpus.write_text("\n".join(lines) + "\n")
    code = _readme_pipeline()
    assert code.count('"examples/corpus.jsonl"') == 1 and code.count('"examples/demo-model"') == 1
    assert code.count("compute=ray.data.ActorPoolStrategy(size=1)") == 2
    code = code.replace('"examples/corpus.jsonl"', repr(str(corpus)))
    code = code.replace('"examples/demo-model"', repr(str(REPO / "examples" / "demo-model")))
    if form != "readme":
        code = code.replace("compute=ray.data.ActorPoolStrategy(size=1)", "concurrency=1")
    capsys.readouterr()
    with warnings.catch_warnings():
        if form == "readme":
            warnings.simplefilter("error", RayDeprecationWarning)
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 (the README's own code)
    rows = {int(x.split()[0]): x.split() for x in capsys.readouterr().out.splitlines() if x[:1].isdigit()}
    local = tmp_path / "local.jsonl"
    assert main(["score", str(corpus), "--model", str(REPO / "examples" / "demo-model"), "-o", str(local),
                 "--dtype", "float32", "--no-progress"]) == 0
    capsys.readouterr()
    want = {r["line"]: r for r in read(local)}
    assert sorted(rows) == sorted(want) == [1, 2, 3, 4, 5]
    for line, (_, sid, ok, score, *_) in rows.items():
        assert (json.loads(sid), ok) == (want[line]["id"], "True")
        assert abs(float(score) - want[line]["score"]) < TOL
