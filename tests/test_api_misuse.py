"""Python API misuse gets a clear error at once: a str of candidates, one conversation where a list of them is due,
score_stream items of the wrong type, loose best_of_n images."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ixc_engine.api import RewardEngine
from ixc_engine.engine.sequence import Sample, SampleError

PROMPT = [{"role": "user", "content": "What is in the picture?"}]
CHAT = PROMPT + [{"role": "assistant", "content": "A blue square."}]


@pytest.fixture(scope="module")
def eng(tiny_ckpt):
    torch.set_num_threads(1)
    return RewardEngine.from_pretrained(tiny_ckpt, device="cpu")


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("misuse") / "photo.png"
    Image.new("RGB", (64, 48), (30, 90, 200)).save(path)
    return str(path)


@pytest.mark.parametrize("candidates", ["abc", b"abc"])
def test_best_of_n_rejects_a_bare_string(eng, candidates):
    with pytest.raises(ValueError, match=r"candidates must be a list or tuple of assistant replies.*got a single"):
        eng.best_of_n(PROMPT, candidates)


def test_best_of_n_rejects_non_str_candidates_and_other_containers(eng):
    with pytest.raises(ValueError, match=r"candidates\[1\] has type int, not str"):
        eng.best_of_n(PROMPT, ["fine", 3])
    with pytest.raises(ValueError, match=r"candidates\[0\] has type dict"):
        eng.best_of_n(PROMPT, [{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="got set"):
        eng.best_of_n(PROMPT, {"a", "b"})
    with pytest.raises(ValueError, match="at least one candidate"):
        eng.best_of_n(PROMPT, ())


def test_best_of_n_rejects_bad_messages_and_images(eng, photo):
    with pytest.raises(ValueError, match=r"got a single dict \(one message: pass \[message\]\)"):
        eng.best_of_n(PROMPT[0], ["a", "b"])
    with pytest.raises(ValueError, match="messages must be the shared conversation.*got str"):
        eng.best_of_n("What is in the picture?", ["a", "b"])
    with pytest.raises(ValueError, match=r"images\[0\] has type list.*shared by all candidates"):
        eng.best_of_n(PROMPT, ["a", "b"], images=[[photo], [photo]])
    with pytest.raises(ValueError, match=r"images\[1\] has type int"):
        eng.best_of_n(PROMPT, ["a", "b"], images=[photo, 7])
    with pytest.raises(ValueError, match="images must be None, a path or PIL image, or a list of them"):
        eng.best_of_n(PROMPT, ["a", "b"], images={"img": photo})


def test_best_of_n_accepted_forms_agree(eng, photo):
    best_l, as_list = eng.best_of_n(PROMPT, ["A cat.", "A blue square."], images=[photo])
    best_t, as_tuple = eng.best_of_n(PROMPT, ("A cat.", "A blue square."), images=photo)
    best_p, as_pil = eng.best_of_n(PROMPT, ["A cat.", "A blue square."], images=(Image.open(photo),))
    assert len(as_list) == 2 and best_l == best_t == best_p
    # later calls reuse the cached prompt: equal to fp32 rounding of a different batch split (1e-5, as elsewhere)
    assert as_tuple == pytest.approx(as_list, rel=1e-5) and as_pil == pytest.approx(as_list, rel=1e-5)


@pytest.mark.parametrize("method", ["score", "rank"])
def test_a_single_conversation_is_told_to_be_wrapped(eng, method):
    with pytest.raises(ValueError, match=rf"single message.*wrap it: engine\.{method}\(\[messages\]\)"):
        getattr(eng, method)(CHAT)
    # wrapped, it works
    assert len(getattr(eng, method)([CHAT])) == 1


def test_conversations_and_images_containers(eng, photo):
    with pytest.raises(ValueError, match="conversations must be a list of conversations.*got str"):
        eng.score("hello")
    with pytest.raises(ValueError, match=r"images must be a list with one entry per conversation.*images=\[\[path\]\]"):
        eng.score([CHAT], photo)
    with pytest.raises(ValueError, match="image lists"):  # the existing length check is kept
        eng.score([CHAT, CHAT], [[photo]])


def test_genuinely_bad_conversations_keep_their_per_conversation_errors(eng):
    with pytest.raises(SampleError, match=r"1 of 2 conversations could not be scored.*'robot'"):
        eng.score([CHAT, [{"role": "robot", "content": "hi"}]])
    with pytest.raises(SampleError, match="messages must be a list of .* dicts, got dict"):
        eng.score([{"messages": CHAT}])  # a dict without "role": reported by the template check, its type named
    with pytest.raises(SampleError, match="got str"):
        eng.score(["not a conversation"])


@pytest.mark.parametrize("item, shown", [
    ({"messages": CHAT, "images": ["a.png"]}, "item 0 is a dict"),
    ((CHAT, ["a.png"]), r"item 0 is a tuple \(list, list\)"),
    (CHAT, "item 0 is a list"),
    (("0", Sample(CHAT)), r"item 0 is a tuple \(str, Sample\)"),
    ((0, CHAT), r"item 0 is a tuple \(int, list\)"),
])
def test_score_stream_rejects_wrong_item_types_at_once(eng, item, shown):
    with pytest.raises(TypeError, match=shown + r".*must be a Sample\(messages, media, id\) or an \(index, Sample\)"):
        eng.score_stream([item])  # a list is checked when the call is made, before anything is scored


def test_score_stream_checks_lazy_iterables_as_they_come(eng):
    stream = eng.score_stream(iter([Sample(CHAT, id="a"), {"messages": CHAT}]))
    with pytest.raises(TypeError, match=r"item 1 is a dict"):
        list(stream)
    with pytest.raises(TypeError, match=r"for one sample pass \[sample\]"):
        eng.score_stream(Sample(CHAT))


def test_score_stream_accepted_forms(eng):
    bad = SampleError("line 3: invalid JSON")
    items = [Sample(CHAT, id="x"), (7, Sample(CHAT, id="y")), (8, bad), Sample([{"role": "robot", "content": "?"}])]
    for source in (items, iter(items)):
        res = list(eng.score_stream(source))
        assert [r.index for r in res] == [0, 7, 8, 3]
        assert res[0].score == pytest.approx(res[1].score, rel=1e-6) and res[0].id == "x" and res[1].id == "y"
        assert res[2].error == "line 3: invalid JSON"  # bad *samples* stay per-item results, as documented
        assert res[3].score is None and "robot" in res[3].error
