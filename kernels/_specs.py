"""Launch configurations of the Triton kernels for ahead-of-time compile checks (bench/compile_table.py).

Every kernel module (kernels/*.py, training/gae.py) exposes `compile_specs()`: a list of plain dicts, one per launch
configuration its host wrapper picks at the released 7B shapes, built with `kernel_spec` below:

    {"name": str, "fn": the @triton.jit function, "signature": {arg: "*bf16" | "*i32" | "i32" | "fp32" | "constexpr"},
     "constexprs": {arg: value}, "num_warps": int, "num_stages": int,
     "ints": {arg: value at the 7B shapes} (non-constexpr integers; decides the JIT's divisibility-by-16 hints),
     "per_batch": [int args whose value changes from batch to batch], "dtype": "bf16" | "fp32" (the data dtype)}

No device and no compiler are touched here; building the list is cheap.
"""

from __future__ import annotations

_TYPES = ("*bf16", "*fp16", "*fp32", "*i32", "*i64", "*u8", "i32", "i64", "fp32", "constexpr")


def kernel_spec(name: str, fn, *, pointers: dict[str, str], constexprs: dict, num_warps: int, num_stages: int,
                ints: dict[str, int] | None = None, floats: tuple[str, ...] = (), per_batch: tuple[str, ...] = (),
                dtype: str = "bf16") -> dict:
    """One compile spec; every argument of `fn` must be named exactly once (a pointer, int, float or constexpr)."""
    ints = dict(ints or {})
    arg_names = list(fn.arg_names)
    named = [*pointers, *ints, *floats, *constexprs]
    missing = [a for a in arg_names if a not in named]
    extra = [a for a in named if a not in arg_names]
    dup = sorted({a for a in named if named.count(a) > 1})
    if missing or extra or dup:
        raise ValueError(f"{name}: spec does not match the kernel's arguments (missing {missing}, unknown {extra}, "
                         f"named twice {dup})")
    bad = [p for p in per_batch if p not in ints]
    if bad:
        raise ValueError(f"{name}: per-batch arguments {bad} must be integer arguments")
    signature = {}
    for a in arg_names:
        if a in pointers:
            signature[a] = pointers[a]
        elif a in ints:
            signature[a] = "i64" if abs(ints[a]) >= 2**31 else "i32"
        elif a in floats:
            signature[a] = "fp32"
        else:
            signature[a] = "constexpr"
    unknown = [t for t in signature.values() if t not in _TYPES]
    if unknown:
        raise ValueError(f"{name}: unknown argument types {unknown}")
    return {"name": name, "fn": fn, "signature": signature, "constexprs": dict(constexprs), "num_warps": num_warps,
            "num_stages": num_stages, "ints": ints, "per_batch": list(per_batch), "dtype": dtype}


def triton_type(dtype) -> str:
    """Pointer type string of a torch dtype."""
    import torch

    return {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
