"""CPU threads and preparation workers: the CLI's `score` job under each (workers, torch threads) setting, interleaved.

    python bench/bench_cpu_workers.py [--corpus examples/corpus.jsonl] [--model examples/demo-model]
                                      [--configs 0:2,0:1,1:1,2:1] [--rounds 3] [--dtype float32]

Each setting W:T runs `ixc-engine score CORPUS --model MODEL --workers W` in a fresh process with OMP_NUM_THREADS=T
(the model's torch threads; workers get their share of the cores, see ixc_engine/engine/cpu.py), settings interleaved
in every round (order reversed every other round). Reported: the job's own `seconds` and `samples_per_s` (model load
excluded; worker start-up included), the median per setting, and the load average around each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_job(corpus: str, model: str, workers: int, threads: int, dtype: str, out: Path, extra: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "ixc_engine.cli", "score", corpus, "--model", model, "-o", str(out), "--workers",
           str(workers), "--dtype", dtype, "--no-progress", "--restart", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr[-2000:]}")
    lines = [x for x in (res.stdout + res.stderr).splitlines() if x.startswith("{") and '"scored"' in x]
    return json.loads(lines[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default=str(REPO / "examples" / "corpus.jsonl"))
    ap.add_argument("--model", default=str(REPO / "examples" / "demo-model"))
    ap.add_argument("--configs", default="0:2,0:1,1:1,2:1", help="W:T settings (workers : model torch threads)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--hd-num", default=None, help="passed to score as --hd-num")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    extra = ["--hd-num", args.hd_num] if args.hd_num else []
    runs: dict[str, list[dict]] = {f"{w}:{t}": [] for w, t in configs}
    print(f"cpu cores {os.cpu_count()}; corpus {args.corpus}; model {args.model}; dtype {args.dtype}", flush=True)
    with tempfile.TemporaryDirectory(prefix="ixc_workers_") as tmp:
        for rnd in range(args.rounds):
            order = configs if rnd % 2 == 0 else configs[::-1]
            for w, t in order:
                load0 = os.getloadavg()[0]
                summary = run_job(args.corpus, args.model, w, t, args.dtype, Path(tmp) / f"s{w}_{t}.jsonl", extra)
                load1 = os.getloadavg()[0]
                runs[f"{w}:{t}"].append({"seconds": summary["seconds"], "samples_per_s": summary["samples_per_s"],
                                         "load": [load0, load1]})
                print(f"  round {rnd + 1} workers {w} threads {t}: {summary['seconds']:.2f} s, "
                      f"{summary['samples_per_s']:.3f} samples/s (load average {load0:.2f} -> {load1:.2f})",
                      flush=True)
    best = None
    print("medians:", flush=True)
    for key, rs in runs.items():
        med = statistics.median(r["seconds"] for r in rs)
        best = key if best is None or med < statistics.median(r["seconds"] for r in runs[best]) else best
        print(f"  workers {key.split(':')[0]} threads {key.split(':')[1]}: {med:.2f} s "
              f"({statistics.median(r['samples_per_s'] for r in rs):.3f} samples/s) over {len(rs)} runs", flush=True)
    print(f"fastest: workers:threads {best}", flush=True)
    result = {"configs": runs, "fastest": best, "cpu_cores": os.cpu_count(), "corpus": args.corpus,
              "model": args.model, "dtype": args.dtype}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
