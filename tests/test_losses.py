import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere: kernels then run on CPU

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from ixc_engine.kernels import pool_score as ps_mod
from ixc_engine.kernels._backend import kernel_device
from ixc_engine.kernels.pool_score import pool_score
from ixc_engine.training.critic import (
    critic_step,
    padded_to_values,
    state_mask_from_action_mask,
    values_to_padded,
)
from ixc_engine.training.gae import gae
from ixc_engine.training.losses import (
    bradley_terry_loss,
    bt_loss_from_hidden,
    clipped_value_loss,
    pairwise_scores_from_hidden,
    value_loss_terms,
)

# Interpreted kernels take CPU tensors; kernels compiled for a GPU take CUDA tensors.
KDEV = kernel_device(getattr(ps_mod, "_pool_score_fwd_kernel", None))
needs_triton = pytest.mark.skipif(KDEV is None, reason="triton missing, or its kernels compiled for an absent GPU")


def packed_case(lengths, H, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    hidden = (torch.randn(T, H, generator=g) * 2.0).to(device).requires_grad_()
    norm_weight = (1.0 + 0.3 * torch.randn(H, generator=g)).to(device).requires_grad_()
    head_weight = (torch.randn(1, H, generator=g) / math.sqrt(H)).to(device).requires_grad_()
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=device)
    return hidden, norm_weight, head_weight, cu


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def manual_scores(hidden, norm_weight, head_weight, cu, mode, eps=1e-5):
    """Independent fp64 scores: rmsnorm, head, then per-sequence pooling with a Python loop."""
    x = hidden.double()
    s = (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * norm_weight.double()) @ head_weight.double()[0]
    if mode == "token":
        return s
    bounds = cu.tolist()
    out = [s[a:b].mean() if mode == "mean" else s[b - 1] for a, b in itertools.pairwise(bounds)]
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------------
# Bradley-Terry
# ---------------------------------------------------------------------------------------------------------------


def test_bt_loss_matches_hand_computation():
    rc = [1.5, -0.25, 3.0]
    rr = [0.5, 0.75, 3.0]
    expected = sum(math.log1p(math.exp(-(c - r))) for c, r in zip(rc, rr)) / 3
    got = bradley_terry_loss(torch.tensor(rc), torch.tensor(rr))
    assert got.item() == pytest.approx(expected, rel=1e-6)

    margin = 0.4
    center = 0.1
    expected_m = sum(math.log1p(math.exp(-(c - r - margin))) for c, r in zip(rc, rr)) / 3
    expected_m += center * sum((c + r) ** 2 for c, r in zip(rc, rr)) / 3
    got_m = bradley_terry_loss(torch.tensor(rc), torch.tensor(rr), margin=margin, center_coef=center)
    assert got_m.item() == pytest.approx(expected_m, rel=1e-6)

    per_pair = [0.0, 1.0, -2.0]
    expected_t = sum(math.log1p(math.exp(-(c - r - m))) for c, r, m in zip(rc, rr, per_pair)) / 3
    got_t = bradley_terry_loss(torch.tensor(rc), torch.tensor(rr), margin=torch.tensor(per_pair))
    assert got_t.item() == pytest.approx(expected_t, rel=1e-6)


def test_bt_loss_is_stable_for_large_gaps_and_upcasts():
    rc = torch.tensor([200.0, -200.0], dtype=torch.bfloat16)
    rr = torch.tensor([-200.0, 200.0], dtype=torch.bfloat16)
    loss = bradley_terry_loss(rc, rr)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(400.0 / 2, rel=1e-3)  # -logsigmoid(-400) ~ 400, -logsigmoid(400) ~ 0


def test_bt_loss_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="1-D"):
        bradley_terry_loss(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="at least one pair"):
        bradley_terry_loss(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="center_coef"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), center_coef=-1.0)
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), margin=torch.zeros(3))


BT_CASES = [
    # (H, lengths of the 2P sequences: chosen half first, mode, margin, center_coef)
    (100, [5, 1, 13, 7, 3, 9], "last", 0.0, 0.0),
    (257, [3, 11, 1, 5, 9, 2, 7, 15, 1, 4, 6, 3, 8, 5], "mean", 0.3, 0.05),
    (257, [9, 4, 1, 17, 6, 3, 1, 2], "last", 0.0, 0.1),
    (100, [2, 7, 3, 1, 5, 11, 4, 9, 1, 3], "mean", 0.0, 0.0),
]


