"""Corpus scoring on Ray Data: a CPU preparation stage, a scoring stage (one engine per actor), and the driver of
`ixc-engine score --ray`.

The stages compose into any Ray Data pipeline (README, "Running on a Ray cluster", runs this on the demo model)::

    from ixc_engine.corpus import read_corpus
    from ixc_engine.integrations.ray import Prepare, Score, sample_rows

    ds = ray.data.from_items(list(sample_rows(read_corpus("corpus.jsonl"))))
    ds = ds.map_batches(Prepare, fn_constructor_kwargs={"model": M}, batch_size=64, batch_format="pyarrow",
                        num_cpus=1, compute=ray.data.ActorPoolStrategy(size=4))
    ds = ds.map_batches(Score, fn_constructor_kwargs={"model": M}, batch_size=64, batch_format="pyarrow",
                        num_gpus=1, compute=ray.data.ActorPoolStrategy(size=2))
    for batch in ds.iter_batches(batch_size=None): ...   # index, id (JSON), ok, score, n_tokens, error, warnings

Ray 2.60 documents `concurrency=N` as deprecated in favour of `compute=ray.data.ActorPoolStrategy(size=N)` (the
form above; `concurrency=N` still runs, without a warning yet), and warns (RayDeprecationWarning) on any other
`ray.remote` option passed to map_batches as a keyword (`max_restarts=...`): `build_pipeline` passes none.

Rows between the stages (all Arrow columns, nothing pickled):
- input (`sample_rows`): `index` int64 (the record's line number), `sample` JSON text: {"messages", "media", "id",
  "warnings"} for a sample, {"error", "id"} for a record the reader could not parse. Any reader yielding
  (index, Sample | SampleError) pairs plugs in.
- prepared (`Prepare`): `index`, `meta` JSON text (id, piece lengths, media grid/kind/digest/compact, n_tokens,
  warnings, or the error), `tokens` (int32 token ids of all text pieces, raw little-endian bytes) and `pixels` (per
  media in order: the float32 global view [1, 3, 560, 560], then the uint8 sub-crops [h*w, 3, 560, 560]; or all
  1 + h*w crops in float32 for a media prepared dense), both Arrow large_binary buffers that the scorer views with
  np.frombuffer.
- scored (`Score`): `index`, `id` (JSON text, so that ints stay ints), `ok`, `score`, `n_tokens` (-1 for errors),
  `error` ("" when scored), `warnings` (JSON list of the sample's warnings, as the local job writes them), and the
  batch's `tokens_computed` / `prefix_tokens_reused` (the engine's counters, on
  the batch's first row, 0 on the others: their sums over a job are the job's).

Nothing here imports Ray at module import time; the engine never imports this module.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

RESULT_COLUMNS = ("index", "id", "ok", "score", "n_tokens", "error", "warnings", "tokens_computed",
                  "prefix_tokens_reused")
FEED_MAX_WINDOW = 1024  # records per driver feed window at most (unless one batch is larger)
FEED_BYTES = 256 << 20  # input rows the driver has handed to Ray and not yet written, at most (or one window)
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16"}


# --- rows -------------------------------------------------------------------------------------------------------------
def sample_rows(items: Iterable[tuple[int, Any]]) -> Iterator[dict]:
    """Input rows of `Prepare` from (index, Sample | SampleError) pairs, as `read_corpus` yields them."""
    from ixc_engine.engine.sequence import Sample, SampleError
    from ixc_engine.media.loader import MediaBytes

    for index, item in items:
        if isinstance(item, Sample):
            media = []
            for m in item.media:
                if isinstance(m, MediaBytes):  # a data: URI or a Parquet image cell: the encoded bytes travel
                    media.append({"b64": base64.b64encode(m.data).decode("ascii"), "kind": m.kind, "name": m.name})
                elif isinstance(m, (str, os.PathLike)):
                    media.append(str(m))
                else:
                    raise TypeError(f"record {index}: media must be file paths or MediaBytes to cross the cluster, "
                                    f"got {type(m).__name__}")
            obj = {"messages": item.messages, "media": media, "id": item.id, "warnings": list(item.warnings)}
        elif isinstance(item, SampleError):
            obj = {"error": str(item), "id": getattr(item, "sample_id", None)}
        else:
            raise TypeError(f"record {index}: expected a Sample or SampleError, got {type(item).__name__}")
        yield {"index": int(index), "sample": json.dumps(obj)}


def _media_item(m):
    from ixc_engine.media.loader import MediaBytes

    return MediaBytes(base64.b64decode(m["b64"]), m["kind"], m["name"]) if isinstance(m, dict) else m


def _column(batch, name: str) -> list:
    """One column of a batch as a Python list, whatever Ray's batch format (pyarrow Table or dict of numpy)."""
    if hasattr(batch, "column_names"):
        return batch.column(name).to_pylist()
    return list(batch[name])


