"""Backend selection shared by the kernels: "auto" runs the Triton kernel wherever it can run."""

import pytest
import torch
from ixc_engine.kernels._backend import kernel_unavailable_reason, resolve_backend

CPU = torch.device("cpu")


def _interpreted_kernel():
    pytest.importorskip("triton")
    import ixc_engine.kernels.pool_score as ps
    from ixc_engine.kernels._backend import built_for_interpreter

    fn = getattr(ps, "_pool_score_fwd_kernel", None)
    if not built_for_interpreter(fn):
        pytest.skip("the kernels were compiled for a GPU, not the interpreter")
    return fn


def _plain_function():
    return None


def test_auto_picks_the_interpreted_kernel_on_cpu():
    fn = _interpreted_kernel()
    assert kernel_unavailable_reason(fn, CPU) is None
    assert resolve_backend("k", "auto", fn, CPU) == "triton"
    assert resolve_backend("k", "triton", fn, CPU) == "triton"
    assert resolve_backend("k", "torch", fn, CPU) == "torch"


def test_auto_falls_back_to_the_reference():
    fn = _interpreted_kernel()
    # inputs the kernel does not take
    assert resolve_backend("k", "auto", fn, CPU, unsupported="head dim 80") == "torch"
    with pytest.raises(ValueError, match="k: backend='triton' cannot take these inputs: head dim 80"):
        resolve_backend("k", "triton", fn, CPU, unsupported="head dim 80")
    # no triton, or a kernel compiled for a GPU, with CPU tensors
    assert resolve_backend("k", "auto", None, CPU) == "torch"
    with pytest.raises(RuntimeError, match="needs the triton package"):
        resolve_backend("k", "triton", None, CPU)
    assert resolve_backend("k", "auto", _plain_function, CPU) == "torch"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("k", "triton", _plain_function, CPU)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("k", "cuda", None, CPU)
