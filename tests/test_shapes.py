"""The coloured-shape generator: deterministic, and its descriptions agree with the pixels it draws.

The reference reads the drawn PNGs back: connected components of each colour (a plain BFS), and the kind from how
much of its bounding box a component fills (square ~1, circle ~pi/4, triangle ~1/2). Descriptions are parsed back
into (colour, kind) -> count with a regular expression.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, deque
from pathlib import Path

import numpy as np
import pytest
from ixc_engine.training.pairs import load_pairs
from ixc_engine.training.shapes import (
    COLOURS,
    CORRUPTIONS,
    corrupt,
    describe,
    draw,
    make_example,
    random_scene,
    write_corpus,
    write_pairs,
)
from PIL import Image

from ixc_engine.corpus import parse_line

PHRASE = re.compile(r"\b(a|two|three) (red|green|blue|yellow) (circle|square|triangle)s?\b", re.IGNORECASE)
NUMBERS = {"a": 1, "two": 2, "three": 3}


def parse_description(text: str) -> Counter:
    groups: Counter = Counter()
    for num, colour, kind in PHRASE.findall(text):
        groups[(colour.lower(), kind)] += NUMBERS[num.lower()]
    # every word must be covered by a phrase or the connectives
    rest = PHRASE.sub("", text).replace(",", " ").replace(".", " ").replace(" and ", " ").split()
    assert rest == [], f"unparsed words {rest} in {text!r}"
    return groups


def shapes_from_pixels(img: Image.Image) -> Counter:
    arr = np.asarray(img.convert("RGB")).astype(int)
    h, w, _ = arr.shape
    found: Counter = Counter()
    for name, rgb in COLOURS.items():
        mask = (np.abs(arr - np.array(rgb)).sum(-1) < 30)
        seen = np.zeros_like(mask)
        for y0, x0 in zip(*np.nonzero(mask)):
            if seen[y0, x0]:
                continue
            queue, pixels = deque([(y0, x0)]), []
            seen[y0, x0] = True
            while queue:
                y, x = queue.popleft()
                pixels.append((y, x))
                for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            ys, xs = zip(*pixels)
            box = (max(ys) - min(ys) + 1) * (max(xs) - min(xs) + 1)
            fill = len(pixels) / box
            if len(pixels) < 30:  # anti-aliasing specks would be a generator bug: fail loudly below
                found[(name, "speck")] += 1
            elif fill > 0.92:
                found[(name, "square")] += 1
            elif fill > 0.68:
                found[(name, "circle")] += 1
            else:
                found[(name, "triangle")] += 1
    return found


def test_describe_grammar():
    g = Counter({("red", "circle"): 1, ("blue", "square"): 2})
    assert describe(g, [("red", "circle"), ("blue", "square")]) == "A red circle and two blue squares."
    g3 = Counter({("red", "circle"): 1, ("blue", "square"): 2, ("yellow", "triangle"): 3})
    assert describe(g3, [("yellow", "triangle"), ("red", "circle"), ("blue", "square")]) == (
        "Three yellow triangles, a red circle and two blue squares.")
    assert describe(Counter({("green", "square"): 1})) == "A green square."
    with pytest.raises(ValueError, match="exactly once"):
        describe(g, [("red", "circle")])


@pytest.mark.parametrize("seed", range(12))
def test_correct_description_matches_pixels(seed):
    ex = make_example(random.Random(seed), 112, 112)
    truth = shapes_from_pixels(draw(ex.scene))
    assert truth == ex.scene.groups()
    assert parse_description(ex.correct) == truth
    assert ex.prompt.endswith("?") or ex.prompt.endswith(".")


@pytest.mark.parametrize("seed", range(12))
def test_wrong_description_changes_one_attribute(seed):
    ex = make_example(random.Random(100 + seed), 112, 112)
    truth = shapes_from_pixels(draw(ex.scene))
    wrong = parse_description(ex.wrong)
    assert wrong != truth
    _assert_one_change(truth, wrong, ex.corruption)


def _assert_one_change(truth: Counter, wrong: Counter, what: str) -> None:
    if what == "count":
        assert set(wrong) == set(truth)
        assert sum(wrong[k] != truth[k] for k in truth) == 1
        return
    # colour/kind: some group (c, k) with n shapes moved entirely to a key differing in that attribute only
    for (c, k), n in truth.items():
        rest = truth.copy()
        del rest[(c, k)]
        for key in wrong:
            other = key[1] if what == "colour" else key[0]
            same = k if what == "colour" else c
            changed = key[0] != c if what == "colour" else key[1] != k
            if other == same and changed and rest + Counter({key: n}) == wrong:
                return
    raise AssertionError(f"{dict(wrong)} is not {dict(truth)} with one {what} changed")


@pytest.mark.parametrize("what", CORRUPTIONS)
def test_corrupt_each_kind_never_returns_the_truth(what):
    rng = random.Random(7)
    for _ in range(200):
        truth = random_scene(rng).groups()
        bad, got = corrupt(truth, rng, what)
        assert got == what
        assert bad != truth
        assert sum(bad.values()) >= 1
        _assert_one_change(truth, bad, what)
    with pytest.raises(ValueError, match="what must be"):
        corrupt(truth, rng, "size")


def test_random_scene_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_shapes"):
        random_scene(random.Random(0), max_shapes=5)
    with pytest.raises(ValueError, match="width and height"):
        random_scene(random.Random(0), width=16)


def test_pairs_are_deterministic_and_loadable(tmp_path):
    a = write_pairs(tmp_path / "a" / "pairs.jsonl", 6, seed=3)
    b = write_pairs(tmp_path / "b" / "pairs.jsonl", 6, seed=3)
    c = write_pairs(tmp_path / "c" / "pairs.jsonl", 6, seed=4)
    assert a == b
    assert a != c
    for rec in a:
        img = rec["images"][0]
        assert (tmp_path / "a" / img).read_bytes() == (tmp_path / "b" / img).read_bytes()
    pairs = load_pairs(tmp_path / "a" / "pairs.jsonl")  # extra "corruption" key is ignored
    assert [p.id for p in pairs] == [r["id"] for r in a]
    for p, rec in zip(pairs, a):
        truth = shapes_from_pixels(Image.open(p.images[0]))
        assert parse_description(p.chosen) == truth
        assert parse_description(p.rejected) != truth
        assert Path(p.images[0]).is_file()


def test_several_pairs_per_image_change_different_attributes(tmp_path):
    recs = write_pairs(tmp_path / "p.jsonl", 4, seed=8, pairs_per_image=3)
    assert len(recs) == 12
    for i in range(4):
        group = recs[3 * i:3 * i + 3]
        assert len({r["images"][0] for r in group}) == 1
        assert sorted(r["corruption"] for r in group) == sorted(CORRUPTIONS)
        truth = shapes_from_pixels(Image.open(tmp_path / group[0]["images"][0]))
        for r in group:
            assert parse_description(r["chosen"]) == truth
            _assert_one_change(truth, parse_description(r["rejected"]), r["corruption"])
    assert len({r["id"] for r in recs}) == 12
    with pytest.raises(ValueError, match="pairs_per_image"):
        write_pairs(tmp_path / "q.jsonl", 1, seed=0, pairs_per_image=0)


def test_corpus_labels_and_format(tmp_path):
    path = tmp_path / "corpus.jsonl"
    recs = write_corpus(path, 20, seed=5, wrong_fraction=0.25)
    assert sum(r["label"] == "wrong" for r in recs) == 5
    lines = path.read_text().splitlines()
    assert len(lines) == 20
    for ln, (raw, rec) in enumerate(zip(lines, recs), 1):
        assert json.loads(raw) == rec
        sample = parse_line(raw, ln, tmp_path)  # the scorer's parser ignores label / corruption
        assert sample.id == rec["id"]
        truth = shapes_from_pixels(Image.open(sample.media[0]))
        said = parse_description(rec["messages"][-1]["content"])
        assert (said == truth) == (rec["label"] == "correct")
    with pytest.raises(ValueError, match="wrong_fraction"):
        write_corpus(tmp_path / "x.jsonl", 3, seed=0, wrong_fraction=1.5)
