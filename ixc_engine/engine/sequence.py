"""Samples and their CPU-side preparation: template + tokens + media crops -> a `PreparedSample`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ixc_engine.media.image import MAX_IMAGE_PIXELS, MediaCrops
from ixc_engine.media.loader import MIN_MEDIA_TOKENS, load_media, media_digest, media_tokens, mode_warning
from ixc_engine.template import (
    build_sample,
    check_placeholders_without_media,
    conversation_warnings,
    validate_messages,
)
from ixc_engine.tokenizer import Tokenizer

MEDIA_KEY_BIT = 1 << 62  # content keys of image positions live above every token id
MAX_MEDIA = 64  # media items per sample (images and videos); more is that sample's error


class SampleError(ValueError):
    """A sample that cannot be scored; the message says why (bad messages, media, length)."""


@dataclass(slots=True)
class Sample:
    messages: list[dict]
    media: list[Any] = field(default_factory=list)  # paths (image or video by extension) or PIL images
    id: Any = None
    warnings: list[str] = field(default_factory=list)  # found while reading it (e.g. a corpus key that is not read)


@dataclass(slots=True)
class PreparedSample:
    """Everything the runner needs for one sequence; `pieces` interleaves token-id lists and media slot indices."""

    id: Any
    pieces: list[list[int] | int]
    media: list[MediaCrops]
    media_digests: list[str]
    n_tokens: int
    warnings: list[str] = field(default_factory=list)  # legal but most likely wrong input, scored anyway

    def segments(self) -> list[tuple[int, int, list[int] | int]]:
        """(start, end, piece) in sequence positions."""
        out, pos = [], 0
        for piece in self.pieces:
            n = len(piece) if isinstance(piece, list) else self.media[piece].n_tokens
            out.append((pos, pos + n, piece))
            pos += n
        return out

    def content_keys(self) -> np.ndarray:
        """One int64 key per position: the token id, or a key derived from the media digest and the offset."""
        keys = np.empty(self.n_tokens, dtype=np.int64)
        for start, end, piece in self.segments():
            if isinstance(piece, list):
                keys[start:end] = piece
            else:
                base = int.from_bytes(hashlib.blake2b(self.media_digests[piece].encode(), digest_size=8).digest())
                base = (base & ((1 << 40) - 1)) << 20  # leaves 2^20 offsets per image before wrapping into others
                keys[start:end] = MEDIA_KEY_BIT | (base + np.arange(end - start, dtype=np.int64))
        return keys


def _too_long(n_tokens: int, max_length: int, at_least: bool = False) -> SampleError:
    return SampleError(
        f"sample is {'at least ' if at_least else ''}{n_tokens} tokens long, over max_length {max_length}; it is "
        "not scored (upstream would cut the tail and read the score at a wrong token). Shorten it or raise "
        "--max-length."
    )


def prepare_sample(
    tokenizer: Tokenizer, sample: Sample, *, hd_num: int, max_length: int, media_cache: dict | None = None,
    max_media: int = MAX_MEDIA, max_pixels: int | None = MAX_IMAGE_PIXELS, escape_special: bool = False,
    compact_media: bool = True,
) -> PreparedSample:
    """Validate, template and tokenize, load and crop media. Raises SampleError with a clear reason.

    Cheap checks come first, so that a hostile sample costs little to reject: the number of media (at most
    max_media), then each item's pixels (at most max_pixels per image or video frame) and the sample's length
    from the media headers; only then is anything decoded. The length is checked again on the decoded crops.
    escape_special: read special-token strings in message content as plain text (see `template.build_sample`).
    compact_media: crops in compact form (uint8 sub-crops, see `media.image.canvas_crops`) or dense float32."""
    if len(sample.media) > max_media:
        raise SampleError(
            f"sample has {len(sample.media)} media items, over the limit of {max_media} per sample (--max-media)"
        )
    try:
        messages = validate_messages(sample.messages)
        check_placeholders_without_media(messages, len(sample.media))
        warnings = [*sample.warnings, *conversation_warnings(messages, escape_special=escape_special)]
        templ = build_sample(tokenizer, messages, len(sample.media), hd_num, escape_special=escape_special)
    except ValueError as exc:  # with what was found reading it (e.g. the media under a key that is not read)
        raise SampleError("; ".join([str(exc), *sample.warnings])) from exc
    # Length from the headers; items not read yet (and videos without PyAV: None) count their minimum, so that
    # reading stops as soon as the sample is sure to be too long.
    expected: list[int] = []
    exact = True
    bound = templ.n_text_tokens + MIN_MEDIA_TOKENS * len(sample.media)
    if bound > max_length:
        raise _too_long(bound, max_length, at_least=bool(sample.media))
    for k, item in enumerate(sample.media):
        try:
            n = media_tokens(item, templ.hd_num, max_pixels=max_pixels)
        except ValueError as exc:  # MediaError is a ValueError
            raise SampleError(str(exc)) from exc
        exact = exact and n is not None
        expected.append(MIN_MEDIA_TOKENS if n is None else n)
        bound = templ.n_text_tokens + sum(expected) + MIN_MEDIA_TOKENS * (len(sample.media) - k - 1)
        if bound > max_length:
            raise _too_long(bound, max_length, at_least=not exact or k + 1 < len(sample.media))
    crops, digests = [], []
    for item in sample.media:
        try:
            digest = media_digest(item, templ.hd_num)
            mc = media_cache.get(digest) if media_cache is not None else None
            if mc is None:
                mc = load_media(item, templ.hd_num, max_pixels=max_pixels, compact=compact_media)
        except ValueError as exc:  # MediaError is a ValueError
            raise SampleError(str(exc)) from exc
        if media_cache is not None:
            media_cache[digest] = mc
        crops.append(mc)
        digests.append(digest)
        if w := mode_warning(item):
            warnings.append(w)
    n_tokens = templ.n_tokens([m.n_tokens for m in crops])
    if n_tokens > max_length:
        raise _too_long(n_tokens, max_length)
    return PreparedSample(sample.id, templ.pieces, crops, digests, n_tokens, warnings)
