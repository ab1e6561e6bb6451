"""Request bodies of every endpoint -> engine `Sample`s, with 4xx errors that name the field.

Runs in a worker thread (JSON decoding, base64 of data: URIs and path checks are CPU work the event loop must not do).
Media references go through `ixc_engine.formats.parts` (data: URIs, or paths / file:// URLs below --media-root; never a
URL fetch)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ixc_engine.api import Sample
from ixc_engine.formats.parts import MediaResolver, PartsError, flatten_messages
from ixc_engine.serve.chat import ChatParseError, parse_chat

MAX_HD_NUM = 64
MAX_PATH_CHARS = 4096  # Linux PATH_MAX


class RequestError(Exception):
    """A request the server refuses: HTTP status, the offending field (JSON path) and why."""

    def __init__(self, status: int, message: str, field: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.kind = status, message, field, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.field, "code": self.status}}


def bad(field: str | None, message: str) -> RequestError:
    return RequestError(400, f"{field}: {message}" if field else message, field)


@dataclass(frozen=True, slots=True)
class Limits:
    max_items: int = 256  # samples (queries, conversations, candidates) per request
    max_media: int = 8  # media items per sample
    media_root: Path | None = None  # None: data: URIs only
    max_data_uri_bytes: int = 32 << 20
    hd_num: int = 9  # default HD crop budget
    model_names: tuple[str, ...] = ()  # names /pooling's "model" may carry

    def resolver(self) -> MediaResolver:
        root = self.media_root
        return _ServeResolver(base_dir=root, root=root, allow_paths=root is not None,
                             max_data_uri_bytes=self.max_data_uri_bytes)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a \\uD800-\\uDFFF escape: maybe a lone surrogate


def _lone_surrogate_field(body: Any) -> str | None:
    """JSON path of the first string (key or value) holding a lone surrogate, which cannot be UTF-8 encoded (the
    tokenizer and the file system would raise on it). Iterative: the body may be nested up to the decoder's limit."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            for k, v in reversed(list(value.items())):
                sub = f"{path}.{k}" if path else str(k)
                try:
                    k.encode("utf-8")
                except UnicodeEncodeError:
                    return sub.encode("utf-8", "backslashreplace").decode()
                stack.append((sub, v))
    return None


class _ServeResolver(MediaResolver):
    """MediaResolver that first refuses over-long paths: no file system opens one (ENAMETOOLONG), and resolving one
    component by component is quadratic (a 1 MB path of 'a/a/...' kept a parse thread busy for minutes)."""

    __slots__ = ()

    def __call__(self, ref: object, kind: str):
        url = ref.get("url") if isinstance(ref, Mapping) else ref  # image_url's {"url": ...}, as resolve_media_ref
        if isinstance(url, str) and len(url) > MAX_PATH_CHARS and url[:5].lower() != "data:":
            raise PartsError(f"{kind} path of {len(url)} characters is over the limit of {MAX_PATH_CHARS}")
        return super().__call__(ref, kind)


