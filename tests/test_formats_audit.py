"""Regressions found by auditing the corpus formats and the report with hostile inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ixc_engine.cli import main


def _read(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def _score(corpus, model, out):
    assert main(["score", str(corpus), "--model", str(model), "-o", str(out), "--no-progress"]) == 0
    return _read(out), _read(out.with_name(out.name.removesuffix(".jsonl") + ".errors.jsonl"))


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_lone_surrogate_in_text_is_that_records_error_not_a_crash(fmt, tiny_ckpt, tmp_path):
    # JSON allows "\ud800" (a lone surrogate) but it is no Unicode text: the tokenizer cannot take it, and the job
    # used to die on it ("Unable to cast Python instance of type str")
    good = {"id": "g", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}
    bad = '{"id": "s", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "x \\ud800"}]}'
    recs = [json.dumps(good), bad, json.dumps(good)]
    corpus = tmp_path / f"c.{fmt}"
    corpus.write_text("[" + ",".join(recs) + "]" if fmt == "json" else "\n".join(recs) + "\n")
    scores, errors = _score(corpus, tiny_ckpt, tmp_path / "s.jsonl")
    assert [r["line"] for r in scores] == [1, 3]
    assert [e["line"] for e in errors] == [2] and "surrogate" in errors[0]["error"]


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_image_column_of_raw_bytes_is_decoded(tiny_ckpt, tmp_path):
    # hub datasets often store the encoded image as a plain binary column (or a list of them), not as the
    # `datasets` {"bytes", "path"} struct; those rows used to be "'image' must be a path or a list of paths, got bytes"
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    png = _png_bytes()
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red box."}]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    forms = {"struct": pa.array([{"bytes": png, "path": None}], struct), "binary": pa.array([png], pa.binary()),
             "list": pa.array([[png]], pa.list_(pa.binary()))}
    got = {}
    for name, col in forms.items():
        corpus = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"id": ["a"], "conversations": [conv], "image": col}), corpus)
        scores, errors = _score(corpus, tiny_ckpt, tmp_path / f"{name}.s.jsonl")
        assert errors == [] and len(scores) == 1, (name, errors)
        got[name] = scores[0]["score"]
    assert got["binary"] == got["struct"] == got["list"]


def test_openai_input_image_and_hf_bytes_path_parts_take_their_payload(tiny_ckpt, tmp_path):
    # OpenAI's Responses API writes {"type": "input_image", "image_url": "<url>"}: the payload under 'image_url' was
    # ignored ("a input_image part without a payload"); an HF Image cell {"bytes": null, "path"} in an image part was
    # "image reference must be a string ... got dict"
    import base64

    (tmp_path / "p.png").write_bytes(_png_bytes())
    uri = "data:image/png;base64," + base64.b64encode(_png_bytes()).decode()

    def rec(part):
        return {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]},
                             {"role": "assistant", "content": "A red box."}]}

    parts = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "input_image", "image_url": uri},
             {"type": "image", "image": {"bytes": None, "path": "p.png"}}]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(rec(p)) + "\n" for p in parts))
    scores, errors = _score(corpus, tiny_ckpt, tmp_path / "s.jsonl")
    assert errors == [] and [r["line"] for r in scores] == [1, 2, 3]
    # the same picture in each: the same score up to fp32 rounding of the batch composition
    assert [r["score"] for r in scores] == pytest.approx([scores[0]["score"]] * 3, rel=1e-5)


def _report_corpus(tmp_path, n=6):
    corpus = tmp_path / "c.json"
    corpus.write_text(json.dumps([{"id": f"r{i}", "conversations": [{"from": "human", "value": f"Q{i}?"},
                                                                      {"from": "gpt", "value": "A."}]}
                                  for i in range(n)]))
    return corpus


def _write_scores(path, scores):
    path.write_text("".join(json.dumps({"id": f"r{i}", "score": s, "n_tokens": 10 + i, "line": i + 1}) + "\n"
                            for i, s in enumerate(scores)))


def test_report_refuses_non_finite_scores_clearly(tmp_path):
    # `score` writes strict JSON and makes a non-finite score an error record, so NaN / Infinity in a scores file means
    # it was not written by `score` (or was edited): the report names the file and line instead of plotting junk
    pytest.importorskip("matplotlib")
    pytest.importorskip("jinja2")
    from ixc_engine.report.build import build_report

    corpus = _report_corpus(tmp_path)
    scores = tmp_path / "s.jsonl"
    _write_scores(scores, [1.0, float("inf"), 2.0, float("nan"), 3.0, 4.0])
    with pytest.raises(ValueError, match=r"s\.jsonl:2: not a score record"):
        build_report(scores, corpus, tmp_path / "r.html", threshold=1.5, k=2)


def test_report_of_a_job_where_every_record_failed(tmp_path):
    # the report of such a job is where the user learns why (errors by reason); it used to refuse ("holds no scores")
    pytest.importorskip("matplotlib")
    pytest.importorskip("jinja2")
    from ixc_engine.report.build import build_report

    corpus = _report_corpus(tmp_path, n=3)
    scores = tmp_path / "s.jsonl"
    scores.write_text("")
    (tmp_path / "s.errors.jsonl").write_text("".join(
        json.dumps({"id": f"r{i}", "line": i + 1, "error": "<b>missing</b> picture"}) + "\n" for i in range(3)))
    out = tmp_path / "r.html"
    summary = build_report(scores, corpus, out, group_by="id", threshold=0.0)
    html = out.read_text()
    assert summary["scored"] == 0 and summary["errors"] == 3 and summary["lowest"] == []
    assert "No record was scored" in html and "&lt;b&gt;missing&lt;/b&gt; picture" in html
    assert 'id="histogram"' not in html


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet"])
def test_absurdly_nested_record_is_that_records_error(fmt, tiny_ckpt, tmp_path):
    # json.loads raises RecursionError (not JSONDecodeError) on deep nesting: it used to end the whole job
    good = json.dumps({"id": "g", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]})
    deep_conv = "[" * 100_000 + "]" * 100_000
    deep = '{"id": "d", "conversations": ' + deep_conv + "}"
    corpus = tmp_path / f"c.{fmt}"
    if fmt == "json":
        corpus.write_text(f"[{good},{deep},{good}]")
    elif fmt == "jsonl":
        corpus.write_text(f"{good}\n{deep}\n{good}\n")
    else:
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        conv = json.dumps(json.loads(good)["conversations"])
        pq.write_table(pa.table({"id": ["g", "d", "g"], "conversations": [conv, deep_conv, conv]}), corpus)
    scores, errors = _score(corpus, tiny_ckpt, tmp_path / "s.jsonl")
    assert [r["line"] for r in scores] == [1, 3]
    assert [e["line"] for e in errors] == [2] and "nested too deeply" in errors[0]["error"]


def test_json_array_missing_comma_loses_only_the_record_after_it(tiny_ckpt, tmp_path):
    # `[{..}{..},{..}]`: the records after a missing ',' were all one error record; now only the one right after it
    conv = [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]
    g = [json.dumps({"id": f"g{i}", "conversations": conv}) for i in range(4)]
    corpus = tmp_path / "c.json"
    corpus.write_text(f"[{g[0]}\n {g[1]}, {g[2]},{g[3]}]")
    scores, errors = _score(corpus, tiny_ckpt, tmp_path / "s.jsonl")
    assert [(r["line"], r["id"]) for r in scores] == [(1, "g0"), (3, "g2"), (4, "g3")]
    assert [e["line"] for e in errors] == [2] and "missing ','" in errors[0]["error"]
    out = tmp_path / "clean.json"
    assert main(["filter", str(corpus), "--scores", str(tmp_path / "s.jsonl"), "--min-score=-1e30",
                 "-o", str(out)]) == 0
    assert [r["id"] for r in json.loads(out.read_text())] == ["g0", "g2", "g3"]
