"""pool_score: Triton kernel (interpreter on CPU, fp32) vs the torch reference vs an independent fp64 loop."""

import os

import torch

# The Triton interpreter is chosen when a kernel is decorated, so this must precede the kernel import. On a
# CUDA machine the kernels compile for the GPU and these tests run on CUDA tensors instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ixc_engine.kernels.pool_score as ps
import pytest
from ixc_engine.kernels._backend import built_for_interpreter

# CUDA tensors only when the kernels were compiled for the GPU (another test module may have set the interpreter).
INTERPRETED = built_for_interpreter(getattr(ps, "_pool_score_fwd_kernel", None))
ON_GPU = torch.cuda.is_available() and ps.triton is not None and not INTERPRETED
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
needs_triton = pytest.mark.skipif(ps.triton is None, reason="triton is not installed")
if ps.triton is not None and DEVICE.type == "cpu" and not INTERPRETED:
    pytest.skip("triton kernels were imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

# Lengths with singletons, one 1000+ sequence and 37 sequences in all (T = 2190).
LENGTHS = [1, 1037, 5, 64, 1, 3, 127, 2] + [11 + (7 * i) % 53 for i in range(29)]


def make_inputs(H, lengths, *, seed=0, head_2d=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    # Rows with varied scale and a non-zero mean, so that 1/rms really varies from row to row.
    hidden = (torch.randn(T, H, generator=g) + 0.3) * torch.exp(torch.randn(T, 1, generator=g))
    norm_weight = 1.0 + 0.2 * torch.randn(H, generator=g)
    head_weight = torch.randn(H, generator=g) / H**0.5 + 0.05
    if head_2d:
        head_weight = head_weight[None, :]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return hidden.to(dtype), norm_weight.to(dtype), head_weight.to(dtype), cu


def to_dev(*ts):
    return [t.to(DEVICE) if t is not None else None for t in ts]


def leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def run(fn, hidden, wn, wh, cu, g, dtype=None, **kw):
    """Output and gradients (hidden, norm_weight, head_weight[, prefix_sum]) of sum(out * g)."""
    leaves = [leaf(hidden, dtype), leaf(wn, dtype), leaf(wh, dtype)]
    if kw.get("prefix_sum") is not None:
        kw["prefix_sum"] = leaf(kw["prefix_sum"], dtype)
        leaves.append(kw["prefix_sum"])
    out = fn(*leaves[:3], cu, **kw)
    grads = torch.autograd.grad((out * g.to(out.dtype)).sum(), leaves)
    return [out.detach()] + [gr.detach() for gr in grads]


def assert_within_2x_torch(kernel, ref32, ref64, what):
    """The kernel may be at most 2x as wrong as the fp32 torch reference, both measured against fp64."""
    ref64 = ref64.cpu().double()
    err_k = (kernel.cpu().double() - ref64).abs().max().item()
    err_t = (ref32.cpu().double() - ref64).abs().max().item()
    # Floor: 8 fp32 ulps of the largest entry. Gradients of the weights are sums over ~2k tokens, and the
    # max error of one draw of such a sum varies by a few ulps with the summation order alone.
    floor = 8 * torch.finfo(torch.float32).eps * ref64.abs().max().item()
    assert err_k <= 2.0 * err_t + floor, f"{what}: kernel err {err_k:.3e} vs fp32 torch err {err_t:.3e}"


def compare_all(hidden, wn, wh, cu, mode, config=None, **kw):
    """Kernel vs fp32 reference vs fp64 reference: forward and every gradient."""
    hidden, wn, wh, cu = to_dev(hidden, wn, wh, cu)
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    n_out = cu.numel() - 1 if mode != "token" else hidden.shape[0]
    g = torch.randn(n_out, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    kern = run(lambda *a, **k: ps._pool_score_triton(*a, config=config, **k), hidden, wn, wh, cu, g, mode=mode, **kw)
    r32 = run(ps.pool_score_ref, hidden, wn, wh, cu, g, mode=mode, **kw)
    r64 = run(ps.pool_score_ref, hidden, wn, wh, cu, g, dtype=torch.float64, mode=mode, **kw)
    names = ["output", "d_hidden", "d_norm_weight", "d_head_weight", "d_prefix_sum"]
    assert kern[0].dtype == torch.float32 and kern[0].shape == r64[0].shape
    for name, k, a, b in zip(names, kern, r32, r64):
        assert k.shape == b.shape, name
        assert torch.isfinite(k).all(), name
        assert_within_2x_torch(k, a, b, name)
    return kern


def naive_fp64(hidden, wn, wh, cu, mode, eps=1e-5, prefix_sum=None, prefix_count=None):
    """Independent formulation: per sequence, divide by the RMS, then dot with the head."""
    out = []
    for b in range(cu.numel() - 1):
        xs = hidden[int(cu[b]) : int(cu[b + 1])].double()
        normed = xs / torch.sqrt((xs * xs).sum(-1, keepdim=True) / xs.shape[1] + eps) * wn.double()
        s = (normed * wh.double().reshape(1, -1)).sum(-1)
        if mode == "token":
            out.extend(s.tolist())
        elif mode == "last":
            out.append(s[-1].item())
        else:
            total, n = s.sum().item(), s.numel()
            if prefix_sum is not None:
                total, n = total + float(prefix_sum[b]), n + int(prefix_count[b])
            out.append(total / n)
    return torch.tensor(out, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ps.MODES)
@pytest.mark.parametrize("H", [100, 257])
def test_reference_matches_naive_loop(mode, H):
    hidden, wn, wh, cu = make_inputs(H, LENGTHS, seed=H, dtype=torch.float64)
    got = ps.pool_score_ref(hidden, wn, wh, cu, mode=mode)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, naive_fp64(hidden, wn, wh, cu, mode), rtol=1e-12, atol=1e-12)
    got32 = ps.pool_score_ref(hidden.float(), wn.float(), wh.float(), cu, mode=mode)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), naive_fp64(hidden, wn, wh, cu, mode), rtol=1e-5, atol=1e-5)


