"""Serving throughput: `ixc-engine serve` at concurrency 1, 8, 64 vs direct `RewardEngine.score` on the same samples in
the same run.

Samples: the example corpus's scorable records (examples/corpus.jsonl: one 112x112 picture and a short chat each),
sent as OpenRLHF sends them, one sample per POST /get_reward (the chat text with its markers, the image as a path below
--media-root). The last `--warmup` samples warm up every scorer and are not timed, so all scorers start from the same
cache state (first calls, allocator, prefix cache).

Per concurrency level a fresh server is started (a cold prefix cache, like the fresh direct engine) with the same torch
threads: the HTTP process and its engine process (`ixc-engine serve`'s default); one more row at the highest
concurrency runs `serve --single-process` (the engine in a thread of the HTTP process, as before the engine process),
in the same run. The load generator is this process: a minimal asyncio HTTP/1.1 client (kept-alive connections) that
keeps `c` requests in flight until every sample is answered. Printed per level: requests/s, p50/p99 latency, mean engine
batch size (from /metrics), CPU ms per request of the server processes (of its engine process alone) and of the client
(/proc and process_time), and the scheduler's wall time per request (scoring, idle on an empty queue, waiting for
company; from /metrics); and the direct rows: one `RewardEngine.score` call over all samples (batched; its CPU ms per
sample), run first and once more last (the ratios use the faster of the two, as the load of a shared machine drifts
during a run), and one call per sample. Then the issue's two target ratios and a row for bench/RESULTS.md. Rewards must
equal the direct scores (fp32, 1e-5) or the run stops. `--repeat N` runs it all N times and ends with the median of
each target ratio over the runs.

    python bench/bench_serve.py                          # CPU, demo model, 1 torch thread, ~1-2 min on 2 cores
    python bench/bench_serve.py --concurrency 1,8,64 --threads 1 --json serve.json
    python bench/bench_serve.py --workload text --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from ixc_engine.api import RewardEngine, Sample
from ixc_engine.corpus import read_corpus
from ixc_engine.serve.chat import render_chat

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def corpus_samples(corpus: Path = EXAMPLES / "corpus.jsonl") -> list[Sample]:
    """The corpus's records that can be scored (the broken example lines left out)."""
    out = []
    for _, item in read_corpus(corpus):
        roles_ok = isinstance(item, Sample) and all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") for m in item.messages)
        if roles_ok and all(Path(m).is_file() for m in item.media):
            out.append(item)
    return out


WORDS = ["the", "a", "picture", "shows", "two", "three", "red", "blue", "green", "square", "circle", "triangle",
         "small", "large", "left", "right", "of", "and", "with", "near", "is", "on", "there", "answer", "because",
         "first", "then", "so", "we", "get", "which", "means", "total"]


def text_samples(n: int, seed: int = 0) -> list[Sample]:
    """RL-style text rewards (what OpenRLHF sends): a question of 20-60 words and an answer of 20-150 words."""
    import random

    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    return [Sample([{"role": "user", "content": words(20, 60)}, {"role": "assistant", "content": words(20, 150)}],
                   [], id=i) for i in range(n)]


def request_body(s: Sample, media_root: Path) -> dict:
    body = {"query": [render_chat(s.messages, bos=True, eos="</s>")]}
    if s.media:
        body["images"] = [[os.path.relpath(m, media_root) for m in s.media]]
    return body


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`ixc-engine serve` in a subprocess."""

    def __init__(self, model: str, media_root: Path, threads: int, max_wait_ms: float, window: int,
                 extra: tuple[str, ...] = ()) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "ixc_engine.cli", "serve", "--model", model, "--port", str(self.port),
                    "--media-root", str(media_root), "--threads", str(threads), "--max-wait-ms", str(max_wait_ms),
                    "--window", str(window), "--log-level", "warning", "--max-queue", "100000", *extra]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited: {self.log.read().decode()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for name in ("ixc_batch_size_sum", "ixc_batch_size_count", "ixc_tokens_computed_total", "ixc_batch_seconds_sum",
                     "ixc_scheduler_idle_seconds_total", "ixc_scheduler_gather_seconds_total"):
            m = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
            out[name] = float(m.group(1)) if m else float("nan")
        return out

    def cpu_seconds(self) -> dict[int, float]:
        """CPU seconds (user + system) so far of the server process and its children (the engine process)."""
        return {pid: _cpu_seconds(pid) for pid in [self.proc.pid, *_children(self.proc.pid)]}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError):
                pass
    return out


async def _post(reader, writer, host: str, path: str, payload: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a kept-alive connection. A minimal client on purpose: on a 2-core machine a full client
    library (httpx: ~3-7 ms CPU per request measured here) would use more CPU than the server and set the pace."""
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if m is None:
        raise RuntimeError(f"response without Content-Length: {head!r}")
    return status, await reader.readexactly(int(m.group(1)))


