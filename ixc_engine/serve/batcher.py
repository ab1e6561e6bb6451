"""Dynamic batching across requests: one scheduler thread owns the engine.

Requests put their samples on one FIFO queue. The scheduler takes what is queued (up to the engine's window of
samples), waiting at most `max_wait_ms` after the oldest arrived for more to come, and scores it with
`RewardEngine.score_stream` (a burst of many requests after the engine idled goes in two calls: see `_split_burst`):
the engine prepares the samples (inline or in its worker processes), packs them into
token-budget batches and matches their prefixes against the paged KV cache, which lives across calls, so candidates
of one prompt that arrive as separate requests compute the prompt once. Results go back to each request's
`concurrent.futures.Future` (awaited on the event loop through `asyncio.wrap_future`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from ixc_engine.api import RewardEngine, Sample, ScoreResult


class QueueFull(Exception):
    """More samples are waiting than --max-queue allows."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before its samples were scored."""


@dataclass(slots=True)
class BatcherConfig:
    max_wait_ms: float = 5.0  # how long the oldest queued sample may wait for company
    max_queue: int = 1024  # samples queued or being scored, over all requests
    max_gather: int | None = None  # samples per engine call (None: the engine's window)

    def __post_init__(self) -> None:
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.max_gather is not None and self.max_gather < 1:
            raise ValueError(f"max_gather must be >= 1, got {self.max_gather}")


@dataclass(slots=True)
class BatchInfo:
    """What one engine call did (for metrics)."""

    samples: int
    requests: int
    errors: int
    tokens_computed: int
    prefix_tokens_reused: int
    seconds: float
    idle_s: float = 0.0  # before this batch: the scheduler waited this long on an empty queue
    gather_s: float = 0.0  # ... then this long for more samples to join the first (max_wait)


@dataclass(slots=True)
class _Job:
    samples: list[Sample]
    hd_num: int
    deadline: float  # time.monotonic()
    future: Future
    arrived: float = 0.0  # time.monotonic() when queued
    results: list[ScoreResult | None] = field(default_factory=list)
    left: int = 0

    def __post_init__(self) -> None:
        self.results = [None] * len(self.samples)
        self.left = len(self.samples)