def _buffers(batch, name: str) -> list:
    """A binary column's values as buffers (zero-copy views for a pyarrow Table)."""
    if hasattr(batch, "column_names"):
        return [v.as_buffer() if v.is_valid else b"" for v in batch.column(name)]
    return list(batch[name])


def _table(columns: dict[str, list], types: dict):
    import pyarrow as pa

    return pa.table({k: pa.array(v, type=types[k]) for k, v in columns.items()})


def _prepared_types():
    import pyarrow as pa

    return {"index": pa.int64(), "meta": pa.string(), "tokens": pa.large_binary(), "pixels": pa.large_binary()}


def _result_types():
    import pyarrow as pa

    return {"index": pa.int64(), "id": pa.string(), "ok": pa.bool_(), "score": pa.float64(), "n_tokens": pa.int64(),
            "error": pa.string(), "warnings": pa.string(), "tokens_computed": pa.int64(),
            "prefix_tokens_reused": pa.int64()}


def encode_prepared(p) -> tuple[str, bytes, bytes]:
    """A PreparedSample as (meta JSON, token bytes, pixel bytes)."""
    lens, tokens = [], []
    for piece in p.pieces:
        if isinstance(piece, list):
            lens.append(len(piece))
            tokens.extend(piece)
        else:
            lens.append(-1 - piece)  # a media slot
    # per media [h, w, kind, digest, compact]: compact crops travel as the float32 global view then the uint8
    # sub-crops (a quarter of the bytes; the scoring actor normalises them, bit-identically), others as float32
    media = [[m.h, m.w, m.kind, d, m.compact] for m, d in zip(p.media, p.media_digests)]
    meta = json.dumps({"id": p.id, "pieces": lens, "media": media, "n_tokens": p.n_tokens,
                       "warnings": list(p.warnings)})
    import numpy as np

    def media_bytes(m) -> bytes:
        if not m.compact:
            return np.ascontiguousarray(m.pixel_values.numpy(), dtype=np.float32).tobytes()
        glb = np.ascontiguousarray(m.global_view.numpy(), dtype=np.float32).tobytes()
        return glb + np.ascontiguousarray(m.sub_uint8.numpy()).tobytes()

    pixels = b"".join(media_bytes(m) for m in p.media)
    return meta, np.asarray(tokens, dtype="<i4").tobytes(), pixels


def decode_prepared(meta: dict, tokens, pixels):
    """The PreparedSample `encode_prepared` wrote (pixels copied once into torch tensors)."""
    import numpy as np
    import torch

    from ixc_engine.engine.sequence import PreparedSample
    from ixc_engine.media.image import CROP, MediaCrops

    ids = np.frombuffer(tokens, dtype="<i4")
    pieces, pos = [], 0
    for n in meta["pieces"]:
        if n >= 0:
            pieces.append(ids[pos:pos + n].tolist())
            pos += n
        else:
            pieces.append(-1 - n)
    raw = memoryview(pixels)
    crop = 3 * CROP * CROP
    media, digests, off = [], [], 0

    def take(n: int, dtype: str, count: int):  # `count` crops of `dtype` at the offset, copied once into torch
        nonlocal off
        arr = np.frombuffer(raw[off:off + n * count], dtype=dtype).reshape(count, 3, CROP, CROP)
        off += n * count
        return torch.from_numpy(arr.copy())

    for h, w, kind, digest, compact in meta["media"]:
        if compact:
            glb = take(4 * crop, "<f4", 1)
            media.append(MediaCrops(h=h, w=w, kind=kind, global_view=glb, sub_uint8=take(crop, "u1", h * w)))
        else:
            media.append(MediaCrops(take(4 * crop, "<f4", 1 + h * w), h, w, kind))
        digests.append(digest)
    if pos != len(ids) or off != len(raw):
        raise ValueError("prepared row does not match its description (corrupt object?)")
    return PreparedSample(meta["id"], pieces, media, digests, meta["n_tokens"], list(meta.get("warnings", [])))


def _checkpoint_files(model: str) -> tuple[Path, int]:
    """(tokenizer.model path, the model's max_length) of a checkpoint, without loading its weights."""
    from ixc_engine.checkpoint import resolve_checkpoint
    from ixc_engine.config import ModelConfig

    ckpt = resolve_checkpoint(model)
    tok = ckpt / "tokenizer.model"
    if not tok.is_file():
        from ixc_engine.tiny import PACKAGED_TOKENIZER

        tok = PACKAGED_TOKENIZER
    return tok, ModelConfig.from_file(ckpt / "config.json").max_length