def test_reference_prefix_matches_naive_loop():
    lengths = [4, 0, 9, 1, 0]
    hidden, wn, wh, cu = make_inputs(100, lengths, dtype=torch.float64)
    psum = torch.tensor([0.0, 3.5, -2.0, 1.25, -0.5], dtype=torch.float64)
    pcnt = torch.tensor([0, 7, 3, 100, 1])
    got = ps.pool_score_ref(hidden, wn, wh, cu, mode="mean", prefix_sum=psum, prefix_count=pcnt)
    want = naive_fp64(hidden, wn, wh, cu, "mean", prefix_sum=psum, prefix_count=pcnt)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got[1].item() == pytest.approx(3.5 / 7) and got[4].item() == pytest.approx(-0.5)


@needs_triton
@pytest.mark.parametrize("mode", ps.MODES)
@pytest.mark.parametrize("H", [100, 257])
def test_kernel_matches_reference(mode, H):
    hidden, wn, wh, cu = make_inputs(H, LENGTHS, seed=H + 1, head_2d=(H == 100))
    kern = compare_all(hidden, wn, wh, cu, mode)
    assert kern[3].shape == wh.shape  # gradient keeps head_weight's [1, H] or [H] shape


@needs_triton
@pytest.mark.parametrize("mode", ps.MODES)
@pytest.mark.parametrize("cfg", [(8, 64, 8, 64, 3, 16), (16, 128, 16, 32, 2, 64)], ids=["h64-h64", "h128-h32"])
def test_kernel_blocked_hidden_loops(mode, cfg):
    # Block sizes below H, as on the GPU (H=4096): the column loops and the segment loop take several steps.
    fbt, fbh, bbt, bbh, progs, seg = cfg
    config = ps.KernelConfig(fbt, fbh, 4, bbt, bbh, 4, progs, seg)
    lengths = [1, 130, 7, 45, 2]
    hidden, wn, wh, cu = make_inputs(257, lengths, seed=43)
    kw = {}
    if mode == "mean":
        kw = {"prefix_sum": torch.tensor([1.0, 2.0, -3.0, 0.5, 4.0]), "prefix_count": torch.tensor([0, 3, 1, 0, 9])}
    compare_all(hidden, wn, wh, cu, mode, config=config, **kw)


