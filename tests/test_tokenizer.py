"""Tokenizer: ids of the release vocabulary, special-token splitting as in the HF wrapper, round trips, errors."""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path

import pytest
import sentencepiece as spm

from ixc_engine.tokenizer import (
    IM_END,
    IM_START,
    REWARD_TOKEN,
    Tokenizer,
    unused_token,
    unused_token_id,
)

SHARED_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared" / "ixc" / "tokenizer.model"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    if not SHARED_TOKENIZER.is_file():
        pytest.skip(f"the real IXC-2.5-Reward tokenizer.model is not at {SHARED_TOKENIZER} (../shared is absent)")
    return Tokenizer.from_file(SHARED_TOKENIZER)


def train_tiny_model(bos_id: int = 1) -> bytes:
    """A small BPE model with the release's settings (byte fallback, identity normalizer, no dummy prefix)."""
    lines = ["The quick brown fox jumps over the lazy dog.", "user assistant system", "Hello world, 你好!"] * 40
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=400, byte_fallback=True,
        add_dummy_prefix=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=[REWARD_TOKEN, IM_END, IM_START], character_coverage=1.0, hard_vocab_limit=False,
        bos_id=bos_id, minloglevel=2, num_threads=1,
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer(train_tiny_model())


def split_reference(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    """Independent reference: scan left to right for the three special strings, SentencePiece on the rest."""
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2}
    ids, start, i = [], 0, 0
    while i < len(text):
        hit = next((s for s in specials if text.startswith(s, i)), None)
        if hit is None:
            i += 1
            continue
        if i > start:
            ids += sp.encode(text[start:i])
        ids.append(specials[hit])
        i += len(hit)
        start = i
    if start < len(text):
        ids += sp.encode(text[start:])
    return ids


# --- the release vocabulary ------------------------------------------------------------------------------------------
def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == 92544
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 2)
    assert (tok.im_start_id, tok.im_end_id, tok.reward_id) == (92543, 92542, 92527)
    assert [tok.id_to_piece(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]


def test_unused_tokens_are_atomic_with_ids_92397_plus_n(tok):
    assert (unused_token_id(130), unused_token_id(145), unused_token_id(146)) == (92527, 92542, 92543)
    for n in range(147):
        assert tok.unused_token_id(n) == unused_token_id(n) == 92397 + n
        assert tok.encode(unused_token(n)) == [92397 + n]
    ids = tok.encode("ab[UNUSED_TOKEN_7]cd[UNUSED_TOKEN_14][UNUSED_TOKEN_146]")
    assert ids[-2:] == [92397 + 14, 92543] and 92397 + 7 in ids
    for bad in (-1, 147, 1.0, True, "3"):
        with pytest.raises(ValueError, match="unused token index"):
            unused_token_id(bad)


def test_plain_text_ids(tok):
    # Pinned ids, identical to the HF slow wrapper (transformers 4.45 and 5.23) on this tokenizer.model.
    assert tok.encode("\n") == [364]
    assert tok.encode("") == [] and tok.encode("", add_bos=True) == [1]
    assert tok.encode("hello world") == [15115, 2028]  # no dummy prefix: "hello", "▁world"
    assert tok.encode(" hello") == [24176]
    assert tok.encode("<ImageHere>") == [45910, 8554, 330]
    assert tok.encode("hello world", add_bos=True) == [1, 15115, 2028]


def test_special_strings_become_ids_and_keep_surrounding_whitespace(tok):
    assert tok.encode("a\n</s>[UNUSED_TOKEN_130]") == [264, 364, 2, 92527]
    assert tok.encode("x </s> y") == [274, 262, 2, 509]
    assert tok.encode("<s><unk></s>") == [1, 0, 2]
    assert tok.encode("<</s>>") == [333, 2, 330]
    assert tok.encode("</s>", add_bos=True) == [1, 2]
    assert tok.encode("[UNUSED_TOKEN_146]user\nhi[UNUSED_TOKEN_145]\n</s>[UNUSED_TOKEN_130]") == [
        92543, 1008, 364, 6176, 92542, 364, 2, 92527,
    ]


def test_random_strings_match_independent_reference(tok):
    sp = spm.SentencePieceProcessor(model_file=str(SHARED_TOKENIZER))
    atoms = ["<s>", "</s>", "<unk>", "<", "/", "s", ">", "unk", " ", "  ", "\n", "\t", "a", "hello", " world", "你好",
             "😀", IM_START, IM_END, REWARD_TOKEN, "[UNUSED_TOKEN_1", "]", "<ImageHere>", "123", "é", "\x01", "\r\n"]
    rng = random.Random(1234)
    for _ in range(2000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
        ids = tok.encode(text)
        assert ids == split_reference(sp, text), text
        assert tok.encode(text, add_bos=True) == [1] + ids
        assert tok.decode(ids) == text


@pytest.mark.parametrize(
    "text",
    [
        "你好，世界！这是一个测试。",
        "emoji 😀🎉👍🏽 and ZWJ 👨\u200d👩\u200d👧",
        "Ünïcödé ñ ß ∑ ∞ 𝔘 \u200b",
        "  leading and trailing  ",
        "tabs\tand\r\nnewlines\n\n",
        "日本語のテキストと한국어",
    ],
)
def test_unicode_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_byte_fallback_for_rare_characters(tok):
    ids = tok.encode("😀")
    assert [tok.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_decode_special_ids(tok):
    ids = tok.encode("a</s>b<s>c<unk>", add_bos=True)
    assert tok.decode(ids) == "<s>a</s>b<s>c<unk>"
    assert tok.decode(ids, skip_special=True) == "abc"
    assert tok.decode([]) == ""
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, 92544])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])


