import json
import math
import os

import pytest
from ixc_engine.training.pairs import LengthFilterReport, PairError, PreferencePair, length_filter, load_pairs

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<ImageHere>What is this?"}]


def native(pid="p1", **over):
    obj = {"id": pid, "messages": PROMPT, "chosen": "A red car.", "rejected": "A boat.", "images": ["img/a.jpg"]}
    obj.update(over)
    return obj


def upstream(pref="b", **over):
    prompt = [{"role": "user", "content": "Describe <ImageHere>"}]
    obj = {
        "conversations_a": prompt + [{"role": "assistant", "content": "reply a"}],
        "conversations_b": prompt + [{"role": "assistant", "content": "reply b"}],
        "preference": pref,
        "images": ["img/a.jpg"],
    }
    obj.update(over)
    return obj


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(b"not really a jpeg")
    return tmp_path


def write(dir_, lines, name="pairs.jsonl"):
    path = dir_ / name
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            elif isinstance(line, str):
                f.write(line.encode() + b"\n")
            else:
                f.write(json.dumps(line).encode() + b"\n")
    return path


def test_native_and_upstream_forms(data_dir):
    path = write(data_dir, [native("x"), "", "   ", upstream("b"), upstream("A", id=17)])
    pairs = load_pairs(path)
    assert [p.id for p in pairs] == ["x", "pairs.jsonl:4", "17"]
    first = pairs[0]
    assert isinstance(first, PreferencePair)
    assert first.messages == PROMPT and first.chosen == "A red car." and first.rejected == "A boat."
    assert first.images == [str(data_dir / "img" / "a.jpg")]  # resolved against the JSONL's directory
    assert pairs[1].messages == [{"role": "user", "content": "Describe <ImageHere>"}]
    assert (pairs[1].chosen, pairs[1].rejected) == ("reply b", "reply a")
    assert (pairs[2].chosen, pairs[2].rejected) == ("reply a", "reply b")  # preference is case-insensitive