# --- stages -----------------------------------------------------------------------------------------------------------
class Prepare:
    """CPU stage: validate, template + tokenize, decode and crop media. Use as a callable class in map_batches.

    Identical media within a batch are loaded once. A sample that cannot be prepared becomes an error row (never an
    exception: one bad sample must not fail the job), with the local job's very message. The options are the local
    job's (`EngineConfig`): at most `max_media` media per sample; `strict`: a sample with warnings is an error
    ("rejected by --strict: ..."); `escape_special_tokens`: special-token strings in the text are plain text.
    """

    def __init__(self, model: str | None = None, *, tokenizer_path: str | None = None, hd_num: int = 9,
                 max_length: int | None = None, max_media: int | None = None, strict: bool = False,
                 escape_special_tokens: bool = False) -> None:
        from ixc_engine.engine.sequence import MAX_MEDIA
        from ixc_engine.tokenizer import Tokenizer

        if model is not None:
            tok, model_max = _checkpoint_files(model)
        elif tokenizer_path is not None and max_length is not None:
            tok, model_max = tokenizer_path, max_length
        else:
            raise ValueError("Prepare needs model=, or tokenizer_path= and max_length=")
        if not isinstance(hd_num, int) or hd_num < 1:
            raise ValueError(f"hd_num must be an integer >= 1, got {hd_num!r}")
        max_media = MAX_MEDIA if max_media is None else max_media
        if not isinstance(max_media, int) or max_media < 1:
            raise ValueError(f"max_media must be an integer >= 1, got {max_media!r}")
        self.tokenizer = Tokenizer.from_file(tokenizer_path or tok)
        self.hd_num = hd_num
        self.max_length = max_length or model_max
        self.max_media, self.strict, self.escape_special_tokens = max_media, bool(strict), bool(escape_special_tokens)

    def __call__(self, batch):
        from ixc_engine.engine.engine import as_sample_error
        from ixc_engine.engine.sequence import Sample, prepare_sample

        out = {"index": [], "meta": [], "tokens": [], "pixels": []}
        media_cache: dict = {}
        for index, text in zip(_column(batch, "index"), _column(batch, "sample")):
            obj = json.loads(text)
            meta, tokens, pixels = None, b"", b""
            if "error" in obj:
                meta = json.dumps({"id": obj.get("id"), "error": obj["error"]})
            else:
                try:
                    sample = Sample(obj["messages"], [_media_item(m) for m in obj["media"]], id=obj["id"],
                                    warnings=obj.get("warnings", []))
                    p = prepare_sample(self.tokenizer, sample, hd_num=self.hd_num, max_length=self.max_length,
                                       media_cache=media_cache, max_media=self.max_media,
                                       escape_special=self.escape_special_tokens)
                except Exception as exc:  # noqa: BLE001 (whatever one sample holds is its own error, as locally)
                    meta = json.dumps({"id": obj["id"], "error": str(as_sample_error(exc))})
                else:
                    if self.strict and p.warnings:  # as the local engine's --strict (engine.py, _finish)
                        meta = json.dumps({"id": obj["id"], "error": "rejected by --strict: " + "; ".join(p.warnings)})
                    else:
                        meta, tokens, pixels = encode_prepared(p)
            out["index"].append(int(index))
            out["meta"].append(meta)
            out["tokens"].append(tokens)
            out["pixels"].append(pixels)
        return _table(out, _prepared_types())


class Score:
    """Scoring stage: one engine (model on its device) per actor; consecutive samples of a batch share prefixes, and
    the actor's KV cache keeps them for later batches.

    A batch whose scoring raises is re-scored sample by sample, so one sample that cannot be scored becomes an error
    row; a dead actor is Ray's to restart (max_restarts / max_task_retries), and its batch is redone.
    """

    def __init__(self, model: str, *, device: str | None = None, dtype: str | None = None,
                 max_batch_tokens: int = 16384, max_length: int | None = None, prefix_cache: bool = True,
                 pooling: str | None = None, threads: int | None = None) -> None:
        import torch

        from ixc_engine.api import RewardEngine
        from ixc_engine.engine.engine import EngineConfig

        if threads:
            torch.set_num_threads(threads)
        cfg = EngineConfig(max_batch_tokens=max_batch_tokens, prefix_cache=prefix_cache, max_length=max_length)
        self.engine = RewardEngine.from_pretrained(model, device=device, dtype=dtype, pooling=pooling, config=cfg)

    def __call__(self, batch):
        from ixc_engine.engine.sequence import SampleError

        out = {k: [] for k in RESULT_COLUMNS}
        todo = []  # (row, prepared sample)
        for index, meta_text, tokens, pixels in zip(_column(batch, "index"), _column(batch, "meta"),
                                                    _buffers(batch, "tokens"), _buffers(batch, "pixels")):
            meta = json.loads(meta_text)
            row = len(out["index"])
            out["index"].append(int(index))
            out["id"].append(json.dumps(meta.get("id")))
            out["ok"].append(False)
            out["score"].append(math.nan)
            out["n_tokens"].append(-1)
            out["error"].append(meta.get("error", ""))
            out["warnings"].append("[]")
            out["tokens_computed"].append(0)
            out["prefix_tokens_reused"].append(0)
            if "error" not in meta:
                try:
                    todo.append((row, decode_prepared(meta, tokens, pixels)))
                except Exception as exc:  # noqa: BLE001
                    out["error"][row] = f"prepared sample unreadable ({type(exc).__name__}: {exc})"
        stats = self.engine.engine.stats
        computed, reused = stats.tokens_computed, stats.prefix_tokens_reused
        if todo:
            preps = [p for _, p in todo]
            try:
                results = self.engine.engine.score_prepared(preps)
            except Exception:  # noqa: BLE001 (find the sample at fault: each alone)
                results = []
                for p in preps:
                    try:
                        results.append(self.engine.engine.score_prepared([p])[0])
                    except Exception as exc:  # noqa: BLE001
                        results.append(SampleError(f"scoring failed ({type(exc).__name__}: {exc})"))
            for (row, p), r in zip(todo, results):
                if isinstance(r, SampleError):
                    out["error"][row] = str(r)
                elif not math.isfinite(r):  # the local engine's message (engine.py, _finish)
                    out["error"][row] = (f"the model gave a non-finite score ({r}) for this sample; it is not written "
                                         "as a score (check the checkpoint, the dtype and the sample)")
                else:
                    out["ok"][row], out["score"][row], out["n_tokens"][row] = True, float(r), p.n_tokens
                    out["warnings"][row] = json.dumps(p.warnings)
        if out["index"]:
            out["tokens_computed"][0] = stats.tokens_computed - computed
            out["prefix_tokens_reused"][0] = stats.prefix_tokens_reused - reused
        return _table(out, _result_types())


