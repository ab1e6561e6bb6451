"""One corpus record (a decoded JSON object or Parquet row) -> `Sample`, whatever form its conversation takes.

Forms understood (the same for JSON arrays, Parquet rows and, through `corpus.parse_line`, JSONL lines):

- this project's own: ``messages`` (alias ``conversation``) of ``{role, content}`` with str content or OpenAI / HF
  content parts (see `parts.py`), media in ``images`` (list or one str);
- LLaVA / ShareGPT: ``conversations`` of ``{from, value}`` with ``from`` in human / gpt / system (user / assistant
  too), media in ``image`` (str or list) and ``video`` (str or list), placed where the text says ``<image>`` /
  ``<video>``.

LLaVA placeholders: each ``<image>`` and ``<video>`` token becomes the model's ``<ImageHere>``, and nothing else of the
text changes. LLaVA writes ``"<image>\\nWhat is ..."``; that newline stays (``"<ImageHere>\\nWhat is ..."``), because
it is part of the text the model sees in LLaVA's own template too. A record with only videos whose text uses
``<image>`` as their placeholder (LLaVA-Video does) is read the same way. A record with one medium and no
placeholder puts it at the front of the prompt (the template's rule).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from ixc_engine.corpus import LineError
from ixc_engine.engine.sequence import Sample
from ixc_engine.formats.parts import MediaResolver, PartsError, flatten_messages
from ixc_engine.media.loader import MediaBytes
from ixc_engine.media.video import VIDEO_EXTENSIONS
from ixc_engine.tokenizer import IMAGE_PLACEHOLDER

LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_LLAVA_TOKEN = re.compile(r"<image>|<video>")


def _media_list(value, field: str, sid) -> list:
    """A record's media field: None, one reference, or a list of them (str paths, or {"bytes", "path"} cells)."""
    if value is None:
        return []
    if isinstance(value, (str, Mapping, MediaBytes, bytes, bytearray, memoryview)):  # bytes: a binary image column
        return [value]
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        return list(value)
    raise LineError(f"'{field}' must be a path or a list of paths, got {type(value).__name__}", sid)


def media_cell(ref, kind: str | None, resolver: MediaResolver, where: str):
    """One media reference of a record -> media item: a path (relative to the media root), a ``data:`` URI, or a
    Parquet / HF ``{"bytes", "path"}`` cell (decoded from the bytes in memory; the path only names it)."""
    if isinstance(ref, MediaBytes):
        return ref
    if isinstance(ref, (bytes, bytearray, memoryview)):  # a plain binary Parquet column holds the encoded file
        ref = {"bytes": ref, "path": None}
    if isinstance(ref, Mapping) and ("bytes" in ref or "path" in ref) and "url" not in ref:
        data, name = ref.get("bytes"), ref.get("path")
        if data is not None:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise PartsError(f"{where}: 'bytes' must be binary, got {type(data).__name__}")
            if kind is None:
                kind = "video" if isinstance(name, str) and name.lower().endswith(VIDEO_EXTENSIONS) else "image"
            return MediaBytes(bytes(data), kind, name=f"{where} ({name or 'no path'}, {len(data)} bytes)")
        if name is None:
            raise PartsError(f"{where}: neither 'bytes' nor 'path' is set")
        ref = name
    if kind is None:
        kind = "video" if isinstance(ref, str) and ref.lower().endswith(VIDEO_EXTENSIONS) else "image"
    return resolver(ref, kind)


def _llava_messages(conv, sid) -> list[dict]:
    if not isinstance(conv, list):
        raise LineError(f"'conversations' must be a list of {{from, value}} objects, got {type(conv).__name__}", sid)
    out = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, Mapping):
            raise LineError(f"conversations[{i}] must be an object with 'from' and 'value', got "
                            f"{type(turn).__name__}", sid)
        if "from" not in turn and "role" in turn:  # role/content turns under the LLaVA key
            out.append(dict(turn))
            continue
        who, value = turn.get("from"), turn.get("value")
        if who not in LLAVA_ROLES:
            raise LineError(f"conversations[{i}] has 'from' {who!r}; expected one of {', '.join(LLAVA_ROLES)}", sid)
        if not isinstance(value, str):
            raise LineError(f"conversations[{i}].value must be a string, got {type(value).__name__}", sid)
        out.append({"role": LLAVA_ROLES[who], "content": value})
    return out


