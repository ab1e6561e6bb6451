"""The scoring engine: prepares samples on the CPU, schedules them into packed batches under a token budget, reuses
cached prefixes through the paged KV cache, and yields scores in input order."""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ixc_engine.engine.cpu import init_worker_threads, worker_threads
from ixc_engine.engine.host import get_host_core
from ixc_engine.engine.runner import ModelRunner, SeqPlan
from ixc_engine.engine.sequence import MAX_MEDIA, PreparedSample, Sample, SampleError, prepare_sample
from ixc_engine.media.image import MAX_IMAGE_PIXELS
from ixc_engine.tokenizer import Tokenizer


@dataclass(slots=True)
class EngineConfig:
    hd_num: int = 9
    max_batch_tokens: int = 16384
    max_batch_seqs: int = 256
    prefix_cache: bool = True
    block_size: int = 16
    kv_cache_tokens: int | None = None  # None: enough for a few full batches (bounded by free GPU memory)
    window: int = 64  # samples prepared and scheduled together (prefix sharing and ViT dedup act within it)
    workers: int = 0  # processes for CPU preprocessing (0: in this process)
    max_length: int | None = None  # None: the model's max_length
    max_media: int = MAX_MEDIA  # media items per sample; more is that sample's error
    max_image_pixels: int | None = MAX_IMAGE_PIXELS  # per image or video frame (Pillow's default bomb limit)
    strict: bool = False  # a sample with warnings (legal but most likely wrong input) is an error, not scored
    escape_special_tokens: bool = False  # special-token strings in message content are plain text (not upstream's)
    ramp_up: bool = False  # first windows of 4, 8, 16, ... samples: first results sooner (the CLI's progress bar)

    def __post_init__(self) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        for name in ("hd_num", "max_batch_tokens", "max_batch_seqs", "window", "max_media"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be >= 1 or None, got {self.max_image_pixels}")


@dataclass(slots=True)
class ScoreResult:
    index: int
    id: Any
    score: float | None
    n_tokens: int | None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)  # legal but most likely wrong input (scored anyway)


@dataclass(slots=True)
class EngineStats:
    samples: int = 0
    errors: int = 0
    tokens_requested: int = 0
    tokens_computed: int = 0
    prefix_tokens_reused: int = 0
    media_encoded: int = 0
    crops_encoded: int = 0
    media_requested: int = 0
    cpu_seconds: float = 0.0  # preparation (tokenize, decode, resize) in this process or waiting on workers
    gpu_seconds: float = 0.0  # time inside the runner (device work and its synchronisation)
    batches: int = 0
    oom_splits: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in self.__slots__}


def as_sample_error(exc: Exception) -> SampleError:
    """Any exception raised while preparing one sample, as that sample's error (type and message kept)."""
    if isinstance(exc, SampleError):
        return exc
    return SampleError(f"cannot prepare this sample ({type(exc).__name__}: {str(exc)[:500]})")


def _prepare_worker(args):
    tokenizer_path, sample, hd_num, max_length, max_media, max_pixels, escape = args
    tok = _worker_tokenizer(tokenizer_path)
    try:
        return prepare_sample(tok, sample, hd_num=hd_num, max_length=max_length, max_media=max_media,
                              max_pixels=max_pixels, escape_special=escape)
    except Exception as exc:  # noqa: BLE001 (whatever one sample holds is its own error, never the job's)
        return as_sample_error(exc)