def _actor_pool(ray_data, size: int):
    return ray_data.ActorPoolStrategy(size=size)


def build_pipeline(ds, model: str, *, hd_num: int = 9, max_length: int | None = None, batch_size: int = 64,
                   actors: int = 1, gpus_per_actor: float = 0.0, cpus_per_actor: float = 1.0, prep_actors: int = 1,
                   device: str | None = None, dtype: str | None = None, max_batch_tokens: int = 16384,
                   prefix_cache: bool = True, max_media: int | None = None, strict: bool = False,
                   escape_special_tokens: bool = False):
    """ds (rows of `sample_rows`) -> scored rows: Prepare on `prep_actors` one-CPU actors, Score on `actors` actors
    with `gpus_per_actor` GPUs (CPU scoring when 0) each.

    A dead actor is restarted and its batch redone: Ray Data gives its actors max_restarts=-1 and max_task_retries=-1.
    (Other `ray.remote` options would go through map_batches' **ray_remote_args, which Ray 2.60 deprecates; to set
    them, call map_batches with the stages yourself.)"""
    import ray.data

    threads = max(1, int(cpus_per_actor)) if gpus_per_actor == 0 else None
    ds = ds.map_batches(
        Prepare, fn_constructor_kwargs={"model": model, "hd_num": hd_num, "max_length": max_length,
                                        "max_media": max_media, "strict": strict,
                                        "escape_special_tokens": escape_special_tokens},
        batch_size=batch_size, batch_format="pyarrow", compute=_actor_pool(ray.data, prep_actors), num_cpus=1,
    )
    return ds.map_batches(
        Score, fn_constructor_kwargs={"model": model, "device": device, "dtype": dtype, "max_length": max_length,
                                      "max_batch_tokens": max_batch_tokens, "prefix_cache": prefix_cache,
                                      "threads": threads},
        batch_size=batch_size, batch_format="pyarrow", compute=_actor_pool(ray.data, actors),
        num_gpus=gpus_per_actor, num_cpus=cpus_per_actor,
    )


# --- the driver's input feed -----------------------------------------------------------------------------------------
class _Feeder:
    """A Ray actor (async): the input windows the driver has put in the object store, by number. `_Fetch` asks for
    window k and waits until the driver has put it; a window is dropped once all its records are written, so that a
    retried fetch still finds it, and one already written (k below `low`) comes back as None."""

    def __init__(self) -> None:
        import asyncio

        self.refs: dict[int, Any] = {}
        self.low = 0  # windows below this are written and dropped
        self.changed = asyncio.Event()

    def _wake(self) -> None:
        import asyncio

        self.changed.set()
        self.changed = asyncio.Event()

    def put(self, k: int, ref: list) -> None:
        self.refs[k] = ref[0]
        self._wake()

    def drop(self, k: int) -> None:
        self.refs.pop(k, None)
        self.low = max(self.low, k + 1)

    async def get(self, k: int) -> list | None:
        while k not in self.refs:
            if k < self.low:
                return None
            await self.changed.wait()
        return [self.refs[k]]  # in a list: the caller gets the reference, not the value


class _Fetch:
    """First stage of the driver's pipeline: window number -> that window's input rows (`sample_rows`)."""

    def __init__(self, feeder) -> None:
        self.feeder = feeder

    def __call__(self, batch):
        import pyarrow as pa
        import ray

        tables = []
        for k in _column(batch, "window"):
            got = ray.get(self.feeder.get.remote(int(k)))
            if got is not None:
                tables.append(ray.get(got[0]))
        return pa.concat_tables(tables) if tables else _table({"index": [], "sample": []}, _input_types())


