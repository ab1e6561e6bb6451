"""`open_corpus`: one reader interface over JSONL, JSON arrays and Parquet, chosen by extension and content.

Every source yields the same ``(record index, Sample | LineError)`` stream as `corpus.read_corpus` (the index is the
line number for JSONL and the 1-based position for a JSON array or a Parquet file), counts its records, hands out
each record's decoded object (for the report) and its original form (for `filter`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ixc_engine.corpus import LineError
from ixc_engine.engine.sequence import Sample
from ixc_engine.formats import FORMATS

PARQUET_EXTENSIONS = (".parquet", ".pq")
JSONL_EXTENSIONS = (".jsonl", ".ndjson")


def detect_format(path: str | Path, format: str | None = None) -> str:
    """"jsonl", "json" (a JSON array) or "parquet". `format` overrides the guess; "llava" means a LLaVA / ShareGPT
    file, a JSON array or JSON Lines by its content (the records' form is recognised per record anyway)."""
    from ixc_engine.formats.jsonarray import sniff_json_array

    path = Path(path)
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown corpus format {format!r}; known: {', '.join(FORMATS)}")
    if format == "parquet":
        return "parquet"
    if format == "jsonl":
        return "jsonl"
    if format == "json":
        return "json"
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if format is None and (path.suffix.lower() in PARQUET_EXTENSIONS or magic == b"PAR1"):
        return "parquet"
    if format is None and path.suffix.lower() in JSONL_EXTENSIONS:
        return "jsonl"
    return "json" if sniff_json_array(path) else "jsonl"  # .json, llava and unknown extensions: by content


@dataclass(slots=True)
class CorpusSource:
    """A corpus file and how to read it. `media_root`: where relative media paths start (default: its folder)."""

    path: Path
    format: str
    media_root: Path

    def count(self) -> int:
        """Records in the file: lines (JSONL), array elements (JSON) or rows (Parquet)."""
        if self.format == "jsonl":
            from ixc_engine.corpus import count_lines

            return count_lines(self.path)
        if self.format == "json":
            from ixc_engine.formats.jsonarray import count_elements

            return count_elements(self.path)
        from ixc_engine.formats.parquet import count_rows

        return count_rows(self.path)

    def records(self, *, start: int = 1, shard: tuple[int, int] = (0, 1)
                ) -> Iterator[tuple[int, Sample | LineError]]:
        """(record index, Sample or LineError) for each record from `start` that belongs to shard (i, n):
        records with (index - 1) % n == i."""
        if self.format == "jsonl":
            from ixc_engine.corpus import read_corpus

            yield from read_corpus(self.path, start_line=start, shard=shard, base_dir=self.media_root)
            return
        from ixc_engine.formats.records import default_resolver, parse_record

        resolver = default_resolver(self.media_root)
        i, n = shard
        for index, obj in self._objects(start, lambda k: (k - 1) % n == i):
            if isinstance(obj, LineError):
                yield index, obj
                continue
            try:
                yield index, parse_record(obj, index, resolver)
            except LineError as exc:
                yield index, exc

    def objects(self, *, wanted=None) -> Iterator[tuple[int, object]]:
        """(record index, the decoded record) for every record (or those where wanted(index) is true); a record that
        cannot be decoded comes as a LineError."""
        if self.format == "jsonl":
            yield from _jsonl_objects(self.path, wanted)
            return
        yield from self._objects(1, wanted, decode=False)

    def _objects(self, start: int, wanted, decode: bool = True) -> Iterator[tuple[int, object]]:
        if self.format == "json":
            from ixc_engine.formats.jsonarray import decode_span, iter_spans

            for span in iter_spans(self.path):
                if span.index < start or (wanted is not None and not wanted(span.index)):
                    continue
                try:
                    yield span.index, decode_span(span)
                except ValueError as exc:
                    yield span.index, LineError(str(exc))
        elif self.format == "parquet":
            from ixc_engine.formats.parquet import iter_rows

            yield from iter_rows(self.path, start=start, wanted=wanted, decode_json=decode)
        else:
            raise AssertionError(self.format)


def _jsonl_objects(path: Path, wanted) -> Iterator[tuple[int, object]]:
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if wanted is not None and not wanted(line_no):
                continue
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
                if line_no == 1:
                    text = text.removeprefix("\ufeff")
                yield line_no, json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                yield line_no, LineError(f"not a JSON line ({exc})")
            except RecursionError:
                yield line_no, LineError("not a JSON line (nested too deeply to decode)")


def open_corpus(path: str | Path, format: str | None = None, media_root: str | Path | None = None) -> CorpusSource:
    """The corpus at `path` with its format (`format` overrides the guess from extension and content)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"corpus {path} not found")
    fmt = detect_format(path, format)
    root = Path(media_root).resolve() if media_root is not None else path.resolve().parent
    if media_root is not None and not root.is_dir():
        raise ValueError(f"--media-root {media_root} is not a directory")
    if fmt == "json":
        from ixc_engine.formats.jsonarray import iter_spans

        spans = iter_spans(path)
        next(spans, None)  # not an array: a clear error now, not at the first record
        spans.close()
    return CorpusSource(path, fmt, root)
