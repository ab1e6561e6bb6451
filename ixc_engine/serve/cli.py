"""`ixc-engine serve`: its parser and handler (registered by ixc_engine/cli.py)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

DESCRIPTION = (
    "Serve rewards over HTTP: OpenRLHF POST /get_reward, vLLM-style POST /pooling, native POST /v1/score and "
    "/v1/best_of_n, GET /health, /v1/models, /metrics. One scheduler thread owns the engine and batches samples "
    "across requests under the token budget; the paged prefix cache lives across requests, so N candidates of one "
    "prompt sent as N requests compute the prompt and image once.\n\nMedia come only as data: URIs, or as paths "
    "(or file:// URLs) below --media-root; nothing is fetched over the network."
)
EPILOG = """examples:
  ixc-engine serve --model examples/demo-model --port 8000
  ixc-engine serve --model /models/ixc-reward --device cuda --api-key $KEY --media-root /data/images
  curl -s localhost:8000/get_reward -d '{"query": ["[UNUSED_TOKEN_146]user\\nHi[UNUSED_TOKEN_145]\\n\
[UNUSED_TOKEN_146]assistant\\nHello![UNUSED_TOKEN_145]\\n"]}'
"""


DEFAULT_MAX_CONNECTIONS = 4096
RESERVED_FILES = 128  # descriptors kept for the model files, the engine process, workers, logs


def default_max_connections() -> int:
    """DEFAULT_MAX_CONNECTIONS, capped below the soft open-file limit: past it accept() fails (EMFILE) and uvicorn logs
    errors instead of answering 503."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS
    return max(1, min(DEFAULT_MAX_CONNECTIONS, soft - RESERVED_FILES))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_parser(sub, formatter_class, int_at_least) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve rewards over HTTP (OpenRLHF /get_reward, vLLM-style /pooling, ...)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=formatter_class)
    p.add_argument("--model", required=True, help="checkpoint directory (or a hub id with huggingface_hub)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int_at_least(0), default=8000, help="port (default 8000; 0: a free one)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--api-key", default=os.environ.get("IXC_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $IXC_API_KEY; none: no auth)")
    p.add_argument("--media-root", type=Path, default=None,
                   help="directory that image/video paths and file:// URLs must lie in (default: none: data: URIs "
                   "only)")
    p.add_argument("--served-model-name", default=None, help="model name in /v1/models and responses "
                   "(default: the --model directory's name)")
    p.add_argument("--hd-num", type=int_at_least(1), default=9, help="HD crop budget per image (default 9)")
    p.add_argument("--max-batch-tokens", type=int_at_least(1), default=16384,
                   help="token budget of one packed engine batch (default 16384)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the oldest queued sample waits for others to batch with (default 5)")
    p.add_argument("--max-queue", type=int_at_least(1), default=4096,
                   help="samples queued or being scored before requests get 503 + Retry-After (default 4096)")
    p.add_argument("--window", type=int_at_least(1), default=64,
                   help="samples per engine call: gathered, prepared and prefix-matched together (default 64)")
    p.add_argument("--workers", type=int_at_least(0), default=0,
                   help="processes for CPU preprocessing: decode, resize, tokenize (default 0: the scheduler thread). "
                   "Text-only samples (up to 32768 characters) of requests of at most 16 samples are templated and "
                   "tokenized in the HTTP process instead (not with --single-process)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body in MiB (default 64)")
    p.add_argument("--max-items", type=int_at_least(1), default=256,
                   help="samples (queries, conversations, candidates) per request (default 256)")
    p.add_argument("--max-media", type=int_at_least(1), default=8, help="images/videos per sample (default 8)")
    p.add_argument("--request-timeout", type=float, default=180.0,
                   help="per-request deadline in seconds; later answers are 504 (default 180, OpenRLHF's timeout)")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-prefix-cache", action="store_true", help="disable shared-prefix reuse (scores are equal)")
    p.add_argument("--single-process", action="store_true",
                   help="run the engine in a thread of the server's process instead of a process of its own (default: "
                   "its own process, so that HTTP handling and scoring do not take turns on one GIL: more requests/s "
                   "under load, see bench/RESULTS.md)")
    p.add_argument("--max-connections", "--limit-concurrency", dest="max_connections", type=int_at_least(1),
                   default=None, metavar="N",
                   help="open HTTP connections served at once (uvicorn's --limit-concurrency); a request that arrives "
                   "while more are open gets 503 and its connection is closed, the others are still served. Idle "
                   f"keep-alive connections count too (default {DEFAULT_MAX_CONNECTIONS}, or fewer when the open-file "
                   "limit, ulimit -n, is lower)")
    p.add_argument("--timeout-keep-alive", type=_positive_float, default=30.0, metavar="S",
                   help="close a kept-alive connection idle for S seconds (uvicorn's --timeout-keep-alive; default 30)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    return p


def _engine_config(args):
    from ixc_engine.engine.engine import EngineConfig

    return EngineConfig(hd_num=args.hd_num, max_batch_tokens=args.max_batch_tokens, window=args.window,
                        workers=args.workers, prefix_cache=not args.no_prefix_cache)


def build(args):
    """(engine, ServeConfig) from the parsed arguments: the engine loaded in this process (--single-process)."""
    import torch

    from ixc_engine.api import RewardEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = RewardEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype, config=_engine_config(args))
    return engine, serve_config(args)


