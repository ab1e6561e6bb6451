import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere: kernels then run on CPU

import importlib

import numpy as np
import pytest
import torch
from ixc_engine.kernels._backend import kernel_device

gae_mod = importlib.import_module("ixc_engine.training.gae")  # the package re-exports the function `gae`
from ixc_engine.training.gae import gae, gae_ref

# Interpreted kernels take CPU tensors; kernels compiled for a GPU take CUDA tensors.
KDEV = kernel_device(getattr(gae_mod, "_gae_kernel", None))
needs_triton = pytest.mark.skipif(KDEV is None, reason="triton missing, or its kernels compiled for an absent GPU")


def numpy_gae(rewards, values, mask, gamma, lam):
    """Independent float64 reference: the closed form A_t = sum_k (gamma*lam)^k delta_{t_k} over the valid positions
    t = t_0 < t_1 < ... of the row, with delta_{t_j} = r_{t_j} + gamma * V_{t_{j+1}} - V_{t_j} (V past the end = 0)."""
    r = np.asarray(rewards, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    m = np.asarray(mask) != 0
    adv = np.zeros_like(r)
    ret = np.zeros_like(r)
    for b in range(r.shape[0]):
        idx = np.flatnonzero(m[b])
        n = len(idx)
        nxt_v = np.append(v[b, idx[1:]], 0.0)
        delta = r[b, idx] + gamma * nxt_v - v[b, idx]
        for j in range(n):
            weights = (gamma * lam) ** np.arange(n - j)
            adv[b, idx[j]] = float(np.sum(weights * delta[j:]))
            ret[b, idx[j]] = adv[b, idx[j]] + v[b, idx[j]]
    return adv, ret


def make_case(B, T, kind, seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    if kind == "ragged":
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        lengths[0] = T  # one full row
        if B > 1:
            lengths[1] = 0  # one empty row
        mask = torch.arange(T)[None, :] < lengths[:, None]
    elif kind == "holes":
        mask = torch.rand(B, T, generator=g) < 0.6
        mask[0] = False  # an all-invalid row
    else:
        mask = torch.ones(B, T, dtype=torch.bool)
    return rewards, values, mask


CASES = [
    # (B, T, mask kind, gamma, lam)
    (5, 37, "ragged", 0.99, 0.95),
    (3, 61, "holes", 0.99, 0.95),
    (1, 1, "full", 0.99, 0.95),
    (7, 23, "full", 1.0, 1.0),
    (4, 29, "holes", 0.9, 0.0),
    (300, 9, "ragged", 0.97, 0.9),  # more rows than one interpreter program takes
]


@pytest.mark.parametrize("B,T,kind,gamma,lam", CASES)
def test_reference_matches_numpy(B, T, kind, gamma, lam):
    rewards, values, mask = make_case(B, T, kind, seed=B * 1000 + T)
    adv, ret = gae_ref(rewards, values, mask, gamma, lam)
    adv_np, ret_np = numpy_gae(rewards.numpy(), values.numpy(), mask.numpy(), gamma, lam)
    np.testing.assert_allclose(adv.numpy(), adv_np, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(ret.numpy(), ret_np, rtol=1e-5, atol=2e-5)
    assert adv.dtype == ret.dtype == torch.float32


@needs_triton
@pytest.mark.parametrize("B,T,kind,gamma,lam", CASES)
def test_kernel_matches_reference_and_numpy(B, T, kind, gamma, lam):
    rewards, values, mask = make_case(B, T, kind, seed=B * 1000 + T)
    adv_k, ret_k = (x.cpu() for x in gae(rewards.to(KDEV), values.to(KDEV), mask.to(KDEV), gamma, lam,
                                         backend="triton"))
    adv_r, ret_r = gae(rewards, values, mask, gamma, lam, backend="torch")
    torch.testing.assert_close(adv_k, adv_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ret_k, ret_r, rtol=1e-6, atol=1e-6)
    adv_np, ret_np = numpy_gae(rewards.numpy(), values.numpy(), mask.numpy(), gamma, lam)
    np.testing.assert_allclose(adv_k.numpy(), adv_np, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(ret_k.numpy(), ret_np, rtol=1e-5, atol=2e-5)
    assert not mask.all() or kind == "full"
    assert (adv_k[~mask] == 0).all() and (ret_k[~mask] == 0).all()


@needs_triton
def test_kernel_long_rows_float_mask_and_strided_inputs():
    B, T = 3, 257
    g = torch.Generator().manual_seed(7)
    # strided (transposed) rewards/values and a float 0/1 mask
    rewards = torch.randn(T, B, generator=g).t()
    values = torch.randn(T, B, generator=g).t()
    lengths = torch.tensor([257, 130, 1])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    adv_k, ret_k = (x.cpu() for x in gae(rewards.to(KDEV), values.to(KDEV), mask.to(KDEV), backend="triton"))
    adv_np, ret_np = numpy_gae(rewards.numpy(), values.numpy(), mask.numpy(), 0.99, 0.95)
    np.testing.assert_allclose(adv_k.numpy(), adv_np, rtol=1e-5, atol=5e-5)
    np.testing.assert_allclose(ret_k.numpy(), ret_np, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_contiguous_prefix_formula_and_ignored_padding(backend):
    # Hand-checkable: one row of 3 valid steps, gamma=0.5, lam=0.5.
    dev = KDEV if backend == "triton" else "cpu"
    r = torch.tensor([[1.0, 0.0, 2.0, 9.0, 9.0]], device=dev)
    v = torch.tensor([[0.5, 1.0, -1.0, 7.0, 7.0]], device=dev)
    m = torch.tensor([[True, True, True, False, False]], device=dev)
    adv, ret = gae(r, v, m, gamma=0.5, lam=0.5, backend=backend)
    d2 = 2.0 + 0.0 - (-1.0)  # no bootstrap after the last valid position
    d1 = 0.0 + 0.5 * (-1.0) - 1.0
    d0 = 1.0 + 0.5 * 1.0 - 0.5
    a2 = d2
    a1 = d1 + 0.25 * a2
    a0 = d0 + 0.25 * a1
    torch.testing.assert_close(adv.cpu(), torch.tensor([[a0, a1, a2, 0.0, 0.0]]))
    torch.testing.assert_close(ret.cpu(), torch.tensor([[a0 + 0.5, a1 + 1.0, a2 - 1.0, 0.0, 0.0]]))
    # rewards and values at invalid positions do not matter
    r2, v2 = r.clone(), v.clone()
    r2[0, 3:] = -123.0
    v2[0, 3:] = float("nan")
    adv2, ret2 = gae(r2, v2, m, gamma=0.5, lam=0.5, backend=backend)
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2, ret)


def test_holes_skip_invalid_positions():
    # A mask with a hole equals the same row with the hole removed.
    g = torch.Generator().manual_seed(3)
    r = torch.randn(1, 6, generator=g)
    v = torch.randn(1, 6, generator=g)
    m = torch.tensor([[True, False, True, True, False, True]])
    adv, ret = gae(r, v, m, 0.9, 0.8)
    keep = m[0]
    adv_c, ret_c = gae(r[:, keep], v[:, keep], torch.ones(1, int(keep.sum()), dtype=torch.bool), 0.9, 0.8)
    torch.testing.assert_close(adv[:, keep], adv_c)
    torch.testing.assert_close(ret[:, keep], ret_c)


def test_no_grad_and_empty_shapes():
    r = torch.randn(2, 4, requires_grad=True)
    v = torch.randn(2, 4, requires_grad=True)
    adv, ret = gae(r, v, torch.ones(2, 4, dtype=torch.bool))
    assert not adv.requires_grad and not ret.requires_grad
    a0, r0 = gae(torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool))
    assert a0.shape == (0, 5) and r0.shape == (0, 5)


def test_bad_inputs():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="same"):
        gae(x, torch.zeros(2, 4), m)
    with pytest.raises(ValueError, match="2-D"):
        gae(torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="gamma"):
        gae(x, x, m, gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        gae(x, x, m, lam=-0.1)
    with pytest.raises(ValueError, match="backend"):
        gae(x, x, m, backend="cuda")
    with pytest.raises(ValueError, match="0 and 1"):
        gae(x, x, torch.full((2, 3), 2.0))
    with pytest.raises(TypeError, match="floating"):
        gae(torch.zeros(2, 3, dtype=torch.long), x, m)
