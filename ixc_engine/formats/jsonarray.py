"""A JSON array of records (LLaVA's one-big-file form), streamed: memory bounded by the largest record, not the file.

The top-level array is split into its elements by a byte scanner that follows strings and bracket depth only (each
element's exact byte span is kept, so that `filter` can copy a record's original text); each element is then
decoded on its own with `json.loads`. A malformed element (bad literal, trailing comma inside it, invalid UTF-8) is
an error for that record alone, as long as its brackets balance. Text that cannot be split into elements any more
(junk between elements, an unterminated string or bracket at the end of the file) ends the array with one error
record that says where; nothing after it is read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 18  # bytes read at a time; the window holds about two of these plus the current record
_WS = b" \t\r\n"
_STRUCT = re.compile(rb'["\[\]{}]')  # what changes the scanner's state outside strings
_STRING_END = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # after an opening quote, up to its closing one
_SCALAR_END = re.compile(rb"[,\]\s]")


@dataclass(frozen=True, slots=True)
class Span:
    """One element of the array: its 1-based index, byte offsets [start, end) in the file and its bytes; `error` when
    the array cannot be split past this point (the bytes are then what is left of the file, possibly nothing)."""

    index: int
    start: int
    end: int
    data: bytes
    error: str | None = None


class JsonArrayError(ValueError):
    """The file is not a JSON array at all (checked on its first bytes)."""


class _Reader:
    """A window over the file: `buf` holds file bytes from offset `base`; read on demand, trimmed now and then."""

    def __init__(self, fh) -> None:
        self.fh, self.buf, self.base, self.eof = fh, b"", 0, False

    def more(self) -> bool:
        if self.eof:
            return False
        chunk = self.fh.read(_CHUNK)
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def trim(self, pos: int) -> int:
        """Forget the bytes before buf[pos] once there are many of them; returns pos in the new buffer."""
        if pos < _CHUNK:
            return pos
        self.buf = self.buf[pos:]
        self.base += pos
        return 0

    def skip_ws(self, pos: int) -> int:
        while True:
            n = len(self.buf)
            while pos < n and self.buf[pos] in _WS:
                pos += 1
            if pos < n or not self.more():
                return pos


def iter_spans(path: str | Path) -> Iterator[Span]:
    """The elements of the top-level JSON array in `path`, in order. Raises JsonArrayError when it is not one."""
    with open(path, "rb") as fh:
        r = _Reader(fh)
        r.more()
        pos = 3 if r.buf.startswith(b"\xef\xbb\xbf") else 0  # UTF-8 byte order mark
        pos = r.skip_ws(pos)
        if r.buf[pos:pos + 1] != b"[":
            head = r.buf[pos:pos + 20]
            raise JsonArrayError(f"{path} is not a JSON array (it starts with {head!r}; expected '[')")
        pos = r.skip_ws(pos + 1)
        if pos >= len(r.buf):  # "[" and nothing after it: one record saying so, not an empty element before it
            yield Span(1, r.base + pos, r.base + pos, b"",
                       "invalid JSON array: the file ends before the array's closing ']'")
            return
        if r.buf[pos:pos + 1] == b"]":
            rest = r.skip_ws(pos + 1)
            if rest < len(r.buf):
                yield Span(1, r.base + rest, r.base + len(r.buf), r.buf[rest:],
                           f"invalid JSON array: text after the closing ']' at byte {r.base + rest}")
            return
        index = 0
        no_comma = None  # byte offset of a missing ',' before this element
        while True:
            index += 1
            pos = r.trim(pos)
            end, err = _element_end(r, pos)
            if err is not None:
                yield Span(index, r.base + pos, r.base + len(r.buf), r.buf[pos:], f"invalid JSON array: {err}")
                return
            if no_comma is not None:  # only this element is lost: the scan goes on after it
                yield Span(index, r.base + pos, r.base + end, r.buf[pos:end],
                           f"invalid JSON array: missing ',' between records {index - 1} and {index} at byte "
                           f"{no_comma}")
                no_comma = None
            else:
                yield Span(index, r.base + pos, r.base + end, r.buf[pos:end])
            pos = r.skip_ws(end)
            sep = r.buf[pos:pos + 1]
            if sep == b",":
                pos = r.skip_ws(pos + 1)
                if r.buf[pos:pos + 1] == b"]":  # a trailing comma before the end: refused, as JSON does
                    yield Span(index + 1, r.base + pos, r.base + pos, b"",
                               f"invalid JSON array: trailing ',' before ']' at byte {r.base + pos}")
                    return
                if pos >= len(r.buf):
                    yield Span(index + 1, r.base + pos, r.base + pos, b"",
                               "invalid JSON array: the file ends before the array's closing ']'")
                    return
                continue
            if sep == b"]":
                rest = r.skip_ws(pos + 1)
                if rest < len(r.buf):
                    yield Span(index + 1, r.base + rest, r.base + len(r.buf), r.buf[rest:],
                               f"invalid JSON array: text after the closing ']' at byte {r.base + rest}")
                return
            if sep in (b"{", b"["):  # a missing comma between two objects (or arrays): that record is an error
                no_comma = r.base + pos
                continue
            msg = "the file ends before the array's closing ']'" if not sep else \
                f"expected ',' or ']' after record {index} at byte {r.base + pos}, found {sep!r}"
            yield Span(index + 1, r.base + pos, r.base + len(r.buf), r.buf[pos:], f"invalid JSON array: {msg}")
            return


def _element_end(r: _Reader, start: int) -> tuple[int, str | None]:
    """End offset (exclusive) in r.buf of the element starting at r.buf[start], or an error when there is none."""
    first = r.buf[start:start + 1]
    if first not in (b"{", b"[", b'"'):
        while True:  # a scalar: up to the next separator
            m = _SCALAR_END.search(r.buf, start)
            if m:
                return m.start(), None
            if not r.more():
                return len(r.buf), None
    depth, pos = 0, start
    while True:
        m = _STRUCT.search(r.buf, pos)
        if m is None:
            pos = len(r.buf)
            if not r.more():
                return 0, f"the file ends inside record starting at byte {r.base + start} (unbalanced brackets)"
            continue
        c, pos = m.group(), m.end()
        if c == b'"':
            while True:
                s = _STRING_END.match(r.buf, pos)
                if s is not None:
                    pos = s.end()
                    break
                if not r.more():
                    return 0, f"the file ends inside a string of the record starting at byte {r.base + start}"
            if depth == 0:
                return pos, None
        elif c in b"{[":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return pos, None
            if depth < 0:
                return 0, f"unbalanced {c.decode()!r} at byte {r.base + pos - 1}"


def decode_span(span: Span):
    """The element's value, or raises ValueError with a reason fit for an error record."""
    if span.error is not None:
        raise ValueError(span.error)
    try:
        text = span.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 ({exc.reason} at byte {span.start + exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} at character {exc.pos + 1} of the record (which starts at byte "
                         f"{span.start} of the file)") from None
    except RecursionError:  # json.loads on absurdly deep nesting
        raise ValueError(f"invalid JSON: the record (which starts at byte {span.start} of the file) is nested too "
                         "deeply to decode") from None


def count_elements(path: str | Path) -> int:
    """Number of records `iter_spans` yields (error records included)."""
    return sum(1 for _ in iter_spans(path))


def sniff_json_array(path: str | Path) -> bool:
    """Whether the file's first non-blank byte is '[' (a JSON array, not JSON Lines)."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    head = head.removeprefix(b"\xef\xbb\xbf").lstrip(_WS)
    return head[:1] == b"["
