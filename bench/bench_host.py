"""Host planning cost per engine step: C++ core (`ixc_engine._core`) vs the pure-Python fallback.

One step, for S sequences (default 64 of 2k-9k tokens, block size 16, best-of-N shaped: 8 prompts x 8 candidates,
the prompts reused by every step so later steps hit the prefix cache):
    block_hashes -> match_prefix -> allocate -> pack_varlen -> build_slot_mapping -> block_table_array
    -> plan_batches -> register_blocks (after the forward) -> release (reversed tables)
Prints measured host microseconds per phase and per step, and the tokens per step. No GPU figures.

    python bench/bench_host.py [--seqs 64] [--min-tokens 2000] [--max-tokens 9000] [--block-size 16] [--iters 20]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import numpy as np

from ixc_engine.engine.host import get_host_core

PHASES = ("hashes", "match", "allocate", "pack", "slots", "tables", "plan", "register", "release")


@dataclass(slots=True)
class Workload:
    """Pre-generated key arrays for several steps (generation is not timed)."""

    steps: list[list[np.ndarray]]
    block_size: int
    num_blocks: int
    max_batch_tokens: int


@dataclass(slots=True)
class StepStats:
    ns: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    tokens: int = 0
    new_tokens: int = 0
    steps: int = 0


def make_workload(
    n_seqs: int = 64,
    min_tokens: int = 2000,
    max_tokens: int = 9000,
    block_size: int = 16,
    n_prompts: int = 8,
    n_steps: int = 4,
    seed: int = 0,
) -> Workload:
    rng = np.random.default_rng(seed)
    prompt_len = max(1, min_tokens // 2)
    prompts = [rng.integers(0, 92544, int(rng.integers(prompt_len // 2, prompt_len + 1))) for _ in range(n_prompts)]
    steps = []
    for _ in range(n_steps):
        seqs = []
        for i in range(n_seqs):
            prompt = prompts[i % n_prompts]
            total = int(rng.integers(min_tokens, max_tokens + 1))
            seqs.append(np.concatenate([prompt, rng.integers(0, 92544, max(1, total - len(prompt)))]))
        steps.append(seqs)
    max_blocks = max(sum(-(-len(s) // block_size) for s in step) for step in steps)
    return Workload(steps, block_size, num_blocks=max_blocks * 3 // 2, max_batch_tokens=16384)


def run_step(core, bm, seqs: list[np.ndarray], wl: Workload, stats: StepStats | None = None) -> int:
    """One planning step on block manager ``bm``; returns the number of new (computed) tokens."""
    bs = wl.block_size
    clock = time.perf_counter_ns
    t0 = clock()
    hashes = [core.block_hashes(keys, bs) for keys in seqs]
    t1 = clock()
    # the last token is always recomputed (its hidden state gives the score), so never match its block
    matched = [bm.match_prefix(h[: (len(keys) - 1) // bs]) for h, keys in zip(hashes, seqs)]
    t2 = clock()
    tables = [m + bm.allocate(-(-len(keys) // bs) - len(m)) for m, keys in zip(matched, seqs)]
    t3 = clock()
    start = np.array([len(m) * bs for m in matched], dtype=np.int32)
    q_lens = np.array([len(keys) for keys in seqs], dtype=np.int32) - start
    cu_seqlens, positions = core.pack_varlen(q_lens, start)
    t4 = clock()
    slots = core.build_slot_mapping(tables, start, q_lens, bs)
    t5 = clock()
    block_table = core.block_table_array(tables)
    t6 = clock()
    batches = core.plan_batches(q_lens.astype(np.int64), wl.max_batch_tokens, 256)
    t7 = clock()
    for h, m, table in zip(hashes, matched, tables):
        bm.register_blocks(table[len(m) : len(h)], h[len(m) :])
    t8 = clock()
    for table in tables:
        bm.release(table[::-1])
    t9 = clock()
    assert len(slots) == len(positions) == int(cu_seqlens[-1]) and block_table.shape[0] == len(seqs) and batches
    new_tokens = int(cu_seqlens[-1])
    if stats is not None:
        for name, a, b in zip(PHASES, (t0, t1, t2, t3, t4, t5, t6, t7, t8), (t1, t2, t3, t4, t5, t6, t7, t8, t9)):
            stats.ns[name] += b - a
        stats.tokens += sum(len(k) for k in seqs)
        stats.new_tokens += new_tokens
        stats.steps += 1
    return new_tokens


def bench(kind: str, wl: Workload, iters: int, warmup: int = 2) -> StepStats:
    core = get_host_core(kind)
    bm = core.BlockManager(wl.num_blocks, wl.block_size)
    for i in range(warmup):
        run_step(core, bm, wl.steps[i % len(wl.steps)], wl)
    stats = StepStats()
    for i in range(iters):
        run_step(core, bm, wl.steps[(warmup + i) % len(wl.steps)], wl, stats)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--min-tokens", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=9000)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--impl", choices=["both", "cpp", "python"], default="both")
    args = ap.parse_args()
    wl = make_workload(args.seqs, args.min_tokens, args.max_tokens, args.block_size)
    kinds = ["cpp", "python"] if args.impl == "both" else [args.impl]
    print(
        f"host planning step: {args.seqs} seqs of {args.min_tokens}-{args.max_tokens} tokens, "
        f"block size {args.block_size}, {wl.num_blocks} KV blocks, {args.iters} timed steps"
    )
    totals = {}
    for kind in kinds:
        s = bench(kind, wl, args.iters)
        per = {k: v / s.steps / 1e3 for k, v in s.ns.items()}
        totals[kind] = sum(per.values())
        print(
            f"[{kind:6s}] {totals[kind]:10.1f} us/step | tokens/step {s.tokens / s.steps:.0f} "
            f"(new {s.new_tokens / s.steps:.0f}, cached {(s.tokens - s.new_tokens) / s.steps:.0f}) | "
            f"{totals[kind] * 1e3 / (s.tokens / s.steps):.1f} ns/token"
        )
        print("         " + "  ".join(f"{k} {v:.1f}" for k, v in per.items()))
    if len(totals) == 2:
        print(f"C++ speedup over Python: {totals['python'] / totals['cpp']:.1f}x")


if __name__ == "__main__":
    main()