async def _drive(url: str, bodies: list[dict], concurrency: int) -> tuple[list[float], list[float], float]:
    host, port = url.removeprefix("http://").split(":")
    payloads = [json.dumps(b).encode() for b in bodies]
    latencies = [0.0] * len(bodies)
    rewards = [0.0] * len(bodies)
    next_i = 0

    async def worker():
        nonlocal next_i
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while next_i < len(bodies):
                i = next_i
                next_i += 1
                t0 = time.perf_counter()
                status, data = await _post(reader, writer, host, "/get_reward", payloads[i])
                latencies[i] = time.perf_counter() - t0
                if status != 200:
                    raise RuntimeError(f"request {i}: HTTP {status}: {data[:300]!r}")
                rewards[i] = json.loads(data)["rewards"][0]
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return rewards, latencies, time.perf_counter() - t0


def drive(url: str, bodies: list[dict], concurrency: int):
    return asyncio.run(_drive(url, bodies, concurrency))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def run(args, workload: str) -> dict:
    torch.set_num_threads(args.threads)
    samples = corpus_samples() if workload == "image" else text_samples(args.text_n + args.warmup)
    warm, timed = samples[-args.warmup:], samples[:-args.warmup]
    if args.n:
        timed = timed[:args.n]
    convs, media = [s.messages for s in timed], [s.media for s in timed]
    rows = []

    def fresh_engine():
        eng = RewardEngine.from_pretrained(args.model, device="cpu")
        eng.score([s.messages for s in warm], [s.media for s in warm])
        return eng

    eng = fresh_engine()
    t0, c0 = time.perf_counter(), time.process_time()
    want = eng.score(convs, media)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows.append({"scorer": "direct RewardEngine.score, one call", "concurrency": None,
                 "requests_per_s": len(timed) / wall, "wall_s": wall, "server_cpu_ms": 1e3 * cpu / len(timed)})
    eng = fresh_engine()
    lat = []
    t0 = time.perf_counter()
    for c, m in zip(convs, media):
        t1 = time.perf_counter()
        eng.score([c], [m])
        lat.append(time.perf_counter() - t1)
    wall = time.perf_counter() - t0
    rows.append({"scorer": "direct RewardEngine.score, one call per sample", "concurrency": 1,
                 "requests_per_s": len(timed) / wall, "wall_s": wall, "p50_ms": 1e3 * pct(lat, 0.5),
                 "p99_ms": 1e3 * pct(lat, 0.99)})
    del eng

    bodies = [request_body(s, EXAMPLES) for s in timed]
    warm_bodies = [request_body(s, EXAMPLES) for s in warm]
    levels = [(c, ()) for c in args.concurrency]
    if args.single_process_row and args.concurrency:
        levels.append((max(args.concurrency), ("--single-process",)))
    for c, extra in levels:
        srv = Server(args.model, EXAMPLES, args.threads, args.max_wait_ms, args.window, extra)
        try:
            drive(srv.url, warm_bodies, min(c, len(warm_bodies)))
            m0, cpu0 = srv.metrics(), srv.cpu_seconds()
            t_client = time.process_time()
            rewards, lat, wall = drive(srv.url, bodies, c)
            t_client = time.process_time() - t_client
            m1, cpu1 = srv.metrics(), srv.cpu_seconds()
        finally:
            srv.stop()
        diff = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(rewards, want))
        if diff > 1e-5:
            raise RuntimeError(f"concurrency {c}: rewards differ from RewardEngine.score by {diff:.2e}")
        n_batches = m1["ixc_batch_size_count"] - m0["ixc_batch_size_count"]
        cpu = {pid: cpu1[pid] - cpu0.get(pid, 0.0) for pid in cpu1}
        engine_cpu = max((v for pid, v in cpu.items() if pid != srv.proc.pid), default=0.0)
        rows.append({"scorer": "ixc-engine serve, POST /get_reward" + (" " + " ".join(extra) if extra else ""),
                     "concurrency": c, "requests_per_s": len(timed) / wall, "wall_s": wall,
                     "p50_ms": 1e3 * statistics.median(lat), "p99_ms": 1e3 * pct(lat, 0.99),
                     "mean_batch": (m1["ixc_batch_size_sum"] - m0["ixc_batch_size_sum"]) / max(n_batches, 1),
                     "max_reward_diff": diff,
                     # CPU ms per request: all server processes, the engine process alone, the load generator
                     "server_cpu_ms": 1e3 * sum(cpu.values()) / len(timed),
                     "engine_cpu_ms": 1e3 * engine_cpu / len(timed) if engine_cpu else None,
                     "client_cpu_ms": 1e3 * t_client / len(timed),
                     # the scheduler's wall time per request: scoring, idle on an empty queue, waiting for company
                     "sched_ms": {k: 1e3 * (m1[name] - m0[name]) / len(timed) for k, name in (
                         ("busy", "ixc_batch_seconds_sum"), ("idle", "ixc_scheduler_idle_seconds_total"),
                         ("gather", "ixc_scheduler_gather_seconds_total"))}})
    # direct batched once more, after the servers: on a shared machine the load drifts during a run; the ratios use
    # the faster of the two direct runs (never flattering the server)
    eng = fresh_engine()
    t0, c0 = time.perf_counter(), time.process_time()
    eng.score(convs, media)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows.append({"scorer": "direct RewardEngine.score, one call (again, last)", "concurrency": None,
                 "requests_per_s": len(timed) / wall, "wall_s": wall, "server_cpu_ms": 1e3 * cpu / len(timed)})
    del eng
    return {"workload": workload, "rows": rows, "samples": len(timed), "warmup": len(warm)}


