"""Chat template of IXC-2.5-Reward and the split of a prompt into text pieces and media slots (MODEL.md section 2).

A conversation renders as ``[UNUSED_TOKEN_146]{role}\\n{content}[UNUSED_TOKEN_145]\\n`` per message, then
``</s>[UNUSED_TOKEN_130]``; the score is read at that final reward token. Media go where the text holds
``<ImageHere>``, in order. There is no truncation here: ``TemplatedSample.n_tokens`` gives the full length so the
engine can reject an over-long sample instead of cutting off the reward token as upstream does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ixc_engine.tokenizer import EOS_TOKEN, IM_END, IM_START, IMAGE_PLACEHOLDER, REWARD_TOKEN

ROLES = ("system", "user", "assistant")
MULTI_MEDIA_HD_NUM = 6  # upstream's hd_num for every item of a sample with more than one image


class _Encoder(Protocol):
    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...


def validate_messages(messages: object) -> list[dict]:
    """Check a conversation: a non-empty list of ``{"role": one of ROLES, "content": str}``.

    Returns new dicts holding only ``role`` and ``content``; other keys are ignored. Raises ValueError (also for
    wrong types, since callers treat any bad sample alike) naming the message index and the problem."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        got = type(messages).__name__
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {got}")  # noqa: TRY004
    if len(messages) == 0:
        raise ValueError("messages is empty: a conversation needs at least one message")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            got = type(msg).__name__
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {got}")  # noqa: TRY004
        for key in ("role", "content"):
            if key not in msg:
                raise ValueError(f"messages[{i}] has no {key!r} key (keys: {sorted(map(str, msg))})")
        role, content = msg["role"], msg["content"]
        if not isinstance(role, str) or role not in ROLES:
            raise ValueError(f"messages[{i}]['role'] is {role!r}; it must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]['content'] must be a str, got {type(content).__name__}")  # noqa: TRY004
        try:  # JSON's "\ud800" decodes to a lone surrogate, which no tokenizer can take: that sample's error
            content.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"messages[{i}]['content'] holds a lone surrogate {content[exc.start]!r} at character "
                             f"{exc.start}: not valid Unicode text") from None
        out.append({"role": role, "content": content})
    return out


def check_placeholders(n_placeholders: int, n_media: int) -> None:
    """The placement rule: one placeholder per media item, or none with a single item (it goes to the front).

    Raises ValueError otherwise. Shared by the scoring template and the training pair loader."""
    if n_placeholders == 0 and n_media > 1:
        raise ValueError(
            f"{n_media} media items but the text has no {IMAGE_PLACEHOLDER} placeholder: put one "
            f"{IMAGE_PLACEHOLDER} per item where it belongs (upstream would silently score only the first item, "
            "placed after all the text, a bug this engine does not reproduce)"
        )
    if n_placeholders and n_placeholders != n_media:
        raise ValueError(
            f"the text has {n_placeholders} {IMAGE_PLACEHOLDER} placeholders but {n_media} media items were given; "
            "they must match one to one"
        )


