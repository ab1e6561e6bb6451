"""CPU policy: the dtype of `--dtype auto` on a CPU, and thread counts for the model and the preparation workers.

bf16 pays on a CPU only where oneDNN has bf16 matrix units to run it on (AMX-BF16 tiles or AVX512-BF16 dot
products); elsewhere torch emulates bf16 matmuls and they run several times slower than fp32 (measured on a 2-core
AMD EPYC without either: F.linear 512x1024x2048 ran at ~40 GFLOP/s in fp32 and ~11 GFLOP/s in bf16). So `auto`
takes bf16 only when the CPU reports those units AND a short same-run probe of the model's own matmul shape shows
bf16 clearly faster; otherwise fp32. The decision is a pure function of the probe's figures (`choose_cpu_dtype`),
so it can be tested with any figures.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BF16_UNITS = ("amx_bf16", "avx512_bf16")
MIN_SPEEDUP = 1.3  # bf16 must beat fp32 by this much: it costs ~3 significant digits of every score
MIN_HIDDEN = 256  # narrower models: time goes to preprocessing and small ops, bf16 cannot pay for its rounding
PROBE_ROWS = 256


@dataclass(slots=True)
class CpuDtypeChoice:
    """What `--dtype auto` chose on this CPU, and why (printed by the CLI, recorded by benchmarks)."""

    dtype: torch.dtype
    reason: str
    units: tuple[str, ...] = ()
    fp32_gflops: float | None = None
    bf16_gflops: float | None = None

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def bf16_units(capabilities: Mapping[str, object] | None = None, flags: set[str] | None = None) -> tuple[str, ...]:
    """The bf16 matrix units of this CPU that torch's oneDNN can use: a subset of BF16_UNITS.

    From torch's own CPU capability report (`torch.cpu.get_capabilities()`, torch >= 2.4), else /proc/cpuinfo flags;
    either can be injected for tests. oneDNN must also say it runs bf16 (it does exactly where one unit exists)."""
    if capabilities is None and flags is None:
        get = getattr(torch.cpu, "get_capabilities", None)
        if get is not None:
            try:
                capabilities = get()
            except Exception:  # noqa: BLE001 - a capability probe must never stop a job
                capabilities = None
        if capabilities is None:
            flags = _cpuinfo_flags()
    found = set()
    if capabilities is not None:
        found = {u for u in BF16_UNITS if capabilities.get(u)}
    if flags is not None:
        found |= {u for u in BF16_UNITS if u in flags}
    return tuple(u for u in BF16_UNITS if u in found)


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def mkldnn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def probe_linear(dtype: torch.dtype, width: int, *, rows: int = PROBE_ROWS, reps: int = 3,
                 limit_s: float = 0.25) -> float:
    """GFLOP/s of F.linear([rows, width] x [2*width, width]^T) in `dtype`: the model's own kind of matmul at its
    width. Fastest of `reps` calls after one warm-up (a shared CPU's median understates the cores); stops early once
    `limit_s` is spent, so a slow emulated dtype costs little."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=g).to(dtype)
    w = torch.randn(2 * width, width, generator=g).to(dtype)
    flop = 2.0 * rows * width * 2 * width
    with torch.inference_mode():
        t0 = time.perf_counter()
        F.linear(x, w)
        best = time.perf_counter() - t0
        spent = best
        for _ in range(reps):
            if spent > limit_s:
                break
            t = time.perf_counter()
            F.linear(x, w)
            dt = time.perf_counter() - t
            spent += dt
            best = min(best, dt)
    return flop / max(best, 1e-9) / 1e9


def choose_cpu_dtype(units: tuple[str, ...], fp32_gflops: float | None, bf16_gflops: float | None, *,
                     hidden_size: int | None = None, min_speedup: float = MIN_SPEEDUP) -> CpuDtypeChoice:
    """The decision of `--dtype auto` on a CPU from its bf16 units and the probe's figures (None: not probed)."""
    if hidden_size is not None and hidden_size < MIN_HIDDEN:
        return CpuDtypeChoice(torch.float32, f"model hidden size {hidden_size} < {MIN_HIDDEN}: too small for bf16 "
                              "to pay", units)
    if not units:
        return CpuDtypeChoice(torch.float32, "the CPU has no bf16 matrix units (AMX-BF16, AVX512-BF16): torch would "
                              "emulate bf16", units)
    if fp32_gflops is None or bf16_gflops is None:
        return CpuDtypeChoice(torch.float32, "bf16 not probed", units, fp32_gflops, bf16_gflops)
    ratio = bf16_gflops / max(fp32_gflops, 1e-9)
    figures = f"probe: bf16 {bf16_gflops:.0f} vs fp32 {fp32_gflops:.0f} GFLOP/s ({ratio:.2f}x)"
    if ratio >= min_speedup:
        return CpuDtypeChoice(torch.bfloat16, f"{'+'.join(units)}, {figures}", units, fp32_gflops, bf16_gflops)
    return CpuDtypeChoice(torch.float32, f"{'+'.join(units)} but {figures} < {min_speedup}x", units, fp32_gflops,
                          bf16_gflops)


def auto_cpu_dtype(hidden_size: int | None = None, *, units: tuple[str, ...] | None = None,
                   probe: Callable[[torch.dtype, int], float] = probe_linear) -> CpuDtypeChoice:
    """Measure and decide (< 1 s): probe fp32 and bf16 matmuls at the model's width only where bf16 could win."""
    if units is None:
        units = bf16_units() if mkldnn_bf16() else ()
    if (hidden_size is not None and hidden_size < MIN_HIDDEN) or not units:
        return choose_cpu_dtype(units, None, None, hidden_size=hidden_size)
    width = min(max(hidden_size or 1024, MIN_HIDDEN), 1024)  # 256 x 1024 x 2048: ~1 GFLOP a call
    fp32 = [probe(torch.float32, width)]
    bf16 = [probe(torch.bfloat16, width)]
    if bf16[0] >= fp32[0]:  # could win: a second interleaved round, so that a burst of load hits both
        fp32.append(probe(torch.float32, width))
        bf16.append(probe(torch.bfloat16, width))
    return choose_cpu_dtype(units, max(fp32), max(bf16), hidden_size=hidden_size)


# --- threads ----------------------------------------------------------------------------------------------------------
def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask: containers and taskset limit it below os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers(device: torch.device | str, cores: int | None = None) -> int:
    """`--workers` default: 0 (prepare inline between batches) on every device, for now.

    Not yet settled by measurement: on the 2-core development machine one loaded round of the demo job (tiny model,
    preparation-bound) ran workers 0 / torch threads 2 in 130 s, workers 1 / threads 1 in 71 s and workers 2 /
    threads 1 in 43 s (bench/RESULTS.md), while for a mid-size model preparation is ~1.5% of the job. A rule needs
    interleaved rounds of `bench/bench_cpu_workers.py` (including workers 0 / threads 1) on a quiet machine."""
    del cores  # kept in the signature for a measured many-core / GPU rule
    torch.device(device)  # validates
    return 0


def worker_threads(workers: int, cores: int | None = None) -> int:
    """torch threads of each preparation worker: its share of the cores, at least 1 (torch's default is all cores
    in every process, which oversubscribes them workers + 1 times)."""
    cores = cpu_cores() if cores is None else cores
    return max(1, cores // max(1, workers + 1))


def init_worker_threads(threads: int) -> None:
    """ProcessPoolExecutor initializer of preparation workers."""
    torch.set_num_threads(threads)
