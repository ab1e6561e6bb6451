"""Ahead-of-time compiles of every Triton kernel for sm_90a and sm_80 (no GPU needed): registers, spills, shared
memory, pipelining and wgmma, at the launch configurations the host wrappers pick for the released 7B shapes.

    python bench/compile_table.py                 # print the table (TRITON_INTERPRET must be unset)
    python bench/compile_table.py --write         # also replace the table in bench/RESULTS.md
    python bench/compile_table.py --json out.json

Kernels come from `compile_specs()` of every module in kernels/ and training/ that defines one (see
ixc_engine/kernels/_specs.py). Each spec is bound the way the JIT binds a launch (Triton's own binder on stand-in
arguments: the pointer dtypes, and the integer values at the 7B shapes, decide the divisibility hints and which
integers become constants), compiled with `triton.compile` for a `GPUTarget`, and its PTX assembled by the wheel's
bundled ptxas with `-v` (the same flags Triton uses) for the register and spill counts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHS = {"sm_90a": 90, "sm_80": 80}
MARK_BEGIN = "<!-- compile-table:begin -->"
MARK_END = "<!-- compile-table:end -->"


def _require_compiler() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: the kernels are then interpreted functions that cannot be "
                           "compiled; run this in a process without it (env -u TRITON_INTERPRET ...)")


def kernel_modules() -> list[str]:
    """Importable names of the modules in kernels/ and training/ whose source defines compile_specs()."""
    names = []
    for folder, package in (("kernels", "ixc_engine.kernels"), ("training", "ixc_engine.training")):
        for path in sorted((REPO / folder).glob("*.py")):
            if path.name.startswith("__") or "def compile_specs(" not in path.read_text():
                continue
            names.append(f"{package}.{path.stem}")
    return names


def all_specs(only: str | None = None) -> list[dict]:
    _require_compiler()
    specs = []
    for name in kernel_modules():
        for spec in importlib.import_module(name).compile_specs():
            if only is None or re.search(only, spec["name"]):
                specs.append({**spec, "module": name})
    return specs


def _backend(cap: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", cap, 32))


def _standin_args(spec: dict) -> dict:
    """Launch arguments as the JIT's binder sees them: tensors only show their dtype and (16-byte) alignment."""
    import torch

    dtypes = {"*bf16": torch.bfloat16, "*fp16": torch.float16, "*fp32": torch.float32, "*i32": torch.int32,
              "*i64": torch.int64, "*u8": torch.uint8}
    args = {}
    for arg, kind in spec["signature"].items():
        if kind.startswith("*"):
            args[arg] = torch.empty(16, dtype=dtypes[kind], device="meta")
        elif kind == "constexpr":
            args[arg] = spec["constexprs"][arg]
        elif kind == "fp32":
            args[arg] = 0.5
        else:
            args[arg] = spec["ints"][arg]
    return args


def specialization(spec: dict, cap: int = 90, **overrides):
    """The JIT's specialisation key of a launch with the spec's arguments (overrides replace integer values), and
    the (signature, constexprs, attrs) it would compile with."""
    from triton.runtime.jit import create_function_from_signature

    fn = spec["fn"]
    backend = _backend(cap)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = {**_standin_args(spec), **overrides}
    bound, spec_key, options = binder(**args, num_warps=spec["num_warps"], num_stages=spec["num_stages"])
    _, signature, constexprs, attrs = fn._pack_args(backend, options, bound, spec_key, options)
    return tuple(map(tuple, spec_key)), signature, constexprs, attrs


def specialised_per_batch(spec: dict, values=(1, 16, 17, 4099)) -> list[str]:
    """Per-batch integer arguments of `spec` whose value changes the JIT's cache key (each would recompile)."""
    bad = []
    for arg in spec["per_batch"]:
        keys = {specialization(spec, **{arg: v})[0] for v in values}
        if len(keys) > 1:
            bad.append(arg)
    return bad


def launched_kernels(module) -> list[str]:
    """Names of the module's @triton.jit functions that are launched from the host (not called by other kernels)."""
    import inspect

    from triton.runtime.jit import JITFunction

    jits = {n: f for n, f in vars(module).items() if isinstance(f, JITFunction) and f.__module__ == module.__name__}
    sources = {n: inspect.getsource(f.fn) for n, f in jits.items()}
    return sorted(n for n in jits if not any(re.search(rf"\b{n}\(", src) for m, src in sources.items() if m != n))