def decode_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise bad(None, f"body is not UTF-8 JSON ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise bad(None, f"body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise bad(None, "body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal of over 4300 digits (sys.get_int_max_str_digits)
        raise bad(None, f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad(None, f"body must be a JSON object, got {type(body).__name__}")
    if _SURROGATE_ESCAPE.search(raw):  # only \\u escapes can put a lone surrogate into decoded JSON
        field = _lone_surrogate_field(body)
        if field is not None:
            raise bad(field, "holds a lone UTF-16 surrogate (an unpaired \\uD800-\\uDFFF escape), which is not text")
    return body


def _list(body: Mapping, key: str, *, required: bool = True) -> list | None:
    if key not in body or body[key] is None:
        if required:
            raise bad(key, "required field is missing")
        return None
    value = body[key]
    if not isinstance(value, list):
        raise bad(key, f"must be a list, got {type(value).__name__}")
    return value


def _check_count(field: str, n: int, limits: Limits) -> None:
    if n > limits.max_items:
        raise RequestError(413, f"{field}: {n} items, over the limit of {limits.max_items} per request (split the "
                           "request)", field, kind="request_too_large")


def _hd_num(body: Mapping, limits: Limits) -> int:
    hd = body.get("hd_num", limits.hd_num)
    if hd is None:
        return limits.hd_num
    if isinstance(hd, bool) or not isinstance(hd, int) or not 1 <= hd <= MAX_HD_NUM:
        raise bad("hd_num", f"must be an integer in [1, {MAX_HD_NUM}], got {hd!r}")
    return hd


def _media_ref(ref: Any, field: str, resolver: MediaResolver):
    kind = "video" if isinstance(ref, str) and ref[:11].lower() == "data:video/" else "image"
    try:
        return resolver(ref, kind)
    except PartsError as exc:
        raise bad(field, str(exc)) from None


def _media_list(value: Any, field: str, limits: Limits, resolver: MediaResolver) -> list:
    """None, one reference, or a list of references -> media items."""
    if value is None:
        return []
    refs = [value] if isinstance(value, (str, Mapping)) else value
    if not isinstance(refs, list):
        raise bad(field, f"must be a list of media references (data: URIs or paths), got {type(value).__name__}")
    if len(refs) > limits.max_media:
        raise RequestError(413, f"{field}: {len(refs)} media items, over the limit of {limits.max_media} per item",
                           field, kind="request_too_large")
    return [_media_ref(r, f"{field}[{j}]", resolver) for j, r in enumerate(refs)]


def _conversation(messages: Any, media: list, field: str, limits: Limits, resolver: MediaResolver):
    """Messages (str content or content parts) + external media -> (plain messages, media)."""
    try:
        msgs, items = flatten_messages(messages, resolver, external=media)
    except PartsError as exc:
        raise bad(field, str(exc)) from None
    if len(items) > limits.max_media:
        raise RequestError(413, f"{field}: {len(items)} media items, over the limit of {limits.max_media} per item",
                           field, kind="request_too_large")
    return msgs, items


def _messages_from_text(text: Any, prompt: Any, field: str) -> list[dict]:
    if not isinstance(text, str):
        raise bad(field, f"must be a string (the policy's decoded prompt + response), got {type(text).__name__}")
    try:
        return parse_chat(text)
    except ChatParseError as exc:
        # A policy without a chat template: the prompt is the user turn and the rest of the query the reply.
        if isinstance(prompt, str) and prompt and text.startswith(prompt) and "no InternLM2 chat markers" in str(exc):
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": text[len(prompt):]}]
        raise bad(field, str(exc)) from None


# --- endpoints --------------------------------------------------------------------------------------------------------
def parse_get_reward(body: Mapping, limits: Limits) -> list[Sample]:
    """OpenRLHF: {"query": [str], "prompts"?: [str], "labels"?: [...], "images"?: [[ref]]}."""
    queries = _list(body, "query")
    _check_count("query", len(queries), limits)
    prompts = _list(body, "prompts", required=False)
    images = _list(body, "images", required=False)
    for key, value in (("prompts", prompts), ("images", images)):
        if value is not None and len(value) != len(queries):
            raise bad(key, f"has {len(value)} entries but query has {len(queries)}")
    resolver = limits.resolver()
    samples = []
    for i, q in enumerate(queries):
        messages = _messages_from_text(q, prompts[i] if prompts else None, f"query[{i}]")
        media = _media_list(images[i], f"images[{i}]", limits, resolver) if images else []
        samples.append(Sample(messages, media, id=i))
    return samples


def parse_pooling(body: Mapping, limits: Limits) -> tuple[list[Sample], str]:
    """vLLM pooling: {"model"?, "messages": [OpenAI messages]} (one sample) or {"input": str | [str]}. Returns the
    samples and the field they came from."""
    model = body.get("model")
    if model is not None and limits.model_names and model not in limits.model_names:
        raise RequestError(404, f"The model `{model}` does not exist (this server serves {limits.model_names[0]!r})",
                           "model", kind="NotFoundError")
    has_msgs, has_input = body.get("messages") is not None, body.get("input") is not None
    if has_msgs == has_input:
        raise bad("messages" if has_msgs else None, "give exactly one of 'messages' (chat) or 'input' (text)")
    resolver = limits.resolver()
    if has_msgs:
        messages = _list(body, "messages")
        msgs, media = _conversation(messages, [], "messages", limits, resolver)
        return [Sample(msgs, media, id=0)], "messages"
    inputs = body["input"]
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list):
        raise bad("input", f"must be a string or a list of strings, got {type(inputs).__name__}")
    if inputs and not isinstance(inputs[0], str):
        raise bad("input[0]", "token-id inputs are not supported: send the decoded chat text")
    _check_count("input", len(inputs), limits)
    return [Sample(_messages_from_text(t, None, f"input[{i}]"), [], id=i) for i, t in enumerate(inputs)], "input"


def parse_score(body: Mapping, limits: Limits) -> tuple[list[Sample | RequestError], int]:
    """Native batch: {"conversations": [[messages]], "images"?: [[ref]], "hd_num"?}. A bad conversation is a per-item
    error (the RequestError in its place), the request's own shape a 400."""
    convs = _list(body, "conversations")
    _check_count("conversations", len(convs), limits)
    images = _list(body, "images", required=False)
    if images is not None and len(images) != len(convs):
        raise bad("images", f"has {len(images)} entries but conversations has {len(convs)}")
    hd = _hd_num(body, limits)
    resolver = limits.resolver()
    out: list[Sample | RequestError] = []
    for i, conv in enumerate(convs):
        try:
            media = _media_list(images[i], f"images[{i}]", limits, resolver) if images else []
            msgs, media = _conversation(conv, media, f"conversations[{i}]", limits, resolver)
            out.append(Sample(msgs, media, id=i))
        except RequestError as exc:
            if exc.status == 413:
                raise
            out.append(exc)
    return out, hd


def parse_best_of_n(body: Mapping, limits: Limits) -> tuple[list[Sample], int]:
    """{"messages": [...], "candidates": [str], "images"?: [ref], "hd_num"?} -> one sample per candidate."""
    messages = _list(body, "messages")
    cands = _list(body, "candidates")
    if not cands:
        raise bad("candidates", "needs at least one candidate")
    _check_count("candidates", len(cands), limits)
    for j, c in enumerate(cands):
        if not isinstance(c, str):
            raise bad(f"candidates[{j}]", f"must be a string (one assistant reply), got {type(c).__name__}")
    hd = _hd_num(body, limits)
    resolver = limits.resolver()
    media = _media_list(body.get("images"), "images", limits, resolver)
    msgs, media = _conversation(messages, media, "messages", limits, resolver)
    return [Sample([*msgs, {"role": "assistant", "content": c}], list(media), id=j) for j, c in enumerate(cands)], hd
