"""Shared benchmark helpers: median timing, the copy-bandwidth ceiling and one-line reports.

Import from a bench script or a bench test as ``from harness import ...`` (bench/ is on sys.path for both).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def do_bench_median(fn: Callable[[], object], *, device=None, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """Median wall time of ``fn()`` in milliseconds.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call). CPU: ``time.perf_counter``
    around single calls, after ``warmup_ms`` of warm-up, for at least 5 calls and ``rep_ms`` in all.
    ``device`` defaults to CUDA when available.
    """
    if _device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    start = time.perf_counter()
    fn()
    while (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or ((time.perf_counter() - start) * 1e3 < rep_ms and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gbps(nbytes: float, ms: float) -> float:
    """GB/s (1e9 bytes per second) for ``nbytes`` moved in ``ms`` milliseconds."""
    return nbytes / (ms * 1e-3) / 1e9


def measure_copy_bandwidth(device=None, nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth in GB/s, counting read + write bytes (2 * nbytes per copy).

    Defaults: 1 GiB on CUDA (far beyond L2), 64 MiB on CPU.
    """
    dev = _device(device)
    nbytes = nbytes or (1 << 30 if dev.type == "cuda" else 64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    ms = do_bench_median(lambda: dst.copy_(src), device=dev)
    return gbps(2 * nbytes, ms)


def _fmt(x: float) -> str:
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.3g}"


def report(name: str, achieved: float, unit: str, ceiling: float | None = None,
           baseline: float | None = None) -> str:
    """Print and return one line: the achieved figure, its share of ``ceiling`` and its ratio to ``baseline``.

    ``ceiling`` and ``baseline`` are in the same ``unit`` as ``achieved`` (higher is better).
    """
    line = f"{name:<44} {_fmt(achieved):>10} {unit}"
    if ceiling is not None:
        line += f"  {100.0 * achieved / ceiling:5.1f}% of ceiling {_fmt(ceiling)} {unit}"
    if baseline is not None:
        line += f"  {achieved / baseline:6.2f}x baseline ({_fmt(baseline)} {unit})"
    print(line, flush=True)
    return line
