"""Corpus JSONL reading (one sample per line, media relative to the file) and resumable, ordered result writing."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ixc_engine.engine.sequence import Sample, SampleError
from ixc_engine.formats.parts import MediaResolver, PartsError, flatten_messages
from ixc_engine.joblock import JobLock, lock_path_for  # noqa: F401 (re-exported)


class LineError(SampleError):
    """A corpus line that is not a valid sample; carries the id when one could be read."""

    def __init__(self, message: str, sample_id=None) -> None:
        super().__init__(message)
        self.sample_id = sample_id


# Keys that hold media in other corpus formats (or by a typo); `score` reads media from "images" only.
_MEDIA_LIKE_KEY = re.compile(r"image|img|video|picture|photo|media|frame|visual", re.IGNORECASE)
_KNOWN_KEYS = frozenset({"id", "messages", "conversation", "images"})


def _unencodable(text: str) -> int | None:
    """Index of the first lone UTF-16 surrogate in text (valid JSON, not valid Unicode text), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def check_id(sid) -> None:
    """An id must be written back as strict JSON and compared on resume: a str, an int or null (LineError if not)."""
    if sid is None or (isinstance(sid, int) and not isinstance(sid, bool)):
        return
    if isinstance(sid, str):
        if (pos := _unencodable(sid)) is not None:
            raise LineError(f"'id' holds a lone UTF-16 surrogate at character {pos} (not valid Unicode text): "
                            f"{ascii(sid)[:80]}")
        return
    if isinstance(sid, float) and not math.isfinite(sid):
        raise LineError(f"'id' is {sid!r}, which is not valid JSON; an id must be a string, an integer or null")
    raise LineError(f"'id' must be a string, an integer or null, got {type(sid).__name__} {ascii(sid)[:60]}")


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
        # some messages end in "at" ("Unterminated string starting at"): no "at at column"
        raise LineError(f"invalid JSON: {exc.msg.removesuffix(' at')} at column {exc.colno}") from None
    except RecursionError:  # json.loads on absurdly deep nesting
        raise LineError("invalid JSON: nested too deeply to decode") from None
    except ValueError as exc:  # e.g. an integer of over 4300 digits
        raise LineError(f"invalid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {type(obj).__name__}")
    sid = obj.get("id", line_no)
    check_id(sid)
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
    for k, p in enumerate(images):
        if (pos := _unencodable(p)) is not None:
            raise LineError(f"images[{k}] holds a lone UTF-16 surrogate at character {pos}, not a file name: "
                            f"{ascii(p)[:80]}", sid)
    media = [str(p if os.path.isabs(p) else base_dir / p) for p in images]
    warnings = [f"key {key!a} is not read (media go in 'images'): its value is ignored"
                for key in obj if key not in _KNOWN_KEYS and _MEDIA_LIKE_KEY.search(key)]
    try:  # OpenAI / HF content parts -> str content, their media in order (ixc_engine/formats/parts.py)
        from ixc_engine.formats.records import media_cell  # a part's payload may be an HF {"bytes", "path"} cell

        resolver = MediaResolver(base_dir=base_dir)
        messages, media = flatten_messages(messages, lambda r, k: media_cell(r, k, resolver, "payload"), media)
    except PartsError as exc:
        raise LineError(str(exc), sid) from None
    return Sample(messages, media, id=sid, warnings=warnings)