@needs_triton
@pytest.mark.parametrize("H,lengths,mode,margin,center", BT_CASES)
def test_bt_loss_gradients_through_fused_kernel(H, lengths, mode, margin, center):
    hidden, wn, wh, cu = packed_case(lengths, H, seed=H + len(lengths), device=KDEV)
    inputs = (hidden, wn, wh)
    out_k = bt_loss_from_hidden(hidden, wn, wh, cu, mode=mode, backend="triton", margin=margin, center_coef=center)
    out_r = bt_loss_from_hidden(hidden, wn, wh, cu, mode=mode, backend="torch", margin=margin, center_coef=center)
    torch.testing.assert_close(out_k.loss, out_r.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_k.chosen, out_r.chosen, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_k.rejected, out_r.rejected, rtol=1e-5, atol=1e-6)
    g_k = grads(out_k.loss, inputs)
    for gk, gr in zip(g_k, grads(out_r.loss, inputs)):
        torch.testing.assert_close(gk, gr, rtol=1e-4, atol=1e-6)

    # Independent fp64 check of the whole chain: layout (chosen half first), pooling, loss and gradients.
    P = len(lengths) // 2
    s = manual_scores(hidden, wn, wh, cu, mode)
    loss64 = -torch.nn.functional.logsigmoid(s[:P] - s[P:] - margin).mean() + center * (s[:P] + s[P:]).square().mean()
    torch.testing.assert_close(out_k.loss.double(), loss64, rtol=1e-5, atol=1e-6)
    for gk, g64 in zip(g_k, grads(loss64, inputs)):
        torch.testing.assert_close(gk.double(), g64.double(), rtol=1e-4, atol=1e-6)


def test_pairwise_layout_and_accuracy():
    hidden, wn, wh, cu = packed_case([3, 4, 5, 2, 6, 1], 16, seed=1)
    rc, rr = pairwise_scores_from_hidden(hidden, wn, wh, cu, mode="last", backend="torch")
    scores = pool_score(hidden, wn, wh, cu, mode="last", backend="torch")
    torch.testing.assert_close(rc, scores[:3])
    torch.testing.assert_close(rr, scores[3:])
    out = bt_loss_from_hidden(hidden, wn, wh, cu, backend="torch")
    assert out.accuracy() == pytest.approx((scores[:3] > scores[3:]).float().mean().item())
    with pytest.raises(ValueError, match="even"):
        pairwise_scores_from_hidden(hidden, wn, wh, cu[:-1].clone().index_fill_(0, torch.tensor([4]), 20), mode="last")
    with pytest.raises(ValueError, match="mode"):
        pairwise_scores_from_hidden(hidden, wn, wh, cu, mode="token")


# ---------------------------------------------------------------------------------------------------------------
# Clipped value loss
# ---------------------------------------------------------------------------------------------------------------


def numpy_value_loss(v, old, ret, mask, clip):
    v, old, ret, mask = (np.asarray(a, dtype=np.float64) for a in (v, old, ret, mask))
    terms, clipped_count = [], 0
    for vi, oi, ri, mi in zip(v.ravel(), old.ravel(), ret.ravel(), mask.ravel()):
        if not mi:
            continue
        a = (vi - ri) ** 2
        vc = oi + min(max(vi - oi, -clip), clip)
        b = (vc - ri) ** 2
        terms.append(max(a, b))
        clipped_count += b > a
    return 0.5 * sum(terms) / len(terms), clipped_count / len(terms)


def test_value_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(11)
    v = torch.randn(4, 9, generator=g)
    old = v + 0.4 * torch.randn(4, 9, generator=g)
    ret = v + torch.randn(4, 9, generator=g)
    mask = torch.rand(4, 9, generator=g) < 0.7
    loss, clipfrac = value_loss_terms(v, old, ret, mask, 0.2)
    exp_loss, exp_frac = numpy_value_loss(v, old, ret, mask, 0.2)
    assert loss.item() == pytest.approx(exp_loss, rel=1e-5)
    assert clipfrac.item() == pytest.approx(exp_frac, rel=1e-6)
    assert 0.0 < exp_frac < 1.0  # both branches exercised
    assert clipped_value_loss(v, old, ret, mask.float(), 0.2).item() == pytest.approx(exp_loss, rel=1e-5)
    plain = clipped_value_loss(v, old, ret, mask, clip=None)
    assert plain.item() == pytest.approx(0.5 * ((v - ret)[mask] ** 2).mean().item(), rel=1e-5)