def _ptxas(ptx: str, cap: int) -> dict:
    """Registers and spills of one PTX module, from the bundled ptxas with -v (Triton's own flags)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    arch = sm_arch_from_capability(cap)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(cap).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(src),
               "-o", str(Path(tmp) / "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return _parse_ptxas(log)


def loop_pipelining(ttgir: str) -> list[dict]:
    """Per top-level scf.for of the kernel, in source order: the upper-bound name, the number of buffers of the
    multi-buffered shared allocations it indexes (0 when it has none) and the async_wait counts inside it."""
    allocs = {}
    for m in re.finditer(r"(%[\w.]+) = ttg\.local_alloc\s*(?::|\{[^}]*\}\s*:)\s*\(\)\s*->\s*!ttg\.memdesc<([\dx]+)x",
                         ttgir):
        allocs[m.group(1)] = int(m.group(2).split("x")[0])
    lines = ttgir.splitlines()
    loops, i = [], 0
    while i < len(lines):
        line = lines[i]
        m = re.search(r"scf\.for %\S+ = %\S+ to (%[\w.]+) step", line)
        if not m:
            i += 1
            continue
        depth, body = 0, []
        for j in range(i, len(lines)):
            depth += lines[j].count("{") - lines[j].count("}")
            body.append(lines[j])
            if depth <= 0 and j > i:
                break
        text = "\n".join(body)
        used = {a: n for a, n in allocs.items() if re.search(re.escape(a) + r"\b", text)}
        waits = [int(x) for x in re.findall(r"ttg\.async_wait[^\n]*\{num = (\d+) : i32\}", text)]
        upper = re.sub(r"_\d+$", "", m.group(1).lstrip("%"))
        loops.append({"upper": upper, "buffers": max(used.values(), default=0), "async_waits": waits})
        i += len(body)
    return loops


def _parse_ptxas(log: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", log)
    stores = re.findall(r"(\d+) bytes spill stores", log)
    loads = re.findall(r"(\d+) bytes spill loads", log)
    if not regs:
        raise RuntimeError(f"ptxas -v printed no register count:\n{log}")
    return {"registers": max(map(int, regs)), "spill_stores": sum(map(int, stores)),
            "spill_loads": sum(map(int, loads)), "ptxas_log": log}


def compile_one(spec: dict, arch: str) -> dict:
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cap = ARCHS[arch]
    _, signature, constexprs, attrs = specialization(spec, cap)
    t0 = time.perf_counter()
    # Triton runs ptxas with -v itself and prints its log with dump_ptxas_log; a cache hit runs no ptxas, and then
    # the PTX is assembled again below.
    captured = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(captured):
        knobs.nvidia.dump_ptxas_log = True
        kernel = triton.compile(ASTSource(spec["fn"], signature, constexprs, attrs),
                                target=GPUTarget("cuda", cap, 32),
                                options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    seconds = time.perf_counter() - t0
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    row = {"kernel": spec["name"], "module": spec["module"], "arch": arch, "dtype": spec["dtype"],
           "num_warps": spec["num_warps"], "num_stages": spec["num_stages"], "shared_bytes": kernel.metadata.shared,
           "wgmma": ptx.count("wgmma.mma_async"), "mma": len(re.findall(r"\bmma\.sync", ptx)),
           "loops": loop_pipelining(ttgir), "compile_s": round(seconds, 2)}
    log = captured.getvalue()
    row.update(_parse_ptxas(log) if "Used" in log else _ptxas(ptx, cap))
    return row


def _compile_job(job: tuple[str, str, str]) -> dict:
    module, name, arch = job
    spec = next(s for s in importlib.import_module(module).compile_specs() if s["name"] == name)
    return compile_one({**spec, "module": module}, arch)


def run(only: str | None = None, archs=tuple(ARCHS), jobs: int = 1) -> list[dict]:
    """Rows in (spec, arch) order; jobs > 1 compiles in that many spawned processes (slowest kernels first)."""
    jobs_list = [(s["module"], s["name"], arch) for s in all_specs(only) for arch in archs]
    if jobs <= 1:
        return [_compile_job(j) for j in jobs_list]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    order = sorted(range(len(jobs_list)), key=lambda i: "attn" not in jobs_list[i][1])
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = dict(zip(order, pool.map(_compile_job, [jobs_list[i] for i in order])))
    return [done[i] for i in range(len(jobs_list))]


def markdown(rows: list[dict]) -> str:
    head = ("| kernel | arch | registers | spill stores / loads (bytes) | shared memory (bytes) | warps | stages | "
            "loops: buffers (async_wait) | wgmma / mma.sync |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    out = [head]
    for r in rows:
        loops = ", ".join(
            f"{lp['upper']}: {lp['buffers']}"
            + (f" ({'/'.join(map(str, sorted(set(lp['async_waits']))))})" if lp["async_waits"] else "")
            for lp in r["loops"])
        out.append(f"| {r['kernel']} | {r['arch']} | {r['registers']} | {r['spill_stores']} / {r['spill_loads']} | "
                   f"{r['shared_bytes']} | {r['num_warps']} | {r['num_stages']} | {loops or '-'} | "
                   f"{r['wgmma']} / {r['mma']} |")
    return "\n".join(out)


def write_results(table: str, path: Path = REPO / "bench" / "RESULTS.md") -> None:
    import triton

    text = path.read_text()
    block = (f"{MARK_BEGIN}\nMeasured by `python bench/compile_table.py --write` (Triton {triton.__version__}, its "
             f"bundled ptxas; compiled ahead of time on a CPU, no GPU involved).\n\n{table}\n{MARK_END}")
    if MARK_BEGIN in text:
        text = re.sub(re.escape(MARK_BEGIN) + r".*?" + re.escape(MARK_END), lambda _: block, text, flags=re.DOTALL)
    else:
        text = text.rstrip() + "\n\n## Triton kernels compiled ahead of time for sm_90a and sm_80\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="regular expression on kernel names")
    ap.add_argument("--arch", action="append", choices=sorted(ARCHS), help="default: all")
    ap.add_argument("--write", action="store_true", help="replace the table in bench/RESULTS.md")
    ap.add_argument("--json", type=Path, help="write the rows (with ptxas logs) as JSON")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args.only, tuple(args.arch or ARCHS), args.jobs)
    table = markdown(rows)
    print(table)
    print(f"\n{len(rows)} compiles in {time.perf_counter() - t0:.1f} s")
    if args.write:
        write_results(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
