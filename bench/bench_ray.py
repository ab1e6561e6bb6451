"""`ixc-engine score --ray` (1 and 2 scoring actors) against the local job on the same corpus, in the same run.

Each job runs as the user runs it (the CLI in a subprocess), on the corpus copied k and 2k times. The fixed costs
(interpreter, imports, model and actor start-up) cancel in T(2k) - T(k), so the steady-state rate is
k * lines / (T(2k) - T(k)), and Ray's per-sample overhead is the difference of the per-sample times. The Ray jobs join
one Ray instance started here (its start-up is not counted). On a 2-core machine the point is the overhead, not a
speed-up: the two actors share the cores that one local job uses.

    python bench/bench_ray.py [--corpus examples/corpus.jsonl --model examples/demo-model --copies 1] [--threads 1]
    python bench/bench_ray.py --prep-costs      # what one sample costs the preparation stage, and its row encoding
    python bench/bench_ray.py --driver-memory   # the driver's peak RSS on N and 4N lines: flat, the corpus is streamed
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


def run(corpus: Path, model: str, out: Path, extra: list[str], meter: CpuMeter, env: dict) -> tuple[float, float,
                                                                                                 dict]:
    cmd = [sys.executable, "-m", "ixc_engine.cli", "score", str(corpus), "--model", model, "-o", str(out),
           "--no-progress", *extra]
    meter.sample()
    cpu0 = meter.total()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    time.sleep(0.3)  # let the sampler see the actors' last ticks before they are reaped
    meter.sample()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    summary = json.loads([x for x in out.splitlines() if x.startswith('{"scored"')][-1])  # the summary is on stdout
    return wall, meter.total() - cpu0, summary


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def prep_costs(threads: int) -> None:
    """Per-sample cost of the preparation stage (template, tokens, decode, HD crops at hd_num 9) and of the Ray row
    encoding (`encode_prepared`) and decoding on the scorer (`decode_prepared`), in this process."""
    import numpy as np
    import torch

    from ixc_engine.engine.sequence import Sample, prepare_sample
    from ixc_engine.integrations.ray import decode_prepared, encode_prepared
    from ixc_engine.tiny import PACKAGED_TOKENIZER
    from ixc_engine.tokenizer import Tokenizer

    torch.set_num_threads(threads)
    tok = Tokenizer.from_file(PACKAGED_TOKENIZER)
    msg = [{"role": "user", "content": "<ImageHere>Describe the picture."},
           {"role": "assistant", "content": "Two cars."}]
    with tempfile.TemporaryDirectory() as tmp:
        import av

        video = Path(tmp) / "clip.mp4"
        with av.open(str(video), "w") as c:
            st = c.add_stream("mpeg4", rate=4)
            st.width, st.height, st.pix_fmt = 640, 480, "yuv420p"
            for i in range(16):
                frame = np.full((480, 640, 3), 15 * i, dtype=np.uint8)
                for pkt in st.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    c.mux(pkt)
            for pkt in st.encode():
                c.mux(pkt)
        cases = {"text only": Sample([{"role": "user", "content": "What is 2+2?"},
                                      {"role": "assistant", "content": "4"}], []),
                 "examples/images/img-000.png": Sample(msg, [str(REPO / "examples/images/img-000.png")])}
        for name in ("cars1.jpg", "dubai.png"):
            if (REPO.parent / "shared" / "media" / name).exists():
                cases[f"../shared/media/{name}"] = Sample(msg, [str(REPO.parent / "shared" / "media" / name)])
        cases["16-frame 640x480 mp4"] = Sample(msg, [str(video)])
        print("| sample | tokens | crops | crop MB | prepare wall ms | prepare CPU ms | encode ms | decode ms |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, sample in cases.items():
            prepare_sample(tok, sample, hd_num=9, max_length=16384)
            n = 5
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                prep = prepare_sample(tok, sample, hd_num=9, max_length=16384)
            wall, cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
            t0 = time.perf_counter()
            for _ in range(n):
                enc = encode_prepared(prep)
            t_enc = (time.perf_counter() - t0) / n
            t0 = time.perf_counter()
            for _ in range(n):
                decode_prepared(json.loads(enc[0]), enc[1], enc[2])
            t_dec = (time.perf_counter() - t0) / n
            crops = sum(m.pixel_values.shape[0] for m in prep.media)
            print(f"| {name} | {prep.n_tokens} | {crops} | {len(enc[2]) / 2**20:.1f} | {wall * 1e3:.1f} | "
                  f"{cpu * 1e3:.1f} | {t_enc * 1e3:.1f} | {t_dec * 1e3:.1f} |")
    print(f"torch threads: {threads}; load average: {load()}")


def driver_memory(lines: int) -> None:
    """Peak RSS of the `score --ray` driver process on text corpora of `lines` and 4 x `lines` records of ~10 KB each,
    every one over --max-length 64 (tokenized by the preparation actors, then an error record: cheap to score, so that
    the records' size, not the model, dominates). The driver joins a Ray instance started here, so the actors are
    not its children and its RSS is its own (ru_maxrss of a wrapper process's only child)."""
    import ray

    from ixc_engine.tiny import init_tiny

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = init_tiny(tmp / "model")
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
        address = ray.get_runtime_context().gcs_address
        print(f"load average at start: {load()}", file=sys.stderr)
        print("| lines | corpus MB | wall s | driver peak RSS MB | feed |")
        print("| --- | --- | --- | --- | --- |")
        for n in (lines, 4 * lines):
            corpus = tmp / f"c{n}.jsonl"
            with open(corpus, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps({"id": i, "messages": [{"role": "user", "content": f"q{i}"}, {
                        "role": "assistant", "content": f"word{i} " * 1200}]}) + "\n" for i in range(n))
            cmd = [sys.executable, "-m", "ixc_engine.cli", "score", str(corpus), "--model", str(model), "-o",
                   str(tmp / f"s{n}.jsonl"), "--ray", "--ray-address", address, "--max-length", "64", "--no-progress"]
            wrapper = ("import json, resource, subprocess, sys; p = subprocess.run(json.loads(sys.argv[1]), "
                       "capture_output=True, text=True); print(p.returncode, resource.getrusage("
                       "resource.RUSAGE_CHILDREN).ru_maxrss); print(p.stdout)")
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", wrapper, json.dumps(cmd)], capture_output=True, text=True,
                                 check=True).stdout
            wall = time.perf_counter() - t0
            rc, rss = (int(x) for x in out.splitlines()[0].split())
            if rc != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed (rc {rc})")
            s = json.loads([x for x in out.splitlines() if x.startswith('{"scored"')][-1])
            print(f"| {n} | {corpus.stat().st_size / 2**20:.1f} | {wall:.1f} | {rss / 1024:.0f} | {s['feed']} |")
        ray.shutdown()
    print(f"load average at end: {load()}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=REPO / "examples" / "corpus.jsonl")
    ap.add_argument("--model", default=str(REPO / "examples" / "demo-model"))
    ap.add_argument("--copies", type=int, default=1, help="k: the corpus is scored k and 2k times over")
    ap.add_argument("--batch-size", type=int, default=16, help="--ray-batch-size")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of every scorer: the local job (OMP_NUM_THREADS) and each scoring actor "
                    "(--ray-cpus-per-actor); default: the local job's own default and the machine's cores split "
                    "between the actors. Ray's one-CPU preparation actors always run one thread")
    ap.add_argument("--prep-costs", action="store_true", help="only the per-sample costs of the preparation stage")
    ap.add_argument("--driver-memory", type=int, nargs="?", const=2000, default=None, metavar="N",
                    help="only the driver's peak RSS on N and 4N text lines (default N: 2000)")
    args = ap.parse_args()
    if args.driver_memory:
        driver_memory(args.driver_memory)
        return
    if args.prep_costs:
        prep_costs(args.threads or 1)
        return

    import ray

    cpus = os.cpu_count() or 2
    ray_common = ["--ray", "--ray-batch-size", str(args.batch_size), "--ray-prep-cpus", "1"]
    configs = {
        "local": [],
        "ray, 1 scoring actor": ray_common + ["--ray-actors", "1", "--ray-cpus-per-actor", str(args.threads or cpus)],
        "ray, 2 scoring actors": ray_common + ["--ray-actors", "2", "--ray-cpus-per-actor",
                                               str(args.threads or max(1, cpus // 2))],
    }
    meter = CpuMeter()
    threading.Thread(target=meter.run, daemon=True).start()
    rows = []
    print(f"load average at start: {load()}; threads: {args.threads or 'default'}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = {k: replicate(args.corpus, k, tmp / f"corpus{k}.jsonl") for k in (args.copies, 2 * args.copies)}
        for c, (name, extra) in enumerate(configs.items()):
            if extra and not ray.is_initialized():
                # After the local runs, so that they do not pay for Ray's idle processes. Logical CPUs: one
                # preparation actor plus two one-CPU scorers, or one scorer with as many torch threads as the local
                # job uses.
                ray.init(num_cpus=max(cpus, 2 * (args.threads or 1)) + 1, include_dashboard=False,
                         log_to_driver=False)
            if extra:
                extra = [*extra, "--ray-address", ray.get_runtime_context().gcs_address]
            t = {}
            for k, n in sizes.items():
                env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads and not extra else {}
                t[k] = run(tmp / f"corpus{k}.jsonl", args.model, tmp / f"config{c}-{k}.jsonl", extra, meter, env)
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