def _input_types():
    import pyarrow as pa

    return {"index": pa.int64(), "sample": pa.string()}


class _Feed:
    """The driver's records, streamed to Ray: a thread reads `records` ((index, Sample | SampleError) in input order)
    and puts them in the object store `window` at a time, at most `ahead` windows and `max_bytes` of rows (or one
    window, whatever its size) that are not written yet; Ray Data's input is the list of window numbers (`dataset`),
    fetched by `_Fetch` from the `_Feeder` actor. So the driver holds at most `ahead` windows of records
    (`max_resident` counts them), whatever the corpus size."""

    def __init__(self, ray, records: Iterable[tuple[int, Any]], *, n_windows: int, window: int, ahead: int,
                 max_bytes: int | None = None) -> None:
        import threading

        self.ray, self.n_windows, self.window, self.ahead = ray, n_windows, window, ahead
        self.max_bytes = FEED_BYTES if max_bytes is None else max_bytes
        self.feeder = ray.remote(_Feeder).options(num_cpus=0, max_restarts=0).remote()
        self._lock = threading.Condition()
        self._bytes: dict[int, int] = {}  # window -> bytes of its rows, until written
        self._lines: dict[int, list[int]] = {}  # window -> its record indexes, until written
        self._refs: dict[int, Any] = {}
        self._resident: set[int] = set()  # record indexes handed to Ray and not written yet
        self.max_resident = self.records_sent = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(records,), name="ixc-ray-feed", daemon=True)
        self._thread.start()

    def dataset(self):
        ray = self.ray
        ds = ray.data.from_items([{"window": k} for k in range(self.n_windows)], override_num_blocks=self.n_windows)
        # One window per block: Ray Data buffers a task's output until the task ends (or 128 MB), so a task holding
        # several windows would wait for records that are only fed once its first window is written. Two fetch
        # actors: one window's round trips to the feeder and the object store overlap the next one's. One task in
        # flight per actor: an actor need not run its queued tasks in the order they were given (Ray 2.60; traced:
        # the fetches of windows 4 and 5 ran while that of 3 waited behind one of them), and a fetch that waits for a
        # window fed only once a lower one is written, with that lower one queued behind it, waited for ever (CI hung
        # so). With one task per actor, every window below the ones being fetched has been fetched, so the lowest
        # unwritten window is always on its way to the driver.
        return ds.map_batches(_Fetch, fn_constructor_kwargs={"feeder": self.feeder}, batch_size=1,
                              batch_format="pyarrow", num_cpus=0,
                              compute=ray.data.ActorPoolStrategy(size=min(2, self.n_windows),
                                                                 max_tasks_in_flight_per_actor=1))

    def _produce(self, records) -> None:
        k, buf = 0, []
        try:
            for item in records:
                buf.append(item)
                if len(buf) == self.window:
                    self._put(k, buf)
                    k, buf = k + 1, []
            if buf:
                self._put(k, buf)
                k += 1
            while k < self.n_windows:  # fewer records than counted (the file changed): empty windows, no slot
                self._put(k, [])
                k += 1
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 (told to the main thread, which raises it)
            # The remaining windows go out empty, so that every stage finishes and the driver's next batch comes
            # (it then raises this error), instead of fetches failing inside Ray, whose retries are Ray's to decide.
            self.error = exc
            for rest in range(k, self.n_windows):
                with contextlib.suppress(Exception):  # the cluster may be going away too
                    self._put(rest, [])

    def _put(self, k: int, items: list) -> None:
        if k >= self.n_windows:
            raise ValueError("the corpus has more records to score than it had when the job started (it changed "
                             "while being read): run the same command again")
        rows = list(sample_rows(items))
        table = _table({"index": [r["index"] for r in rows], "sample": [r["sample"] for r in rows]}, _input_types())
        with self._lock:  # room for it: fewer than `ahead` windows out, and under max_bytes (or none out)
            while items and self._bytes and (len(self._bytes) >= self.ahead or
                                             sum(self._bytes.values()) + table.nbytes > self.max_bytes):
                if self._stop.is_set():
                    raise _Stopped
                self._lock.wait(0.2)
        ref = self.ray.put(table)
        with self._lock:
            if items:
                self._bytes[k] = table.nbytes
            self._lines[k] = [r["index"] for r in rows]
            self._refs[k] = ref
            self._resident.update(self._lines[k])
            self.records_sent += len(rows)
            self.max_resident = max(self.max_resident, len(self._resident))
        self.feeder.put.remote(k, [ref])

    def lines(self, k: int) -> list[int] | None:
        """Window k's record indexes, once it is sent."""
        if self.error is not None:
            raise self.error
        with self._lock:
            return self._lines.get(k)

    def in_flight(self, index: int) -> bool:
        with self._lock:
            return index in self._resident

    def written(self, k: int) -> None:
        with self._lock:
            lines = self._lines.pop(k)
            self._refs.pop(k, None)
            self._bytes.pop(k, None)
            self._resident.difference_update(lines)
            self._lock.notify_all()
        self.feeder.drop.remote(k)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):  # already gone with its cluster
            self.ray.kill(self.feeder)