def render_conversation(messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt text: every message in the chat format, then ``</s>`` and the reward token. Content is used
    verbatim (not stripped)."""
    msgs = validate_messages(messages)
    body = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in msgs)
    return body + EOS_TOKEN + REWARD_TOKEN


@dataclass(slots=True)
class TemplatedSample:
    """A tokenized prompt: ``pieces`` interleaves token-id lists of text with media slot indices 0, 1, ... in order
    (e.g. ``[[1], 0, [92543, ...]]``). Text lists are never empty. ``hd_num`` is the effective HD crop budget of the
    sample's images (6 when it has more than one). ``n_text_tokens`` is computed from ``pieces`` when not given."""

    pieces: list[list[int] | int]
    hd_num: int
    n_text_tokens: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pieces, list) or not self.pieces:
            raise ValueError("pieces must be a non-empty list of token-id lists and media slot indices")
        n_text, next_slot = 0, 0
        for i, piece in enumerate(self.pieces):
            if isinstance(piece, list):
                if not piece:
                    raise ValueError(f"pieces[{i}] is an empty token list; empty text pieces must be left out")
                n_text += len(piece)
            elif isinstance(piece, int) and not isinstance(piece, bool):
                if piece != next_slot:
                    raise ValueError(f"pieces[{i}] is media slot {piece}; slots must be 0, 1, ... in order")
                next_slot += 1
            else:
                msg = f"pieces[{i}] must be a list of token ids or a media slot int, got {piece!r}"
                raise ValueError(msg)  # noqa: TRY004
        if isinstance(self.hd_num, bool) or not isinstance(self.hd_num, int) or self.hd_num < 1:
            raise ValueError(f"hd_num must be a positive int, got {self.hd_num!r}")
        if self.n_text_tokens is None:
            self.n_text_tokens = n_text
        elif self.n_text_tokens != n_text:
            raise ValueError(f"n_text_tokens is {self.n_text_tokens} but pieces hold {n_text} text tokens")

    @property
    def n_media(self) -> int:
        return sum(1 for p in self.pieces if not isinstance(p, list))

    def text_ids(self) -> list[int]:
        """All text token ids in order, media slots left out (the whole input_ids of a text-only sample)."""
        return [t for p in self.pieces if isinstance(p, list) for t in p]

    def n_tokens(self, media_token_counts: Sequence[int]) -> int:
        """Sequence length once media slot k is replaced by ``media_token_counts[k]`` embeddings."""
        counts = list(media_token_counts)
        if len(counts) != self.n_media:
            raise ValueError(
                f"media_token_counts has {len(counts)} entries but the sample has {self.n_media} media slots"
            )
        for k, c in enumerate(counts):
            if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                raise ValueError(f"media_token_counts[{k}] must be a non-negative int, got {c!r}")
        return self.n_text_tokens + sum(counts)


def build_sample(
    tokenizer: _Encoder, messages: Sequence[Mapping[str, str]], n_media: int, hd_num: int
) -> TemplatedSample:
    """Render ``messages`` and tokenize the prompt around ``n_media`` media items (images or videos).

    - no media: the whole prompt is encoded with BOS; a literal ``<ImageHere>`` stays plain text (as upstream).
    - one item and no placeholder: one ``<ImageHere>`` is put at the very front of the prompt.
    - otherwise the number of placeholders must equal ``n_media`` (ValueError if not).
    The prompt is split on the placeholders; the first piece is encoded with BOS even when empty, later pieces
    without BOS, and empty later pieces are left out."""
    return build_sample_from_prompt(tokenizer, render_conversation(messages), n_media, hd_num)


def build_sample_from_prompt(tokenizer: _Encoder, prompt: str, n_media: int, hd_num: int) -> TemplatedSample:
    """``build_sample`` for an already rendered prompt."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")  # noqa: TRY004
    if isinstance(n_media, bool) or not isinstance(n_media, int) or n_media < 0:
        raise ValueError(f"n_media must be a non-negative int, got {n_media!r}")
    if isinstance(hd_num, bool) or not isinstance(hd_num, int) or hd_num < 1:
        raise ValueError(f"hd_num must be a positive int, got {hd_num!r}")
    if n_media == 0:
        return TemplatedSample([tokenizer.encode(prompt, add_bos=True)], hd_num)

    n_placeholders = prompt.count(IMAGE_PLACEHOLDER)
    check_placeholders(n_placeholders, n_media)
    if n_placeholders == 0:
        prompt = IMAGE_PLACEHOLDER + prompt
    parts = prompt.split(IMAGE_PLACEHOLDER)
    pieces: list[list[int] | int] = [tokenizer.encode(parts[0], add_bos=True)]
    for slot, part in enumerate(parts[1:]):
        pieces.append(slot)
        ids = tokenizer.encode(part) if part else []
        if ids:
            pieces.append(ids)
    return TemplatedSample(pieces, MULTI_MEDIA_HD_NUM if n_media > 1 else hd_num)
