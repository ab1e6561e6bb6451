"""The engine in a process of its own: what `ixc-engine serve` runs by default.

Why: in one process the HTTP side (uvicorn, Starlette, JSON, request parsing) and the scheduler thread share one
GIL, so they take turns instead of running side by side. Measured under 64 concurrent /get_reward requests with the
demo model on CPU (bench/RESULTS.md): the server process used ~1.6 ms of CPU per request and its wall time per
request was about that, i.e. one core's worth of work done one thing at a time, while direct `RewardEngine.score`
needs ~1.15 ms per sample. With the engine in its own process (its own GIL and core), the HTTP work overlaps the
scoring, as in vLLM's split of API server and engine core.

`ProcessBatcher` has the `Batcher` interface the app uses (submit -> Future, depth, start, stop, batches,
samples_scored, on_batch). The child process loads the model, runs the ordinary `Batcher` (one scheduler thread owning
the engine, dynamic batching, the prefix cache across requests) and answers each request's samples over a pipe.
Admission (--max-queue) is decided in the server process, so a 503 never waits on the child. Small requests of
text-only samples are prepared (templated and tokenized) in the server process (`TextPreparer`), as vLLM's API server
tokenizes for its engine core: under load the engine process is the bottleneck, and preparation was 13% of its time.
The child ignores SIGINT and SIGTERM: the server process tells it to drain and stop, and it also stops when the server
process dies (its end of the pipe closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import pickle
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass, field, replace

from ixc_engine.engine.engine import ScoreResult
from ixc_engine.serve.batcher import BatcherConfig, BatchInfo, QueueFull, ShuttingDown


@dataclass(slots=True)
class EngineSpec:
    """What the engine process loads: `RewardEngine.from_pretrained(model, device=, dtype=, config=)`."""

    model: str
    device: str | None = None
    dtype: str | None = None
    config: object = None  # EngineConfig (None: its defaults)
    threads: int | None = None  # torch CPU threads of the engine process (None: torch's default)
    info: dict = field(default_factory=dict)  # filled once loaded: device, dtype


BIG_JOB_BYTES = 1 << 20


@dataclass(slots=True)
class TextPreparer:
    """Prepares text-only samples in the server process, exactly as the engine would: same tokenizer and settings, told
    by the engine process once it has loaded the model (`ScoringEngine.preparation`). A sample with media (decoding and
    cropping would hold up the event loop), or one whose preparation fails (the engine then reports the error in its
    own words), goes as it is. Runs on the event loop: ~0.2 ms per sample of the bench's text workload, so only
    requests of at most MAX_SAMPLES samples, each of at most MAX_CHARS characters of text, are prepared here (a body of
    megabytes of text would hold up every other request while it is tokenized)."""

    settings: dict
    tokenizer: object = None

    MAX_SAMPLES = 16
    MAX_CHARS = 32768

    def __post_init__(self) -> None:
        from ixc_engine.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.from_file(self.settings["tokenizer_path"])

    def __call__(self, samples: list, hd_num: int) -> list:
        if len(samples) > self.MAX_SAMPLES:
            return samples
        from ixc_engine.engine.sequence import Sample, prepare_sample

        st = self.settings
        out = []
        for s in samples:
            if isinstance(s, Sample) and not s.media and _text_chars(s.messages) <= self.MAX_CHARS:
                try:
                    s = prepare_sample(self.tokenizer, s, hd_num=hd_num, max_length=st["max_length"],
                                       max_media=st["max_media"], max_pixels=st["max_pixels"],
                                       escape_special=st["escape_special"])
                except Exception:  # noqa: BLE001, S110 - the engine prepares it again and reports its error
                    pass
            out.append(s)
        return out


def _text_chars(messages) -> float:
    """Characters of the messages' text; infinite when a message is not the plain {role, content: str} form."""
    total = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, str):
            return float("inf")
        total += len(content)
    return total


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _inline_bytes(samples) -> int:
    """Bytes of in-memory media (decoded data: URIs) the samples carry."""
    return sum(len(m.data) for s in samples for m in s.media if isinstance(getattr(m, "data", None), bytes))


