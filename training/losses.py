"""Training losses: Bradley-Terry reward loss (optionally straight from hidden states through the fused pool_score
kernel) and the PPO clipped value loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.pool_score import pool_score


@dataclass(slots=True)
class PairwiseOutput:
    """Result of `bt_loss_from_hidden`: the scalar loss and the fp32 [P] rewards of both halves."""

    loss: Tensor
    chosen: Tensor
    rejected: Tensor

    def accuracy(self) -> float:
        """Fraction of pairs with r_chosen > r_rejected (ties count as wrong)."""
        return (self.chosen > self.rejected).float().mean().item()


def bradley_terry_loss(
    r_chosen: Tensor, r_rejected: Tensor, *, margin: float | Tensor = 0.0, center_coef: float = 0.0
) -> Tensor:
    """Bradley-Terry pairwise loss on [P] rewards, computed in fp32:

        loss = mean_p( -log sigmoid(r_c[p] - r_r[p] - m[p]) ) + center_coef * mean_p( (r_c[p] + r_r[p])^2 )

    ``margin`` m (a float or a [P] tensor, e.g. per-pair preference strength) asks the chosen reward to win by at
    least m. The second term is reward centering (Eisenstein et al. 2023, "Helping or Herding?"): the BT term only
    sees differences, so it leaves the reward's offset free; penalising the squared pair sum pulls rewards toward
    zero mean without changing which reply wins. ``center_coef`` 0 disables it (upstream trains without it).
    """
    for name, x in (("r_chosen", r_chosen), ("r_rejected", r_rejected)):
        if not isinstance(x, Tensor) or x.dim() != 1:
            raise ValueError(f"bradley_terry_loss: {name} must be a 1-D [P] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"bradley_terry_loss: r_chosen {tuple(r_chosen.shape)} and r_rejected "
                         f"{tuple(r_rejected.shape)} must have the same shape")
    if r_chosen.numel() == 0:
        raise ValueError("bradley_terry_loss: need at least one pair (got P = 0)")
    if center_coef < 0:
        raise ValueError(f"bradley_terry_loss: center_coef must be >= 0, got {center_coef}")
    if isinstance(margin, Tensor) and margin.dim() > 0 and margin.shape != r_chosen.shape:
        raise ValueError(f"bradley_terry_loss: a tensor margin must be a scalar or have shape "
                         f"{tuple(r_chosen.shape)}, got {tuple(margin.shape)}")
    rc = r_chosen.float()
    rr = r_rejected.float()
    m = margin.to(device=rc.device, dtype=torch.float32) if isinstance(margin, Tensor) else float(margin)
    loss = -F.logsigmoid(rc - rr - m).mean()
    if center_coef:
        loss = loss + center_coef * (rc + rr).square().mean()
    return loss


def pairwise_scores_from_hidden(
    hidden: Tensor,
    norm_weight: Tensor,
    head_weight: Tensor,
    cu_seqlens: Tensor,
    *,
    mode: str = "last",
    eps: float = 1e-5,
    backend: str = "auto",
    rejected_prefix: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Rewards of P pairs from the packed final hidden states of 2P sequences.

    Layout convention: sequences 0..P-1 of ``cu_seqlens`` are the chosen replies and P..2P-1 the rejected ones,
    pair p = (sequence p, sequence P + p). hidden [T, H], cu_seqlens int32 [2P + 1]; mode "last" or "mean".
    rejected_prefix: with in-batch prefix sharing, rejected sequence p holds only the tokens after the first
    ``rejected_prefix[p]`` positions, which it shares with chosen sequence p (0: a full sequence). "last" needs no
    change; "mean" adds the chosen sequence's scores over those positions to the rejected mean.
    Returns fp32 ``(r_chosen [P], r_rejected [P])``, differentiable through the fused kernel.
    """
    if mode not in ("last", "mean"):
        raise ValueError(f"pairwise_scores_from_hidden: mode must be 'last' or 'mean', got {mode!r}")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1:
        raise ValueError("pairwise_scores_from_hidden: cu_seqlens must be a 1-D int32 [2P + 1] tensor")
    n_seq = cu_seqlens.numel() - 1
    if n_seq < 2 or n_seq % 2:
        raise ValueError(f"pairwise_scores_from_hidden: need an even, non-zero number of sequences (chosen half then "
                         f"rejected half), got {n_seq}")
    p = n_seq // 2
    if mode == "mean" and rejected_prefix is not None and any(rejected_prefix):
        if len(rejected_prefix) != p:
            raise ValueError(f"pairwise_scores_from_hidden: rejected_prefix needs {p} entries, got "
                             f"{len(rejected_prefix)}")
        s = pool_score(hidden, norm_weight, head_weight, cu_seqlens, mode="token", eps=eps, backend=backend)
        cu = cu_seqlens.long()
        lens = cu[1:] - cu[:-1]
        sums = s.new_zeros(n_seq).index_add(0, torch.repeat_interleave(torch.arange(n_seq, device=s.device), lens), s)
        csum = torch.cat([s.new_zeros(1), torch.cumsum(s, 0)])
        pre = torch.as_tensor(list(rejected_prefix), dtype=torch.long, device=s.device)
        if bool((pre < 0).any() | (pre >= lens[:p]).any()):
            raise ValueError("pairwise_scores_from_hidden: rejected_prefix must be in [0, chosen length)")
        shared = csum[cu[:p] + pre] - csum[cu[:p]]  # sum of the chosen scores over the shared positions
        return sums[:p] / lens[:p], (sums[p:] + shared) / (lens[p:] + pre)
    scores = pool_score(hidden, norm_weight, head_weight, cu_seqlens, mode=mode, eps=eps, backend=backend)
    return scores[:p], scores[p:]


