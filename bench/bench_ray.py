"""`ixc-engine score --ray` (1 and 2 scoring actors) against the local job on the same corpus, in the same run.

Each job runs as the user runs it (the CLI in a subprocess), on the corpus copied k and 2k times. The fixed costs
(interpreter, imports, model and actor start-up) cancel in T(2k) - T(k), so the steady-state rate is
k * lines / (T(2k) - T(k)), and Ray's per-sample overhead is the difference of the per-sample times. The Ray jobs join
one Ray instance started here (its start-up is not counted). On a 2-core machine the point is the overhead, not a
speed-up: the two actors share the cores that one local job uses.

    python bench/bench_ray.py [--corpus examples/corpus.jsonl --model examples/demo-model --copies 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def replicate(corpus: Path, copies: int, out: Path) -> int:
    """The corpus `copies` times over, media made absolute (so the copy may live elsewhere); returns its lines."""
    base = corpus.resolve().parent
    lines = []
    for raw in corpus.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:  # a deliberately broken line stays as it is (an error record in every job)
            lines.append(raw)
            continue
        if isinstance(obj, dict) and isinstance(obj.get("images"), list):
            obj["images"] = [p if not isinstance(p, str) or os.path.isabs(p) else str(base / p) for p in obj["images"]]
        lines.append(json.dumps(obj))
    out.write_text("\n".join(lines * copies) + "\n", encoding="utf-8")
    return len(lines) * copies


class CpuMeter:
    """CPU seconds (user + system) of this process's descendants: the CLI driver and, for Ray, the raylet, GCS and
    every worker and actor process. Sampled every 0.1 s, so a process that exits keeps its last sample (a process
    that lives under 0.1 s can be missed). On a shared machine CPU time is a steadier measure than wall time: the
    wall time depends on the CPU share a job's processes win from other jobs."""

    def __init__(self) -> None:
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")

    def _descendants(self) -> dict[int, float]:
        parent, cpu = {}, {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            parent[int(d)] = int(fields[1])
            cpu[int(d)] = (int(fields[11]) + int(fields[12])) / self._tick
        me, out = os.getpid(), {}
        for pid, used in cpu.items():
            p, seen = pid, 0
            while p in parent and p != me and seen < 64:
                p, seen = parent[p], seen + 1
            if p == me and pid != me:
                out[pid] = used
        return out

    def sample(self) -> None:
        self.last.update(self._descendants())

    def total(self) -> float:
        return sum(self.last.values())

    def run(self) -> None:
        while not self._stop.wait(0.1):
            self.sample()

    def stop(self) -> None:
        self._stop.set()


def run(corpus: Path, model: str, out: Path, extra: list[str], meter: CpuMeter) -> tuple[float, float, dict]:
    cmd = [sys.executable, "-m", "ixc_engine.cli", "score", str(corpus), "--model", model, "-o", str(out),
           "--no-progress", *extra]
    meter.sample()
    cpu0 = meter.total()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = p.communicate()
    wall = time.perf_counter() - t0
    time.sleep(0.3)  # let the sampler see the actors' last ticks before they are reaped
    meter.sample()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    summary = json.loads([x for x in err.splitlines() if x.startswith('{"scored"')][-1])
    return wall, meter.total() - cpu0, summary


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=REPO / "examples" / "corpus.jsonl")
    ap.add_argument("--model", default=str(REPO / "examples" / "demo-model"))
    ap.add_argument("--copies", type=int, default=1, help="k: the corpus is scored k and 2k times over")
    ap.add_argument("--batch-size", type=int, default=16, help="--ray-batch-size")
    args = ap.parse_args()

    import ray

    cpus = os.cpu_count() or 2
    ray_common = ["--ray", "--ray-batch-size", str(args.batch_size), "--ray-prep-cpus", "1"]
    configs = {
        "local": [],
        "ray, 1 scoring actor": ray_common + ["--ray-actors", "1", "--ray-cpus-per-actor", str(cpus)],
        "ray, 2 scoring actors": ray_common + ["--ray-actors", "2", "--ray-cpus-per-actor", str(max(1, cpus // 2))],
    }
    meter = CpuMeter()
    threading.Thread(target=meter.run, daemon=True).start()
    rows = []
    print(f"load average at start: {load()}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = {k: replicate(args.corpus, k, tmp / f"corpus{k}.jsonl") for k in (args.copies, 2 * args.copies)}
        for c, (name, extra) in enumerate(configs.items()):
            if extra and not ray.is_initialized():
                # After the local runs, so that they do not pay for Ray's idle processes. Logical CPUs: one
                # preparation actor plus two one-CPU scorers, or one scorer with as many torch threads as the local
                # job uses.
                ray.init(num_cpus=cpus + 1, include_dashboard=False, log_to_driver=False)
            if extra:
                extra = [*extra, "--ray-address", ray.get_runtime_context().gcs_address]
            t = {}
            for k, n in sizes.items():
                t[k] = run(tmp / f"corpus{k}.jsonl", args.model, tmp / f"config{c}-{k}.jsonl", extra, meter)
                s = t[k][2]
                print(f"{name}: {n} samples ({s['scored']} scored, {s['errors']} errors), {t[k][0]:.1f} s wall, "
                      f"{t[k][1]:.1f} CPU s, load {load()}", file=sys.stderr)
            (n1, (w1, c1, _)), (n2, (w2, c2, _)) = ((sizes[k], t[k]) for k in sizes)
            dn = n2 - n1
            rows.append({"config": name, "samples": [n1, n2], "wall_s": [round(w1, 1), round(w2, 1)],
                         "cpu_s": [round(c1, 1), round(c2, 1)],
                         "steady_samples_per_s": round(dn / (w2 - w1), 3) if w2 > w1 else None,
                         "wall_ms_per_sample": round(1000 * (w2 - w1) / dn, 1),
                         "cpu_ms_per_sample": round(1000 * (c2 - c1) / dn, 1),
                         "fixed_wall_s": round(w1 - n1 * (w2 - w1) / dn, 1),
                         "fixed_cpu_s": round(c1 - n1 * (c2 - c1) / dn, 1)})
    ray.shutdown()
    meter.stop()
    for r in rows[1:]:
        r["ray_cpu_overhead_ms_per_sample"] = round(r["cpu_ms_per_sample"] - rows[0]["cpu_ms_per_sample"], 1)
        r["ray_wall_overhead_ms_per_sample"] = round(r["wall_ms_per_sample"] - rows[0]["wall_ms_per_sample"], 1)
    print(f"load average at end: {load()}", file=sys.stderr)
    print("| config | samples | wall s | CPU s | steady samples/s (wall) | wall ms/sample | CPU ms/sample "
          "| fixed wall s | fixed CPU s | Ray CPU overhead ms/sample |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['config']} | {r['samples'][0]} / {r['samples'][1]} | {r['wall_s'][0]} / {r['wall_s'][1]} | "
              f"{r['cpu_s'][0]} / {r['cpu_s'][1]} | {r['steady_samples_per_s']} | {r['wall_ms_per_sample']} | "
              f"{r['cpu_ms_per_sample']} | {r['fixed_wall_s']} | {r['fixed_cpu_s']} | "
              f"{r.get('ray_cpu_overhead_ms_per_sample', '-')} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
