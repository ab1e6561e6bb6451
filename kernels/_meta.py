"""Triton launches on `meta` tensors: the hook the modelled roofline (bench/roofline.py) reads.

A meta tensor has a shape and a dtype but no storage, so no kernel can run on it. A host wrapper given meta tensors
checks shapes as usual, calls `record_launch` with what the launch would cost (matmul-class FLOPs, counted the way
`torch.utils.flop_counter` counts its torch reference, and HBM bytes, never below the sum of its input and output
sizes) and returns empty results of the right shapes. The recorder is whatever active `TorchDispatchMode` has a
`record_kernel(name, flops, nbytes)` method (torch's own mode stack: no state of our own); with none active the
launch is simply skipped.
"""

from __future__ import annotations

import torch


def is_meta(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


def nbytes(*tensors) -> int:
    """Sum of the sizes of the given tensors (None entries ignored)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def record_launch(name: str, *, flops: int, nbytes: int) -> None:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    for mode in reversed(_get_current_dispatch_mode_stack()):
        rec = getattr(mode, "record_kernel", None)
        if rec is not None:
            rec(name, int(flops), int(nbytes))
            return
