"""Corpus JSONL reading (one sample per line, media relative to the file) and resumable, ordered result writing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ixc_engine.engine.sequence import Sample, SampleError


class LineError(SampleError):
    """A corpus line that is not a valid sample; carries the id when one could be read."""

    def __init__(self, message: str, sample_id=None) -> None:
        super().__init__(message)
        self.sample_id = sample_id


def parse_line(text: str, line_no: int, base_dir: Path) -> Sample:
    """One corpus line -> Sample. Raises LineError naming what is wrong."""
    if not text.strip():
        raise LineError("empty line")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {type(obj).__name__}")
    sid = obj.get("id", line_no)
    messages = obj.get("messages", obj.get("conversation"))
    if messages is None:
        raise LineError("missing field 'messages' (or its alias 'conversation')", sid)
    if not isinstance(messages, list):
        raise LineError(f"'messages' must be a list of {{role, content}} objects, got {type(messages).__name__}", sid)
    images = obj.get("images", [])
    if images is None:
        images = []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise LineError("'images' must be a list of file paths", sid)
    media = [str(p if os.path.isabs(p) else base_dir / p) for p in images]
    return Sample(messages, media, id=sid)


def read_corpus(
    path: str | Path, *, start_line: int = 1, shard: tuple[int, int] = (0, 1)
) -> Iterator[tuple[int, Sample | LineError]]:
    """(line number, Sample or LineError) for each line from `start_line` that belongs to shard (i, n)."""
    path = Path(path)
    base = path.resolve().parent
    index, count = shard
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if line_no < start_line or (line_no - 1) % count != index:
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield line_no, LineError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            try:
                yield line_no, parse_line(text, line_no, base)
            except LineError as exc:
                yield line_no, exc


def count_lines(path: str | Path) -> int:
    n = 0
    last = b"\n"
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def errors_path_for(scores_path: str | Path) -> Path:
    p = Path(scores_path)
    name = p.name.removesuffix(".jsonl")
    return p.with_name(name + ".errors.jsonl")


def _trim_partial_line(path: Path) -> list[dict]:
    """Records of complete lines; a torn last line (killed mid-write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with open(path, "r+b") as fh:
            fh.truncate(keep)
    records = []
    for raw in data[:keep].splitlines():
        try:
            records.append(json.loads(raw))
        except json.JSONDecodeError:
            raise ValueError(f"{path}: cannot resume, a line is not valid JSON: {raw[:80]!r}") from None
    return records


@dataclass(slots=True)
class ResultWriter:
    """Appends score and error records in input order; `done_lines()` tells a resumed job where to continue."""

    scores_path: Path
    errors_path: Path
    _scores: object = None
    _errors: object = None

    @classmethod
    def open(cls, scores_path: str | Path, *, resume: bool) -> tuple[ResultWriter, set[int]]:
        scores_path = Path(scores_path)
        errors_path = errors_path_for(scores_path)
        done: set[int] = set()
        if resume:
            for rec in _trim_partial_line(scores_path) + _trim_partial_line(errors_path):
                done.add(int(rec["line"]))
        else:
            for p in (scores_path, errors_path):
                if p.exists():
                    p.unlink()
        scores_path.parent.mkdir(parents=True, exist_ok=True)
        w = cls(scores_path, errors_path)
        w._scores = open(scores_path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        w._errors = open(errors_path, "a", encoding="utf-8")  # noqa: SIM115
        return w, done

    def write_score(self, line: int, sid, score: float, n_tokens: int) -> None:
        self._scores.write(json.dumps({"id": sid, "score": score, "n_tokens": n_tokens, "line": line}) + "\n")

    def write_error(self, line: int, sid, reason: str) -> None:
        self._errors.write(json.dumps({"id": sid, "line": line, "error": reason}, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        for fh in (self._scores, self._errors):
            fh.flush()
            os.fsync(fh.fileno())

    def close(self) -> None:
        self.flush()
        self._scores.close()
        self._errors.close()