class _Stopped(Exception):
    pass


def _results(ds, feed: _Feed):
    """The scored batches; when the feed failed (e.g. a changed corpus), its error rather than Ray's report of it."""
    try:
        # prefetch_batches=0: each block as soon as it is there (with prefetching, Ray 2.60 waits for the next block
        # before it hands out one, and the next window may only be fed once this one is written)
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
    except Exception:
        if feed.error is not None:
            raise feed.error from None
        raise
    if feed.error is not None:
        raise feed.error


# --- command line -----------------------------------------------------------------------------------------------------
def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


RAY_OPTIONS = ("ray_address", "ray_actors", "ray_gpus_per_actor", "ray_cpus_per_actor", "ray_prep_cpus",
               "ray_batch_size")


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """The --ray* options of `ixc-engine score`."""
    g = parser.add_argument_group("Ray cluster (pip install 'ixc-engine[ray]')")
    g.add_argument("--ray", action="store_true",
                   help="score on a Ray cluster: preparation and scoring as Ray Data stages; the same outputs, "
                   "order, resume and job checks as a local job (one writer, on this driver)")
    g.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="cluster to join (auto: the one `ray start` made on this node; default: start a Ray "
                   "instance on this machine)")
    g.add_argument("--ray-actors", type=_count, default=None, metavar="N", help="scoring actors (default 1)")
    g.add_argument("--ray-gpus-per-actor", type=_positive_float, default=None, metavar="G",
                   help="GPUs per scoring actor (default 1 when the cluster has GPUs, else 0: CPU scoring)")
    g.add_argument("--ray-cpus-per-actor", type=_positive_float, default=None, metavar="C",
                   help="CPUs reserved per scoring actor (default 1; a CPU scorer uses that many torch threads)")
    g.add_argument("--ray-prep-cpus", type=_count, default=None, metavar="N",
                   help="preparation actors, one CPU each: tokenize, decode, HD crops (default 1)")
    g.add_argument("--ray-batch-size", type=_count, default=None, metavar="B",
                   help="samples per stage batch (default: --window); consecutive samples of a batch share "
                   "prefixes")


def ray_requested(args) -> bool:
    """Whether `score` runs on Ray; --ray-* options without --ray are refused rather than ignored."""
    if getattr(args, "ray", False):
        return True
    given = [name for name in RAY_OPTIONS if getattr(args, name, None) is not None]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} needs --ray")
    return False


def _ray_settings(args, ray) -> dict:
    gpus = args.ray_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    if args.device is not None and gpus > 0 and not args.device.startswith("cuda"):
        raise ValueError(f"--device {args.device} with --ray-gpus-per-actor {gpus}: a GPU actor scores on cuda")
    if args.device is not None and gpus == 0 and args.device != "cpu":
        raise ValueError(f"--device {args.device} needs GPUs per actor: pass --ray-gpus-per-actor 1")
    device = "cuda" if gpus > 0 else "cpu"
    # "auto" (the CLI default): bf16 on GPU actors, fp32 on CPU ones. The CPU probe of `auto` would run on each actor's
    # own machine, while the job file needs one dtype before any actor starts.
    dtype = args.dtype if args.dtype not in (None, "auto") else ("bfloat16" if gpus > 0 else "float32")
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPE_NAMES)}")
    settings = {"gpus_per_actor": gpus, "device": device, "dtype": _DTYPE_NAMES[dtype],
                "actors": args.ray_actors or 1, "cpus_per_actor": 1.0 if args.ray_cpus_per_actor is None
                else args.ray_cpus_per_actor, "prep_actors": args.ray_prep_cpus or 1,
                "batch_size": args.ray_batch_size or args.window}
    have = ray.cluster_resources()
    need = {"CPU": settings["prep_actors"] + settings["actors"] * settings["cpus_per_actor"],
            "GPU": settings["actors"] * gpus}
    short = [f"{need[k]:g} {k}s (the cluster has {have.get(k, 0):g})" for k in need if need[k] > have.get(k, 0)]
    if short:  # an autoscaling cluster may still grow; a fixed one would wait for ever
        print(f"warning: the actors need {' and '.join(short)}; the job waits until the cluster has them "
              "(fewer --ray-actors / --ray-prep-cpus, or smaller --ray-cpus-per-actor)", file=sys.stderr)
    return settings