def test_value_loss_padding_garbage_and_empty_mask():
    v = torch.tensor([1.0, float("nan")], requires_grad=True)
    old = torch.tensor([0.5, float("inf")])
    ret = torch.tensor([2.0, float("nan")])
    mask = torch.tensor([True, False])
    loss = clipped_value_loss(v, old, ret, mask, clip=0.2)
    # v - old = 0.5 -> clipped value 0.7: max((1-2)^2, (0.7-2)^2) = 1.69
    assert loss.item() == pytest.approx(0.5 * 1.69, rel=1e-6)
    loss.backward()
    assert torch.isfinite(v.grad).all() and v.grad[1] == 0
    empty = clipped_value_loss(v, old, ret, torch.zeros(2, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="shape"):
        clipped_value_loss(v, old, ret, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="clip"):
        clipped_value_loss(v, old, ret, mask, clip=-0.1)
    with pytest.raises(ValueError, match="0 and 1"):
        clipped_value_loss(v, old, ret, torch.tensor([1.0, 0.5]))


@needs_triton
@pytest.mark.parametrize("H,lengths,clip", [(100, [7, 1, 12, 5], 0.2), (257, [3, 9, 2, 11, 1, 6, 4], 0.05)])
def test_value_loss_gradients_through_fused_kernel(H, lengths, clip):
    hidden, wn, wh, cu = packed_case(lengths, H, seed=3 * H + len(lengths), device=KDEV)
    inputs = (hidden, wn, wh)
    T = hidden.shape[0]
    g = torch.Generator().manual_seed(H)
    with torch.no_grad():
        v0 = pool_score(hidden, wn, wh, cu, mode="token", backend="torch")
    old = v0 + 0.3 * torch.randn(T, generator=g).to(KDEV)
    ret = v0 + torch.randn(T, generator=g).to(KDEV)
    mask = (torch.rand(T, generator=g) < 0.75).to(KDEV)
    losses = {}
    for backend in ("triton", "torch"):
        values = pool_score(hidden, wn, wh, cu, mode="token", backend=backend)
        losses[backend], frac = value_loss_terms(values, old, ret, mask, clip)
        assert 0.0 < frac.item() < 1.0
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-5, atol=1e-6)
    g_k = grads(losses["triton"], inputs)
    for gk, gr in zip(g_k, grads(losses["torch"], inputs)):
        torch.testing.assert_close(gk, gr, rtol=1e-4, atol=1e-6)
    # independent fp64 chain
    s = manual_scores(hidden, wn, wh, cu, "token")
    o, r, m = old.double(), ret.double(), mask
    vc = o + (s - o).clamp(-clip, clip)
    loss64 = 0.5 * torch.maximum((s - r) ** 2, (vc - r) ** 2)[m].mean()
    torch.testing.assert_close(losses["triton"].double(), loss64, rtol=1e-5, atol=1e-6)
    for gk, g64 in zip(g_k, grads(loss64, inputs)):
        torch.testing.assert_close(gk.double(), g64.double(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Packed <-> padded and the critic step
# ---------------------------------------------------------------------------------------------------------------


def test_packed_padded_round_trip():
    cu = torch.tensor([0, 3, 3, 8, 9], dtype=torch.int32)  # includes an empty sequence
    vals = torch.arange(9, dtype=torch.float32).requires_grad_()
    padded = values_to_padded(vals, cu, pad_value=-1.0)
    expected = torch.tensor([[0, 1, 2, -1, -1], [-1] * 5, [3, 4, 5, 6, 7], [8, -1, -1, -1, -1]], dtype=torch.float32)
    torch.testing.assert_close(padded, expected)
    back = padded_to_values(padded, cu)
    torch.testing.assert_close(back, vals)
    (back * torch.arange(9.0)).sum().backward()
    torch.testing.assert_close(vals.grad, torch.arange(9.0))
    mask = values_to_padded(torch.ones(9, dtype=torch.bool), cu, max_len=7)
    assert mask.shape == (4, 7) and mask.sum() == 9 and mask.dtype == torch.bool
    two_d = values_to_padded(torch.randn(9, 2), cu)
    assert two_d.shape == (4, 5, 2)
    with pytest.raises(ValueError, match="max_len"):
        values_to_padded(vals, cu, max_len=4)
    with pytest.raises(ValueError, match="token count"):
        values_to_padded(torch.zeros(10), cu)
    with pytest.raises(ValueError, match="rows"):
        padded_to_values(padded[:3], cu)


def test_state_mask_shifts_within_sequences():
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    action = torch.tensor([0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    state = state_mask_from_action_mask(action, cu)
    assert state.tolist() == [True, True, True, False, True, True, False]


class TinyCritic(torch.nn.Module):
    """A linear 'backbone' over fixed token features, with the reward-model-shaped norm and score head."""

    def __init__(self, D, H, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.backbone = torch.nn.Linear(D, H)
        with torch.no_grad():
            self.backbone.weight.copy_(torch.randn(H, D, generator=g) / math.sqrt(D))
            self.backbone.bias.copy_(0.1 * torch.randn(H, generator=g))
        self.norm_weight = torch.nn.Parameter(torch.ones(H))
        self.head_weight = torch.nn.Parameter(torch.randn(1, H, generator=g) / math.sqrt(H))
        self.features = torch.randn(0, D)

    def forward(self):
        return self.backbone(self.features)


def critic_case(seed=0, H=100, lengths=(5, 9, 3, 8), device="cpu"):
    g = torch.Generator().manual_seed(seed)
    critic = TinyCritic(12, H, seed)
    T = sum(lengths)
    critic.features = torch.randn(T, 12, generator=g)
    critic.to(device)
    critic.features = critic.features.to(device)
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=device)
    mask = (torch.rand(T, generator=g) < 0.8).to(device)
    with torch.no_grad():
        old = pool_score(critic(), critic.norm_weight, critic.head_weight, cu, mode="token", backend="torch")
    return critic, cu, mask, old, g


@needs_triton
def test_critic_step_reduces_value_loss():
    critic, cu, mask, old, g = critic_case(device=KDEV)
    returns = old + torch.randn(old.shape, generator=g).to(KDEV)
    opt = torch.optim.Adam(critic.parameters(), lr=5e-3)
    history = []
    for _ in range(10):
        # PPO-style: each update starts from fresh rollout values; clip 0.2 limits how far one update moves them
        with torch.no_grad():
            old = pool_score(critic(), critic.norm_weight, critic.head_weight, cu, mode="token", backend="torch")
        stats = critic_step(critic, critic.norm_weight, critic.head_weight, cu, mask, old, returns, opt,
                            backend="triton", max_grad_norm=10.0)
        assert set(stats) == {"value_loss", "values_mean", "clipfrac", "grad_norm"}
        assert all(isinstance(x, float) and math.isfinite(x) for x in stats.values())
        history.append(stats["value_loss"])
    assert history[0] > 0
    assert history[-1] < 0.3 * history[0], history
    assert all(p.grad is None for p in critic.parameters())  # zero_grad after the step


def test_critic_step_grad_clipping_and_stats():
    critic, cu, mask, old, g = critic_case(seed=5)
    returns = old + torch.randn(old.shape, generator=g)
    # expected loss, grad norm and values mean from a plain autograd pass
    ref = copy.deepcopy(critic)
    values = pool_score(ref(), ref.norm_weight, ref.head_weight, cu, mode="token", backend="torch")
    loss = clipped_value_loss(values, old, returns, mask)
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()])).item()

    before = [p.detach().clone() for p in critic.parameters()]
    opt = torch.optim.SGD(critic.parameters(), lr=1.0)
    stats = critic_step(critic, critic.norm_weight, critic.head_weight, cu, mask, old, returns, opt,
                        backend="torch", max_grad_norm=0.01)
    assert stats["value_loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert stats["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert stats["values_mean"] == pytest.approx(values[mask].mean().item(), rel=1e-5, abs=1e-7)
    assert stats["clipfrac"] == 0.0  # values == old_values: nothing can clip on the first step
    step = torch.linalg.vector_norm(torch.stack([(p.detach() - b).norm() for p, b in zip(critic.parameters(), before)]))
    assert step.item() == pytest.approx(0.01, rel=1e-3)  # SGD lr 1 moves by exactly the clipped gradient


def test_critic_step_accepts_padded_targets_from_gae():
    critic, cu, mask, old, g = critic_case(seed=9, H=40)
    rewards = torch.zeros(old.shape)
    ends = cu[1:].long() - 1
    rewards[ends] = torch.randn(len(ends), generator=g)
    mask_p = values_to_padded(mask, cu)
    _, ret_p = gae(values_to_padded(rewards, cu), values_to_padded(old, cu), mask_p)
    ret_packed = padded_to_values(ret_p, cu)
    results = []
    for m, o, r in ((mask_p, values_to_padded(old, cu), ret_p), (mask, old, ret_packed)):
        c = copy.deepcopy(critic)
        opt = torch.optim.SGD(c.parameters(), lr=0.1)
        stats = critic_step(c, c.norm_weight, c.head_weight, cu, m, o, r, opt, backend="torch")
        results.append((stats, [p.detach().clone() for p in c.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_critic_step_rejects_non_finite_and_bad_shapes():
    critic, cu, mask, old, _ = critic_case(seed=2, H=24)
    opt = torch.optim.SGD(critic.parameters(), lr=0.1)
    before = [p.detach().clone() for p in critic.parameters()]
    bad = old.clone()
    bad[mask.nonzero()[0]] = float("nan")
    with pytest.raises(FloatingPointError, match="skipped"):
        critic_step(critic, critic.norm_weight, critic.head_weight, cu, mask, old, bad, opt, backend="torch")
    for p, b in zip(critic.parameters(), before):
        assert torch.equal(p.detach(), b) and p.grad is None
    with pytest.raises(ValueError, match="entries"):
        critic_step(critic, critic.norm_weight, critic.head_weight, cu, mask[:-1], old, old, opt, backend="torch")
