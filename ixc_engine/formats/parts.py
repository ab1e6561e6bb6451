"""Chat messages whose content is a list of parts (OpenAI / HF style) -> the engine's plain messages and media list.

Shared by every reader and front end that meets content parts (corpus readers, the HTTP server):

- ``{"type": "text", "text": str}`` (also ``"input_text"``): the text, verbatim; parts are concatenated as given.
- ``{"type": "image_url", "image_url": {"url": URL} | URL}``, ``{"type": "image", "image": URL}``: an image at this
  position; ``{"type": "video_url", "video_url": ...}``, ``{"type": "video", "video": URL}``: a video. Each becomes the
  model's placeholder ``<ImageHere>`` where it stands, and its media item is appended in order.
- ``{"type": "image"}`` / ``{"type": "video"}`` with no payload (the HF processors' form): the next item of the
  record's own media list (``external``) goes there.

A URL is a ``data:`` URI (decoded in memory, size-capped), a ``file://`` URL or a plain path. ``http(s)://`` URLs are
refused: nothing is fetched over the network.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ixc_engine.media.loader import MediaBytes, MediaItem
from ixc_engine.tokenizer import IMAGE_PLACEHOLDER

DEFAULT_MAX_DATA_URI_BYTES = 64 << 20  # decoded size of one data: URI


class PartsError(ValueError):
    """A message, part or media reference that cannot be used; the message names it."""


@dataclass(frozen=True, slots=True)
class MediaResolver:
    """How media references of one record are turned into media items.

    base_dir: relative paths are taken from here (a corpus file's folder, or --media-root).
    root: when set, every file must resolve (symlinks followed) to a path inside it; anything else is refused
      (the HTTP server's sandbox). None: any readable path.
    allow_paths: False refuses plain paths and file:// URLs (only data: URIs are then accepted).
    max_data_uri_bytes: cap on the decoded size of one data: URI.
    """

    base_dir: Path | None = None
    root: Path | None = None
    allow_paths: bool = True
    max_data_uri_bytes: int = DEFAULT_MAX_DATA_URI_BYTES

    def __call__(self, ref: object, kind: str) -> MediaItem:
        return resolve_media_ref(ref, kind, self)


def decode_data_uri(uri: str, max_bytes: int = DEFAULT_MAX_DATA_URI_BYTES) -> tuple[str, bytes]:
    """``data:[<mime>][;base64],<data>`` -> (mime type, decoded bytes). Raises PartsError."""
    head, sep, payload = uri.partition(",")
    if not sep or not head.lower().startswith("data:"):
        raise PartsError("malformed data: URI (expected data:<mime>;base64,<data>)")
    meta = head[5:].split(";")
    mime = meta[0].strip().lower() or "text/plain"
    # base64 inflates by 4/3: refuse before decoding what would be too large
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise PartsError(f"data: URI holds more than {max_bytes} bytes (the limit)")
    if any(m.strip().lower() == "base64" for m in meta[1:]):
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PartsError(f"data: URI is not valid base64 ({exc})") from None
    else:
        data = unquote(payload).encode("latin-1", errors="replace")
    if len(data) > max_bytes:
        raise PartsError(f"data: URI holds {len(data)} bytes, over the limit of {max_bytes}")
    return mime, data


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        return False
    return True


def resolve_media_ref(ref: object, kind: str, resolver: MediaResolver) -> MediaItem:
    """One media reference (data: URI, file:// URL or path) -> a media item for `kind` ("image" or "video")."""
    if isinstance(ref, Mapping) and "url" in ref:  # {"url": ...} objects, as image_url carries
        ref = ref["url"]
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str):
        raise PartsError(f"{kind} reference must be a string (data: URI, file:// URL or path), got "
                         f"{type(ref).__name__}")
    if not ref:
        raise PartsError(f"empty {kind} reference")
    scheme = urlsplit(ref).scheme.lower() if ":" in ref[:12] else ""
    if scheme == "data":
        mime, data = decode_data_uri(ref, resolver.max_data_uri_bytes)
        major = mime.split("/", 1)[0]
        if major in ("image", "video") and major != kind:
            raise PartsError(f"a {kind} part holds a data: URI of type {mime}")
        return MediaBytes(data, kind, name=f"data: URI ({mime}, {len(data)} bytes)")
    if scheme in ("http", "https", "ftp", "s3", "gs"):
        raise PartsError(f"{kind} URL {ref[:80]!r}: media are never fetched over the network; download it and give "
                         "a path (or a data: URI)")
    # os.path, not pathlib: pathlib interns every path part, so a corpus of millions of distinct file names would grow
    # the interpreter's intern table without bound
    if scheme == "file":
        path = unquote(urlsplit(ref).path)
    elif scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive, i.e. a path
        raise PartsError(f"{kind} reference {ref[:80]!r}: unsupported URL scheme {scheme!r}")
    else:
        path = ref
    if not resolver.allow_paths:
        raise PartsError(f"{kind} reference {ref[:80]!r}: only data: URIs are accepted here")
    if not os.path.isabs(path) and resolver.base_dir is not None:
        path = os.path.join(resolver.base_dir, path)
    if resolver.root is not None and not _inside(Path(path), resolver.root):
        raise PartsError(f"{kind} path {ref[:80]!r} lies outside the media root {resolver.root}")
    return path


_TEXT_TYPES = ("text", "input_text")
_MEDIA_TYPES = {"image_url": "image", "image": "image", "input_image": "image", "video_url": "video",
                "video": "video"}


def flatten_messages(
    messages: object, resolve: Callable[[object, str], MediaItem], external: Sequence[MediaItem] | None = None,
) -> tuple[list[dict], list[MediaItem]]:
    """Messages whose content is a str or a list of parts -> (messages with str content, media in order).

    Messages with str content pass through unchanged (their own ``<ImageHere>`` placeholders refer to `external`).
    Payload-less image/video parts take the items of `external` in order. Raises PartsError naming the message and
    part. Only the message list's shape is checked here; roles and the rest are the template's checks."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise PartsError(f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}")
    external = list(external or [])
    has_parts = any(isinstance(m, Mapping) and isinstance(m.get("content"), list) for m in messages)
    if not has_parts:
        return [dict(m) if isinstance(m, Mapping) else m for m in messages], external
    out: list[dict] = []
    media: list[MediaItem] = []
    taken = 0  # items of `external` used by payload-less parts
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            out.append(msg)  # the template names the problem
            continue
        content = msg.get("content")
        if not isinstance(content, list):
            if isinstance(content, str) and IMAGE_PLACEHOLDER in content:
                raise PartsError(f"messages[{i}] has a {IMAGE_PLACEHOLDER} placeholder in text while other messages "
                                 "use content parts: put the media as parts")
            out.append(dict(msg))
            continue
        texts: list[str] = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, str):  # a bare string part, as some datasets write
                texts.append(part)
                continue
            if not isinstance(part, Mapping):
                raise PartsError(f"{where} must be an object with a 'type', got {type(part).__name__}")
            ptype = part.get("type")
            if ptype in _TEXT_TYPES:
                text = part.get("text")
                if not isinstance(text, str):
                    raise PartsError(f"{where} is a text part without a string 'text'")
                if IMAGE_PLACEHOLDER in text:
                    raise PartsError(f"{where} holds a literal {IMAGE_PLACEHOLDER}: media go in image parts")
                texts.append(text)
            elif ptype in _MEDIA_TYPES:
                kind = _MEDIA_TYPES[ptype]
                payload = part.get(ptype)
                if payload is None and ptype == "image":
                    payload = part.get("url") or part.get("path")
                if payload is None and ptype == "input_image":  # OpenAI Responses: {"type": "input_image", "image_url"}
                    payload = part.get("image_url")
                try:
                    if payload is None:
                        if taken >= len(external):
                            raise PartsError(f"a {ptype} part without a payload, but the record's media list has only "
                                             f"{len(external)} items")
                        item = external[taken]
                        taken += 1
                    else:
                        item = resolve(payload, kind)
                except PartsError as exc:
                    raise PartsError(f"{where}: {exc}") from None
                media.append(item)
                texts.append(IMAGE_PLACEHOLDER)
            else:
                raise PartsError(f"{where} has unknown type {ptype!r}; known: "
                                 f"{', '.join((*_TEXT_TYPES, *_MEDIA_TYPES))}")
        out.append({**msg, "content": "".join(texts)})
    if taken != len(external):
        raise PartsError(f"the record lists {len(external)} media items but its content parts use {taken}")
    return out, media
