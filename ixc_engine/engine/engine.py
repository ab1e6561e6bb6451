"""The scoring engine: prepares samples on the CPU, schedules them into packed batches under a token budget, reuses
cached prefixes through the paged KV cache, and yields scores in input order."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ixc_engine.engine.cpu import init_worker_threads, worker_threads
from ixc_engine.engine.host import get_host_core
from ixc_engine.engine.runner import ModelRunner, SeqPlan
from ixc_engine.engine.sequence import PreparedSample, Sample, SampleError, prepare_sample
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

    def __post_init__(self) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        for name in ("hd_num", "max_batch_tokens", "max_batch_seqs", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(slots=True)
class ScoreResult:
    index: int
    id: Any
    score: float | None
    n_tokens: int | None
    error: str | None = None


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


def _prepare_worker(args):
    tokenizer_path, sample, hd_num, max_length = args
    tok = _worker_tokenizer(tokenizer_path)
    try:
        return prepare_sample(tok, sample, hd_num=hd_num, max_length=max_length)
    except SampleError as exc:
        return exc


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
        t0 = time.perf_counter()
        media_cache: dict = {}
        out: list[PreparedSample | SampleError] = []
        for s in samples:
            try:
                out.append(prepare_sample(
                    self.tokenizer, s, hd_num=hd_num, max_length=self.max_length, media_cache=media_cache
                ))
            except SampleError as exc:
                out.append(exc)
        self.stats.cpu_seconds += time.perf_counter() - t0
        return out

    # --- scheduling -----------------------------------------------------------------------------------------------
    def score_prepared(self, preps: list[PreparedSample]) -> list[float | SampleError]:
        """Scores for prepared samples (any order of lengths); prefix sharing within the list when the cache is on."""
        results: list[float | SampleError | None] = [None] * len(preps)
        for p in preps:
            self.stats.tokens_requested += p.n_tokens
            self.stats.media_requested += len(p.media)
        if not self.cfg.prefix_cache:
            self._run_wave(list(range(len(preps))), preps, None, results, [p.n_tokens for p in preps])
            return results
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
            self._run_wave(wave, preps, hashes, results, [to_compute[i] for i in wave])
            remaining = later
        return results

    def _run_wave(self, wave: list[int], preps, hashes, results, to_compute: list[int]) -> None:
        """Token-budget batches of one wave, in order; the budget counts the tokens each sample will compute (its
        length less the cached prefix found when the wave was formed)."""
        order = self._host.plan_batches(
            np.array(to_compute, dtype=np.int64), self.cfg.max_batch_tokens, self.cfg.max_batch_seqs,
        )
        for batch in order:
            self._run_batch([wave[j] for j in batch], preps, hashes, results)

    def _run_batch(self, idx: list[int], preps, hashes, results) -> None:
        if not idx:
            return
        try:
            self._run_batch_once(idx, preps, hashes, results)
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            if len(idx) == 1:
                results[idx[0]] = SampleError(f"out of memory scoring this sample alone ({preps[idx[0]].n_tokens} "
                                              f"tokens): {exc}")
                return
            self.stats.oom_splits += 1
            if self.runner.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(idx) // 2
            self._run_batch(idx[:half], preps, hashes, results)
            self._run_batch(idx[half:], preps, hashes, results)

    def _run_batch_once(self, idx, preps, hashes, results) -> None:
        plans: list[SeqPlan] = []
        held: list[list[int]] = []
        bs = self.cfg.block_size
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
            want_sums = hashes is not None and self.pooling == "mean"
            out = self.runner.run(
                plans, pooling=self.pooling, slot_mapping=slot_mapping, block_tables=block_tables,
                want_block_sums=want_sums,
            )
            if hashes is not None:
                for k, (i, pl) in enumerate(zip(idx, plans)):
                    if not self._shareable(preps[i]):
                        continue
                    first, last = pl.start // bs, preps[i].n_tokens // bs  # full blocks computed in this pass
                    fresh = pl.block_table[first:last]
                    self._blocks.register_blocks(fresh, hashes[i][first:last])
                    if want_sums and fresh:
                        self._block_sum[fresh] = out.block_sums[k]
        finally:
            # Tail first: the LRU then evicts a sequence's last blocks before its (more shareable) first ones; a
            # chain whose first block is gone can never match again.
            for blocks in held:
                self._blocks.release(blocks[::-1])
        for i, pl, s in zip(idx, plans, out.scores):
            results[i] = s
            self.stats.tokens_computed += pl.new_tokens
            self.stats.prefix_tokens_reused += pl.start
        self.stats.media_encoded += out.media_encoded
        self.stats.crops_encoded += out.crops_encoded
        self.stats.batches += 1
        self.stats.gpu_seconds = self.runner.stats.gpu_seconds

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
        every input line gets exactly one result). With `workers > 0` the next window is prepared in worker processes
        while the current one is on the device. hd_num (default cfg.hd_num) is fixed when this is called, so other
        calls on the engine while the stream is consumed do not change it.
        """
        hd_num = self.cfg.hd_num if hd_num is None else hd_num
        if not isinstance(hd_num, int) or isinstance(hd_num, bool) or hd_num < 1:
            raise ValueError(f"hd_num must be an integer >= 1, got {hd_num!r}")
        return self._stream(samples, hd_num)

    def _stream(self, samples, hd_num: int) -> Iterator[ScoreResult]:
        if self.cfg.workers > 0 and self._pool is None:  # kept for later calls (RL loops call score repeatedly)
            # spawn, not fork: forking a process whose torch thread pools are running can deadlock the child
            # each worker gets its share of the cores: torch's default (all cores in every process) oversubscribes
            self._pool = ProcessPoolExecutor(self.cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=init_worker_threads,
                                             initargs=(worker_threads(self.cfg.workers),))
        pending = None
        for window in self._windows(samples):
            submitted = self._submit(window, self._pool, hd_num)
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

    def _windows(self, samples) -> Iterator[list[tuple[int, Sample | SampleError]]]:
        window: list[tuple[int, Sample | SampleError]] = []
        for counter, item in enumerate(samples):
            window.append(item if isinstance(item, tuple) else (counter, item))
            if len(window) >= self.cfg.window:
                yield window
                window = []
        if window:
            yield window

    def _submit(self, window, pool, hd_num: int):
        """Start preparing a window: futures in worker processes, or the finished list when inline."""
        real = [s for _, s in window if isinstance(s, Sample)]
        if pool is None:
            return self.prepare(real, hd_num)
        args = [(self.tokenizer_path, s, hd_num, self.max_length) for s in real]
        return [pool.submit(_prepare_worker, a) for a in args]

    def _finish(self, window, submitted) -> Iterator[ScoreResult]:
        t0 = time.perf_counter()
        prepared = [f.result() if hasattr(f, "result") else f for f in submitted]
        self.stats.cpu_seconds += time.perf_counter() - t0 if submitted and hasattr(submitted[0], "result") else 0.0
        real = [k for k, (_, s) in enumerate(window) if isinstance(s, Sample)]
        outcome: dict[int, PreparedSample | SampleError] = dict(zip(real, prepared))
        ok = [(k, p) for k, p in outcome.items() if isinstance(p, PreparedSample)]
        scores = self.score_prepared([p for _, p in ok]) if ok else []
        score_of = {k: s for (k, _), s in zip(ok, scores)}
        for k, (index, s) in enumerate(window):
            o = outcome.get(k, s)
            sid = s.id if isinstance(s, Sample) else getattr(s, "sample_id", None)
            self.stats.samples += 1
            if isinstance(o, PreparedSample) and not isinstance(score_of[k], SampleError):
                yield ScoreResult(index, sid, float(score_of[k]), o.n_tokens)
            else:
                err = score_of[k] if isinstance(o, PreparedSample) else o
                self.stats.errors += 1
                yield ScoreResult(index, sid, None, getattr(o, "n_tokens", None), str(err))
