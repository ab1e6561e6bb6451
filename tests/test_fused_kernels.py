"""The fused glue kernels of the GPU path (add_rms_norm, silu_mul, rope_qk, quick_gelu): the Triton kernels under the
interpreter (fp32, odd shapes, strided windows) against their torch references, their meta hooks (the roofline
model: bytes at least the inputs and outputs, FLOPs as FlopCounterMode counts the reference), and their compile specs.
Inference-only kernels: no backward (training runs the torch backend)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from ixc_engine.kernels import add_rms_norm as arn
from ixc_engine.kernels import quick_gelu as qg
from ixc_engine.kernels import rope as rp
from ixc_engine.kernels import silu_mul as sm
from ixc_engine.kernels._meta import nbytes
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ixc_engine.models.internlm2 import RMSNorm, apply_rope, rope_cos_sin

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")
META = torch.device("meta")


class _Rec(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.kernels = []

    def record_kernel(self, name, flops, nbytes):
        self.kernels.append((name, flops, nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _window(t: int, width: int, lo: int, n: int, seed: int):
    """A [t, n] column window [lo, lo+n) of a wider [t, width] buffer (row stride width)."""
    return torch.randn(t, width, generator=_g(seed))[:, lo:lo + n]


@pytest.mark.parametrize(("t", "h"), [(1, 8), (7, 48), (33, 100)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_the_module(t, h, with_delta):
    x = _window(t, h + 5, 3, h, 1)
    delta = _window(t, h + 9, 9, h, 2) if with_delta else None
    norm = RMSNorm(h, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(h, generator=_g(3)))
    want_r = x + delta if with_delta else x
    want_n = norm(want_r).detach()
    buf = torch.full((t, h + 11), 7.0)
    r, n = arn.add_rms_norm(x, delta, norm.weight.detach(), 1e-5, out=buf[:, 11:], backend="triton")
    torch.testing.assert_close(r, want_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(n, want_n, rtol=1e-5, atol=1e-5)
    assert torch.equal(buf[:, :11], torch.full((t, 11), 7.0))  # the rest of the buffer is untouched
    _, nn_ = arn.add_rms_norm_ref(x, delta, norm.weight.detach(), 1e-5)
    torch.testing.assert_close(nn_, want_n, rtol=0, atol=0)


@pytest.mark.parametrize(("t", "n"), [(1, 5), (9, 70), (40, 1030)])
def test_silu_mul(t, n):
    a, b = _window(t, n + 4, 4, n, 1), _window(t, 2 * n, 0, n, 2)
    buf = torch.zeros(t, n + 3)
    got = sm.silu_mul(a, b, out=buf[:, 3:], backend="triton")
    torch.testing.assert_close(got, torch.nn.functional.silu(a) * b, rtol=1e-5, atol=1e-6)
    assert torch.equal(buf[:, :3], torch.zeros(t, 3))


@pytest.mark.parametrize("shape", [(3,), (5, 17), (2, 9, 33)])
def test_quick_gelu(shape):
    h = torch.randn(*shape, generator=_g(4)) * 3
    want = h * torch.sigmoid(1.702 * h)
    torch.testing.assert_close(qg.quick_gelu(h, backend="triton"), want, rtol=1e-5, atol=1e-6)
    qg.quick_gelu(h, out=h, backend="triton")  # in place
    torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("t", "hkv", "g", "d"), [(1, 1, 1, 4), (13, 2, 4, 16), (37, 3, 2, 32)])
def test_rope_qk_matches_apply_rope(t, hkv, g, d):
    qkv = torch.randn(t, hkv * (g + 2) * d + 6, generator=_g(5))[:, 6:].reshape(t, hkv, g + 2, d)
    pos = torch.arange(t) + 3
    cos, sin = rope_cos_sin(pos, torch.full((t,), 1e6, dtype=torch.float64), d, torch.float32)
    q, k = rp.rope_qk(qkv, cos, sin, backend="triton")
    want_q = apply_rope(qkv[:, :, :g].reshape(t, hkv * g, d), cos, sin)
    want_k = apply_rope(qkv[:, :, g], cos, sin)
    torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, want_k, rtol=1e-5, atol=1e-5)
    rq, rk = rp.rope_qk_ref(qkv, cos, sin)
    assert torch.equal(rq, want_q) and torch.equal(rk, want_k)


def _meta_case(name):
    """(call on meta tensors, call of the torch reference on real ones, the tensors read and written)."""
    t = 6
    if name == "add_rms_norm":
        x, d, w = torch.randn(t, 32), torch.randn(t, 32), torch.randn(32)
        out = torch.empty(t, 32)
        return (lambda: arn.add_rms_norm(x.to(META), d.to(META), w.to(META), 1e-5, out=out.to(META)),
                lambda: arn.add_rms_norm_ref(x, d, w, 1e-5), [x, d, w, out, x])
    if name == "silu_mul":
        a, b = torch.randn(t, 40), torch.randn(t, 40)
        return (lambda: sm.silu_mul(a.to(META), b.to(META)), lambda: sm.silu_mul_ref(a, b), [a, b, a])
    if name == "quick_gelu":
        h = torch.randn(t, 40)
        return lambda: qg.quick_gelu(h.to(META)), lambda: qg.quick_gelu_ref(h), [h, h]
    qkv, c = torch.randn(t, 2, 6, 16), torch.randn(t, 16)
    q, k = torch.empty(t, 8, 16), torch.empty(t, 2, 16)
    return (lambda: rp.rope_qk(qkv.to(META), c.to(META), c.to(META)), lambda: rp.rope_qk_ref(qkv, c, c),
            [q, k, c, c, q, k])  # reads the q and k slots (not v) and both tables, writes q and k


@pytest.mark.parametrize("name", ["add_rms_norm", "silu_mul", "quick_gelu", "rope_qk"])
def test_meta_hooks(name):
    run_meta, run_ref, io = _meta_case(name)
    with FlopCounterMode(display=False) as fc:
        run_ref()
    rec = _Rec()
    with rec:
        out = run_meta()
    (kname, flops, moved) = rec.kernels[-1]
    assert kname == name and flops == fc.get_total_flops() == 0
    assert moved >= nbytes(*io)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(o.is_meta for o in outs)


@pytest.mark.parametrize("mod", [arn, sm, qg, rp])
def test_compile_specs_name_jit_functions(mod):
    specs = mod.compile_specs()
    assert specs
    for s in specs:
        # the kernels/_specs.py format bench/compile_table.py binds and compiles
        assert set(s) == {"name", "fn", "signature", "constexprs", "num_warps", "num_stages", "ints", "per_batch",
                          "dtype"}
        assert set(s["constexprs"]) == {k for k, v in s["signature"].items() if v == "constexpr"}
        assert list(s["signature"]) == list(s["fn"].arg_names)
        assert set(s["ints"]) == {k for k, v in s["signature"].items() if v in ("i32", "i64")}
        # the row / element count changes every batch: it must be neither a spec'd constant nor JIT-specialised
        assert s["per_batch"], s["name"]
        fn = s["fn"]  # a JITFunction, or an InterpretedFunction (keeps the decorator's kwargs) under TRITON_INTERPRET
        dns = ({prm.name for prm in fn.params if prm.do_not_specialize} if hasattr(fn, "params")
               else set(fn.kwargs.get("do_not_specialize") or ()))
        assert set(s["per_batch"]) <= dns, (s["name"], s["per_batch"], dns)
    assert {s["dtype"] for s in specs} == {"bf16", "fp32"}
