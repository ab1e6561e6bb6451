"""PPO critic update on the engine's fused score kernel, plus packed <-> padded conversions.

The critic is a reward-model-shaped network: a backbone producing final hidden states of packed sequences and the
score head read at every token (``pool_score(mode="token")``). GAE works on right-padded [B, Tmax] tensors,
pool_score on packed [T] ones; `values_to_padded` / `padded_to_values` move between the two.

Position convention: the value read at packed position t is V(tokens 0..t of its sequence). The value of the state
that generated token t+1 therefore sits at t; `state_mask_from_action_mask` shifts a mask of generated tokens onto
those positions when that is the convention wanted.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..kernels.pool_score import pool_score
from .losses import value_loss_terms


def _lengths(cu_seqlens: Tensor, n_tokens: int, who: str) -> list[int]:
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{who}: cu_seqlens must be a 1-D [B+1] integer tensor")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{who}: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != n_tokens:
        raise ValueError(f"{who}: cu_seqlens must start at 0 and end at the token count {n_tokens}, "
                         f"got {cu[0]} .. {cu[-1]}")
    lengths = [b - a for a, b in itertools.pairwise(cu)]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{who}: cu_seqlens must be non-decreasing, got {cu}")
    return lengths


def _packed_index(cu_seqlens: Tensor, lengths: list[int], n_tokens: int) -> tuple[Tensor, Tensor]:
    """(sequence id, position within its sequence) of every packed token, both int64 [T]."""
    dev = cu_seqlens.device
    lens = torch.tensor(lengths, dtype=torch.long, device=dev)
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=dev), lens, output_size=n_tokens)
    pos = torch.arange(n_tokens, device=dev) - cu_seqlens.long()[:-1][seq]
    return seq, pos


def values_to_padded(values: Tensor, cu_seqlens: Tensor, *, max_len: int | None = None, pad_value=0) -> Tensor:
    """Packed [T, ...] -> right-padded [B, max_len, ...] (max_len defaults to the longest sequence).

    Works for any dtype (values, bool masks); differentiable w.r.t. values. Padding holds ``pad_value``.
    """
    who = "values_to_padded"
    if not isinstance(values, Tensor) or values.dim() < 1:
        raise ValueError(f"{who}: values must be a packed [T, ...] tensor")
    T = values.shape[0]
    lengths = _lengths(cu_seqlens, T, who)
    longest = max(lengths, default=0)
    if max_len is None:
        max_len = longest
    elif max_len < longest:
        raise ValueError(f"{who}: max_len={max_len} is shorter than the longest sequence ({longest})")
    seq, pos = _packed_index(cu_seqlens.to(values.device), lengths, T)
    out = values.new_full((len(lengths), max_len, *values.shape[1:]), pad_value)
    return out.index_put((seq, pos), values)


def padded_to_values(padded: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Right-padded [B, Tmax, ...] -> packed [T, ...] (the first len_b entries of each row); differentiable."""
    who = "padded_to_values"
    if not isinstance(padded, Tensor) or padded.dim() < 2:
        raise ValueError(f"{who}: padded must be a [B, Tmax, ...] tensor")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{who}: cu_seqlens must be a 1-D [B+1] integer tensor")
    B = cu_seqlens.numel() - 1
    if padded.shape[0] != B:
        raise ValueError(f"{who}: padded has {padded.shape[0]} rows but cu_seqlens describes {B} sequences")
    lengths = _lengths(cu_seqlens, int(cu_seqlens[-1]), who)
    T = sum(lengths)
    if max(lengths, default=0) > padded.shape[1]:
        raise ValueError(f"{who}: padded rows hold {padded.shape[1]} positions, the longest sequence needs "
                         f"{max(lengths)}")
    seq, pos = _packed_index(cu_seqlens.to(padded.device), lengths, T)
    return padded[seq, pos]