def test_piece_lookup(tok):
    assert tok.piece_to_id("\n") == 364
    assert tok.piece_to_id("<unk>") == 0
    with pytest.raises(KeyError, match="not in the tokenizer vocabulary"):
        tok.piece_to_id("[UNUSED_TOKEN_147]")


def test_bytes_and_pickle_give_the_same_tokenizer(tok):
    text = "[UNUSED_TOKEN_146]user\n图片里有什么？</s>[UNUSED_TOKEN_130]"
    again = Tokenizer(SHARED_TOKENIZER.read_bytes())
    assert again.encode(text, add_bos=True) == tok.encode(text, add_bos=True)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(text) == tok.encode(text) and clone.vocab_size == 92544


def test_hf_wrapper_parity_when_transformers_is_installed(tok):
    """Same ids as a minimal transformers slow tokenizer over the same model (what upstream's wrapper is)."""
    transformers = pytest.importorskip("transformers")
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if (major, minor) < (4, 34):
        pytest.skip("transformers < 4.34 strips whitespace around plain-string special tokens; see tokenizer.py")

    class MinimalSlow(transformers.PreTrainedTokenizer):
        def __init__(self, path, **kwargs):
            self.sp = spm.SentencePieceProcessor(model_file=path)
            super().__init__(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>", **kwargs)

        @property
        def vocab_size(self):
            return self.sp.get_piece_size()

        def get_vocab(self):
            return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

        def _tokenize(self, text):
            return self.sp.encode(text, out_type=str)

        def _convert_token_to_id(self, token):
            return self.sp.piece_to_id(token)

        def _convert_id_to_token(self, index):
            return self.sp.id_to_piece(index)

        def build_inputs_with_special_tokens(self, ids, pair=None):
            return [self.bos_token_id] + ids

    hf = MinimalSlow(str(SHARED_TOKENIZER))
    atoms = ["<s>", "</s>", "<unk>", " ", "\n", "a", "hello", " world", "你好", "😀", IM_START, IM_END]
    atoms += [REWARD_TOKEN, "<ImageHere>", "<", ">", "123"]
    rng = random.Random(7)
    for _ in range(500):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 10)))
        assert tok.encode(text, add_bos=True) == hf(text)["input_ids"], text
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text


# --- behaviour that does not need the real model ---------------------------------------------------------------------
def test_tiny_model_splitting_and_lookup(tiny):
    sp = spm.SentencePieceProcessor(model_proto=tiny.model_proto)
    assert (tiny.unk_id, tiny.bos_id, tiny.eos_id, tiny.pad_id) == (0, 1, 2, 2)
    assert (tiny.reward_id, tiny.im_end_id, tiny.im_start_id) == (3, 4, 5)
    assert tiny.unused_token_id(146) == 5
    with pytest.raises(KeyError):
        tiny.unused_token_id(0)
    text = f"{IM_START}user\nHello </s>world{IM_END}\n</s>{REWARD_TOKEN}"
    ids = tiny.encode(text, add_bos=True)
    assert ids == [1] + split_reference(sp, text)
    assert ids[:2] == [1, 5] and ids[-2:] == [2, 3] and ids.count(2) == 2
    assert tiny.decode(ids) == "<s>" + text


def test_constructor_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_file(junk)
    with pytest.raises(ValueError, match="not a serialized SentencePiece model"):
        Tokenizer(b"\x00\x01garbage")
    with pytest.raises(TypeError, match="path or the serialized model bytes"):
        Tokenizer(123)
    with pytest.raises(ValueError, match="'<s>'"):
        Tokenizer(train_tiny_model(bos_id=-1))


def test_encode_rejects_non_text(tiny):
    with pytest.raises(TypeError, match="text must be a str"):
        tiny.encode(b"bytes")
    with pytest.raises(TypeError, match="text must be a str"):
        tiny.encode(None)