def iter_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(line number, the line's bytes with its b"\n" if it has one): split on b"\n" only, the one split every command
    uses (a CR, a NUL or invalid UTF-8 inside a line stays in that line)."""
    with open(path, "rb") as fh:
        yield from enumerate(fh, 1)


def read_corpus(
    path: str | Path, *, start_line: int = 1, shard: tuple[int, int] = (0, 1), base_dir: str | Path | None = None
) -> Iterator[tuple[int, Sample | LineError]]:
    """(line number, Sample or LineError) for each line from `start_line` that belongs to shard (i, n); media paths
    are relative to base_dir (default: the file's folder)."""
    path = Path(path)
    base = Path(base_dir).resolve() if base_dir is not None else path.resolve().parent
    index, count = shard
    for line_no, raw in iter_lines(path):
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
        except Exception as exc:  # noqa: BLE001 (whatever one line holds, it is that line's error, not the job's)
            yield line_no, LineError(f"cannot read this line ({type(exc).__name__}: {str(exc)[:200]})")


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


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _check_record(rec, path: Path, k: int, kind: str) -> dict:
    """A line of a scores ("score") or errors ("error") file written by `ixc-engine score`, or a clear error."""
    if not isinstance(rec, dict) or not isinstance(rec.get("line"), int) or kind not in rec:
        raise ValueError(f"{path}:{k}: not {_a(kind)} record written by `ixc-engine score` (need 'line' and "
                         f"'{kind}')")
    return rec


def read_records(path: str | Path, kind: str, *, trim: bool = False, with_lines: bool = False) -> list:
    """Validated records of a scores (kind "score") or errors ("error") file; [] when it does not exist.

    A torn last line (a job killed mid-write) is ignored, and with trim=True also cut off the file so that a resumed
    job appends after the last complete record. with_lines=True gives (record, the line's bytes with its b"\n") pairs.
    Records are read as strict JSON (a bare NaN or Infinity is not a record).
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
            rec = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{path}:{k}: not {_a(kind)} record written by `ixc-engine score` (not valid JSON: "
                             f"{raw[:60]!r})") from None
        rec = _check_record(rec, path, k, kind)
        records.append((rec, raw + b"\n") if with_lines else rec)
    return records


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def by_line(*files: tuple[str | Path, list]) -> dict[int, dict]:
    """{line: record} of the records of one job's files ((path, records) pairs); a line recorded twice (in one file or
    in two) is refused: two jobs wrote into one output, or the files were joined by hand."""
    out: dict[int, dict] = {}
    where: dict[int, Path] = {}
    for path, records in files:
        for item in records:
            rec = item[0] if isinstance(item, tuple) else item
            ln = rec["line"]
            if ln in out:
                raise ValueError(f"line {ln} is recorded twice (in {where[ln]} and {path}): these files were written "
                                 "by two jobs at once or joined by hand; score the corpus again into a new -o "
                                 "(or with --restart)")
            out[ln] = rec
            where[ln] = Path(path)
    return out


def dumps_strict(obj) -> str:
    """One JSON line: strict (no NaN/Infinity: ValueError), UTF-8 text kept readable; a lone surrogate (not valid
    Unicode, rejected by strict JSON readers) in a string is written as the visible text \\udXXX."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    if _unencodable(text) is not None:
        text = json.dumps(_visible_surrogates(obj), ensure_ascii=False, allow_nan=False)
    return text


def _visible_surrogates(obj):
    if isinstance(obj, str):
        return obj.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(obj, dict):
        return {_visible_surrogates(k): _visible_surrogates(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_visible_surrogates(v) for v in obj]
    return obj


def check_not_foreign(path: Path, kind: str) -> None:
    """Refuse to append to or delete a file that `ixc-engine score` did not write (e.g. -o naming the corpus)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb") as fh:
        first = fh.readline()
    try:
        _check_record(json.loads(first), path, 1, kind)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} exists and was not written by `ixc-engine score` (its first line is not "
                         f"{_a(kind)} record); refusing to touch it: remove it or choose another -o") from None


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
    strict: bool = False
    escape_special_tokens: bool = False

    IDENTITY = ("corpus", "model", "hd_num", "max_length", "shard", "strict", "escape_special_tokens")

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
        tmp.write_text(json.dumps(d, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def differences(self, other: JobManifest) -> list[str]:
        return [f"{name}: {getattr(self, name)!r} then, {getattr(other, name)!r} now" for name in self.IDENTITY
                if getattr(self, name) != getattr(other, name)]


@dataclass(slots=True)
class ResultWriter:
    """Appends score and error records in input order; `done_lines()` tells a resumed job where to continue.

    Each record is handed to the OS as soon as it is written (a kill -9 loses nothing written); `flush()` also
    fsyncs (against power loss)."""

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
            recs = by_line((scores_path, read_records(scores_path, "score", trim=True)),
                           (errors_path, read_records(errors_path, "error", trim=True)))
            done = {ln: rec.get("id") for ln, rec in recs.items()}
        else:
            for p in (scores_path, errors_path):
                if p.exists():
                    p.unlink()
        scores_path.parent.mkdir(parents=True, exist_ok=True)
        w = cls(scores_path, errors_path)
        w._scores = open(scores_path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        w._errors = open(errors_path, "a", encoding="utf-8")  # noqa: SIM115
        return w, done

    def write_score(self, line: int, sid, score: float, n_tokens: int, warnings: list[str] | None = None) -> None:
        rec = {"id": sid, "score": score, "n_tokens": n_tokens, "line": line}
        if warnings:
            rec["warnings"] = list(warnings)
        self._scores.write(dumps_strict(rec) + "\n")
        self._scores.flush()

    def write_error(self, line: int, sid, reason: str, warnings: list[str] | None = None) -> None:
        rec = {"id": sid, "line": line, "error": reason}
        if warnings:
            rec["warnings"] = list(warnings)
        self._errors.write(dumps_strict(rec) + "\n")
        self._errors.flush()

    def flush(self) -> None:
        for fh in (self._scores, self._errors):
            fh.flush()
            os.fsync(fh.fileno())

    def close(self) -> None:
        self.flush()
        self._scores.close()
        self._errors.close()