def build_spec(args):
    """(EngineSpec, ServeConfig): what the engine process loads (the default)."""
    from ixc_engine.serve.engine_process import EngineSpec

    spec = EngineSpec(model=str(args.model), device=args.device, dtype=args.dtype, config=_engine_config(args),
                      threads=args.threads)
    return spec, serve_config(args)


def serve_config(args):
    from ixc_engine.serve.app import ServeConfig
    from ixc_engine.serve.batcher import BatcherConfig

    return ServeConfig(
        model_name=args.served_model_name or Path(str(args.model)).name or str(args.model), api_key=args.api_key,
        media_root=args.media_root, max_body_bytes=int(args.max_body_mb * (1 << 20)), max_items=args.max_items,
        max_media=args.max_media, hd_num=args.hd_num, request_timeout_s=args.request_timeout,
        batcher=BatcherConfig(max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, max_gather=args.window),
    )


def cmd_serve(args) -> int:
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        print(f"error: serving needs the serve extra (pip install -e '.[serve]'): {exc}", file=sys.stderr)
        return 2
    from ixc_engine.serve.app import create_app

    t0 = time.perf_counter()
    if args.single_process:
        engine, scfg = build(args)
        app = create_app(engine, scfg)
        where, close = f"{engine.engine.runner.device} ({engine.engine.runner.dtype})", engine.close
    else:
        from ixc_engine.serve.engine_process import ProcessBatcher

        spec, scfg = build_spec(args)
        batcher = ProcessBatcher(spec, scfg.batcher)
        batcher.start()  # the engine process loads the model; raises EngineProcessError (a RuntimeError) if it cannot
        app = create_app(None, scfg, batcher=batcher)
        where = f"{spec.info['device']} ({spec.info['dtype']}) in engine process {batcher.pid}"
        close = batcher.stop
    print(f"model loaded in {time.perf_counter() - t0:.1f}s on {where}; serving {scfg.model_name!r}", file=sys.stderr)
    # uvicorn re-raises SIGTERM once it has shut down; with the default handler that kills the process before the
    # `finally` below, leaving --workers processes orphaned. A handler of ours is what it restores and re-raises to.
    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda sig, _frame: got.append(sig))
    try:
        run(app, args.host, args.port, args.log_level, max_connections=args.max_connections or
            default_max_connections(), timeout_keep_alive=args.timeout_keep_alive)
    finally:
        close()
        signal.signal(signal.SIGTERM, previous)
    if got:
        signal.raise_signal(signal.SIGTERM)  # the exit status still says SIGTERM, as before
    return 0


def run(app, host: str, port: int, log_level: str = "info", max_connections: int | None = None,
        timeout_keep_alive: float = 30.0) -> None:
    """uvicorn in this thread; SIGTERM / Ctrl-C stop accepting, finish in-flight requests, then drain the queue."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", access_log=False,
                            timeout_graceful_shutdown=None, timeout_keep_alive=timeout_keep_alive,
                            limit_concurrency=None if max_connections is None else max_connections + 1)
    # +1: uvicorn answers 503 once the open connections, the asking one included, reach limit_concurrency; so N + 1
    # serves N connections
    uvicorn.Server(config).run()
