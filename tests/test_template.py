"""Chat template and prompt splitting: exact layout with the real tokenizer, structure with a tiny trained one."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ixc_engine.template import (
    ROLES,
    TemplatedSample,
    build_sample,
    build_sample_from_prompt,
    render_conversation,
    validate_messages,
)
from ixc_engine.tokenizer import IMAGE_PLACEHOLDER, Tokenizer

from .test_tokenizer import train_tiny_model

SHARED_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared" / "ixc" / "tokenizer.model"
IMG = IMAGE_PLACEHOLDER

CHAT = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is in the picture?"},
    {"role": "assistant", "content": "Two cars on a road."},
    {"role": "user", "content": "Which one is faster?"},
    {"role": "assistant", "content": "The red one, a Ferrari."},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    if not SHARED_TOKENIZER.is_file():
        pytest.skip(f"the real IXC-2.5-Reward tokenizer.model is not at {SHARED_TOKENIZER} (../shared is absent)")
    return Tokenizer.from_file(SHARED_TOKENIZER)


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer(train_tiny_model())


@pytest.fixture(params=["real", "tiny"])
def any_tok(request) -> Tokenizer:
    return request.getfixturevalue("tok" if request.param == "real" else "tiny")


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}, {"role": "assistant", "content": "Fine."}]


def reassemble(tokenizer: Tokenizer, sample: TemplatedSample) -> str:
    """Decode the pieces back to a prompt, media slots as placeholders, the leading BOS dropped."""
    parts = [tokenizer.decode(p) if isinstance(p, list) else IMG for p in sample.pieces]
    text = "".join(parts)
    assert text.startswith("<s>")
    return text[len("<s>"):]


# --- validate_messages / render_conversation -------------------------------------------------------------------------
def test_render_conversation_exact_string():
    msgs = [{"role": "user", "content": " hi \n"}, {"role": "assistant", "content": ""}]
    assert render_conversation(msgs) == (
        "[UNUSED_TOKEN_146]user\n hi \n[UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]assistant\n[UNUSED_TOKEN_145]\n</s>[UNUSED_TOKEN_130]"
    )


def test_validate_messages_accepts_and_copies():
    msgs = [{"role": r, "content": f"c{i}", "name": "x"} for i, r in enumerate(ROLES)]
    out = validate_messages(msgs)
    assert out == [{"role": r, "content": f"c{i}"} for i, r in enumerate(ROLES)]
    assert out[0] is not msgs[0]
    assert validate_messages(({"role": "user", "content": ""},)) == [{"role": "user", "content": ""}]


@pytest.mark.parametrize(
    ("messages", "pattern"),
    [
        (None, "must be a list"),
        ("user: hi", "must be a list"),
        ({"role": "user", "content": "hi"}, "must be a list"),
        ([], "empty"),
        ([{"role": "user", "content": "a"}, "hi"], r"messages\[1\] must be a dict"),
        ([{"content": "a"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\] has no 'content'"),
        ([{"role": "bot", "content": "a"}], r"messages\[0\]\['role'\] is 'bot'; it must be one of system, user"),
        ([{"role": "User", "content": "a"}], r"messages\[0\]\['role'\] is 'User'"),
        ([{"role": None, "content": "a"}], r"messages\[0\]\['role'\] is None"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}],
         r"messages\[1\]\['content'\] must be a str, got NoneType"),
        ([{"role": "user", "content": ["a", "b"]}], r"messages\[0\]\['content'\] must be a str, got list"),
    ],
)
def test_validate_messages_errors(messages, pattern):
    with pytest.raises(ValueError, match=pattern):
        validate_messages(messages)
    with pytest.raises(ValueError, match=pattern):
        render_conversation(messages)


# --- exact layout with the real tokenizer ----------------------------------------------------------------------------
def test_text_only_multi_turn_layout(tok):
    s = build_sample(tok, CHAT, 0, 9)
    assert len(s.pieces) == 1 and s.n_media == 0 and s.hd_num == 9
    ids = s.pieces[0]
    assert ids == tok.encode(render_conversation(CHAT), add_bos=True)
    assert ids[:2] == [1, 92543]
    assert ids[2:4] == tok.encode("system\n")
    assert ids[-4:] == [92542, 364, 2, 92527]
    assert ids.count(92543) == ids.count(92542) == len(CHAT)
    assert ids.count(2) == 1 and ids.count(1) == 1
    # every turn: 92543, role ids, "\n", content ids, 92542, "\n"
    pos = 1
    for m in CHAT:
        turn = [92543] + tok.encode(f"{m['role']}\n{m['content']}") + [92542, 364]
        assert ids[pos:pos + len(turn)] == turn
        pos += len(turn)
    assert ids[pos:] == [2, 92527]
    assert s.n_text_tokens == len(ids) == s.n_tokens([])
    assert s.text_ids() == ids


def test_eos_inside_content_becomes_id_2(tok):
    s = build_sample(tok, user("stop here </s> and go on"), 0, 9)
    ids = s.pieces[0]
    assert ids.count(2) == 2 and ids[-4:] == [92542, 364, 2, 92527]
    i = ids.index(2)
    assert ids[i - 1] == 262 and tok.decode(ids[i - 1:i + 2]) == " </s> and"  # the spaces around </s> are kept


def test_placeholder_in_text_only_sample_stays_text(tok):
    s = build_sample(tok, user(f"a literal {IMG} here"), 0, 9)
    assert len(s.pieces) == 1
    ids = s.pieces[0]
    assert ids == tok.encode(render_conversation(user(f"a literal {IMG} here")), add_bos=True)
    assert [tok.id_to_piece(i) for i in ids[6:11]] == ["▁<", "Image", "Here", ">", "▁here"]


def test_one_image_without_placeholder_goes_in_front(tok):
    s = build_sample(tok, CHAT, 1, 24)
    assert s.pieces[0] == [1] and s.pieces[1] == 0 and len(s.pieces) == 3
    assert s.pieces[2] == tok.encode(render_conversation(CHAT))  # no BOS on the later piece
    assert s.pieces[2][0] == 92543 and s.pieces[2][-4:] == [92542, 364, 2, 92527]
    assert s.hd_num == 24 and s.n_media == 1
    assert s.n_tokens([841]) == 841 + 1 + len(s.pieces[2])


def test_one_image_with_placeholder_mid_text(tok):
    s = build_sample(tok, user(f"Look at this {IMG} and describe it."), 1, 9)
    prompt = render_conversation(user(f"Look at this {IMG} and describe it."))
    before, after = prompt.split(IMG)
    assert s.pieces == [tok.encode(before, add_bos=True), 0, tok.encode(after)]
    assert s.pieces[0][:2] == [1, 92543] and s.pieces[2][0] == tok.encode(" and")[0]


def test_several_images_with_placeholders(tok):
    msgs = [{"role": "user", "content": f"{IMG}{IMG}Compare the two cars, then this one: {IMG}"},
            {"role": "assistant", "content": "Done."}]
    s = build_sample(tok, msgs, 3, 24)
    assert s.hd_num == 6  # forced for more than one image
    head = tok.encode("[UNUSED_TOKEN_146]user\n", add_bos=True)
    assert s.pieces[:4] == [head, 0, 1, tok.encode("Compare the two cars, then this one: ")]
    assert s.pieces[4] == 2 and s.pieces[5][:2] == [92542, 364] and s.pieces[5][-4:] == [92542, 364, 2, 92527]
    assert all(p for p in s.pieces if isinstance(p, list))
    assert s.n_tokens([100, 200, 300]) == s.n_text_tokens + 600
    assert reassemble(tok, s) == render_conversation(msgs)


def test_empty_first_piece_keeps_bos_and_empty_later_pieces_vanish(tok):
    s = build_sample_from_prompt(tok, f"{IMG}{IMG}text{IMG}", 3, 9)
    assert s.pieces == [[1], 0, 1, tok.encode("text"), 2]
    assert s.n_text_tokens == 1 + len(tok.encode("text"))
    s = build_sample_from_prompt(tok, IMG, 1, 9)
    assert s.pieces == [[1], 0] and s.n_tokens([5]) == 6


def test_random_conversations_reassemble(tok):
    rng = random.Random(99)
    words = ["hello", " world", "\n", "你好", "😀", " ", "</s>", IMG, "x", "  ", "<s>"]
    for _ in range(200):
        msgs = [{"role": rng.choice(ROLES), "content": "".join(rng.choice(words) for _ in range(rng.randint(0, 6)))}
                for _ in range(rng.randint(1, 4))]
        prompt = render_conversation(msgs)
        n = prompt.count(IMG)
        s = build_sample(tok, msgs, n, 9)
        assert s.n_media == n and s.hd_num == (6 if n > 1 else 9)
        assert s.pieces[0][0] == 1 and s.pieces[-1][-4:] == [92542, 364, 2, 92527]
        assert reassemble(tok, s) == prompt
        if n == 0:
            s1 = build_sample(tok, msgs, 1, 9)
            assert s1.pieces[:2] == [[1], 0] and reassemble(tok, s1) == IMG + prompt


# --- errors ----------------------------------------------------------------------------------------------------------
def test_several_media_without_placeholder_is_an_error(any_tok):
    with pytest.raises(ValueError, match=r"2 media items but the text has no <ImageHere>.*only the first.*bug"):
        build_sample(any_tok, CHAT, 2, 9)


@pytest.mark.parametrize(("content", "n_media", "counts"), [
    (f"{IMG} and {IMG}", 1, ("2", "1")),
    (f"{IMG}", 2, ("1", "2")),
    (f"{IMG}{IMG}{IMG}", 2, ("3", "2")),
])
def test_placeholder_count_mismatch(any_tok, content, n_media, counts):
    with pytest.raises(ValueError, match=rf"has {counts[0]} <ImageHere> placeholders but {counts[1]} media items"):
        build_sample(any_tok, user(content), n_media, 9)


@pytest.mark.parametrize(("n_media", "hd_num", "pattern"), [
    (-1, 9, "n_media must be a non-negative int"),
    (1.0, 9, "n_media must be a non-negative int"),
    (True, 9, "n_media must be a non-negative int"),
    (1, 0, "hd_num must be a positive int"),
    (0, "9", "hd_num must be a positive int"),
])
def test_bad_arguments(any_tok, n_media, hd_num, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_sample(any_tok, CHAT, n_media, hd_num)


def test_bad_messages_propagate(any_tok):
    with pytest.raises(ValueError, match=r"messages\[0\]\['role'\]"):
        build_sample(any_tok, [{"role": "robot", "content": "x"}], 0, 9)


# --- TemplatedSample -------------------------------------------------------------------------------------------------
def test_templated_sample_counts_and_checks():
    s = TemplatedSample([[1], 0, [5, 6, 7], 1], 6)
    assert s.n_text_tokens == 4 and s.n_media == 2 and s.text_ids() == [1, 5, 6, 7]
    assert s.n_tokens([841, 1000]) == 1845
    assert TemplatedSample([[1, 2]], 9, 2).n_text_tokens == 2
    with pytest.raises(ValueError, match="2 entries but the sample has 1 media slots"):
        TemplatedSample([[1], 0], 9).n_tokens([1, 2])
    with pytest.raises(ValueError, match=r"media_token_counts\[0\] must be a non-negative int"):
        TemplatedSample([[1], 0], 9).n_tokens([-1])
    with pytest.raises(ValueError, match="empty token list"):
        TemplatedSample([[1], 0, []], 9)
    with pytest.raises(ValueError, match="slots must be 0, 1, ... in order"):
        TemplatedSample([[1], 1], 9)
    with pytest.raises(ValueError, match="n_text_tokens is 3 but pieces hold 1"):
        TemplatedSample([[1]], 9, 3)
    with pytest.raises(ValueError, match="hd_num must be a positive int"):
        TemplatedSample([[1]], 0)
    with pytest.raises(ValueError, match="non-empty list"):
        TemplatedSample([], 9)


# --- structure with a tiny trained tokenizer (runs without ../shared) ------------------------------------------------
def test_tiny_tokenizer_structure(tiny):
    end = [tiny.im_end_id] + tiny.encode("\n") + [tiny.eos_id, tiny.reward_id]
    s = build_sample(tiny, CHAT, 0, 9)
    ids = s.pieces[0]
    assert ids[:2] == [tiny.bos_id, tiny.im_start_id] and ids[-len(end):] == end
    assert ids.count(tiny.im_start_id) == ids.count(tiny.im_end_id) == len(CHAT)
    assert reassemble(tiny, s) == render_conversation(CHAT)

    s = build_sample(tiny, CHAT, 1, 9)
    assert s.pieces[:2] == [[tiny.bos_id], 0] and s.pieces[2][0] == tiny.im_start_id
    assert s.pieces[2][-len(end):] == end

    msgs = user(f"{IMG}{IMG}Hello{IMG}")
    s = build_sample(tiny, msgs, 3, 24)
    assert s.hd_num == 6
    assert [p if isinstance(p, int) else "T" for p in s.pieces] == ["T", 0, 1, "T", 2, "T"]
    assert reassemble(tiny, s) == render_conversation(msgs)
