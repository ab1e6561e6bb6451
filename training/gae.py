"""Generalized advantage estimation (GAE) over right-padded [B, T] rollouts: Triton kernel + torch reference.

Definition (for any mask, not only contiguous prefixes). For row b let the valid positions be those with
mask[b, t] != 0; for a valid t let n(t) be the next valid position after t in the same row (none if t is the last
one). Invalid positions are skipped entirely: they consume no discount step and their rewards and values are
ignored. Then, for valid t,

    delta_t = r_t + gamma * V_{n(t)} - V_t          (V_{n(t)} := 0 when t has no next valid position)
    A_t     = delta_t + gamma * lam * A_{n(t)}      (A_{n(t)} := 0 likewise)
    R_t     = A_t + V_t                             (the critic's regression target)

and A_t = R_t = 0 at invalid positions. With the usual right padding (valid positions 0..L_b-1 of row b) this is
delta_t = r_t + gamma * V_{t+1} * [t+1 valid] - V_t and A_t = delta_t + gamma * lam * A_{t+1} * [t+1 valid], i.e.
the episode ends after the last valid position with no bootstrap. Outputs are float32 and carry no gradient
(advantages and returns are fixed targets for a PPO update).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels._backend import BACKENDS, resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is the optional `gpu` extra; the torch reference still works
    triton = None


def gae_ref(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 0.99, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Reference GAE: a plain reverse loop over T in fp32, vectorised over rows. Returns (advantages, returns)."""
    r = rewards.detach().to(torch.float32)
    v = values.detach().to(torch.float32)
    m = mask.detach() != 0
    B, T = r.shape
    adv = torch.zeros_like(r)
    next_v = torch.zeros(B, dtype=torch.float32, device=r.device)
    next_a = torch.zeros(B, dtype=torch.float32, device=r.device)
    for t in range(T - 1, -1, -1):
        a = r[:, t] + gamma * next_v - v[:, t] + (gamma * lam) * next_a
        valid = m[:, t]
        adv[:, t] = torch.where(valid, a, 0.0)
        # the carry (value and advantage of the next valid position) only moves at valid positions
        next_v = torch.where(valid, v[:, t], next_v)
        next_a = torch.where(valid, a, next_a)
    returns = torch.where(m, adv + v, 0.0)
    return adv, returns


if triton is not None:

    # B and T change with every rollout batch: not specialised, so a new value does not recompile.
    @triton.jit(do_not_specialize=["B", "T"])
    def _gae_kernel(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, B, T, gamma, gamma_lam, BLOCK_B: tl.constexpr):
        # One program owns BLOCK_B rows and walks t = T-1 .. 0 carrying (V, A) of the next valid position.
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        base = rows.to(tl.int64) * T
        next_v = tl.zeros([BLOCK_B], dtype=tl.float32)
        next_a = tl.zeros([BLOCK_B], dtype=tl.float32)
        for i in range(T):
            t = T - 1 - i
            r = tl.load(r_ptr + base + t, mask=row_ok, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + base + t, mask=row_ok, other=0.0).to(tl.float32)
            valid = tl.load(m_ptr + base + t, mask=row_ok, other=0) != 0
            a = r + gamma * next_v - v + gamma_lam * next_a
            tl.store(adv_ptr + base + t, tl.where(valid, a, 0.0), mask=row_ok)
            tl.store(ret_ptr + base + t, tl.where(valid, a + v, 0.0), mask=row_ok)
            next_v = tl.where(valid, v, next_v)
            next_a = tl.where(valid, a, next_a)


def _gae_triton(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    r = rewards.detach().to(torch.float32).contiguous()
    v = values.detach().to(torch.float32).contiguous()
    m = (mask.detach() != 0).to(torch.uint8).contiguous()
    B, T = r.shape
    adv = torch.empty_like(r)
    ret = torch.empty_like(r)
    if B == 0 or T == 0:
        return adv, ret
    # Rows are independent, T is sequential: on a GPU small row blocks give more programs; the interpreter
    # pays per program instance, so it takes all rows at once.
    block_b = _block_b(B, r.device.type == "cuda")
    grid = (triton.cdiv(B, block_b),)
    _gae_kernel[grid](r, v, m, adv, ret, B, T, float(gamma), float(gamma * lam), BLOCK_B=block_b)
    return adv, ret


def _block_b(B: int, on_gpu: bool) -> int:
    cap = 32 if on_gpu else 256
    return min(max(triton.next_power_of_2(B), 16), cap)


def compile_specs(batch_rows: tuple[int, ...] = (8, 64)) -> list[dict]:
    """Launch configurations of the GAE kernel on a GPU for rollout batches of `batch_rows` rows (small and large),
    for ahead-of-time compile checks (see ixc_engine/kernels/_specs.py). Inputs are cast to fp32 first."""
    from ..kernels._specs import kernel_spec

    specs = []
    for B in batch_rows:
        block_b = _block_b(B, True)
        if any(s["constexprs"]["BLOCK_B"] == block_b for s in specs):
            continue
        specs.append(kernel_spec(
            f"gae[BLOCK_B={block_b},fp32]", _gae_kernel,
            pointers={"r_ptr": "*fp32", "v_ptr": "*fp32", "m_ptr": "*u8", "adv_ptr": "*fp32", "ret_ptr": "*fp32"},
            ints={"B": B, "T": 301}, floats=("gamma", "gamma_lam"), constexprs={"BLOCK_B": block_b},
            num_warps=4, num_stages=3, per_batch=("B", "T"), dtype="fp32",
        ))
    return specs


def _check_inputs(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float, backend: str) -> None:
    for name, x in (("rewards", rewards), ("values", values), ("mask", mask)):
        if not isinstance(x, Tensor):
            raise TypeError(f"gae: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"gae: {name} must be 2-D [B, T] (right-padded), got shape {tuple(x.shape)}")
    if rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(
            f"gae: rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask {tuple(mask.shape)} "
            "must have the same [B, T] shape"
        )
    if rewards.device != values.device or rewards.device != mask.device:
        raise ValueError(f"gae: rewards, values and mask must be on one device, got {rewards.device}, "
                         f"{values.device}, {mask.device}")
    for name, x in (("rewards", rewards), ("values", values)):
        if not x.is_floating_point():
            raise TypeError(f"gae: {name} must be a floating tensor, got {x.dtype}")
    if mask.dtype != torch.bool and mask.numel() and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("gae: mask must be bool or hold only 0 and 1")
    for name, x in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= float(x) <= 1.0:
            raise ValueError(f"gae: {name} must be in [0, 1], got {x}")
    if backend not in BACKENDS:
        raise ValueError(f"gae: backend must be one of {BACKENDS}, got {backend!r}")


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 0.99, lam: float = 0.95, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """GAE over right-padded [B, T] rewards/values with a [B, T] bool (or 0/1) mask of valid action positions.

    Returns float32 (advantages, returns), both [B, T], zero at invalid positions, no gradient; see the module
    docstring for the exact recurrence. backend: "auto" (the Triton kernel for CUDA tensors, or for CPU tensors
    when Triton's interpreter is on; the torch reference otherwise), "triton" (force the kernel; CPU tensors need
    TRITON_INTERPRET=1 set before import), "torch" (the reference loop).
    """
    _check_inputs(rewards, values, mask, gamma, lam, backend)
    if resolve_backend("gae", backend, globals().get("_gae_kernel"), rewards.device) == "torch":
        return gae_ref(rewards, values, mask, gamma, lam)
    return _gae_triton(rewards, values, mask, gamma, lam)