def cmd_score_ray(args, reader=None) -> int:
    """`ixc-engine score --ray`: the local job's checks and writer, the scoring on Ray Data.

    The corpus is read on this driver with the local reader (`reader`: any callable like `read_corpus`, yielding
    (line, Sample | LineError)), not with ray.data.read_json/read_text: those lose line numbers and ids' JSON types,
    read_json fails a whole block on one invalid line, read_text drops empty lines and fails a whole file on one
    byte of bad UTF-8; the local reader gives every line its own record, error or not, exactly as a local job does.
    The parsed rows (text only; media stay files that the workers open, in-memory media travel as their bytes) are
    streamed to Ray window by window (`_Feed`): the driver holds a few windows, never the corpus.
    """
    from ixc_engine.corpus import (
        ResultWriter,
        count_lines,
        errors_path_for,
        job_path_for,
    )
    from ixc_engine.formats.jobs import check_outputs_apart, job_for, records_to_do, shard_output
    from ixc_engine.formats.source import open_corpus

    source = open_corpus(args.corpus, getattr(args, "format", None), getattr(args, "media_root", None))
    reader = reader or (lambda _path, shard: source.records(shard=shard))
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise RuntimeError(f"--ray needs Ray Data ({exc}): pip install 'ixc-engine[ray]'") from None
    if args.workers:
        raise ValueError("--workers is the local job's preparation; with --ray, preparation runs in Ray actors: "
                         "use --ray-prep-cpus")
    if not args.corpus.is_file():
        print(f"error: corpus {args.corpus} not found", file=sys.stderr)
        return 2
    out_path = shard_output(args.output, args.shard)
    job_path = job_path_for(out_path)
    check_outputs_apart({"corpus": args.corpus}, [out_path, errors_path_for(out_path), job_path])
    total_lines = source.count()
    job, previous, mine = job_for(args, total_lines, out_path, job_path)
    writer, done = ResultWriter.open(out_path, resume=not args.restart)
    try:
        if args.restart:
            job_path.unlink(missing_ok=True)
        if total_lines == 0:
            print(f"warning: corpus {args.corpus} is empty", file=sys.stderr)
        if done:
            print(f"resuming: {len(done)} of {mine} lines already in {out_path} and its errors file", file=sys.stderr)
        if len(done) >= mine:
            writer.flush()
            job.dtype, job.complete = previous.dtype if previous else None, True
            job.errors = count_lines(writer.errors_path)
            job.scored = len(done) - job.errors
            job.save(job_path)
            print(json.dumps({"scored": 0, "errors": 0, "warnings": 0, "skipped_already_done": len(done),
                              "scores": str(out_path), "errors_file": str(writer.errors_path)}))  # as the local job
            return 0
        # read as Ray asks for more (_Feed): never the whole corpus in memory
        todo = records_to_do(reader(args.corpus, shard=args.shard), done, args.corpus, out_path)

        n_todo = mine - sum(1 for ln in done if (ln - 1) % args.shard[1] == args.shard[0])
        started = not ray.is_initialized()
        if started:
            init = {"address": args.ray_address, "log_to_driver": True}
            if args.ray_address is None:
                init["include_dashboard"] = False
            ray.init(**init)
        try:
            return _run(args, ray, (todo, n_todo), writer, job, job_path, previous, done, mine, out_path)
        finally:
            if started:
                ray.shutdown()
    finally:
        writer.close()


def _run(args, ray, todo, writer, job, job_path, previous, done, mine, out_path) -> int:
    settings = _ray_settings(args, ray)
    job.dtype = settings["dtype"]
    if previous is not None and previous.dtype not in (None, job.dtype):
        raise ValueError(f"{out_path} was scored in {previous.dtype}, this run would use {job.dtype}: pass --dtype "
                         f"{previous.dtype} to resume it, or --restart")
    job.save(job_path)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start)
    ctx.execution_options.preserve_order = True  # batches of consecutive records; results come back in order
    ctx.enable_progress_bars = False  # ours counts what is written
    ctx.print_on_execution_start = False
    try:
        return _execute(args, ray, todo, writer, job, job_path, done, mine, out_path, settings)
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start = saved


