"""The policy's decoded chat text (OpenRLHF's `query`) back into messages: parse(render(messages)) == messages."""

from __future__ import annotations

import random

import pytest

from ixc_engine.serve.chat import ChatParseError, parse_chat, render_chat
from ixc_engine.template import render_conversation

PIECES = ["hello", "world", " ", "\n", "\n\n", "  indented", "trailing  ", "<s>", "</s>", "<ImageHere>", "é ü 中文",
          "tab\there", "[UNUSED_TOKEN_1]", "x" * 50, "1 + 1 = 2", "<|endoftext|>middle"]


def random_conversation(rng: random.Random) -> list[dict]:
    msgs = [{"role": "system", "content": "".join(rng.choices(PIECES, k=rng.randint(0, 3)))}] if rng.random() < 0.3 \
        else []
    for t in range(rng.randint(1, 4)):
        for role in ("user", "assistant"):
            msgs.append({"role": role, "content": "".join(rng.choices(PIECES, k=rng.randint(0, 6)))})
    if rng.random() < 0.2:
        msgs.pop()  # ends with a user turn
    return msgs


@pytest.mark.parametrize("spelling", ["xcomposer", "internlm2"])
def test_parse_inverts_render_for_many_conversations(spelling):
    rng = random.Random(0)
    for n in range(400):
        msgs = random_conversation(rng)
        pad = "</s>" * rng.randint(0, 3)
        text = render_chat(msgs, spelling=spelling, bos=rng.random() < 0.5, eos=rng.choice(["", "</s>", "</s></s>",
                                                                                             "<|endoftext|>"]))
        assert parse_chat(pad + text) == msgs, (n, text)
        assert parse_chat(render_conversation(msgs)) == msgs  # the reward model's own rendering, </s>[R] tail


def test_open_last_message_is_the_response_up_to_eos():
    q = "<s>[UNUSED_TOKEN_146]user\nHi[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\nHello there </s></s></s>"
    assert parse_chat(q) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there "}]
    cut = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nA long answer that was cut"  # hit max length
    assert parse_chat(cut)[-1] == {"role": "assistant", "content": "A long answer that was cut"}
    assert parse_chat("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")[-1] == {"role": "assistant",
                                                                                         "content": ""}
    mixed = "[UNUSED_TOKEN_146]user\nHi<|im_end|>\n<|im_start|>assistant\nOk[UNUSED_TOKEN_145]\n"
    assert parse_chat(mixed) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ok"}]


@pytest.mark.parametrize("text, why", [
    ("just text", "no InternLM2 chat markers"),
    ("preamble <|im_start|>user\nhi", "text before the first message"),
    ("<|im_end|>", "without an open message"),
    ("<|im_start|>user\nhi<|im_end|>\nstray<|im_start|>assistant\nx", "text between messages"),
    ("<|im_start|>user\nhi<|im_start|>assistant\nx", "not closed"),
    ("<|im_start|>user hi<|im_end|>\n", "no newline after its role"),
    ("<|im_start|>", "empty"),
    (5, "must be a string"),
])
def test_malformed_queries_are_refused_with_the_reason(text, why):
    with pytest.raises(ChatParseError, match=why):
        parse_chat(text)
