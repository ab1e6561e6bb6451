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