@needs_triton
@pytest.mark.parametrize("count_dtype", [torch.int32, torch.int64])
def test_kernel_mean_with_prefix_and_empty_segments(count_dtype):
    lengths = [3, 0, 1037, 1, 0, 17, 0, 40]
    hidden, wn, wh, cu = make_inputs(257, lengths, seed=7, head_2d=False)
    g = torch.Generator().manual_seed(8)
    psum = torch.randn(len(lengths), generator=g) * 30
    pcnt = torch.tensor([0, 5, 120, 0, 1, 9, 2000, 3], dtype=count_dtype)
    kern = compare_all(hidden, wn, wh, cu, "mean", prefix_sum=psum, prefix_count=pcnt)
    # An empty segment's mean is exactly its prefix mean, and d mean / d prefix_sum = 1 / count.
    assert kern[0][1].item() == pytest.approx(psum[1].item() / 5, rel=1e-6)
    counts = torch.tensor(lengths) + pcnt.long()
    g_out = torch.randn(len(lengths), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(kern[4].cpu(), g_out / counts, rtol=1e-6, atol=0)


@needs_triton
def test_kernel_all_segments_empty_with_prefix():
    hidden, wn, wh, cu = make_inputs(100, [0, 0], seed=3)
    psum, pcnt = torch.tensor([2.0, -9.0]), torch.tensor([4, 3])
    out = ps.pool_score(*to_dev(hidden, wn, wh, cu), mode="mean", backend="triton",
                        prefix_sum=psum.to(DEVICE), prefix_count=pcnt.to(DEVICE))
    torch.testing.assert_close(out.cpu(), torch.tensor([0.5, -3.0]))


@needs_triton
@pytest.mark.parametrize("layout", ["column_slice", "row_stride", "transposed"])
@pytest.mark.parametrize("mode", ["mean", "last"])
def test_kernel_non_contiguous_hidden(layout, mode):
    lengths = [1, 300, 7, 45, 2]
    T, H = sum(lengths), 100
    base, wn, wh, cu = make_inputs(H, lengths, seed=11)
    g = torch.Generator().manual_seed(12)
    if layout == "column_slice":
        wide = torch.randn(T, H + 37, generator=g)
        wide[:, 5 : 5 + H] = base
        hidden = wide[:, 5 : 5 + H]
    elif layout == "row_stride":
        tall = torch.randn(2 * T, H, generator=g)
        tall[::2] = base
        hidden = tall[::2]
    else:
        hidden = base.t().contiguous().t()
    assert not hidden.is_contiguous() and torch.equal(hidden, base)
    compare_all(hidden, wn, wh, cu, mode)


@needs_triton
def test_kernel_gradients_of_view_reach_base():
    lengths, H = [6, 20, 1], 100
    base, wn, wh, cu = make_inputs(H, lengths, seed=13)
    wide = torch.zeros(sum(lengths), H + 8)
    wide[:, 3 : 3 + H] = base
    wide = wide.to(DEVICE).requires_grad_(True)
    out = ps.pool_score(wide[:, 3 : 3 + H], *to_dev(wn, wh, cu), mode="token", backend="triton")
    (d_wide,) = torch.autograd.grad(out.sum(), [wide])
    x = base.to(DEVICE).requires_grad_(True)
    (d_ref,) = torch.autograd.grad(ps.pool_score_ref(x, *to_dev(wn, wh, cu), mode="token").sum(), [x])
    assert torch.count_nonzero(d_wide[:, :3]) == 0 and torch.count_nonzero(d_wide[:, 3 + H :]) == 0
    torch.testing.assert_close(d_wide[:, 3 : 3 + H], d_ref, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("which", ["hidden_only", "weights_only", "head_only"])
def test_kernel_partial_requires_grad(which):
    hidden, wn, wh, cu = to_dev(*make_inputs(257, [5, 33, 1], seed=17))
    needs = {"hidden_only": (True, False, False), "weights_only": (False, True, True),
             "head_only": (False, False, True)}[which]
    args = [t.clone().requires_grad_(n) for t, n in zip((hidden, wn, wh), needs)]
    wanted = [a for a in args if a.requires_grad]
    got = torch.autograd.grad(ps.pool_score(*args, cu, mode="mean", backend="triton").sum(), wanted)
    args_ref = [t.clone().requires_grad_(n) for t, n in zip((hidden, wn, wh), needs)]
    want = torch.autograd.grad(ps.pool_score_ref(*args_ref, cu, mode="mean").sum(),
                               [a for a in args_ref if a.requires_grad])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_triton
def test_kernel_last_reads_only_last_rows():
    lengths = [4, 1, 30, 9]
    hidden, wn, wh, cu = make_inputs(100, lengths, seed=19)
    poisoned = hidden.clone()
    last = (cu[1:] - 1).long()
    keep = torch.zeros(hidden.shape[0], dtype=torch.bool)
    keep[last] = True
    poisoned[~keep] = float("nan")
    out = ps.pool_score(*to_dev(poisoned, wn, wh, cu), mode="last", backend="triton")
    torch.testing.assert_close(out.cpu(), ps.pool_score_ref(hidden, wn, wh, cu, mode="last"), rtol=1e-5, atol=1e-6)


@needs_triton
def test_kernel_zero_rows_give_zero_not_nan():
    hidden, wn, wh, cu = make_inputs(100, [3, 4], seed=23)
    hidden[1] = 0.0
    hidden[6] = 0.0
    x = hidden.to(DEVICE).requires_grad_(True)
    out = ps.pool_score(x, *to_dev(wn, wh, cu), mode="token", backend="triton")
    (dx,) = torch.autograd.grad(out.sum(), [x])
    assert out[1].item() == 0.0 and out[6].item() == 0.0
    assert torch.isfinite(dx).all()
    # At x = 0: s = 0 and ds/dx = rsqrt(eps) * w_norm * w_head.
    torch.testing.assert_close(dx[1].cpu(), 1e-5**-0.5 * wn * wh.reshape(-1), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_inputs_forward(dtype):
    # Loads of half types are exact upcasts, so the fp32 maths must match the reference on the same inputs.
    hidden, wn, wh, cu = to_dev(*make_inputs(257, [1, 50, 8], seed=29, dtype=dtype))
    for mode in ps.MODES:
        got = ps.pool_score(hidden, wn, wh, cu, mode=mode, backend="triton")
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ps.pool_score_ref(hidden, wn, wh, cu, mode=mode), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.skipif(DEVICE.type != "cuda", reason="the Triton interpreter truncates fp32->bf16 stores; GPU only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_gradients_gpu(dtype):
    hidden, wn, wh, cu = to_dev(*make_inputs(4096, [1, 500, 37, 2], seed=31, dtype=dtype))
    for mode in ps.MODES:
        g = torch.randn(hidden.shape[0] if mode == "token" else 4, device=DEVICE)
        got = run(lambda *a, **k: ps.pool_score(*a, backend="triton", **k), hidden, wn, wh, cu, g, mode=mode)
        want = run(ps.pool_score_ref, hidden, wn, wh, cu, g, mode=mode)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype
            # Both compute in fp32 and round once to the half type: allow one half-precision ulp.
            tol = torch.finfo(dtype).eps * b.float().abs().max().item()
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=tol)


def test_auto_backend_runs_the_kernel_where_it_can():
    # CPU tensors: the kernel under the interpreter (what CI checks), the reference otherwise; fp64 only the reference.
    hidden, wn, wh, cu = make_inputs(100, [3, 9], seed=37)
    expect = "triton" if INTERPRETED else "torch"
    for mode in ps.MODES:
        assert torch.equal(ps.pool_score(hidden, wn, wh, cu, mode=mode),
                           ps.pool_score(hidden, wn, wh, cu, mode=mode, backend=expect))
        h64, wn64, wh64 = hidden.double(), wn.double(), wh.double()
        assert torch.equal(ps.pool_score(h64, wn64, wh64, cu, mode=mode),
                           ps.pool_score_ref(h64, wn64, wh64, cu, mode=mode))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_no_sequences(backend):
    hidden, wn, wh, _ = make_inputs(100, [1], seed=41)
    cu = torch.zeros(1, dtype=torch.int32)
    for mode in ps.MODES:
        out = ps.pool_score(*to_dev(hidden[:0], wn, wh, cu), mode=mode, backend=backend)
        assert out.shape == (0,)


# ------------------------------------------------------------------------------------------------
# Bad inputs


def _bad_cases():
    H = 100
    hidden, wn, wh, cu = make_inputs(H, [3, 4])
    T = hidden.shape[0]
    i32 = torch.int32
    ok = {"hidden": hidden, "norm_weight": wn, "head_weight": wh, "cu_seqlens": cu, "mode": "mean"}
    return {
        "hidden_1d": ({"hidden": hidden[0]}, "hidden must be 2-D"),
        "hidden_3d": ({"hidden": hidden[None]}, "hidden must be 2-D"),
        "hidden_int": ({"hidden": hidden.long()}, "hidden dtype"),
        "hidden_no_columns": ({"hidden": hidden[:, :0]}, "H > 0"),
        "norm_weight_shape": ({"norm_weight": wn[:-1]}, "norm_weight must have shape"),
        "norm_weight_dtype": ({"norm_weight": wn.to(torch.int32)}, "norm_weight dtype"),
        "head_weight_2_rows": ({"head_weight": torch.cat([wh, wh])}, "head_weight must have shape"),
        "head_weight_columns": ({"head_weight": wh[:, :-1]}, "head_weight must have shape"),
        "cu_int64": ({"cu_seqlens": cu.long()}, "cu_seqlens must be int32"),
        "cu_2d": ({"cu_seqlens": cu[None]}, "cu_seqlens must be 1-D"),
        "cu_empty": ({"cu_seqlens": cu[:0]}, "cu_seqlens must be 1-D"),
        "cu_not_from_zero": ({"cu_seqlens": torch.tensor([1, 3, T], dtype=i32)}, r"cu_seqlens\[0\] must be 0"),
        "cu_short_of_T": ({"cu_seqlens": torch.tensor([0, 3, T - 1], dtype=i32)}, r"must equal the number of tokens"),
        "cu_decreasing": ({"cu_seqlens": torch.tensor([0, 5, 2, T], dtype=i32)}, "non-decreasing"),
        "empty_sequence_mean": ({"cu_seqlens": torch.tensor([0, 3, 3, T], dtype=i32)}, "sequence 1 is empty"),
        "empty_sequence_last": ({"cu_seqlens": torch.tensor([0, 0, T], dtype=i32), "mode": "last"},
                                "sequence 0 is empty"),
        "empty_sequence_token": ({"cu_seqlens": torch.tensor([0, T, T], dtype=i32), "mode": "token"},
                                 "sequence 1 is empty"),
        "empty_sequence_zero_prefix": ({"cu_seqlens": torch.tensor([0, 3, 3, T], dtype=i32),
                                        "prefix_sum": torch.zeros(3), "prefix_count": torch.tensor([2, 0, 1])},
                                       "sequence 1 is empty and prefix_count is 0"),
        "bad_mode": ({"mode": "max"}, "mode must be one of"),
        "eps_zero": ({"eps": 0.0}, "eps must be a positive number"),
        "prefix_with_last": ({"mode": "last", "prefix_sum": torch.zeros(2), "prefix_count": torch.zeros(2, dtype=i32)},
                             "only valid with mode='mean'"),
        "prefix_with_token": ({"mode": "token", "prefix_sum": torch.zeros(2),
                               "prefix_count": torch.zeros(2, dtype=i32)}, "only valid with mode='mean'"),
        "prefix_sum_alone": ({"prefix_sum": torch.zeros(2)}, "must be given together"),
        "prefix_count_alone": ({"prefix_count": torch.zeros(2, dtype=i32)}, "must be given together"),
        "prefix_sum_shape": ({"prefix_sum": torch.zeros(3), "prefix_count": torch.zeros(2, dtype=i32)},
                             r"prefix_sum must have shape \[2\]"),
        "prefix_count_float": ({"prefix_sum": torch.zeros(2), "prefix_count": torch.zeros(2)},
                               "prefix_count must be int32 or int64"),
        "prefix_count_negative": ({"prefix_sum": torch.zeros(2), "prefix_count": torch.tensor([0, -1])},
                                  "prefix_count must be >= 0"),
    }, ok


BAD_CASES, OK_ARGS = _bad_cases()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_inputs_raise(case, backend):
    change, message = BAD_CASES[case]
    kw = {**OK_ARGS, **change}
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    args = [kw.pop(k) for k in ("hidden", "norm_weight", "head_weight", "cu_seqlens")]
    with pytest.raises(ValueError, match=message):
        ps.pool_score(*args, backend=backend, **kw)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_non_tensor_argument_raises_type_error(backend):
    hidden, wn, wh, cu = make_inputs(100, [3, 4])
    with pytest.raises(TypeError, match="head_weight must be a torch.Tensor"):
        ps.pool_score(hidden, wn, wh.tolist(), cu, mode="last", backend=backend)
    with pytest.raises(TypeError, match="prefix_count must be a torch.Tensor"):
        ps.pool_score(hidden, wn, wh, cu, mode="mean", backend=backend, prefix_sum=torch.zeros(2), prefix_count=[1, 2])


def test_bad_backend_and_triton_rejects_fp64():
    hidden, wn, wh, cu = make_inputs(100, [3, 4], dtype=torch.float64)
    with pytest.raises(ValueError, match="backend must be one of"):
        ps.pool_score(hidden, wn, wh, cu, mode="last", backend="cuda")
    if ps.triton is not None:
        with pytest.raises(ValueError, match="cannot take these inputs: hidden dtype torch.float64"):
            ps.pool_score(*to_dev(hidden, wn, wh, cu), mode="last", backend="triton")


def test_mismatched_devices_raise():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device besides the CPU")
    hidden, wn, wh, cu = make_inputs(100, [3, 4])
    with pytest.raises(ValueError, match="cu_seqlens is on cpu"):
        ps.pool_score(hidden.cuda(), wn.cuda(), wh.cuda(), cu, mode="last")