def _init_worker(n_threads: int) -> None:
    """Workers leave Ctrl-C to the parent (which stops them), instead of each printing a traceback; each gets its
    share of the cores (torch's default, all cores in every process, oversubscribes)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init_worker_threads(n_threads)


_WORKER_TOKENIZERS: dict[str, Tokenizer] = {}  # per worker process, read-only after first load


def _worker_tokenizer(path: str) -> Tokenizer:
    if path not in _WORKER_TOKENIZERS:
        _WORKER_TOKENIZERS[path] = Tokenizer.from_file(path)
    return _WORKER_TOKENIZERS[path]


@dataclass(slots=True)
class ScoringEngine:
    runner: ModelRunner
    tokenizer: Tokenizer
    tokenizer_path: str
    pooling: str
    max_length: int
    cfg: EngineConfig = field(default_factory=EngineConfig)
    stats: EngineStats = field(default_factory=EngineStats)
    _host: Any = None
    _blocks: Any = None
    _block_sum: np.ndarray | None = None
    _pool: ProcessPoolExecutor | None = None

    MAX_WAVES = 4

    def __post_init__(self) -> None:
        if self.cfg.max_length is not None:
            self.max_length = self.cfg.max_length
        self._host = get_host_core()
        if self.cfg.prefix_cache:
            self._init_cache()

    def _init_cache(self) -> None:
        bs = self.cfg.block_size
        tokens = self.cfg.kv_cache_tokens or max(4 * self.cfg.max_batch_tokens, 2 * self.max_length)
        if self.runner.device.type == "cuda" and self.cfg.kv_cache_tokens is None:
            free, _ = torch.cuda.mem_get_info(self.runner.device)
            tokens = min(tokens, int(0.4 * free) // self.runner.kv_bytes_per_block(bs) * bs)
        num_blocks = max(tokens // bs, (self.max_length + bs - 1) // bs + 1)
        self.runner.allocate_kv_cache(num_blocks, bs)
        self._blocks = self._host.BlockManager(num_blocks, bs)
        self._block_sum = np.zeros(num_blocks, dtype=np.float64)

    # --- preparation ----------------------------------------------------------------------------------------------
    def prepare(self, samples: list[Sample], hd_num: int | None = None) -> list[PreparedSample | SampleError]:
        """Inline preparation (tokenize, decode, crop); identical media in the list are loaded once.

        hd_num: the HD crop budget (default: cfg.hd_num)."""
        hd_num = self.cfg.hd_num if hd_num is None else hd_num
        # Prepared here for a model in this process: uint8 sub-crops save bytes only on their way to a GPU; a CPU
        # model would normalise them a second time (~5% of the README job), so it gets them normalised once.
        compact = self.runner.device.type != "cpu"
        t0 = time.perf_counter()
        media_cache: dict = {}
        out: list[PreparedSample | SampleError] = []
        for s in samples:
            try:
                out.append(prepare_sample(
                    self.tokenizer, s, hd_num=hd_num, max_length=self.max_length, media_cache=media_cache,
                    max_media=self.cfg.max_media, max_pixels=self.cfg.max_image_pixels,
                    escape_special=self.cfg.escape_special_tokens, compact_media=compact,
                ))
            except Exception as exc:  # noqa: BLE001 (whatever one sample holds is its own error, never the job's)
                out.append(as_sample_error(exc))
        self.stats.cpu_seconds += time.perf_counter() - t0
        return out

    # --- scheduling -----------------------------------------------------------------------------------------------
    def score_prepared(self, preps: list[PreparedSample]) -> list[float | SampleError]:
        """Scores for prepared samples (any order of lengths); prefix sharing within the list when the cache is on."""
        results: list[float | SampleError | None] = [None] * len(preps)
        for _ in self._score_batches(preps, results):
            pass
        return results

    def _score_batches(self, preps: list[PreparedSample], results: list) -> Iterator[list[int]]:
        """Fills results[i] batch by batch; yields the indices of each batch as it finishes."""
        for p in preps:
            self.stats.tokens_requested += p.n_tokens
            self.stats.media_requested += len(p.media)
        if not self.cfg.prefix_cache:
            yield from self._run_wave(list(range(len(preps))), preps, None, results, [p.n_tokens for p in preps])
            return
        bs = self.cfg.block_size
        hashes = [self._host.block_hashes(p.content_keys(), bs) for p in preps]
        # Waves: of the samples whose first not-yet-cached block is the same, the longest ("leader") runs now and puts
        # its blocks in the cache; the others wait for a later wave and reuse every block they share with it. With
        # the longest as leader a chain of nested samples (one conversation scored at every turn) or a best-of-N
        # group needs two waves. MAX_WAVES bounds the batch boundaries of deep branching trees; the last wave takes
        # everyone left.
        remaining = list(range(len(preps)))
        for wave_no in range(self.MAX_WAVES):
            if not remaining:
                break
            groups: dict[int, list[int]] = {}
            wave, to_compute = [], {}
            for i in remaining:
                h = hashes[i]
                usable = (preps[i].n_tokens - 1) // bs if self._shareable(preps[i]) else 0
                cached = list(self._blocks.match_prefix(h[:usable]))  # a look-up: the references go right back
                self._blocks.release(cached[::-1])
                k = len(cached)
                to_compute[i] = preps[i].n_tokens - k * bs
                if k < usable and wave_no < self.MAX_WAVES - 1:
                    groups.setdefault(int(h[k]), []).append(i)
                else:
                    wave.append(i)
            later = []
            for members in groups.values():
                leader = max(members, key=lambda i: preps[i].n_tokens)  # first of the longest
                wave.append(leader)
                later += [i for i in members if i != leader]
            wave.sort()
            later.sort()
            yield from self._run_wave(wave, preps, hashes, results, [to_compute[i] for i in wave])
            remaining = later

    def _run_wave(self, wave: list[int], preps, hashes, results, to_compute: list[int]) -> Iterator[list[int]]:
        """Token-budget batches of one wave, in order; the budget counts the tokens each sample will compute (its
        length less the cached prefix found when the wave was formed).

        Pipelined: batch k+1 is packed and queued on the device before batch k's scores are read back (the batch's
        only sync), so the host's packing overlaps the device's work. With mean pooling and the cache, a batch's
        per-block score sums must be known before the next batch may reuse its blocks: there each batch is read back
        before the next one is launched."""
        order = self._host.plan_batches(
            np.array(to_compute, dtype=np.int64), self.cfg.max_batch_tokens, self.cfg.max_batch_seqs,
        )
        overlap = not (hashes is not None and self.pooling == "mean")
        queued: list[tuple[list[int], list]] = []  # launched batches not read back yet: (indices, finishers)

        def drain() -> list[int]:
            idx, finishers = queued.pop(0)
            for finish in finishers:
                finish()
            return idx

        try:
            for batch in order:
                idx = [wave[j] for j in batch]
                queued.append((idx, self._run_batch(idx, preps, hashes, results)))
                while len(queued) > (1 if overlap else 0):
                    yield drain()
            while queued:
                yield drain()
        finally:
            while queued:  # read back what was launched, also when a later launch failed
                drain()

    def _run_batch(self, idx: list[int], preps, hashes, results) -> list:
        """Launch one batch; returns the callables that read its scores back (several after an out-of-memory
        split, whose halves run one after the other)."""
        if not idx:
            return []
        try:
            return [self._launch_batch(idx, preps, hashes, results)]
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            if len(idx) == 1:
                results[idx[0]] = SampleError(f"out of memory scoring this sample alone ({preps[idx[0]].n_tokens} "
                                              f"tokens): {exc}")
                return []
            self.stats.oom_splits += 1
            if self.runner.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(idx) // 2
            for finish in self._run_batch(idx[:half], preps, hashes, results):
                finish()
            return self._run_batch(idx[half:], preps, hashes, results)

    def _launch_batch(self, idx, preps, hashes, results):
        plans: list[SeqPlan] = []
        held: list[list[int]] = []
        bs = self.cfg.block_size
        want_sums = hashes is not None and self.pooling == "mean"

        def release() -> None:
            # Tail first: the LRU then evicts a sequence's last blocks before its (more shareable) first ones; a
            # chain whose first block is gone can never match again.
            for blocks in held:
                self._blocks.release(blocks[::-1])

        try:
            for i in idx:
                p = preps[i]
                if hashes is None:
                    plans.append(SeqPlan(p))
                    continue
                usable = (p.n_tokens - 1) // bs  # leave at least the last token to compute
                if not self._shareable(p):
                    usable = 0
                matched = list(self._blocks.match_prefix(hashes[i][:usable]))
                held.append(matched)
                n_blocks = (p.n_tokens + bs - 1) // bs
                fresh = list(self._blocks.allocate(n_blocks - len(matched)))
                held[-1] = matched + fresh
                prefix_sum = float(self._block_sum[matched].sum()) if matched else 0.0
                plans.append(SeqPlan(p, start=len(matched) * bs, block_table=matched + fresh, prefix_sum=prefix_sum))
            slot_mapping = block_tables = None
            if hashes is not None:
                starts = np.array([pl.start for pl in plans], dtype=np.int32)
                lens = np.array([pl.new_tokens for pl in plans], dtype=np.int32)
                tables = [pl.block_table for pl in plans]
                slot_mapping = self._host.build_slot_mapping(tables, starts, lens, bs)
                block_tables = self._host.block_table_array(tables, None)
            pending = self.runner.launch(
                plans, pooling=self.pooling, slot_mapping=slot_mapping, block_tables=block_tables,
                want_block_sums=want_sums,
            )
            if hashes is not None and not want_sums:
                self._register(idx, plans, preps, hashes, None)
        except BaseException:
            release()
            raise
        if not want_sums:
            # The next batch may reuse these blocks now: its device work is queued behind this batch's, in order.
            release()

        def finish() -> None:
            try:
                out = self.runner.finish(pending)
                if want_sums:
                    self._register(idx, plans, preps, hashes, out.block_sums)
            finally:
                if want_sums:
                    release()
            for i, pl, s in zip(idx, plans, out.scores):
                results[i] = s
                self.stats.tokens_computed += pl.new_tokens
                self.stats.prefix_tokens_reused += pl.start
            self.stats.media_encoded += out.media_encoded
            self.stats.crops_encoded += out.crops_encoded
            self.stats.batches += 1
            self.stats.gpu_seconds = self.runner.stats.gpu_seconds

        return finish

    def _register(self, idx, plans, preps, hashes, block_sums) -> None:
        """Put the full blocks each sequence computed in the prefix index (with their score sums for mean pooling)."""
        bs = self.cfg.block_size
        for k, (i, pl) in enumerate(zip(idx, plans)):
            if not self._shareable(preps[i]):
                continue
            first, last = pl.start // bs, preps[i].n_tokens // bs  # full blocks computed in this pass
            fresh = pl.block_table[first:last]
            self._blocks.register_blocks(fresh, hashes[i][first:last])
            if block_sums is not None and fresh:
                self._block_sum[fresh] = block_sums[k]

    def _shareable(self, p: PreparedSample) -> bool:
        """Past max_position_embeddings the dynamic-NTK RoPE base depends on the sequence length, so cached K of
        such a sequence is not valid for any other sequence (and vice versa)."""
        mcfg = self.runner.model.cfg
        return mcfg.rope_scaling_factor == 1.0 or p.n_tokens <= mcfg.max_position_embeddings

    # --- streaming ------------------------------------------------------------------------------------------------
    def score_stream(
        self, samples: Iterable[Sample | tuple[int, Sample | SampleError]], hd_num: int | None = None
    ) -> Iterator[ScoreResult]:
        """Score an iterable of samples window by window; results come in input order, errors as results too.

        Items may be `Sample`s or `(index, Sample | SampleError)` pairs (the CLI passes parse errors through so that
        every input line gets exactly one result); a `PreparedSample` in place of a Sample is scored as it is (it must
        have been prepared with `preparation()`'s settings and this hd_num). With `workers > 0` the next window is
        prepared in worker processes while the current one is on the device. hd_num (default cfg.hd_num) is fixed
        when this is called, so other calls on the engine while the stream is consumed do not change it.
        """
        hd_num = self.cfg.hd_num if hd_num is None else hd_num
        if not isinstance(hd_num, int) or isinstance(hd_num, bool) or hd_num < 1:
            raise ValueError(f"hd_num must be an integer >= 1, got {hd_num!r}")
        return self._stream(samples, hd_num)

    def _stream(self, samples, hd_num: int) -> Iterator[ScoreResult]:
        if self.cfg.workers > 0 and self._pool is None:  # kept for later calls (RL loops call score repeatedly)
            self._pool = self._new_pool()
        pending = None
        for window in self._windows(samples):
            submitted = self._submit(window, self._pool, hd_num)
            if self._pool is None:  # prepared inline: nothing to overlap, so its results come first
                yield from self._finish(window, submitted)
                continue
            if pending is not None:
                yield from self._finish(*pending)
            pending = (window, submitted)
        if pending is not None:
            yield from self._finish(*pending)

    def close(self) -> None:
        """Stop the preprocessing worker processes, if any."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    FIRST_WINDOW = 8  # with workers: samples in the first window, so that the device starts while the next is made

    def _windows(self, samples) -> Iterator[list[tuple[int, Sample | SampleError]]]:
        window: list[tuple[int, Sample | SampleError]] = []
        # ramp_up: windows of 4, 8, 16, ... samples up to cfg.window, so that the first results (and a first rate)
        # come after a few samples are prepared, not after a whole window of decoding and cropping; with workers and
        # no ramp-up, a small first window so that the device starts while the next one is made
        if self.cfg.ramp_up:
            size = min(4, self.cfg.window)
        else:
            size = min(self.cfg.window, self.FIRST_WINDOW) if self.cfg.workers > 0 else self.cfg.window
        for counter, item in enumerate(samples):
            window.append(item if isinstance(item, tuple) else (counter, item))
            if len(window) >= size:
                yield window
                window = []
                size = min(2 * size, self.cfg.window) if self.cfg.ramp_up else self.cfg.window
        if window:
            yield window

    def _submit(self, window, pool, hd_num: int):
        """Start preparing a window: futures in worker processes, or the finished list when inline. Items prepared
        already (a `PreparedSample`, made with `preparation()`'s settings elsewhere) are taken as they are."""
        real = [s for _, s in window if isinstance(s, (Sample, PreparedSample))]
        if pool is None:
            made = iter(self.prepare([s for s in real if isinstance(s, Sample)], hd_num))
            return [s if isinstance(s, PreparedSample) else next(made) for s in real]
        return [s if isinstance(s, PreparedSample) else self._submit_one(pool, (
            self.tokenizer_path, s, hd_num, self.max_length, self.cfg.max_media, self.cfg.max_image_pixels,
            self.cfg.escape_special_tokens)) for s in real]

    def preparation(self) -> dict:
        """What `prepare_sample` needs besides the tokenizer, sample and hd_num to prepare a sample exactly as this
        engine would (plain values: it crosses to other processes, e.g. the server's HTTP process)."""
        return {"tokenizer_path": str(self.tokenizer_path), "max_length": self.max_length,
                "max_media": self.cfg.max_media, "max_pixels": self.cfg.max_image_pixels,
                "escape_special": self.cfg.escape_special_tokens}

    def _submit_one(self, pool, args) -> Future:
        try:
            fut = pool.submit(_prepare_worker, args)
        except BrokenProcessPool as exc:  # broke while the previous window ran: retried in _worker_result
            fut = Future()
            fut.set_exception(exc)
        fut.ixc_args, fut.ixc_pool = args, pool
        return fut

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: forking a process whose torch thread pools are running can deadlock the child
        return ProcessPoolExecutor(self.cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(worker_threads(self.cfg.workers),))

    def _worker_result(self, fut: Future):
        """A worker's preparation of one sample. When a worker process died (killed for memory, a crash in a
        decoder), every pending sample of that pool fails, not only the culprit: each is retried alone in a fresh
        pool, and one that kills a worker twice becomes its own SampleError. Nothing is lost and the main process
        never runs a sample that killed a worker."""
        try:
            return fut.result()
        except BrokenProcessPool:
            pass
        except Exception as exc:  # noqa: BLE001 (a result that failed to come back, e.g. unpicklable: its own error)
            return as_sample_error(exc)
        for _ in range(2):
            if self._pool is None or self._pool is fut.ixc_pool:
                if self._pool is not None:
                    self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
            fut = self._submit_one(self._pool, fut.ixc_args)
            try:
                return fut.result()
            except BrokenProcessPool:
                continue
            except Exception as exc:  # noqa: BLE001
                return as_sample_error(exc)
        return SampleError("preparing this sample killed a worker process twice (out of memory, or a crash in an "
                           "image or video decoder); it is not scored")

    def _finish(self, window, submitted) -> Iterator[ScoreResult]:
        """Results of one window in input order, each as soon as it and all before it are known (batch by batch)."""
        t0 = time.perf_counter()
        prepared = [self._worker_result(f) if isinstance(f, Future) else f for f in submitted]
        self.stats.cpu_seconds += time.perf_counter() - t0 if submitted and hasattr(submitted[0], "result") else 0.0
        real = [k for k, (_, s) in enumerate(window) if isinstance(s, (Sample, PreparedSample))]
        outcome: dict[int, PreparedSample | SampleError] = dict(zip(real, prepared))
        if self.cfg.strict:
            for k, o in outcome.items():
                if isinstance(o, PreparedSample) and o.warnings:
                    outcome[k] = SampleError("rejected by --strict: " + "; ".join(o.warnings))
        ok = [(k, p) for k, p in outcome.items() if isinstance(p, PreparedSample)]
        ready: dict[int, ScoreResult] = {}

        def result(k: int, o, score) -> ScoreResult:
            index, s = window[k]
            sid = s.id if isinstance(s, (Sample, PreparedSample)) else getattr(s, "sample_id", None)
            self.stats.samples += 1
            if isinstance(o, PreparedSample) and isinstance(score, SampleError):
                o, score = score, None
            if isinstance(o, PreparedSample) and not math.isfinite(score):
                o = SampleError(f"the model gave a non-finite score ({score}) for this sample; it is not written as a "
                                "score (check the checkpoint, the dtype and the sample)")
            if isinstance(o, PreparedSample):
                return ScoreResult(index, sid, float(score), o.n_tokens, warnings=list(o.warnings))
            self.stats.errors += 1
            return ScoreResult(index, sid, None, getattr(o, "n_tokens", None), str(o))

        for k, (_, s) in enumerate(window):
            o = outcome.get(k, s)
            if not isinstance(o, PreparedSample):
                ready[k] = result(k, o, None)
        next_k = 0
        while next_k in ready:
            yield ready.pop(next_k)
            next_k += 1
        scores: list = [None] * len(ok)
        for batch in self._score_batches([p for _, p in ok], scores):
            for j in batch:
                k, p = ok[j]
                ready[k] = result(k, p, scores[j])
            while next_k in ready:
                yield ready.pop(next_k)
                next_k += 1