class Batcher:
    def __init__(self, engine: RewardEngine, cfg: BatcherConfig | None = None,
                 on_batch: Callable[[BatchInfo], None] | None = None) -> None:
        self.engine = engine
        self.cfg = cfg or BatcherConfig()
        self.on_batch = on_batch
        self._queue: deque[tuple[_Job, int]] = deque()
        self._cond = threading.Condition()
        self._in_flight = 0  # samples taken from the queue, not yet answered
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.samples_scored = 0
        self._limit = self.cfg.max_gather or engine.engine.cfg.window  # samples per engine call
        self._waits = (0.0, 0.0)  # (idle, gather) before the batch being run; scheduler thread only

    # --- request side (any thread) ----------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Samples waiting or being scored."""
        with self._cond:
            return len(self._queue) + self._in_flight

    def submit(self, samples: list[Sample], hd_num: int, timeout_s: float) -> Future:
        """Queue samples; the future gets their ScoreResults in order (or DeadlineExceeded). Raises QueueFull,
        ShuttingDown."""
        fut: Future = Future()
        now = time.monotonic()
        job = _Job(list(samples), hd_num, now + timeout_s, fut, arrived=now)
        if not job.samples:
            fut.set_result([])
            return fut
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) + self._in_flight + len(job.samples) > self.cfg.max_queue:
                raise QueueFull(f"{len(self._queue) + self._in_flight} samples are queued or being scored; the limit "
                                f"is {self.cfg.max_queue}")
            was_empty = not self._queue
            self._queue.extend((job, k) for k in range(len(job.samples)))
            # wake the scheduler only when it has something new to decide: the first sample (it then waits max_wait
            # for company) or a full gather; a wake-up per request would take the GIL from the event loop each time
            if was_empty or len(self._queue) >= self._limit:
                self._cond.notify()
        return fut

    # --- lifecycle ------------------------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("batcher already started")
        import torch

        # OpenMP thread counts are per thread: a new thread would use every core, whatever torch.set_num_threads said
        # in the thread that built the server (two OpenMP threads on a busy 2-core machine run ~10x slower)
        threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._loop, args=(threads,), name="ixc-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Take no new work, finish what is queued, then end the scheduler thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- scheduler thread -----------------------------------------------------------------------------------------
    def _gather(self) -> list[tuple[_Job, int]] | None:
        limit = self._limit
        wait = self.cfg.max_wait_ms / 1000.0
        t0 = time.monotonic()
        with self._cond:
            idle = not self._queue  # the engine has nothing to do: what comes now is a new burst
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            t1 = time.monotonic()
            # the oldest sample waits at most max_wait after it arrived for others to join it (none when stopping:
            # drain fast). From its arrival, not from now: samples that queued up while the engine was busy have waited
            # already, and waiting again would leave the engine idle between batches under load.
            until = self._queue[0][0].arrived + wait
            while len(self._queue) < limit and not self._stopping:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            taken = []
            while self._queue and len(taken) < limit:
                taken.append(self._queue.popleft())
            if idle:
                taken = self._split_burst(taken)
            self._in_flight += len(taken)
            self._waits = (t1 - t0, time.monotonic() - t1)
            return taken

    SPLIT_MIN_REQUESTS = 8

    def _split_burst(self, taken: list[tuple[_Job, int]]) -> list[tuple[_Job, int]]:
        """After the engine idled, a gather of many requests (at least 2 x SPLIT_MIN_REQUESTS) is scored in two calls:
        the first half's answers go out, and its clients' next requests come in, while the second half is scored, so
        the engine has work queued when it finishes. Without this, clients that each keep one request in flight (RL
        workers, bench_serve) fall into lock-step: one engine call with every request, then the engine idles while all
        the answers and the next requests cross HTTP (measured: idle 21% of the time at 64 in flight). Once the
        queue no longer runs dry, nothing is split. Halves are cut between requests; the rest goes back to the front
        of the queue. Caller holds the lock."""
        jobs = list(dict.fromkeys(id(j) for j, _ in taken))
        if len(jobs) < 2 * self.SPLIT_MIN_REQUESTS:
            return taken
        half = set(jobs[:len(jobs) // 2])
        cut = next(i for i, (j, _) in enumerate(taken) if id(j) not in half)
        self._queue.extendleft(reversed(taken[cut:]))
        return taken[:cut]

    def _loop(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        while True:
            taken = self._gather()
            if taken is None:
                return
            try:
                self._run(taken)
            finally:
                with self._cond:
                    self._in_flight -= len(taken)

    def _run(self, taken: list[tuple[_Job, int]]) -> None:
        now = time.monotonic()
        live = []
        for job, k in taken:
            if job.future.done():  # cancelled by its request (deadline or disconnect), or failed already
                continue
            if now > job.deadline:
                _fail(job, DeadlineExceeded("the request's deadline passed while it was queued"))
                continue
            live.append((job, k))
        if not live:
            return
        t0 = time.perf_counter()
        before = self.engine.stats()
        errors = 0
        by_hd: dict[int, list[tuple[_Job, int]]] = {}
        for job, k in live:
            by_hd.setdefault(job.hd_num, []).append((job, k))
        for hd_num, items in by_hd.items():
            try:
                stream = self.engine.score_stream([(n, job.samples[k]) for n, (job, k) in enumerate(items)],
                                                  hd_num=hd_num)
                for res in stream:
                    job, k = items[res.index]
                    errors += res.error is not None
                    _deliver(job, k, res)
            except Exception:  # noqa: BLE001 - an engine failure fails the guilty requests, not the server
                errors += self._isolate(items, hd_num)
        after = self.engine.stats()
        self.batches += 1
        self.samples_scored += len(live)
        if self.on_batch is not None:
            self.on_batch(BatchInfo(
                samples=len(live), requests=len({id(j) for j, _ in live}), errors=errors,
                tokens_computed=after["tokens_computed"] - before["tokens_computed"],
                prefix_tokens_reused=after["prefix_tokens_reused"] - before["prefix_tokens_reused"],
                seconds=time.perf_counter() - t0, idle_s=self._waits[0], gather_s=self._waits[1],
            ))


    def _isolate(self, items: list[tuple[_Job, int]], hd_num: int) -> int:
        """A batch raised: score its undelivered samples one by one, so that a sample the engine cannot take fails
        only its own request, not every request that shared the batch. Returns the number of per-sample errors."""
        errors = 0
        for job, k in items:
            if job.future.done() or job.results[k] is not None:
                continue
            try:
                for res in self.engine.score_stream([(0, job.samples[k])], hd_num=hd_num):
                    errors += res.error is not None
                    _deliver(job, k, res)
            except Exception as exc:  # noqa: BLE001
                _fail(job, RuntimeError(f"scoring failed: {type(exc).__name__}: {exc}"))
        return errors


def _deliver(job: _Job, k: int, res: ScoreResult) -> None:
    if job.results[k] is not None or job.future.done():
        return
    job.results[k] = res
    job.left -= 1
    if job.left == 0:
        with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
            job.future.set_result(job.results)


def _fail(job: _Job, exc: BaseException) -> None:
    if not job.future.done():
        with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
            job.future.set_exception(exc)
