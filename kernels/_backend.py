"""Which implementation a kernel call runs: the Triton kernel or its pure-torch reference.

"auto" runs the Triton kernel wherever it can run: on CUDA tensors, and on CPU tensors when Triton was imported with
TRITON_INTERPRET=1 (Triton reads that variable once, when it decorates the kernel, so that is what is checked, not the
environment at call time). It falls back to the reference for CPU tensors without the interpreter and for inputs the
kernel does not take (the caller says which). "triton" insists on the kernel and says why it cannot run.
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "triton", "torch")


def built_for_interpreter(jit_fn) -> bool:
    """True when `jit_fn` (a @triton.jit function) was decorated with TRITON_INTERPRET=1 set."""
    if jit_fn is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(jit_fn, InterpretedFunction)


def kernel_device(jit_fn) -> str | None:
    """The device type whose tensors the Triton kernel `jit_fn` takes in this process: "cpu" under the interpreter,
    "cuda" when compiled for a present GPU, None when it cannot run (no triton, or compiled for an absent GPU)."""
    if jit_fn is None:
        return None
    if built_for_interpreter(jit_fn):
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


def kernel_unavailable_reason(jit_fn, device: torch.device) -> str | None:
    """Why the Triton kernel `jit_fn` cannot run on `device`, or None when it can."""
    if jit_fn is None:
        return "it needs the triton package (pip install 'ixc-engine[gpu]')"
    if device.type == "cuda":
        return None
    if built_for_interpreter(jit_fn):
        return None
    return (f"tensors on {device} need Triton's interpreter: set TRITON_INTERPRET=1 before ixc_engine's kernels are "
            "first imported, or use CUDA tensors or backend='torch'")


def resolve_backend(name: str, backend: str, jit_fn, device: torch.device, unsupported: str | None = None) -> str:
    """"triton" or "torch" for a call of kernel `name` on `device`.

    unsupported: why the kernel cannot take these inputs (e.g. a head dim it has no tile for), or None. With "auto"
    that selects the reference; with "triton" it is an error.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{name}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    reason = kernel_unavailable_reason(jit_fn, device)
    if backend == "auto":
        return "torch" if (reason or unsupported) else "triton"
    if reason:
        raise RuntimeError(f"{name}: backend='triton' cannot run: {reason}")
    if unsupported:
        raise ValueError(f"{name}: backend='triton' cannot take these inputs: {unsupported}")
    return "triton"
