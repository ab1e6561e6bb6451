"""The HTTP app (Starlette on uvicorn): OpenRLHF /get_reward, vLLM-style /pooling, native /v1/score and
/v1/best_of_n, /health, /v1/models, /metrics.

The event loop only reads bodies and writes answers: JSON decoding and request parsing run in a small thread pool,
scoring in the batcher's scheduler thread. Errors are JSON ``{"error": {"message", "type", "param", "code"}}`` with
a 4xx status naming the field; the server keeps serving after any of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ixc_engine.api import RewardEngine
from ixc_engine.serve.batcher import Batcher, BatcherConfig, BatchInfo, DeadlineExceeded, QueueFull, ShuttingDown
from ixc_engine.serve.schemas import (
    Limits,
    RequestError,
    decode_json,
    parse_best_of_n,
    parse_get_reward,
    parse_pooling,
    parse_score,
)

DRAIN_FACTOR = 4  # a body announced at up to 4x --max-body-mb is read before its 413; a larger one is refused at once
INLINE_PARSE_BYTES = 32 << 10  # smaller bodies (text, no media payload) are parsed on the event loop
ENDPOINTS = ("/get_reward", "/pooling", "/v1/score", "/v1/best_of_n", "/health", "/v1/models", "/metrics")


@dataclass(slots=True)
class ServeConfig:
    model_name: str = "ixc-reward"
    api_key: str | None = None
    media_root: Path | None = None
    max_body_bytes: int = 64 << 20
    max_items: int = 256
    max_media: int = 8
    hd_num: int = 9
    request_timeout_s: float = 120.0
    retry_after_s: int = 1
    parse_threads: int = 2
    batcher: BatcherConfig = field(default_factory=BatcherConfig)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_items", "max_media", "hd_num", "parse_threads", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key is empty: give a key or None")
        if self.media_root is not None:
            self.media_root = Path(self.media_root).resolve()
            if not self.media_root.is_dir():
                raise ValueError(f"media root {self.media_root} is not a directory")
        if self.max_items > self.batcher.max_queue:
            raise ValueError(f"max_items ({self.max_items}) is over max_queue ({self.batcher.max_queue}): a full-size "
                             "request could never be queued")

    def limits(self) -> Limits:
        return Limits(max_items=self.max_items, max_media=self.max_media, media_root=self.media_root,
                      max_data_uri_bytes=self.max_body_bytes, hd_num=self.hd_num, model_names=(self.model_name,))


class Metrics:
    """Prometheus metrics in the app's own registry (no global state)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("ixc_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.samples = Counter("ixc_samples", "samples answered", ["outcome"], registry=r)
        self.tokens_computed = Counter("ixc_tokens_computed", "tokens run through the model", registry=r)
        self.tokens_reused = Counter("ixc_prefix_tokens_reused", "tokens read from the prefix cache", registry=r)
        self.batch_size = Histogram("ixc_batch_size", "samples per engine call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_seconds = Histogram("ixc_batch_seconds", "seconds per engine call", registry=r)
        # with ixc_batch_seconds_sum: where the scheduler's time goes (scoring, idle on an empty queue, max-wait)
        self.idle_seconds = Counter("ixc_scheduler_idle_seconds", "scheduler time on an empty queue", registry=r)
        self.gather_seconds = Counter("ixc_scheduler_gather_seconds", "scheduler time waiting for more samples to join "
                                      "a batch (--max-wait-ms)", registry=r)
        self.queue_depth = Gauge("ixc_queue_depth", "samples queued or being scored", registry=r)
        self.latency = Histogram("ixc_request_latency_seconds", "request latency", ["endpoint"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180))

    def on_batch(self, info: BatchInfo) -> None:
        self.samples.labels("scored").inc(info.samples - info.errors)
        self.samples.labels("error").inc(info.errors)
        self.tokens_computed.inc(info.tokens_computed)
        self.tokens_reused.inc(info.prefix_tokens_reused)
        self.batch_size.observe(info.samples)
        self.batch_seconds.observe(info.seconds)
        self.idle_seconds.inc(info.idle_s)
        self.gather_seconds.inc(info.gather_s)


def _error_response(exc: RequestError):
    from starlette.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class _Auth:
    """ASGI middleware: ``Authorization: Bearer KEY`` on every path but /health, compared in constant time."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        got = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                got = value
                break
        scheme, _, token = got.partition(b" ")
        ok = hmac.compare_digest(token.strip(), self.key) and scheme.lower() == b"bearer"
        if not ok:
            err = RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "Authorization",
                               kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})
            return await _error_response(err)(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(engine: RewardEngine | None, cfg: ServeConfig | None = None, *, batcher=None):
    """The ASGI app around one engine. The batcher starts and stops with the app's lifespan (uvicorn runs it).

    engine: scored by a `Batcher` thread in this process; or None with `batcher` given: a `ProcessBatcher` (the engine
    in a process of its own, what `ixc-engine serve` runs), which may already be started."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    cfg = cfg or ServeConfig()
    limits = cfg.limits()
    metrics = Metrics()
    if batcher is None:
        if engine is None:
            raise ValueError("create_app needs an engine or a batcher")
        batcher = Batcher(engine, cfg.batcher, on_batch=metrics.on_batch)
    else:
        batcher.on_batch = metrics.on_batch
    metrics.queue_depth.set_function(lambda: batcher.depth)
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["pool"] = ThreadPoolExecutor(cfg.parse_threads, thread_name_prefix="ixc-parse")
        if not getattr(batcher, "started", False):
            batcher.start()
        try:
            yield
        finally:
            # uvicorn calls this after in-flight requests finished (SIGTERM: graceful shutdown); drain the rest
            await asyncio.get_running_loop().run_in_executor(None, batcher.stop)
            state["pool"].shutdown(wait=False, cancel_futures=True)

    async def read_body(request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise RequestError(400, "Content-Length is not an integer", "Content-Length") from None
            if n > cfg.max_body_bytes:
                if n <= DRAIN_FACTOR * cfg.max_body_bytes:
                    # read and drop it first: a client still sending when the server closes gets a connection reset,
                    # not the 413, and could not know to split its batch (RewardClient does split on the 413)
                    async for _ in request.stream():
                        pass
                raise RequestError(413, f"body of {n} bytes is over the limit of {cfg.max_body_bytes}", "body",
                                   kind="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise RequestError(413, f"body is over the limit of {cfg.max_body_bytes} bytes", "body",
                                   kind="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse(request, parser):
        raw = await read_body(request)
        if len(raw) <= INLINE_PARSE_BYTES:  # a thread hop would cost more than the parsing (and wait for the GIL)
            return parser(decode_json(raw), limits)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(state["pool"], lambda: parser(decode_json(raw), limits))

    async def score(samples, hd_num: int) -> list:
        try:
            fut = batcher.submit(samples, hd_num, cfg.request_timeout_s)
        except QueueFull as exc:
            raise RequestError(503, f"server busy: {exc}; retry later", None, kind="server_busy",
                               headers={"Retry-After": str(cfg.retry_after_s)}) from None
        except ShuttingDown as exc:
            raise RequestError(503, str(exc), None, kind="server_busy",
                               headers={"Retry-After": str(cfg.retry_after_s)}) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), cfg.request_timeout_s)
        except (asyncio.TimeoutError, DeadlineExceeded):
            raise RequestError(504, f"not scored within the request deadline of {cfg.request_timeout_s} s", None,
                               kind="timeout") from None
        except RuntimeError as exc:
            raise RequestError(500, str(exc), None, kind="internal_error") from None

    def item_errors(results, field: str) -> None:
        """400 naming the first item that could not be scored (field "messages": the request's one conversation)."""
        bad = [(k, r.error) for k, r in enumerate(results) if r.error is not None]
        if bad:
            k, why = bad[0]
            name = field if field == "messages" else f"{field}[{k}]"
            more = f" (and {len(bad) - 1} more: {', '.join(f'{field}[{j}]' for j, _ in bad[1:6])})" if len(bad) > 1 \
                else ""
            raise RequestError(400, f"{name}: {why}{more}", name)

    def endpoint(name: str):
        def wrap(fn):
            async def handler(request):
                t0 = time.perf_counter()
                try:
                    resp = await fn(request)
                except RequestError as exc:
                    resp = _error_response(exc)
                metrics.requests.labels(name, str(resp.status_code)).inc()
                metrics.latency.labels(name).observe(time.perf_counter() - t0)
                return resp
            return handler
        return wrap

    @endpoint("/get_reward")
    async def get_reward(request):
        samples = await parse(request, parse_get_reward)
        results = await score(samples, cfg.hd_num)
        item_errors(results, "query")
        rewards = [r.score for r in results]
        return JSONResponse({"rewards": rewards, "scores": rewards, "extra_logs": {}})

    @endpoint("/pooling")
    async def pooling(request):
        samples, field = await parse(request, parse_pooling)
        results = await score(samples, cfg.hd_num)
        item_errors(results, field)
        n = sum(r.n_tokens for r in results)
        return JSONResponse({
            "id": f"pool-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": cfg.model_name,
            "data": [{"index": i, "object": "pooling", "data": [r.score]} for i, r in enumerate(results)],
            "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0},
        })

    @endpoint("/v1/score")
    async def v1_score(request):
        items, hd_num = await parse(request, parse_score)
        real = [s for s in items if not isinstance(s, RequestError)]
        results = iter(await score(real, hd_num))
        scores, n_tokens, errors = [], [], []
        for item in items:
            if isinstance(item, RequestError):
                scores.append(None), n_tokens.append(None), errors.append(item.message)
                continue
            r = next(results)
            scores.append(r.score), n_tokens.append(r.n_tokens), errors.append(r.error)
        return JSONResponse({"model": cfg.model_name, "scores": scores, "n_tokens": n_tokens, "errors": errors})

    @endpoint("/v1/best_of_n")
    async def v1_best_of_n(request):
        samples, hd_num = await parse(request, parse_best_of_n)
        results = await score(samples, hd_num)
        item_errors(results, "candidates")
        scores = [r.score for r in results]
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        return JSONResponse({"model": cfg.model_name, "best": best, "scores": scores,
                             "n_tokens": [r.n_tokens for r in results]})

    async def health(request):
        if not getattr(batcher, "alive", True):  # the engine process died: tell the load balancer / orchestrator
            return JSONResponse({"status": "error", "error": batcher.dead_reason, "queue_depth": 0}, status_code=503)
        return JSONResponse({"status": "ok", "queue_depth": batcher.depth})

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": cfg.model_name, "object": "model", "created": int(state.get("created", 0)),
             "owned_by": "ixc-engine", "task": "reward"}]})

    async def metrics_endpoint(request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request, exc: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            msg += f" (endpoints: {', '.join(ENDPOINTS)})"
        return _error_response(RequestError(exc.status_code, msg, None, kind=kind,
                                            headers=dict(exc.headers or {})))

    async def server_error(request, exc: Exception):
        return _error_response(RequestError(500, f"internal error: {type(exc).__name__}: {exc}", None,
                                            kind="internal_error"))

    post = ["POST"]
    routes = [
        Route("/get_reward", get_reward, methods=post),
        Route("/pooling", pooling, methods=post),
        Route("/v1/score", v1_score, methods=post),
        Route("/v1/best_of_n", v1_best_of_n, methods=post),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    middleware = [Middleware(_Auth, key=cfg.api_key)] if cfg.api_key else []
    state["created"] = math.floor(time.time())
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.engine = engine
    return app
