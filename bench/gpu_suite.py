"""One command for the first GPU run: parity, kernel benches, end to end, training, and the roofline model's view.

    python bench/gpu_suite.py --json gpu_suite.json --md gpu_suite.md    # one H100/H200, ~9 minutes
    python bench/gpu_suite.py --dry-run                                  # CPU: tiny shapes, Triton interpreter

Parts (each reuses the bench scripts' own functions; one failing part is recorded and the others still run; a part
that would start after the time budget is skipped and says so):
  parity     tiny checkpoints, the engine on the GPU in bf16 (Triton kernels) against the CPU fp32 reference path
  pool_score bench_pool_score: GB/s of the fused kernel vs measured device-to-device copy (target >= 85%)
  attention  bench_attention: paged prefix attention vs flash SDPA on equal dense work (target >= 0.9x)
  e2e        bench_e2e: corpus (hd_num 9) and best-of-8 on the real 7B shape, random bf16 weights, vs the
             upstream-algorithm baseline, sharing on/off
  training   bench_training: Bradley-Terry and PPO critic steps, fused pool_score vs the unfused head
  roofline   bench/roofline.py --json (the modelled figures, labelled as a model) next to the measured ones; when the
             file is absent the output says so
Writes one JSON (every figure, the machine, the command) and the markdown rows for bench/RESULTS.md. The dry run
exercises the same code on CPU (the figures then check the harness, not a GPU) and runs as a test in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BUDGET_S = 9 * 60


# ----------------------------------------------------------------------------------------------------------- parts
def part_parity(ctx: dict) -> dict:
    """Scores of tiny checkpoints: the device path (bf16 + Triton on GPU; fp32 + interpreted Triton in a dry run)
    against the CPU fp32 torch reference, both poolings, text-only and image samples."""
    import torch
    from bench_e2e import synthetic_photo

    from ixc_engine.api import RewardEngine
    from ixc_engine.tiny import init_tiny

    tmp = Path(ctx["tmp"])
    photo = str(synthetic_photo(tmp / "parity.jpg", 900, 600, seed=3))
    convs = [[{"role": "user", "content": "<ImageHere>What is in the picture?"},
              {"role": "assistant", "content": reply}] for reply in ("Two cars by a wall.", "A cat", "Nothing.")]
    text = [[{"role": "user", "content": "Say hello " * 20}, {"role": "assistant", "content": "hello " * 15}]]
    out = {"device": ctx["device"], "dtype": ctx["dtype"], "checks": []}
    worst = 0.0
    if ctx["dry_run"]:  # the interpreter pays per program instance: one image sample, one text sample
        cases = {"last": [("image", convs[:1], [[photo]])], "mean": [("text", text, None)]}
    else:
        cases = {pool: [("image", convs, [[photo]] * len(convs)), ("text", text, None)] for pool in ("last", "mean")}
    for seed, pooling in ((1, "last"), (2, "mean")):
        ckpt = init_tiny(tmp / f"tiny{seed}", seed=seed)
        ref = RewardEngine.from_pretrained(ckpt, device="cpu", dtype=torch.float32, backend="torch", pooling=pooling)
        dev = RewardEngine.from_pretrained(ckpt, device=ctx["device"], dtype=ctx["torch_dtype"], backend="triton",
                                           pooling=pooling)
        for name, cs, images in cases[pooling]:
            a = ref.score(cs, images=images, hd_num=ctx["hd_num_small"])
            b = dev.score(cs, images=images, hd_num=ctx["hd_num_small"])
            scale = max(abs(x) for x in a) or 1.0
            err = max(abs(x - y) for x, y in zip(a, b)) / scale
            worst = max(worst, err)
            out["checks"].append({"pooling": pooling, "samples": name, "max_rel_diff": err, "ref": a, "device": b})
        if ctx["device"] == "cuda":
            out.setdefault("syncs", []).append(_count_syncs(dev, convs, [[photo]] * len(convs), ctx["hd_num_small"]))
    # the device-side normalisation of uint8 sub-crops must give the CPU's float32 values bit for bit
    from PIL import Image

    from ixc_engine.media.image import hd_transform, normalize_uint8, process_image, to_tensor_normalized

    img = Image.open(photo)
    crops = process_image(img, 9)
    host = to_tensor_normalized(hd_transform(img, 9))
    dev_subs = normalize_uint8(crops.sub_uint8.to(ctx["device"])).cpu()
    host_subs = host.reshape(3, crops.h, 560, crops.w, 560).permute(1, 3, 0, 2, 4).reshape(-1, 3, 560, 560)
    out["uint8_normalisation_bit_identical"] = bool(torch.equal(dev_subs, host_subs))
    # bf16 against fp32 on the tiny model: README/RESULTS measured 0.2-0.7% on CPU; fp32 paths agree to ~1e-6
    out["tolerance"] = 2e-2 if ctx["dtype"] == "bf16" else 1e-4
    out["max_rel_diff"] = worst
    out["ok"] = worst <= out["tolerance"] and out["uint8_normalisation_bit_identical"]
    out["rows"] = [(f"| parity (tiny, {ctx['dtype']} {ctx['device']} vs CPU fp32) | max relative score difference "
                    f"{worst:.2e} (tolerance {out['tolerance']:.0e}) | {'ok' if out['ok'] else 'FAIL'} |")]
    out["rows"].append(f"| uint8 sub-crops normalised on {ctx['device']} vs the CPU's float32 | "
                       f"{'bit-identical' if out['uint8_normalisation_bit_identical'] else 'DIFFERENT'} | "
                       "bit-identical |")
    for c in out.get("syncs", []):
        out["rows"].append(f"| synchronising CUDA calls while scoring ({c['pooling']} pooling) | {c['syncs']} in "
                           f"{c['batches']} batches (torch.cuda.set_sync_debug_mode) | one read-back per batch |")
    return out


def _count_syncs(engine, convs, images, hd_num) -> dict:
    """Synchronising CUDA calls during one `score` (torch's sync debug mode warns at each), with where they came from:
    the host pipeline should have only the score read-back of each batch (two with mean pooling and the cache)."""
    import warnings

    import torch

    torch.cuda.synchronize()
    before = engine.stats()["batches"]
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.score(convs, images=images, hd_num=hd_num)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where: dict[str, int] = {}
    for w in syncs:
        key = f"{Path(w.filename).name}:{w.lineno}"
        where[key] = where.get(key, 0) + 1
    return {"pooling": engine.config.pooling, "syncs": len(syncs), "batches": engine.stats()["batches"] - before,
            "where": where}


def part_pool_score(ctx: dict) -> dict:
    import torch
    from bench_pool_score import eager_baseline, make_problem, required_bytes
    from harness import do_bench_median, gbps, measure_copy_bandwidth
    from ixc_engine.kernels.pool_score import MODES, pool_score

    dev = ctx["device"]
    if ctx["dry_run"]:
        T, H, Bs, dtype, copy_bytes = 512, 64, [4], torch.float32, 1 << 22
    else:
        T, H, Bs, dtype, copy_bytes = 65536, 4096, [32, 256], torch.bfloat16, None
    copy_bw = measure_copy_bandwidth(dev, copy_bytes) if copy_bytes else measure_copy_bandwidth(dev)
    out = {"copy_gbps": copy_bw, "cases": [], "rows": []}
    for B in Bs:
        p = make_problem(T, H, B, dtype=dtype, device=dev)
        args = (p.hidden, p.norm_weight, p.head_weight, p.cu_seqlens)
        for mode in MODES:
            ms_k = do_bench_median(lambda m=mode, a=args: pool_score(*a, mode=m, backend="triton"), device=dev)
            ms_b = do_bench_median(lambda m=mode, q=p: eager_baseline(q, m), device=dev)
            nbytes = required_bytes(p, mode)
            case = {"mode": mode, "T": T, "H": H, "B": B, "kernel_ms": ms_k, "eager_ms": ms_b,
                    "kernel_gbps": gbps(nbytes, ms_k), "eager_gbps": gbps(nbytes, ms_b)}
            case["pct_of_copy"] = 100 * case["kernel_gbps"] / copy_bw
            out["cases"].append(case)
            out["rows"].append(f"| pool_score fwd {mode} T={T} H={H} B={B} | {_fmt(case['kernel_gbps'])} GB/s = "
                               f"{_fmt(case['pct_of_copy'])}% of copy ({_fmt(copy_bw)} GB/s); eager "
                               f"{_fmt(case['eager_gbps'])} GB/s | target >= 85% of copy |")
    return out


def part_attention(ctx: dict) -> dict:
    import torch
    from bench_attention import (
        _timing,
        bench_kernel,
        cuda_cases,
        dense_baseline,
        make_problem,
        median_ms,
        prefix_baseline,
    )

    cuda = ctx["device"] == "cuda"
    if cuda:
        cases = cuda_cases(16)
    else:  # interpreter: small, fp32; the "flash" baseline falls back to the math SDPA backend on CPU
        cases = {"dense causal varlen, 2 x 24": make_problem([24, 17], [0, 0], hq=4, hkv=2, d=16,
                                                             dtype=torch.float32),
                 "paged prefix, 2 x 16 over a shared 32-token prefix": make_problem(
                     [16, 16], [32, 32], hq=4, hkv=2, d=16, shared_prefix=True, dtype=torch.float32)}
    allowed_dense = (("flash",),) if cuda else (("math",),)
    allowed_prefix = (("flash",), ("flash", "efficient")) if cuda else (("math",),)
    out = {"cases": [], "rows": []}
    for title, prob in cases.items():
        dense = max(prob.prefixes) == 0
        fn, desc = dense_baseline(prob, allowed_dense) if dense else prefix_baseline(prob, allowed_prefix)
        base = _timing("baseline", median_ms(fn, cuda=cuda), prob)
        kern = bench_kernel(prob)[0]
        case = {"case": title, "baseline": desc, "baseline_ms": base.ms, "baseline_tflops": base.tflops,
                "kernel": kern.name, "kernel_ms": kern.ms, "kernel_tflops": kern.tflops,
                "kernel_over_baseline": base.ms / kern.ms}
        out["cases"].append(case)
        target = "target >= 0.9x of flash SDPA" if dense else "paged prefix (baseline gathers pages)"
        out["rows"].append(f"| attention: {title} | {_fmt(kern.tflops)} TFLOP/s, {_fmt(case['kernel_over_baseline'])}x "
                           f"the baseline ({desc}) | {target} |")
        del prob, fn
        if cuda:
            torch.cuda.empty_cache()
    return out


def part_e2e(ctx: dict) -> dict:
    import bench_e2e

    path = Path(ctx["tmp"]) / "e2e.json"
    if ctx["dry_run"]:
        argv = ["--device", "cpu", "--model", "tiny", "--n-samples", "1", "--warmup-samples", "1", "--ns", "2",
                "--hd-num", "1", "--skip", "model-only"]
    else:
        argv = ["--device", "cuda", "--n-samples", "16", "--warmup-samples", "2", "--ns", "8", "--skip", "model-only"]
    result = bench_e2e.main([*argv, "--json", str(path)])
    rows = result["rows"]
    out = {"argv": argv, "result": result, "rows": []}

    def find(bench, scorer):
        return next((r for r in rows if r["bench"].startswith(bench) and r["scorer"] == scorer), None)

    corpus = find("corpus", "engine")
    base = find("corpus", "upstream baseline")
    if corpus:
        out["corpus_tokens_per_s"] = corpus["tokens_per_s"]
        out["corpus_speedup_vs_baseline"] = corpus["speedup"]
        out["rows"].append(f"| e2e corpus ({result['model']}, {result['layers']} layers, {result['dtype']}, hd_num "
                           f"{result['hd_num']}) | engine {corpus['tokens_per_s']:.0f} tok/s, MFU "
                           f"{100 * (corpus['mfu'] or 0):.1f}%; baseline {base['tokens_per_s'] if base else 0:.0f} "
                           f"tok/s; {corpus['speedup'] or 0:.2f}x | target >= 60% of the ceiling, ahead of baseline |")
    n = int(argv[argv.index("--ns") + 1])
    on, off = find(f"best-of-{n}", "engine sharing on"), find(f"best-of-{n}", "engine sharing off")
    if on and off:
        out["bon_on_over_off"], out["bon_n"] = on["items_per_s"] / off["items_per_s"], n
        out["rows"].append(f"| e2e best-of-{n} | sharing on {on['items_per_s']:.2f} cand/s, off "
                           f"{off['items_per_s']:.2f} cand/s: {out['bon_on_over_off']:.2f}x | target >= 4x |")
    return out


def part_training(ctx: dict) -> dict:
    import bench_training

    if ctx["dry_run"]:
        argv = ["--device", "cpu", "--pairs", "1", "--seq", "32", "--iters", "1", "--warmup", "0"]
    else:
        argv = ["--device", "cuda", "--layers", "4", "--pairs", "4", "--seq", "1024", "--iters", "3"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        bench_training.main(argv)
    text = buf.getvalue()
    print(text, end="")
    steps = {m.group(1).strip(): float(m.group(2))
             for m in re.finditer(r"^(.+?)\s+median\s+([\d.]+) ms", text, flags=re.MULTILINE)}
    if not steps:
        raise RuntimeError(f"bench_training printed no step times:\n{text}")
    out = {"argv": argv, "step_ms": steps, "rows": []}
    for kind in ("BT step", "critic step"):
        fused, unfused = steps.get(f"{kind} fused pool_score"), steps.get(f"{kind} unfused head")
        if fused and unfused:
            out["rows"].append(f"| training {kind} ({' '.join(argv[1:])}) | fused {fused:.1f} ms, unfused "
                               f"{unfused:.1f} ms ({unfused / fused:.2f}x) | - |")
    return out


def part_roofline(ctx: dict) -> dict:
    """The roofline model's predictions (bench/roofline.py, labelled a model) beside what the other parts measured."""
    script = BENCH / "roofline.py"
    if not script.is_file():
        msg = "bench/roofline.py is absent: no modelled figures to compare with"
        print(msg)
        return {"absent": True, "note": msg, "rows": [f"| roofline comparison | {msg} | - |"]}
    proc, path = ctx.get("roofline_proc") or _start_roofline(ctx)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError("bench/roofline.py --json took over 300 s") from None
    if proc.returncode != 0 or not path.is_file():
        raise RuntimeError(f"bench/roofline.py --json failed (exit {proc.returncode}): {err[-2000:]}")
    model = json.loads(path.read_text())
    gpu = ctx.get("gpu_name") or ""
    key = "H200" if "H200" in gpu else "H100"
    m = model.get(key, {})
    e2e = ctx["results"].get("e2e", {})
    out = {"model_gpu": key, "model": m, "assumptions": model.get("assumptions"), "rows": [],
           "note": "modelled figures come from bench/roofline.py (a model, not a measurement)"}
    pairs = [("corpus tokens/s", m.get("corpus", {}).get("tokens_per_s"), e2e.get("corpus_tokens_per_s")),
             (f"best-of-{e2e.get('bon_n', 8)} sharing on/off (model: best-of-8)", m.get("bon8", {}).get("on_over_off"),
              e2e.get("bon_on_over_off"))]
    for name, modelled, measured in pairs:
        ratio = measured / modelled if modelled and measured else None
        out.setdefault("compare", {})[name] = {"model": modelled, "measured": measured, "measured_over_model": ratio}
        out["rows"].append(f"| {name}: measured vs roofline model ({key}) | measured "
                           f"{_fmt(measured)}, model {_fmt(modelled)} (model), measured/model {_fmt(ratio)} | - |")
    for name, part in (m.get("corpus", {}).get("parts") or {}).items():
        out.setdefault("model_parts", {})[name] = part
    return out


def _start_roofline(ctx: dict):
    """bench/roofline.py --json in a separate process (CPU only, meta tensors): it runs while the GPU parts do."""
    path = Path(ctx["tmp"]) / "roofline.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, str(BENCH / "roofline.py"), "--json", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, path


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}")


