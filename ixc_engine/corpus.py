"""Corpus JSONL reading (one sample per line, media relative to the file) and resumable, ordered result writing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ixc_engine.engine.sequence import Sample, SampleError
from ixc_engine.formats.parts import MediaResolver, PartsError, flatten_messages


class LineError(SampleError):
    """A corpus line that is not a valid sample; carries the id when one could be read."""

    def __init__(self, message: str, sample_id=None) -> None:
        super().__init__(message)
        self.sample_id = sample_id


def parse_line(text: str, line_no: int, base_dir: Path) -> Sample:
    """One corpus line -> Sample. Raises LineError naming what is wrong."""
    text = text.rstrip("\r\n")  # so that a JSON error's column counts characters of the line itself
    if line_no == 1:
        text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark, as some editors write
    if not text.strip():
        raise LineError("empty line")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:  # json.loads on absurdly deep nesting
        raise LineError("invalid JSON: nested too deeply to decode") from None
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {type(obj).__name__}")
    sid = obj.get("id", line_no)
    messages = obj.get("messages", obj.get("conversation"))
    if messages is None and "conversations" in obj:  # a LLaVA / ShareGPT record
        from ixc_engine.formats.records import default_resolver, parse_record

        return parse_record(obj, line_no, default_resolver(base_dir))
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
    try:  # OpenAI / HF content parts -> str content, their media in order (ixc_engine/formats/parts.py)
        from ixc_engine.formats.records import media_cell  # a part's payload may be an HF {"bytes", "path"} cell

        resolver = MediaResolver(base_dir=base_dir)
        messages, media = flatten_messages(messages, lambda r, k: media_cell(r, k, resolver, "payload"), media)
    except PartsError as exc:
        raise LineError(str(exc), sid) from None
    return Sample(messages, media, id=sid)


def read_corpus(
    path: str | Path, *, start_line: int = 1, shard: tuple[int, int] = (0, 1), base_dir: str | Path | None = None
) -> Iterator[tuple[int, Sample | LineError]]:
    """(line number, Sample or LineError) for each line from `start_line` that belongs to shard (i, n); media paths
    are relative to base_dir (default: the file's folder)."""
    path = Path(path)
    base = Path(base_dir).resolve() if base_dir is not None else path.resolve().parent
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


def job_path_for(scores_path: str | Path) -> Path:
    """The job description beside a scores file: what was scored, with which settings, and whether it finished."""
    p = Path(scores_path)
    return p.with_name(p.name.removesuffix(".jsonl") + ".job.json")


def same_file(a: str | Path, b: str | Path) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _check_record(rec, path: Path, k: int, kind: str) -> dict:
    """A line of a scores ("score") or errors ("error") file written by `ixc-engine score`, or a clear error."""
    if not isinstance(rec, dict) or not isinstance(rec.get("line"), int) or kind not in rec:
        raise ValueError(f"{path}:{k}: not a {kind} record written by `ixc-engine score` (need 'line' and '{kind}')")
    return rec


def read_records(path: str | Path, kind: str, *, trim: bool = False, with_lines: bool = False) -> list:
    """Validated records of a scores (kind "score") or errors ("error") file; [] when it does not exist.

    A torn last line (a job killed mid-write) is ignored, and with trim=True also cut off the file so that a resumed
    job appends after the last complete record. with_lines=True gives (record, the line's text) pairs.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if trim and keep != len(data):
        with open(path, "r+b") as fh:
            fh.truncate(keep)
    records = []
    for k, raw in enumerate(data[:keep].split(b"\n")[:-1], 1):
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}:{k}: not a {kind} record written by `ixc-engine score` (not valid JSON: "
                             f"{raw[:60]!r})") from None
        rec = _check_record(rec, path, k, kind)
        records.append((rec, raw.decode("utf-8") + "\n") if with_lines else rec)
    return records


def check_not_foreign(path: Path, kind: str) -> None:
    """Refuse to append to or delete a file that `ixc-engine score` did not write (e.g. -o naming the corpus)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb") as fh:
        first = fh.readline()
    try:
        _check_record(json.loads(first), path, 1, kind)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} exists and was not written by `ixc-engine score` (its first line is not a {kind} "
                         "record); refusing to touch it: remove it or choose another -o") from None


@dataclass(slots=True)
class JobManifest:
    """What a scores file holds: written when a job starts, marked complete when it ends (see `job_path_for`)."""

    corpus: str
    model: str
    hd_num: int
    max_length: int | None
    shard: tuple[int, int]
    lines: int  # corpus lines of this shard
    dtype: str | None = None
    complete: bool = False
    scored: int = 0
    errors: int = 0

    IDENTITY = ("corpus", "model", "hd_num", "max_length", "shard")

    @classmethod
    def load(cls, path: str | Path) -> JobManifest | None:
        path = Path(path)
        if not path.exists():
            return None
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            d["shard"] = tuple(d["shard"])
            return cls(**d)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{path}: unreadable job description ({exc}); remove it or use --restart") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        d = {name: getattr(self, name) for name in self.__dataclass_fields__}
        d["shard"] = list(self.shard)
        tmp.write_text(json.dumps(d, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def differences(self, other: JobManifest) -> list[str]:
        return [f"{name}: {getattr(self, name)!r} then, {getattr(other, name)!r} now" for name in self.IDENTITY
                if getattr(self, name) != getattr(other, name)]


@dataclass(slots=True)
class ResultWriter:
    """Appends score and error records in input order; `done_lines()` tells a resumed job where to continue."""

    scores_path: Path
    errors_path: Path
    _scores: object = None
    _errors: object = None

    @classmethod
    def open(cls, scores_path: str | Path, *, resume: bool) -> tuple[ResultWriter, dict[int, object]]:
        """The writer and, when resuming, {line: id} of the lines already written (scores and errors)."""
        scores_path = Path(scores_path)
        errors_path = errors_path_for(scores_path)
        check_not_foreign(scores_path, "score")
        check_not_foreign(errors_path, "error")
        done: dict[int, object] = {}
        if resume:
            for rec in read_records(scores_path, "score", trim=True) + read_records(errors_path, "error", trim=True):
                done[rec["line"]] = rec.get("id")
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
