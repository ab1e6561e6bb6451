"""The policy's decoded text (OpenRLHF's `query`: prompt + response, special tokens kept) -> chat messages.

InternLM2 chat text is ``{start}{role}\\n{content}{end}\\n`` per message, where ``start``/``end`` are spelled
``[UNUSED_TOKEN_146]``/``[UNUSED_TOKEN_145]`` (XComposer's tokenizer) or ``<|im_start|>``/``<|im_end|>``
(InternLM2-chat's).
Around the messages a decoded sequence may carry a leading ``<s>`` and left padding (``</s>``, ``<unk>``), and after
them the policy's EOS, right padding, or this model's own ``</s>[UNUSED_TOKEN_130]`` tail. The last message may be
unterminated (generation stopped at EOS or at the length limit). Contents are kept verbatim, so
``parse_chat(render(messages)) == messages`` for every conversation whose contents hold no marker.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ixc_engine.tokenizer import BOS_TOKEN, EOS_TOKEN, IM_END, IM_START, REWARD_TOKEN, UNK_TOKEN

START_MARKERS = (IM_START, "<|im_start|>")
END_MARKERS = (IM_END, "<|im_end|>")
LEADING_TOKENS = (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)  # BOS and left padding (InternLM2 pads with </s>)
DEFAULT_EOS_TOKENS = (EOS_TOKEN, "<|endoftext|>", "<eos>", REWARD_TOKEN, "<pad>", "<|pad|>")

_SPLIT = re.compile("(" + "|".join(re.escape(m) for m in START_MARKERS + END_MARKERS) + ")")


class ChatParseError(ValueError):
    """A query that is not InternLM2 chat text; the message says where."""


def _strip_leading(text: str) -> str:
    while True:
        t = text.lstrip()
        for tok in LEADING_TOKENS:
            if t.startswith(tok):
                t = t[len(tok):]
                break
        else:
            return t
        text = t


def _strip_trailing(text: str, eos_tokens: Sequence[str], whitespace: bool) -> str:
    """Cut trailing EOS / padding tokens; whitespace too where it cannot be content (after a closed message)."""
    while True:
        t = text.rstrip() if whitespace else text
        for tok in eos_tokens:
            if tok and t.endswith(tok):
                text = t[: -len(tok)]
                break
        else:
            return t


def render_chat(messages: Sequence[dict], *, spelling: str = "xcomposer", bos: bool = False, eos: str = "") -> str:
    """The chat text a policy would decode for `messages` (the inverse of `parse_chat`, for clients and tests).

    spelling: "xcomposer" ([UNUSED_TOKEN_146]) or "internlm2" (<|im_start|>)."""
    if spelling not in ("xcomposer", "internlm2"):
        raise ValueError(f"spelling must be 'xcomposer' or 'internlm2', got {spelling!r}")
    start, end = (START_MARKERS[0], END_MARKERS[0]) if spelling == "xcomposer" else (START_MARKERS[1], END_MARKERS[1])
    body = "".join(f"{start}{m['role']}\n{m['content']}{end}\n" for m in messages)
    return (BOS_TOKEN if bos else "") + body + eos


def parse_chat(query: str, eos_tokens: Sequence[str] = DEFAULT_EOS_TOKENS) -> list[dict]:
    """InternLM2 chat text -> [{"role", "content"}, ...]. Raises ChatParseError naming the problem and its offset.

    Roles are not checked here (the engine's template names a bad one)."""
    if not isinstance(query, str):
        raise ChatParseError(f"query must be a string, got {type(query).__name__}")
    text = _strip_leading(query)
    offset = len(query) - len(text)
    parts = _SPLIT.split(text)
    if len(parts) == 1:
        raise ChatParseError("no InternLM2 chat markers ([UNUSED_TOKEN_146] or <|im_start|>) in the query: send the "
                             "policy's decoded text with special tokens kept (skip_special_tokens=False)")
    head = parts[0]
    if head.strip():
        raise ChatParseError(f"text before the first message at offset {offset}: {head[:40]!r}")
    pos = offset + len(head)
    messages: list[dict] = []
    k = 1
    while k < len(parts):
        marker = parts[k]
        if marker in END_MARKERS:
            raise ChatParseError(f"end marker {marker} at offset {pos} without an open message")
        pos += len(marker)
        body = parts[k + 1] if k + 1 < len(parts) else ""
        closed = k + 2 < len(parts) and parts[k + 2] in END_MARKERS
        if not closed:
            if k + 2 < len(parts):  # another start marker inside a message
                raise ChatParseError(f"message {len(messages)} (offset {pos}) is not closed before the next "
                                     f"{parts[k + 2]}")
            body = _strip_trailing(body, eos_tokens, whitespace=False)  # the open last message: EOS / padding
        role, nl, content = body.partition("\n")
        if not nl:
            if closed or role.strip():
                raise ChatParseError(f"message {len(messages)} at offset {pos} has no newline after its role "
                                     f"{role[:20]!r}")
            raise ChatParseError(f"message {len(messages)} at offset {pos} is empty (a start marker with no role)")
        messages.append({"role": role, "content": content})
        pos += len(body)
        if not closed:
            break
        pos += len(parts[k + 2])
        between = parts[k + 3] if k + 3 < len(parts) else ""
        if k + 4 >= len(parts):  # after the last closed message: whitespace, EOS, padding, the reward tail
            between = _strip_trailing(between, eos_tokens, whitespace=True)
        if between.strip():
            raise ChatParseError(f"text between messages at offset {pos}: {between.strip()[:40]!r}")
        pos += len(parts[k + 3]) if k + 3 < len(parts) else 0
        k += 4
    return messages