class EngineProcessError(RuntimeError):
    """The engine process could not load the model, or died."""


def _engine_main(spec: EngineSpec, cfg: BatcherConfig, conn) -> None:
    """Entry point of the engine process."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server drains us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # so does a service manager's SIGTERM
    send_lock = threading.Lock()

    def send(msg) -> None:
        with send_lock:
            try:
                conn.send(msg)
            except (OSError, ValueError):  # the server process is gone: nothing to answer to
                pass

    try:
        import torch

        from ixc_engine.api import RewardEngine
        from ixc_engine.serve.batcher import Batcher

        if spec.threads:
            torch.set_num_threads(spec.threads)
        engine = RewardEngine.from_pretrained(spec.model, device=spec.device, dtype=spec.dtype, config=spec.config)
    except BaseException as exc:  # noqa: BLE001 - reported to the server process, which reports it to the user
        send(("error", f"{type(exc).__name__}: {exc}"))
        return
    runner = engine.engine.runner
    # Answers and batch counters leave through one sender thread, which sends whatever has piled up as one message: the
    # scheduler thread only queues them (no pickling or pipe write per request in the engine's thread), and the server
    # process is woken once per burst of answers, not once per request.
    outbox: queue.SimpleQueue = queue.SimpleQueue()

    def sender() -> None:
        while True:
            msgs = [outbox.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    msgs.append(outbox.get_nowait())
            last = msgs[-1] is None  # the end
            msgs = [m for m in msgs if m is not None]
            if msgs:
                send(("many", msgs))
            if last:
                return

    batcher = Batcher(engine, cfg, on_batch=lambda info: outbox.put(("batch", info)))
    jobs: dict[int, Future] = {}

    def answer(jid: int, fut: Future) -> None:
        jobs.pop(jid, None)
        if fut.cancelled():
            outbox.put(("fail", jid, CancelledError()))
        elif fut.exception() is not None:
            exc = fut.exception()
            try:
                pickle.dumps(exc)
            except Exception:  # noqa: BLE001 - an exception that does not pickle
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            outbox.put(("fail", jid, exc))
        else:  # plain tuples: a tenth of the pickling time of the dataclasses
            outbox.put(("done", jid, [(r.index, r.id, r.score, r.n_tokens, r.error, r.warnings) for r in fut.result()]))

    def job(jid: int, samples, hd_num: int, timeout_s: float) -> None:
        fut = batcher.submit(samples, hd_num, timeout_s)
        jobs[jid] = fut
        fut.add_done_callback(lambda f: answer(jid, f))

    out = threading.Thread(target=sender, name="ixc-engine-answers", daemon=True)
    try:
        batcher.start()
        out.start()
        send(("ready", {"device": str(runner.device), "dtype": str(runner.dtype).removeprefix("torch."),
                        "preparation": engine.engine.preparation()}))
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the server process died
                break
            if msg[0] == "jobs":  # the requests one turn of the server's event loop submitted
                for item in msg[1]:
                    job(*item)
            elif msg[0] == "job":
                job(*msg[1:])
            elif msg[0] == "cancel":
                fut = jobs.get(msg[1])
                if fut is not None:
                    fut.cancel()
            elif msg[0] == "stop":
                break
    finally:
        batcher.stop()  # finishes what is queued
        engine.close()
        outbox.put(None)
        if out.is_alive():
            out.join()
        send(("stopped",))
        conn.close()


class ProcessBatcher:
    """The `Batcher` interface, with the engine and its scheduler thread in a child process (see the module doc)."""

    def __init__(self, spec: EngineSpec, cfg: BatcherConfig | None = None,
                 on_batch: Callable[[BatchInfo], None] | None = None, start_timeout_s: float = 3600.0,
                 prepare_here: bool = True) -> None:
        self.spec = spec
        self.prepare_here = prepare_here  # text-only samples of small requests prepared in this process
        self.cfg = cfg or BatcherConfig()
        self.on_batch = on_batch
        self.start_timeout_s = start_timeout_s
        self.batches = 0
        self.samples_scored = 0
        self._lock = threading.Lock()  # jobs, depth, flags
        self._send_lock = threading.Lock()
        self._jobs: dict[int, tuple[Future, int]] = {}
        self._ids = itertools.count()
        self._depth = 0
        self._stopping = False
        self._dead: str | None = None  # why the engine process is gone, once it is
        self._proc = None
        self._conn = None
        self._reader: threading.Thread | None = None
        self._sender = None  # a thread for jobs carrying megabytes of in-memory media (data: URIs)
        self._outbox: list = []  # jobs submitted on the event loop, not sent yet
        self._prepare: TextPreparer | None = None  # once the engine process has told its settings

    # --- request side (any thread) --------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._proc is not None

    @property
    def alive(self) -> bool:
        return self._dead is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def dead_reason(self) -> str | None:
        return self._dead

    @property
    def depth(self) -> int:
        return self._depth

    def submit(self, samples: list, hd_num: int, timeout_s: float) -> Future:
        fut: Future = Future()
        samples = list(samples)
        if not samples:
            fut.set_result([])
            return fut
        with self._lock:
            if self._dead is not None:
                raise ShuttingDown(self._dead)
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self._depth + len(samples) > self.cfg.max_queue:
                raise QueueFull(f"{self._depth} samples are queued or being scored; the limit is {self.cfg.max_queue}")
            jid = next(self._ids)
            self._jobs[jid] = (fut, len(samples))
            self._depth += len(samples)
        if self._prepare is not None:
            samples = self._prepare(samples, hd_num)
        msg = ("job", jid, samples, hd_num, timeout_s)
        if _inline_bytes(samples) > BIG_JOB_BYTES:  # pickling and piping megabytes would hold up the event loop
            self._big_sender().submit(self._send_big, msg, jid, fut)
        elif (loop := _running_loop()) is not None:
            # on the event loop: the requests of one loop turn go to the engine process as one message (one pipe
            # write, one wake-up of its reader), sent at the start of the next turn
            with self._lock:
                self._outbox.append((jid, samples, hd_num, timeout_s))
                first = len(self._outbox) == 1
            if first:
                loop.call_soon(self._flush)
        else:
            try:
                self._send(msg)
            except BaseException:
                self._pop(jid)
                raise
        fut.add_done_callback(lambda f: self._on_done(jid, f))
        return fut

    def _flush(self) -> None:
        with self._lock:
            items, self._outbox = self._outbox, []
        if not items:
            return
        try:
            self._send(("jobs", items))
        except ShuttingDown as exc:  # the engine process is gone: these requests fail now
            for jid, *_ in items:
                item = self._pop(jid)
                if item is not None:
                    with contextlib.suppress(InvalidStateError):
                        item[0].set_exception(RuntimeError(str(exc)))

    def _big_sender(self):
        with self._lock:
            if self._sender is None:
                from concurrent.futures import ThreadPoolExecutor

                self._sender = ThreadPoolExecutor(1, thread_name_prefix="ixc-engine-send")
            return self._sender

    def _send_big(self, msg, jid: int, fut: Future) -> None:
        try:
            self._send(msg)
        except BaseException as exc:  # noqa: BLE001 - the request's failure, not the sender thread's
            if self._pop(jid) is not None:
                with contextlib.suppress(InvalidStateError):
                    fut.set_exception(exc)

    def _on_done(self, jid: int, fut: Future) -> None:
        if fut.cancelled():  # the request gave up (deadline, disconnect): the child skips its samples
            with contextlib.suppress(OSError, ValueError, EngineProcessError):
                self._send(("cancel", jid))

    def _send(self, msg) -> None:
        with self._send_lock:
            try:
                self._conn.send(msg)
            except (OSError, ValueError) as exc:  # the pipe is closed: the child died
                raise ShuttingDown(self._dead or f"the engine process is gone ({exc})") from None

    def _pop(self, jid: int):
        with self._lock:
            item = self._jobs.pop(jid, None)
            if item is not None:
                self._depth -= item[1]
            return item

    # --- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine process and wait until it has loaded the model (EngineProcessError if it cannot)."""
        if self._proc is not None:
            raise RuntimeError("batcher already started")
        ctx = multiprocessing.get_context("spawn")  # not fork: a forked torch process can deadlock
        self._conn, child = ctx.Pipe()
        # the child's queue is never the limit: admission is decided here, before a request is sent
        child_cfg = replace(self.cfg, max_queue=1 << 40)
        self._proc = ctx.Process(target=_engine_main, args=(self.spec, child_cfg, child), name="ixc-engine")
        self._proc.start()
        child.close()
        try:
            msg = self._wait_ready()
        except BaseException:  # e.g. Ctrl-C while the model loads: the child ignores SIGINT, so end it here
            self._proc.kill()
            self._proc.join()
            self._conn.close()
            raise
        if msg[0] != "ready":
            self._dead = msg[1]
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
            self._conn.close()
            raise EngineProcessError(f"cannot load the model {self.spec.model}: {msg[1]}")
        self.spec.info.update(msg[1])
        if self.prepare_here and "preparation" in msg[1]:
            self._prepare = TextPreparer(msg[1]["preparation"])
        self._reader = threading.Thread(target=self._read, name="ixc-engine-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self):
        deadline = time.monotonic() + self.start_timeout_s
        def exited():
            self._proc.join(5)
            return ("error", f"the engine process exited while loading the model (exit code {self._proc.exitcode})")

        while True:
            if self._conn.poll(0.2):
                try:
                    return self._conn.recv()
                except (EOFError, OSError):
                    return exited()
            if not self._proc.is_alive():
                return exited()
            if time.monotonic() > deadline:
                return ("error", f"the engine process did not load the model within {self.start_timeout_s:.0f} s")

    def _dispatch(self, msg) -> None:
        kind = msg[0]
        if kind == "done" or kind == "fail":
            item = self._pop(msg[1])
            if item is None:
                return
            fut = item[0]
            with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
                if kind == "done":
                    fut.set_result([ScoreResult(*r) for r in msg[2]])
                elif not isinstance(msg[2], CancelledError):
                    fut.set_exception(msg[2])
        elif kind == "batch":
            info: BatchInfo = msg[1]
            self.batches += 1
            self.samples_scored += info.samples
            if self.on_batch is not None:
                self.on_batch(info)

    def stop(self, timeout: float | None = None) -> None:
        """Take no new work; the engine process finishes what it holds, answers it, and exits."""
        with self._lock:
            self._stopping = True
        if self._proc is None:
            return
        if self._sender is not None:
            self._sender.shutdown(wait=True)  # the jobs handed to it go before the stop message
        self._flush()
        with contextlib.suppress(ShuttingDown):
            self._send(("stop",))
        if self._reader is not None:
            self._reader.join(timeout)
        self._proc.join(timeout if timeout is not None else 60)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()

    def _read(self) -> None:
        """Answers from the engine process -> the requests' futures."""
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "stopped":
                break
            for m in msg[1] if msg[0] == "many" else (msg,):
                self._dispatch(m)
        # whatever is still pending will never be answered
        self._proc.join(5)
        code = self._proc.exitcode
        with self._lock:
            if not self._stopping or self._jobs:
                self._dead = f"the engine process exited unexpectedly (exit code {code})"
            else:
                self._dead = "the server is shutting down"
            pending = list(self._jobs.values())
            self._jobs.clear()
            self._depth = 0
        for fut, _ in pending:
            with contextlib.suppress(InvalidStateError):
                fut.set_exception(RuntimeError(self._dead))