def paired(args, rounds: int, concurrency: int) -> dict:
    """c=`concurrency` against direct batched scoring in adjacent pairs: one server and one direct engine, started
    once; each round scores fresh text samples (no prefix reuse from earlier rounds) both ways, back to back, the order
    alternating, so that both figures of a pair see the same machine speed. Ratios per pair and their median."""
    torch.set_num_threads(args.threads)
    n = args.text_n
    samples = text_samples(n * (rounds + 1), seed=11)
    eng = RewardEngine.from_pretrained(args.model, device="cpu")
    srv = Server(args.model, EXAMPLES, args.threads, args.max_wait_ms, args.window)
    pairs = []
    try:
        warm = samples[-n:]
        eng.score([s.messages for s in warm[:args.warmup]])
        drive(srv.url, [request_body(s, EXAMPLES) for s in warm], concurrency)
        for i in range(rounds):
            chunk = samples[i * n:(i + 1) * n]
            convs, bodies = [s.messages for s in chunk], [request_body(s, EXAMPLES) for s in chunk]
            got = {}
            for what in (("direct", "serve") if i % 2 == 0 else ("serve", "direct")):
                t0 = time.perf_counter()
                if what == "direct":
                    want = eng.score(convs)
                else:
                    rewards, _, _ = drive(srv.url, bodies, concurrency)
                got[what] = n / (time.perf_counter() - t0)
            diff = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(rewards, want))
            if diff > 1e-5:
                raise RuntimeError(f"round {i}: rewards differ from RewardEngine.score by {diff:.2e}")
            pairs.append(got)
    finally:
        srv.stop()
    ratios = [g["serve"] / g["direct"] for g in pairs]
    # throughput over all rounds: every sample of the session over the time each scorer spent
    total = {k: len(pairs) * n / sum(n / g[k] for g in pairs) for k in ("direct", "serve")}
    return {"rounds": pairs, "ratios": ratios, "median": statistics.median(ratios), "samples": n,
            "concurrency": concurrency, "total_requests_per_s": total, "total_ratio": total["serve"] / total["direct"]}


