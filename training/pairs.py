"""Preference pairs: loading from JSONL and the length-constraint filter.

Two line forms are accepted (one JSON object per line, blank lines ignored):

* native: ``{"id", "messages", "chosen", "rejected", "images"}`` where ``messages`` is the shared prompt (a list of
  ``{role, content}``), ``chosen`` / ``rejected`` are the two final assistant replies and ``images`` (optional,
  default ``[]``) lists media paths (images or videos);
* upstream-style: ``{"conversations_a", "conversations_b", "preference": "a" | "b", "images", "id"}`` where both
  conversations are full message lists that agree on every message before a final assistant reply; the preferred
  one's reply becomes ``chosen``. ``id`` is optional here (default ``"<file name>:<line>"``).

Media paths are resolved relative to the JSONL file's directory.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from ..template import check_placeholders, validate_messages
from ..tokenizer import IMAGE_PLACEHOLDER


@dataclass(slots=True)
class PreferencePair:
    id: str
    messages: list[dict[str, str]]  # the shared prompt; never ends with an assistant message
    chosen: str
    rejected: str
    images: list[str] = field(default_factory=list)


class PairError(ValueError):
    """One bad JSONL line: where it is, which pair, and why."""

    def __init__(self, path: str, line: int, pair_id: str | None, reason: str):
        self.path = path
        self.line = line
        self.pair_id = pair_id
        self.reason = reason
        where = f"{path}:{line}"
        if pair_id is not None:
            where += f" (id {pair_id!r})"
        super().__init__(f"{where}: {reason}")


class _BadLine(Exception):
    """Internal: a reason found while parsing one line (wrapped into PairError with the location)."""


def _check_messages(value: Any, name: str) -> list[dict[str, str]]:
    try:
        return validate_messages(value)
    except ValueError as exc:
        raise _BadLine(f"{name!r}: {exc}") from None


def _check_reply(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _BadLine(f"{name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _BadLine(f"{name!r} reply is empty")
    if IMAGE_PLACEHOLDER in value:
        raise _BadLine(f"{name!r} reply contains {IMAGE_PLACEHOLDER}; media belong in the shared prompt")
    return value


def _check_id(value: Any) -> str:
    # bool is an int subclass; an id of `true` is almost certainly a data bug
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _BadLine(f"'id' must be a string or an integer, got {type(value).__name__}")
    text = str(value)
    if not text:
        raise _BadLine("'id' is empty")
    return text


def _check_images(obj: dict, base_dir: str, check_media: bool) -> list[str]:
    images = obj.get("images", [])
    if images is None:
        images = []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise _BadLine("'images' must be a list of path strings")
    resolved = []
    for p in images:
        if not p:
            raise _BadLine("'images' holds an empty path")
        full = p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))
        if check_media and not os.path.isfile(full):
            raise _BadLine(f"media file not found: {full}")
        resolved.append(full)
    return resolved


def _check_placeholders(messages: list[dict[str, str]], n_media: int) -> None:
    try:
        check_placeholders(sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages), n_media)
    except ValueError as exc:
        raise _BadLine(f"prompt: {exc}") from None


def _parse_native(obj: dict) -> tuple[list[dict[str, str]], str, str]:
    missing = [k for k in ("messages", "chosen", "rejected") if k not in obj]
    if missing:
        raise _BadLine(f"missing field(s): {', '.join(missing)}")
    messages = _check_messages(obj["messages"], "messages")
    if messages[-1]["role"] == "assistant":
        raise _BadLine("'messages' (the shared prompt) must not end with an assistant message")
    return messages, _check_reply(obj["chosen"], "chosen"), _check_reply(obj["rejected"], "rejected")


def _parse_upstream(obj: dict) -> tuple[list[dict[str, str]], str, str]:
    missing = [k for k in ("conversations_a", "conversations_b", "preference") if k not in obj]
    if missing:
        raise _BadLine(f"missing field(s): {', '.join(missing)}")
    conv = {s: _check_messages(obj[f"conversations_{s}"], f"conversations_{s}") for s in "ab"}
    pref = obj["preference"]
    if not isinstance(pref, str) or pref.strip().lower() not in ("a", "b"):
        raise _BadLine(f"'preference' must be 'a' or 'b', got {pref!r}")
    for s in "ab":
        if conv[s][-1]["role"] != "assistant":
            raise _BadLine(f"conversations_{s} must end with an assistant reply, ends with {conv[s][-1]['role']!r}")
        if len(conv[s]) < 2:
            raise _BadLine(f"conversations_{s} has no prompt before its assistant reply")
    if len(conv["a"]) != len(conv["b"]):
        raise _BadLine(
            f"conversations_a and conversations_b differ in length ({len(conv['a'])} vs {len(conv['b'])}); "
            "they must share every message before the final assistant reply"
        )
    for i, (ma, mb) in enumerate(zip(conv["a"][:-1], conv["b"][:-1])):
        if ma != mb:
            raise _BadLine(f"conversations_a and conversations_b differ at message {i}, before the final reply")
    prompt = conv["a"][:-1]
    if prompt[-1]["role"] == "assistant":
        raise _BadLine("the shared prompt must not end with an assistant message")
    win = pref.strip().lower()
    lose = "b" if win == "a" else "a"
    chosen = _check_reply(conv[win][-1]["content"], f"conversations_{win} reply")
    rejected = _check_reply(conv[lose][-1]["content"], f"conversations_{lose} reply")
    return prompt, chosen, rejected


def _parse_line(raw: bytes, lineno: int, path: str, base_dir: str, check_media: bool) -> PreferencePair:
    pair_id = None
    try:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _BadLine(f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
        try:
            obj = json.loads(text.rstrip("\r\n"))  # the column then counts characters of the line itself
        except json.JSONDecodeError as e:
            raise _BadLine(f"invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise _BadLine(f"a line must hold a JSON object, got {type(obj).__name__}")
        upstream = "conversations_a" in obj or "conversations_b" in obj
        if "id" in obj:
            pair_id = _check_id(obj["id"])
        elif upstream:
            pair_id = f"{os.path.basename(path)}:{lineno}"
        else:
            raise _BadLine("missing field(s): id")
        messages, chosen, rejected = _parse_upstream(obj) if upstream else _parse_native(obj)
        if chosen == rejected:
            raise _BadLine("chosen and rejected replies are identical")
        images = _check_images(obj, base_dir, check_media)
        _check_placeholders(messages, len(images))
    except _BadLine as e:
        raise PairError(path, lineno, pair_id, str(e)) from None
    return PreferencePair(id=pair_id, messages=messages, chosen=chosen, rejected=rejected, images=images)


@overload
def load_pairs(
    path: str | os.PathLike, *, on_error: Literal["raise"] = "raise", check_media: bool = True
) -> list[PreferencePair]: ...


@overload
def load_pairs(
    path: str | os.PathLike, *, on_error: Literal["collect"], check_media: bool = True
) -> tuple[list[PreferencePair], list[PairError]]: ...


def load_pairs(path, *, on_error="raise", check_media=True):
    """Read preference pairs from a JSONL file (see the module docstring for the two accepted forms).

    on_error="raise": the first bad line raises its PairError. on_error="collect": every bad line becomes a
    PairError in the returned ``(pairs, errors)``; good lines are still returned. check_media: require every media
    path to name an existing file. Duplicate ids are errors (the second occurrence is reported).
    """
    if on_error not in ("raise", "collect"):
        raise ValueError(f"on_error must be 'raise' or 'collect', got {on_error!r}")
    path = os.fspath(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    pairs: list[PreferencePair] = []
    errors: list[PairError] = []
    first_line: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                pair = _parse_line(raw, lineno, path, base_dir, check_media)
                if pair.id in first_line:
                    raise PairError(path, lineno, pair.id, f"duplicate id (first seen on line {first_line[pair.id]})")
            except PairError as e:
                if on_error == "raise":
                    raise
                errors.append(e)
                continue
            first_line[pair.id] = lineno
            pairs.append(pair)
    return (pairs, errors) if on_error == "collect" else pairs


@dataclass(slots=True)
class LengthFilterReport:
    """What `length_filter` removed. Ratios are chosen/rejected reply lengths in tokens, over ALL input pairs."""

    max_ratio: float
    total: int
    removed: int
    removed_ids: list[str]
    ratio_min: float | None
    ratio_median: float | None
    ratio_max: float | None

    @property
    def kept(self) -> int:
        return self.total - self.removed

    def __str__(self) -> str:
        pct = 100.0 * self.removed / self.total if self.total else 0.0
        head = (
            f"length filter (keep chosen/rejected token ratio <= {self.max_ratio:g}): "
            f"removed {self.removed} of {self.total} pairs ({pct:.1f}%), kept {self.kept}"
        )
        lines = [head]
        if self.total:
            lines.append(
                f"  ratio before filtering: min {self.ratio_min:.3g}, median {self.ratio_median:.3g}, "
                f"max {self.ratio_max:.3g}"
            )
        if self.removed_ids:
            shown = ", ".join(self.removed_ids[:20])
            more = f" ... (+{len(self.removed_ids) - 20} more)" if len(self.removed_ids) > 20 else ""
            lines.append(f"  removed ids: {shown}{more}")
        return "\n".join(lines)


def _token_count(count_tokens: Callable[[str], int], text: str, pair_id: str, which: str) -> int:
    n = count_tokens(text)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"count_tokens returned {n!r} for the {which} reply of pair {pair_id!r}; need an int >= 0")
    return n


def length_filter(
    pairs: Sequence[PreferencePair], count_tokens: Callable[[str], int], max_ratio: float
) -> tuple[list[PreferencePair], LengthFilterReport]:
    """Drop pairs whose chosen reply is more than ``max_ratio`` times as long (in tokens) as the rejected one.

    ratio = n_tokens(chosen) / n_tokens(rejected); a pair is kept iff ratio <= max_ratio (a pair exactly at the
    threshold is kept). A rejected reply of 0 tokens gives ratio inf (or 1 when the chosen one is empty too).
    ``max_ratio=math.inf`` keeps everything and only reports. Order of the kept pairs is preserved.
    """
    if isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float)) or not max_ratio > 0:
        raise ValueError(f"max_ratio must be a number > 0, got {max_ratio!r}")
    kept: list[PreferencePair] = []
    removed_ids: list[str] = []
    ratios: list[float] = []
    for pair in pairs:
        n_c = _token_count(count_tokens, pair.chosen, pair.id, "chosen")
        n_r = _token_count(count_tokens, pair.rejected, pair.id, "rejected")
        ratio = n_c / n_r if n_r else (math.inf if n_c else 1.0)
        ratios.append(ratio)
        if ratio <= max_ratio:
            kept.append(pair)
        else:
            removed_ids.append(pair.id)
    report = LengthFilterReport(
        max_ratio=float(max_ratio),
        total=len(ratios),
        removed=len(removed_ids),
        removed_ids=removed_ids,
        ratio_min=min(ratios) if ratios else None,
        ratio_median=statistics.median(ratios) if ratios else None,
        ratio_max=max(ratios) if ratios else None,
    )
    return kept, report