def feed_window(n_todo: int, batch_size: int) -> int:
    """Records per feed window: a multiple of the stage batch size, large enough that a job has at most about 1000
    windows when it can (Ray Data keeps some state per block, ~13 KB measured, and pays ~25 ms per block on 2 cores),
    and at most FEED_MAX_WINDOW records (what the driver and the object store hold per window)."""
    per = -(-n_todo // (1000 * batch_size))  # batches per window for <= 1000 windows
    return batch_size * max(1, min(per, max(1, FEED_MAX_WINDOW // batch_size)))


def _execute(args, ray, todo, writer, job, job_path, done, mine, out_path, settings) -> int:
    from ixc_engine.corpus import count_lines

    records, n_todo = todo
    bs = settings["batch_size"]
    window = feed_window(n_todo, bs)
    # Ray Data (2.60) keeps 2 tasks in flight per actor: a window for each, and some being fetched and written. On 8000
    # cheap samples (over --max-length, 2 cores, load 3-4) prep + actors + 2 windows and one fetch actor took 51.6 s
    # against 39.8 s for the whole list handed over at once; this and two fetch actors 44.0 vs 39.4 and 31.9 vs 29.9.
    ahead = 2 * (settings["prep_actors"] + settings["actors"]) + 4
    feed = _Feed(ray, records, n_windows=max(1, -(-n_todo // window)), window=window, ahead=ahead)
    ds = feed.dataset()
    ds = build_pipeline(
        ds, args.model, hd_num=args.hd_num, max_length=args.max_length, batch_size=bs, actors=settings["actors"],
        gpus_per_actor=settings["gpus_per_actor"], cpus_per_actor=settings["cpus_per_actor"],
        prep_actors=settings["prep_actors"], device=settings["device"], dtype=settings["dtype"],
        max_batch_tokens=args.max_batch_tokens, prefix_cache=not args.no_prefix_cache, max_media=args.max_media,
        strict=args.strict, escape_special_tokens=args.escape_special_tokens,
    )
    print(f"ray: {n_todo} records to score on {settings['actors']} scoring actor(s) ({settings['device']}, "
          f"{settings['dtype']}), {settings['prep_actors']} preparation actor(s), fed in windows of {window}",
          file=sys.stderr)
    pending: dict[int, tuple] = {}
    cur, pos, last = 0, 0, 0  # the window being written, the position in it, the last line written
    n_ok = n_err = n_warn = tokens = duplicates = computed = reused = 0
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=mine, initial=len(done), unit="sample", file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for batch in _results(ds, feed):
            cols = {k: batch.column(k).to_pylist() for k in RESULT_COLUMNS}
            computed += sum(cols["tokens_computed"])
            reused += sum(cols["prefix_tokens_reused"])
            for index, sid, ok, score, n_tok, err, warns, _, _ in zip(*(cols[k] for k in RESULT_COLUMNS)):
                # Exactly once whatever the transport does: a line already written (lines are written in increasing
                # order) or waiting is dropped.
                if index <= last or index in pending:
                    duplicates += 1
                    continue
                if not feed.in_flight(index):
                    raise RuntimeError(f"Ray returned a record for line {index}, which this job did not send")
                pending[index] = (json.loads(sid), ok, score, n_tok, err, json.loads(warns))
            while (lines := feed.lines(cur)) is not None:
                if pos == len(lines):  # window written: its slot goes to the next window
                    feed.written(cur)
                    cur, pos = cur + 1, 0
                    continue
                if lines[pos] not in pending:
                    break
                line = lines[pos]
                sid, ok, score, n_tok, err, warns = pending.pop(line)
                if ok:
                    writer.write_score(line, sid, score, n_tok, warns)
                    n_ok += 1
                    n_warn += bool(warns)
                    tokens += n_tok
                else:
                    writer.write_error(line, sid, err)
                    n_err += 1
                last, pos = line, pos + 1
                if bar is not None:
                    bar.update(1)
            writer.flush()
            if bar is not None:
                el = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{tokens / el:,.0f} tok/s, {n_err} errors", refresh=True)
        while (lines := feed.lines(cur)) is not None and pos == len(lines):  # empty windows at the end
            feed.written(cur)
            cur, pos = cur + 1, 0
    except KeyboardInterrupt:
        print(f"\ninterrupted: {n_ok + n_err} lines written; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
        feed.close()
    if cur != feed.n_windows or pending or feed.records_sent != n_ok + n_err:
        lines = feed.lines(cur) or []
        missing = lines[pos] if pos < len(lines) else None
        raise RuntimeError(f"Ray returned {n_ok + n_err} of {feed.records_sent} records (first missing: line "
                           f"{missing}; {len(pending)} out of place): the job is not complete; run the same command "
                           "to resume")
    writer.flush()  # fsynced before the job is marked complete; the caller closes it
    job.complete = True
    job.errors = count_lines(writer.errors_path)
    job.scored = len(done) + n_ok + n_err - job.errors
    job.save(job_path)
    el = time.perf_counter() - t0
    print(json.dumps({
        "scored": n_ok, "errors": n_err, "warnings": n_warn, "skipped_already_done": len(done), "seconds": round(el, 3),
        "samples_per_s": round((n_ok + n_err) / el, 3) if el else None,
        "tokens_per_s": round(tokens / el, 1) if el else None, "tokens_computed": computed,
        "prefix_tokens_reused": reused, "duplicates_dropped": duplicates,
        "feed": {"window": window, "windows": feed.n_windows, "ahead": ahead,
                 "max_records_in_ray": feed.max_resident},
        "ray": {k: settings[k] for k in ("actors", "gpus_per_actor", "cpus_per_actor", "prep_actors", "batch_size")},
        "scores": str(out_path), "errors_file": str(writer.errors_path),
    }))  # the summary on stdout (progress and logs on stderr), as the local job
    return 0