def direct_batched(out: dict) -> dict:
    """The faster of the run's two direct batched rows (first and last)."""
    return max((r for r in out["rows"] if r["scorer"].startswith("direct RewardEngine.score, one call") and
                r["concurrency"] is None), key=lambda r: r["requests_per_s"])


def _served(out: dict, single: bool = False) -> dict[int, dict]:
    return {r["concurrency"]: r for r in out["rows"]
            if r["scorer"].startswith("ixc") and ("--single-process" in r["scorer"]) == single}


def summary(out: dict, c1: float | None, batched: float) -> str:
    """The issue's two targets, as ratios of figures of this run."""
    served = _served(out)
    top = max(served, default=None)
    if top is None:
        return ""
    rate = served[top]["requests_per_s"]
    line = f"targets: c={top} / direct batched (the faster of its two runs) = {rate / batched:.2f}x (>= 0.9x)"
    if c1:
        line += f", c={top} / c=1 = {rate / c1:.2f}x (>= 5x)"
    single = _served(out, single=True).get(top)
    if single:
        line += f"; --single-process at c={top}: {single['requests_per_s'] / batched:.2f}x direct"
    return line


def results_row(out: dict, command: str) -> str:
    """A row of the serving table in bench/RESULTS.md (the lead adds the time, load and code version)."""
    rows, served = out["rows"], _served(out)
    direct, per_call = direct_batched(out), rows[1]

    def cell(r):
        if r is None:
            return "-"
        text = f"{r['requests_per_s']:.2f} (p50 {r['p50_ms']:.1f}, p99 {r['p99_ms']:.1f}"
        if r.get("mean_batch") is not None:
            text += f"; batch {r['mean_batch']:.1f}"
        if r.get("server_cpu_ms") is not None:
            text += f"; CPU {r['server_cpu_ms']:.2f} ms/req"
        return text + ")"

    levels = sorted(served)
    top = levels[-1] if levels else None
    c1 = served.get(1, {}).get("requests_per_s")
    ratio1 = f"{served[top]['requests_per_s'] / c1:.2f}x" if top and c1 else "-"
    ratiod = f"{served[top]['requests_per_s'] / direct['requests_per_s']:.2f}x" if top else "-"
    return " | ".join(["| UTC, load", f"`python bench/bench_serve.py {command}`".replace("  ", " "),
                       f"{out['workload']}, {out['samples']}",
                       f"{direct['requests_per_s']:.2f} req/s (CPU {direct['server_cpu_ms']:.2f} ms/sample)",
                       cell(per_call), *(cell(served.get(c)) for c in levels), ratio1, ratiod]) + " |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(EXAMPLES / "demo-model"))
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64])
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the direct engine")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--n", type=int, default=None, help="timed samples (default: all the corpus's but the warm-up)")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--workload", type=lambda s: s.split(","), default=["text", "image"],
                   help="text (RL-style chats, what OpenRLHF sends), image (the example corpus), or both (default)")
    p.add_argument("--text-n", type=int, default=512, help="timed samples of the text workload (default 512)")
    p.add_argument("--no-single-process-row", dest="single_process_row", action="store_false",
                   help="leave out the row of `serve --single-process` (the engine in a thread of the HTTP process) at "
                   "the highest concurrency")
    p.add_argument("--repeat", type=int, default=1,
                   help="run everything this many times and print the median of each target ratio (a shared 2-core "
                   "machine's speed drifts by up to 1.5x within one run)")
    p.add_argument("--pairs", type=int, default=0, metavar="N",
                   help="instead: N rounds of fresh text samples, each scored by direct batched scoring and by the "
                   "server at the highest --concurrency back to back (order alternating); prints each pair's ratio "
                   "and the median (the fairest same-run comparison on a machine whose speed drifts)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.pairs:
        res = paired(args, args.pairs, max(args.concurrency))
        for i, (g, r) in enumerate(zip(res["rounds"], res["ratios"])):
            print(f"round {i}: direct {g['direct']:.1f} req/s, serve c={res['concurrency']} {g['serve']:.1f} req/s: "
                  f"{r:.3f}x")
        print(f"c={res['concurrency']} / direct batched over {args.pairs} adjacent pairs ({res['samples']} samples "
              f"each): median {res['median']:.3f}x (min {min(res['ratios']):.3f}, max {max(res['ratios']):.3f}); over "
              f"all rounds serve {res['total_requests_per_s']['serve']:.1f} req/s, direct "
              f"{res['total_requests_per_s']['direct']:.1f}: {res['total_ratio']:.3f}x; load {os.getloadavg()[0]:.1f}")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        return 0
    load = os.getloadavg()
    t_start = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results = []
    ratios: dict[str, list[tuple[float, float | None]]] = {}
    for workload in [w for _ in range(args.repeat) for w in args.workload]:
        out = run(args, workload)
        results.append(out)
        batched = direct_batched(out)["requests_per_s"]
        c1 = next((r["requests_per_s"] for r in out["rows"][2:] if r["concurrency"] == 1), None)
        print(f"\n[{workload}] {out['samples']} samples (+{out['warmup']} warm-up), torch threads {args.threads}")
        print(f"{'scorer':52s} {'conc':>5s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'batch':>6s} {'vs c=1':>7s} "
              f"{'vs direct':>9s}   CPU ms/req: server (engine) client")
        for r in out["rows"]:
            conc = "-" if r["concurrency"] is None else str(r["concurrency"])
            vs1 = f"{r['requests_per_s'] / c1:.2f}x" if c1 and r["scorer"].startswith("ixc") else ""
            cpu = f"{r['server_cpu_ms']:.2f}" if r.get("server_cpu_ms") is not None else ""
            if r.get("engine_cpu_ms") is not None:
                cpu += f" ({r['engine_cpu_ms']:.2f})"
            if r.get("client_cpu_ms") is not None:
                cpu += f" {r['client_cpu_ms']:.2f}"
            print(f"{r['scorer']:52s} {conc:>5s} {r['requests_per_s']:8.2f} {r.get('p50_ms', float('nan')):8.1f} "
                  f"{r.get('p99_ms', float('nan')):8.1f} {r.get('mean_batch', float('nan')):6.1f} {vs1:>7s} "
                  f"{r['requests_per_s'] / batched:8.2f}x   {cpu}")
        for r in out["rows"]:
            if "sched_ms" in r:
                t = r["sched_ms"]
                print(f"  scheduler at c={r['concurrency']}{' (single process)' if 'single' in r['scorer'] else ''}: "
                      f"wall ms per request: scoring {t['busy']:.2f}, idle (empty queue) {t['idle']:.2f}, waiting "
                      f"for company {t['gather']:.2f}; request every {1e3 / r['requests_per_s']:.2f} ms")
        print(summary(out, c1, batched))
        print("RESULTS.md row: " + results_row(out, " ".join(sys.argv[1:])))
        served = _served(out)
        if served:
            top = served[max(served)]["requests_per_s"]
            ratios.setdefault(workload, []).append((top / batched, top / c1 if c1 else None))
    for workload, rs in ratios.items():
        if len(rs) > 1:
            vs_direct = [a for a, _ in rs]
            vs_c1 = [b for _, b in rs if b is not None]
            print(f"\n[{workload}] over {len(rs)} runs: c={max(args.concurrency)} / direct batched median "
                  f"{statistics.median(vs_direct):.2f}x ({', '.join(f'{a:.2f}' for a in vs_direct)})"
                  + (f"; / c=1 median {statistics.median(vs_c1):.2f}x ({', '.join(f'{b:.2f}' for b in vs_c1)})"
                     if vs_c1 else ""))
    after = os.getloadavg()
    print(f"\nload average (1 min) {load[0]:.1f} before, {after[0]:.1f} after; {os.cpu_count()} cores")
    out = {"results": results, "command": "python " + " ".join(sys.argv), "start": t_start,
           "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
           "load_before": load, "load_after": after}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