def _place_llava_media(messages: list[dict], images: list, videos: list, sid) -> tuple[list[dict], list]:
    """Map <image>/<video> to <ImageHere> and order the media as their placeholders stand."""
    tokens = [m for msg in messages if isinstance(msg.get("content"), str)
              for m in _LLAVA_TOKEN.findall(msg["content"])]
    n_img, n_vid = tokens.count("<image>"), tokens.count("<video>")
    if not tokens:
        return messages, images + videos  # no placeholder: the template's rules (one medium goes in front)
    if videos and not images and n_vid == 0 and n_img == len(videos):
        tokens = ["<video>"] * n_img  # LLaVA-Video: the video's placeholder is written <image>
        n_img, n_vid = 0, len(videos)
    if n_img != len(images) or n_vid != len(videos):
        raise LineError(f"the text has {n_img} <image> and {n_vid} <video> placeholders but the record lists "
                        f"{len(images)} images and {len(videos)} videos", sid)
    queues = {"<image>": iter(images), "<video>": iter(videos)}
    media = [next(queues[t]) for t in tokens]
    out = [{**m, "content": _LLAVA_TOKEN.sub(IMAGE_PLACEHOLDER, m["content"])} if isinstance(m.get("content"), str)
           else m for m in messages]
    return out, media


def parse_record(obj, index: int, resolver: MediaResolver) -> Sample:
    """A decoded record -> Sample. Raises LineError naming what is wrong (the caller adds the record index)."""
    if not isinstance(obj, Mapping):
        raise LineError(f"expected a JSON object, got {type(obj).__name__}")
    sid = obj.get("id", index)  # as corpus.parse_line: an explicit null id stays null

    def part_resolver(ref, kind):  # a part's payload may be an HF {"bytes", "path"} cell too
        return media_cell(ref, kind, resolver, "payload")

    try:
        if obj.get("messages") is None and obj.get("conversation") is None and "conversations" in obj:
            messages = _llava_messages(obj["conversations"], sid)
            images = [media_cell(r, "image", resolver, f"image[{k}]")
                      for k, r in enumerate(_media_list(obj.get("image", obj.get("images")), "image", sid))]
            videos = [media_cell(r, "video", resolver, f"video[{k}]")
                      for k, r in enumerate(_media_list(obj.get("video", obj.get("videos")), "video", sid))]
            messages, media = _place_llava_media(messages, images, videos, sid)
            return Sample(*flatten_messages(messages, part_resolver, media), id=sid)
        messages = obj.get("messages", obj.get("conversation"))
        if messages is None:
            raise LineError("missing field 'messages' (or its aliases 'conversation', 'conversations')", sid)
        if not isinstance(messages, list):
            raise LineError(f"'messages' must be a list of {{role, content}} objects, got "
                            f"{type(messages).__name__}", sid)
        field = "images" if obj.get("images") is not None else "image"
        refs = _media_list(obj.get(field), field, sid)
        if any(isinstance(r, str) and not r for r in refs):
            raise LineError(f"'{field}' holds an empty path", sid)
        external = [media_cell(r, None, resolver, f"{field}[{k}]") for k, r in enumerate(refs)]
        messages, media = flatten_messages(messages, part_resolver, external)
    except PartsError as exc:
        raise LineError(str(exc), sid) from None
    return Sample(messages, media, id=sid)


def default_resolver(base_dir: str | os.PathLike) -> MediaResolver:
    from pathlib import Path

    return MediaResolver(base_dir=Path(base_dir).resolve())