PARTS = {"parity": part_parity, "pool_score": part_pool_score, "attention": part_attention, "e2e": part_e2e,
         "training": part_training, "roofline": part_roofline}


# ------------------------------------------------------------------------------------------------------------ main
def machine(torch) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_cores": os.cpu_count(),
            "platform": platform.platform()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def run(args) -> dict:
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --dry-run on a CPU (tiny shapes, Triton interpreter)")
    t_start = time.perf_counter()
    info = machine(torch)
    ctx = {"dry_run": args.dry_run, "device": "cpu" if args.dry_run else "cuda",
           "dtype": "fp32" if args.dry_run else "bf16",
           "torch_dtype": torch.float32 if args.dry_run else torch.bfloat16,
           "hd_num_small": 1 if args.dry_run else 4, "gpu_name": info.get("gpu"), "results": {}}
    parts = [p for p in PARTS if p not in args.skip and (not args.only or p in args.only)]
    budget = args.budget
    summary = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d"),
               "machine": info, "dry_run": args.dry_run, "budget_s": budget, "parts": {}}
    with tempfile.TemporaryDirectory(prefix="ixc_gpu_suite_") as tmp:
        ctx["tmp"] = tmp
        if "roofline" in parts and (BENCH / "roofline.py").is_file():
            ctx["roofline_proc"] = _start_roofline(ctx)
        for name in parts:
            elapsed = time.perf_counter() - t_start
            if elapsed > budget and name != "roofline":  # the model was computed meanwhile; comparing is instant
                summary["parts"][name] = {"skipped": f"time budget of {budget:.0f} s used up ({elapsed:.0f} s)"}
                print(f"== {name}: skipped (time budget)", flush=True)
                continue
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            try:
                res = PARTS[name](ctx)
            except Exception as exc:  # noqa: BLE001 (one broken part must not hide the others' figures)
                res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:],
                       "rows": [f"| {name} | failed: {type(exc).__name__}: {str(exc)[:200]} | - |"]}
                print(res["traceback"], file=sys.stderr, flush=True)
            res["seconds"] = time.perf_counter() - t0
            ctx["results"][name] = res
            summary["parts"][name] = res
            if ctx["device"] == "cuda":
                torch.cuda.empty_cache()
    summary["wall_seconds"] = time.perf_counter() - t_start
    where = "CPU dry run (tiny shapes, interpreter: figures check the harness only)" if args.dry_run else \
        f"{info.get('gpu')}, torch {info['torch']}, triton {info.get('triton')}"
    rows = [f"Measured by `{summary['command']}` on {where}, {summary['date']}, {summary['wall_seconds']:.0f} s.", "",
            "| part | measured | target |", "| --- | --- | --- |"]
    for res in summary["parts"].values():
        rows += res.get("rows", [])
    summary["markdown"] = "\n".join(rows)
    print("\n" + summary["markdown"])
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    if args.md:
        Path(args.md).write_text(summary["markdown"] + "\n")
        print(f"wrote {args.md}")
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--md", help="write the markdown rows for bench/RESULTS.md here")
    ap.add_argument("--only", action="append", choices=list(PARTS), help="run only these parts (repeatable)")
    ap.add_argument("--skip", action="append", choices=list(PARTS), default=[], help="leave out a part (repeatable)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds; parts that would start later are skipped")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dry_run:
        # Triton reads this once, when the kernels are first decorated: set it before anything imports them.
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run needs TRITON_INTERPRET=1 before triton is imported; run it as a script")
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(BENCH))
    return run(args)


if __name__ == "__main__":
    main()