def test_media_paths_absolute_missing_and_unchecked(data_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    abs_img = other / "b.png"
    abs_img.write_bytes(b"x")
    text_only = native("t", images=[], messages=[{"role": "user", "content": "hi"}])
    no_images_key = {k: v for k, v in text_only.items() if k != "images"} | {"id": "u"}
    path = write(data_dir, [native("a", images=[str(abs_img)]), text_only, no_images_key])
    pairs = load_pairs(path)
    assert pairs[0].images == [str(abs_img)] and pairs[1].images == [] and pairs[2].images == []

    missing = write(data_dir, [native("m", images=["img/nope.jpg"])], name="missing.jsonl")
    with pytest.raises(PairError, match="media file not found"):
        load_pairs(missing)
    assert load_pairs(missing, check_media=False)[0].images == [os.path.join(str(data_dir), "img", "nope.jpg")]


BAD_LINES = [
    (b'{"id": "j1", "messages": [\n', "invalid JSON: Expecting value (column 27)", None),
    (b"\xff\xfe not utf8", "not valid UTF-8", None),
    ('["a list"]', "JSON object", None),
    ({"id": "m1", "messages": PROMPT, "chosen": "x"}, "missing field(s): rejected", "m1"),
    ({"messages": PROMPT, "chosen": "x", "rejected": "y", "images": ["img/a.jpg"]}, "missing field(s): id", None),
    (native("w1", chosen=3), "'chosen' must be a string", "w1"),
    (native("w2", messages="hello"), "'messages': messages must be a list", "w2"),
    (native("w3", messages=[{"role": "user", "content": ["x"]}]), "['content'] must be a str", "w3"),
    (native("w4", messages=[{"role": "user"}]), "has no 'content' key", "w4"),
    (native("w5", images="img/a.jpg"), "'images' must be a list", "w5"),
    (native("w6", id=["no"]), "'id' must be a string or an integer", None),
    (native("e1", rejected="  \n"), "'rejected' reply is empty", "e1"),
    (native("e2", messages=[]), "'messages': messages is empty", "e2"),
    (native("r1", messages=[{"role": "human", "content": "hi <ImageHere>"}]), "['role'] is 'human'", "r1"),
    (native("s1", rejected="A red car."), "identical", "s1"),
    (native("a1", messages=PROMPT + [{"role": "assistant", "content": "hm"}]), "must not end with an assistant",
     "a1"),
    (native("i1", images=["img/a.jpg", "img/a.jpg"]), "1 <ImageHere> placeholders but 2 media items", "i1"),
    (native("i2", messages=[{"role": "user", "content": "hi"}], images=["img/a.jpg", "img/a.jpg"]),
     "no <ImageHere> placeholder", "i2"),
    (native("i3", chosen="look <ImageHere>"), "reply contains <ImageHere>", "i3"),
    (upstream("c"), "'preference' must be 'a' or 'b'", "pairs.jsonl:1"),
    (upstream(conversations_b=[{"role": "user", "content": "Describe something else <ImageHere>"},
                               {"role": "assistant", "content": "reply b"}]),
     "differ at message 0", "pairs.jsonl:1"),
    (upstream(conversations_b=[{"role": "user", "content": "Describe <ImageHere>"}]), "must end with an assistant",
     "pairs.jsonl:1"),
    (upstream(conversations_b=[{"role": "system", "content": "s"}, {"role": "user", "content": "Describe <ImageHere>"},
                               {"role": "assistant", "content": "reply b"}]), "differ in length", "pairs.jsonl:1"),
    ({k: v for k, v in upstream().items() if k != "preference"}, "missing field(s): preference", "pairs.jsonl:1"),
    (upstream(conversations_a=[{"role": "user", "content": "Describe <ImageHere>"},
                               {"role": "assistant", "content": ""}]), "reply is empty", "pairs.jsonl:1"),
]


@pytest.mark.parametrize("line,reason,pair_id", BAD_LINES)
def test_every_error_kind_names_file_line_id_and_reason(data_dir, line, reason, pair_id):
    path = write(data_dir, [native("ok1"), "", line])
    with pytest.raises(PairError) as info:
        load_pairs(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.path == str(path) and err.line == 3
    assert reason in err.reason
    if pair_id == "pairs.jsonl:1":
        pair_id = "pairs.jsonl:3"
    assert err.pair_id == pair_id
    assert str(err).startswith(f"{path}:3")
    if pair_id is not None:
        assert repr(pair_id) in str(err)


def test_collect_mode_keeps_good_lines_and_reports_all_errors(data_dir):
    lines = [native("g1"), b"{oops", native("g2", chosen=""), native("g3"), native("g1"), upstream("a")]
    path = write(data_dir, lines)
    pairs, errors = load_pairs(path, on_error="collect")
    assert [p.id for p in pairs] == ["g1", "g3", "pairs.jsonl:6"]
    assert [(e.line, e.pair_id) for e in errors] == [(2, None), (3, "g2"), (5, "g1")]
    assert "duplicate id (first seen on line 1)" in errors[2].reason
    with pytest.raises(PairError, match="invalid JSON"):
        load_pairs(path)
    with pytest.raises(ValueError, match="on_error"):
        load_pairs(path, on_error="ignore")


def make_pair(pid, chosen_words, rejected_words):
    return PreferencePair(pid, [{"role": "user", "content": "q"}], "w " * chosen_words, "w " * rejected_words, [])


def count_words(text):
    return len(text.split())


def test_length_filter_threshold_and_report():
    pairs = [
        make_pair("eq", 20, 10),  # ratio exactly 2.0: kept
        make_pair("over", 21, 10),  # 2.1: removed
        make_pair("short", 3, 12),  # 0.25
        make_pair("same", 7, 7),  # 1.0
        make_pair("long", 50, 5),  # 10.0: removed
    ]
    kept, report = length_filter(pairs, count_words, max_ratio=2.0)
    assert [p.id for p in kept] == ["eq", "short", "same"]
    assert isinstance(report, LengthFilterReport)
    assert (report.total, report.removed, report.kept) == (5, 2, 3)
    assert report.removed_ids == ["over", "long"]
    assert report.ratio_min == pytest.approx(0.25)
    assert report.ratio_median == pytest.approx(2.0)
    assert report.ratio_max == pytest.approx(10.0)
    text = str(report)
    assert "removed 2 of 5 pairs (40.0%)" in text and "<= 2" in text
    assert "median 2" in text and "over, long" in text

    kept_all, rep_all = length_filter(pairs, count_words, max_ratio=math.inf)
    assert len(kept_all) == 5 and rep_all.removed == 0 and rep_all.removed_ids == []
    assert rep_all.ratio_median == report.ratio_median  # ratios are measured before filtering


def test_length_filter_edge_cases():
    kept, report = length_filter([], count_words, 1.5)
    assert kept == [] and report.total == 0 and report.ratio_median is None
    assert "removed 0 of 0" in str(report)
    # a rejected reply of zero tokens: infinite ratio, removed by any finite threshold
    kept, report = length_filter([make_pair("z", 2, 0)], lambda t: len(t.split()), 100.0)
    assert kept == [] and report.ratio_max == math.inf
    many = [make_pair(f"id{i}", 9, 1) for i in range(25)]
    _, report = length_filter(many, count_words, 1.0)
    assert "(+5 more)" in str(report)
    with pytest.raises(ValueError, match="max_ratio"):
        length_filter(many, count_words, 0)
    with pytest.raises(ValueError, match="count_tokens returned"):
        length_filter(many, lambda t: -1, 2.0)