def state_mask_from_action_mask(action_mask: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Packed bool [T]: position t is set iff token t+1 is in the same sequence and action_mask[t+1] is set,
    i.e. the positions whose value V(tokens 0..t) is the value of the state that generated an action token."""
    who = "state_mask_from_action_mask"
    if not isinstance(action_mask, Tensor) or action_mask.dim() != 1:
        raise ValueError(f"{who}: action_mask must be a packed 1-D [T] tensor")
    T = action_mask.shape[0]
    lengths = _lengths(cu_seqlens, T, who)
    m = action_mask != 0
    out = torch.zeros_like(m)
    out[:-1] = m[1:]
    ends = cu_seqlens.to(m.device).long()[1:][torch.tensor(lengths, device=m.device) > 0] - 1
    out[ends] = False  # the last token of a sequence has no successor in it
    return out


def _to_packed(x: Tensor, name: str, cu_seqlens: Tensor, n_tokens: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"critic_step: {name} must be a tensor, got {type(x).__name__}")
    if x.dim() == 1:
        if x.shape[0] != n_tokens:
            raise ValueError(f"critic_step: packed {name} has {x.shape[0]} entries, hidden has {n_tokens} tokens")
        return x
    if x.dim() == 2:
        return padded_to_values(x, cu_seqlens)
    raise ValueError(f"critic_step: {name} must be packed [T] or right-padded [B, Tmax], got {tuple(x.shape)}")


def _grad_norm(params: list[Tensor], max_grad_norm: float | None) -> float:
    if max_grad_norm is not None:
        return float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    if not params:
        return 0.0
    norms = torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in params])
    return float(torch.linalg.vector_norm(norms))


def critic_step(
    model_forward: Callable[[], Tensor],
    norm_weight: Tensor,
    head_weight: Tensor,
    cu_seqlens: Tensor,
    action_mask_packed: Tensor,
    old_values: Tensor,
    returns: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    clip: float | None = 0.2,
    backend: str = "auto",
    max_grad_norm: float | None = None,
    eps: float = 1e-5,
) -> dict[str, float]:
    """One PPO critic update.

    ``model_forward()`` runs the critic backbone and returns the final hidden states [T, H] of the packed sequences
    described by ``cu_seqlens`` (int32 [B+1]); per-token values come from the fused
    ``pool_score(mode="token")`` with ``norm_weight`` / ``head_weight``. The loss is `clipped_value_loss` over the
    positions set in ``action_mask_packed``; ``action_mask_packed``, ``old_values`` (the values at rollout time)
    and ``returns`` (GAE targets) may each be packed [T] or right-padded [B, Tmax] (as `gae` returns them).
    Then backward, optional grad-norm clipping (``max_grad_norm``) over the optimizer's parameters,
    ``optimizer.step()`` and ``optimizer.zero_grad()``. Gradients are expected to be clear on entry.

    Returns floats: value_loss (before the step), values_mean (mean value over the masked positions), clipfrac
    (fraction of masked positions where clipping was active) and grad_norm (total norm before clipping).
    Raises FloatingPointError, without stepping and with gradients cleared, if the loss or grad norm is not finite.
    """
    hidden = model_forward()
    if not isinstance(hidden, Tensor) or hidden.dim() != 2:
        got = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
        raise ValueError(f"critic_step: model_forward() must return hidden states [T, H], got {got}")
    T = hidden.shape[0]
    mask = _to_packed(action_mask_packed, "action_mask_packed", cu_seqlens, T)
    old = _to_packed(old_values, "old_values", cu_seqlens, T).to(hidden.device)
    ret = _to_packed(returns, "returns", cu_seqlens, T).to(hidden.device)
    mask = mask.to(hidden.device)

    values = pool_score(hidden, norm_weight, head_weight, cu_seqlens, mode="token", eps=eps, backend=backend)
    loss, clipfrac = value_loss_terms(values, old, ret, mask, clip)
    loss.backward()

    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = _grad_norm(params, max_grad_norm)
    loss_value = float(loss.detach())
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"critic_step: non-finite value loss {loss_value} or grad norm {grad_norm}; "
                                 "the optimizer step was skipped")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    valid = mask != 0
    with torch.no_grad():
        values_mean = float(torch.where(valid, values, 0.0).sum() / valid.sum().clamp_min(1))
    return {"value_loss": loss_value, "values_mean": values_mean, "clipfrac": float(clipfrac),
            "grad_norm": grad_norm}