def bt_loss_from_hidden(
    hidden: Tensor,
    norm_weight: Tensor,
    head_weight: Tensor,
    cu_seqlens: Tensor,
    *,
    mode: str = "last",
    eps: float = 1e-5,
    backend: str = "auto",
    margin: float | Tensor = 0.0,
    center_coef: float = 0.0,
    rejected_prefix: Sequence[int] | None = None,
) -> PairwiseOutput:
    """`pairwise_scores_from_hidden` + `bradley_terry_loss`: the backward runs through the fused pool_score
    kernel into hidden, norm_weight and head_weight. Same layout convention (chosen half first)."""
    rc, rr = pairwise_scores_from_hidden(hidden, norm_weight, head_weight, cu_seqlens, mode=mode, eps=eps,
                                         backend=backend, rejected_prefix=rejected_prefix)
    loss = bradley_terry_loss(rc, rr, margin=margin, center_coef=center_coef)
    return PairwiseOutput(loss=loss, chosen=rc.detach(), rejected=rr.detach())


def _valid_mask(mask: Tensor, shape: torch.Size, who: str) -> Tensor:
    if not isinstance(mask, Tensor) or mask.shape != shape:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{who}: mask must be a tensor of shape {tuple(shape)}, got {got}")
    if mask.dtype != torch.bool:
        if mask.numel() and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{who}: mask must be bool or hold only 0 and 1")
        mask = mask != 0
    return mask


def value_loss_terms(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = 0.2
) -> tuple[Tensor, Tensor]:
    """(loss, clipfrac) of the PPO clipped value loss; see `clipped_value_loss`. clipfrac (fp32 scalar, no grad) is
    the fraction of valid positions where the clipped branch is strictly larger, i.e. where clipping is active."""
    who = "clipped_value_loss"
    for name, x in (("values", values), ("old_values", old_values), ("returns", returns)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"{who}: {name} must be a floating tensor")
        if x.shape != values.shape:
            raise ValueError(f"{who}: {name} has shape {tuple(x.shape)}, values has {tuple(values.shape)}")
    if clip is not None and not clip >= 0:
        raise ValueError(f"{who}: clip must be >= 0 or None (no clipping), got {clip}")
    valid = _valid_mask(mask, values.shape, who)
    # Zero the invalid positions of every input first so padding garbage (even NaN) reaches neither loss nor grad.
    v = torch.where(valid, values.float(), 0.0)
    old = torch.where(valid, old_values.detach().float(), 0.0)
    ret = torch.where(valid, returns.detach().float(), 0.0)
    n = valid.sum().clamp_min(1).float()
    unclipped = (v - ret).square()
    if clip is None:
        return 0.5 * unclipped.sum() / n, torch.zeros((), device=v.device)
    v_clipped = old + (v - old).clamp(-clip, clip)
    clipped = (v_clipped - ret).square()
    loss = 0.5 * torch.maximum(unclipped, clipped).sum() / n
    clipfrac = ((clipped > unclipped) & valid).sum().float() / n
    return loss, clipfrac.detach()


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = 0.2
) -> Tensor:
    """PPO critic loss over the valid positions (mask true / 1) of same-shaped tensors, in fp32:

        0.5 * mean_valid( max( (v - R)^2, (v_old + clamp(v - v_old, -clip, clip) - R)^2 ) )

    old_values and returns are targets (no gradient flows into them). clip=None gives plain 0.5 * MSE. With no
    valid position the loss is 0 (still attached to the graph of values).
    """
    return value_loss_terms(values, old_values, returns, mask, clip)[0]
