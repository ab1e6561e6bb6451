"""pool_score benchmark: `python bench/bench_pool_score.py [--sweep] [--no-backward]`.

On CUDA: the real shape (H=4096, bf16, T=65536 packed tokens split at random into B=32 and B=256 sequences),
each mode, Triton kernel vs a torch eager baseline measured in the same run, both as do_bench medians.
Baseline (what an engine without the fused kernel does, as upstream): RMSNorm in fp32, cast back to bf16,
times the norm weight; the score head as a [T, H] x [H, 1] bf16 matmul on every token; then gather the last
tokens or a segment mean (index_add with precomputed sequence ids). The ceiling is the measured
device-to-device copy bandwidth (read + write bytes).

Byte counting rule (the same bytes for kernel and baseline, so the GB/s ratio is the speed ratio): only the
bytes any implementation must move: the rows of `hidden` that the result depends on (T rows for token/mean,
the B last rows for last) + both weight vectors + cu_seqlens + the fp32 output. For fwd+bwd (training):
hidden is read by the forward and again by the backward, and d_hidden [T, H] is written once, so 3 * T * H
elements, plus the weights, their gradients and the outputs. Intermediates (normalized copies, per-token
scores of the baseline) are not counted: avoiding them is the point.

On CPU (no GPU present): a small fp32 shape on the torch reference path, labelled as such; these are not kernel
figures and say nothing about GPU performance.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch
from harness import do_bench_median, gbps, measure_copy_bandwidth, report
from ixc_engine.kernels.pool_score import MODES, default_config, pool_score, pool_score_ref

EPS = 1e-5


@dataclass(slots=True)
class Problem:
    hidden: torch.Tensor  # [T, H]
    norm_weight: torch.Tensor  # [H]
    head_weight: torch.Tensor  # [1, H]
    cu_seqlens: torch.Tensor  # int32 [B+1]
    seq_ids: torch.Tensor  # int64 [T], sequence of each token (baseline metadata, built outside the timing)
    lengths: torch.Tensor  # fp32 [B]

    @property
    def T(self) -> int:
        return self.hidden.shape[0]

    @property
    def H(self) -> int:
        return self.hidden.shape[1]

    @property
    def B(self) -> int:
        return self.cu_seqlens.numel() - 1


def make_problem(T: int, H: int, B: int, *, dtype=torch.bfloat16, device="cpu", seed: int = 0) -> Problem:
    """T tokens cut at B-1 random distinct points into B non-empty sequences."""
    if not 1 <= B <= T:
        raise ValueError(f"need 1 <= B <= T, got B={B}, T={T}")
    g = torch.Generator().manual_seed(seed)
    cuts = (torch.randperm(T - 1, generator=g)[: B - 1] + 1).sort().values
    cu = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([T])])
    lengths = torch.diff(cu)
    hidden = torch.randn(T, H, generator=g)
    norm_weight = 1.0 + 0.1 * torch.randn(H, generator=g)
    head_weight = torch.randn(1, H, generator=g) / H**0.5
    seq_ids = torch.repeat_interleave(torch.arange(B), lengths)
    return Problem(hidden.to(device, dtype), norm_weight.to(device, dtype), head_weight.to(device, dtype),
                   cu.to(device, torch.int32), seq_ids.to(device), lengths.to(device, torch.float32))


def eager_baseline(p: Problem, mode: str, hidden: torch.Tensor | None = None) -> torch.Tensor:
    x = p.hidden if hidden is None else hidden
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + EPS)).to(x.dtype) * p.norm_weight
    s = (normed @ p.head_weight.t()).float().squeeze(-1)  # score head on every token, [T]
    if mode == "token":
        return s
    if mode == "last":
        return s[p.cu_seqlens[1:].long() - 1]
    return torch.zeros(p.B, device=s.device).index_add_(0, p.seq_ids, s) / p.lengths


def required_bytes(p: Problem, mode: str, backward: bool = False) -> int:
    e = p.hidden.element_size()
    w = 2 * p.H * p.norm_weight.element_size() + 4 * (p.B + 1)
    out = 4 * (p.T if mode == "token" else p.B)
    if backward:
        return 3 * p.T * p.H * e + 2 * w + 2 * out
    rows = p.B if mode == "last" else p.T
    return rows * p.H * e + w + out


def _grad_fn(forward, p: Problem):
    """fwd+bwd closure: gradients of sum(out) w.r.t. hidden and both weights."""
    leaves = [p.hidden.detach().requires_grad_(True), p.norm_weight.detach().requires_grad_(True),
              p.head_weight.detach().requires_grad_(True)]
    return lambda: torch.autograd.grad(forward(*leaves).sum(), leaves)


def _check_gpu_correctness(p: Problem) -> None:
    for mode in MODES:
        got = pool_score(p.hidden, p.norm_weight, p.head_weight, p.cu_seqlens, mode=mode, backend="triton")
        want = pool_score_ref(p.hidden, p.norm_weight, p.head_weight, p.cu_seqlens, mode=mode)
        err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
        print(f"check {mode:<5} B={p.B}: max |kernel - fp32 reference| / max |reference| = {err:.2e}")
        if not err < 1e-4:
            raise SystemExit(f"kernel disagrees with the reference in mode={mode!r} (relative error {err:.2e})")


def run_gpu(args) -> None:
    dev = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name(dev)}; torch {torch.__version__}")
    copy_bw = measure_copy_bandwidth(dev)
    report("device-to-device copy (read + write)", copy_bw, "GB/s")
    for B in args.batches:
        p = make_problem(args.tokens, args.hidden, B, dtype=torch.bfloat16, device=dev)
        _check_gpu_correctness(p)
        args_k = (p.hidden, p.norm_weight, p.head_weight, p.cu_seqlens)
        for mode in MODES:
            ms_k = do_bench_median(lambda m=mode, a=args_k: pool_score(*a, mode=m, backend="triton"))
            ms_b = do_bench_median(lambda m=mode, q=p: eager_baseline(q, m))
            nbytes = required_bytes(p, mode)
            report(f"pool_score fwd {mode:<5} T={p.T} B={B} ({ms_k * 1e3:.1f} us)", gbps(nbytes, ms_k), "GB/s",
                   copy_bw, gbps(nbytes, ms_b))
        if not args.no_backward:
            for mode in ("token", "mean"):
                fk = _grad_fn(lambda h, wn, wh, m=mode, cu=p.cu_seqlens: pool_score(h, wn, wh, cu, mode=m,
                                                                                    backend="triton"), p)
                fb = _grad_fn(lambda h, wn, wh, m=mode, q=p: eager_baseline(
                    dataclasses.replace(q, norm_weight=wn, head_weight=wh), m, hidden=h), p)
                ms_k, ms_b = do_bench_median(fk), do_bench_median(fb)
                nbytes = required_bytes(p, mode, backward=True)
                report(f"pool_score fwd+bwd {mode:<5} T={p.T} B={B} ({ms_k * 1e3:.1f} us)", gbps(nbytes, ms_k),
                       "GB/s", copy_bw, gbps(nbytes, ms_b))
    print("last mode reads only B rows: at these sizes it is launch-latency bound, not bandwidth bound.")
    if args.sweep:
        sweep(make_problem(args.tokens, args.hidden, max(args.batches), dtype=torch.bfloat16, device=dev), copy_bw)


def sweep(p: Problem, copy_bw: float) -> None:
    """Try forward and backward launch parameters on the token mode; prints GB/s of each."""
    from ixc_engine.kernels.pool_score import _pool_score_triton

    base = default_config(p.H, p.T, p.hidden.device)
    print(f"default config: {base}")
    args_k = (p.hidden, p.norm_weight, p.head_weight, p.cu_seqlens)
    for bt in (1, 2, 4, 8):
        for bh in (512, 1024, 2048, 4096):
            for warps in (4, 8, 16):
                cfg = dataclasses.replace(base, fwd_block_t=bt, fwd_block_h=bh, fwd_warps=warps)
                ms = do_bench_median(lambda c=cfg: _pool_score_triton(*args_k, mode="token", config=c))
                report(f"sweep fwd block_t={bt} block_h={bh} warps={warps}", gbps(required_bytes(p, "token"), ms),
                       "GB/s", copy_bw)
    for bt in (4, 8, 16):
        for bh in (256, 512, 1024):
            for progs in (2, 4, 8):
                sms = torch.cuda.get_device_properties(p.hidden.device).multi_processor_count
                cfg = dataclasses.replace(base, bwd_block_t=bt, bwd_block_h=bh, bwd_programs=progs * sms)
                f = _grad_fn(lambda h, wn, wh, c=cfg: _pool_score_triton(h, wn, wh, p.cu_seqlens, mode="token",
                                                                         config=c), p)
                ms = do_bench_median(f)
                report(f"sweep fwd+bwd block_t={bt} block_h={bh} programs={progs}xSM",
                       gbps(required_bytes(p, "token", backward=True), ms), "GB/s", copy_bw)


def run_cpu(args) -> None:
    T, H, B = 4096, 512, 8
    print(f"No CUDA GPU present: timing the torch reference path (backend='torch') at T={T}, H={H}, B={B}, "
          "fp32. These are NOT Triton kernel figures and say nothing about GPU performance.")
    copy_bw = measure_copy_bandwidth("cpu")
    report("CPU memory copy (read + write)", copy_bw, "GB/s")
    p = make_problem(T, H, B, dtype=torch.float32, device="cpu")
    args_k = (p.hidden, p.norm_weight, p.head_weight, p.cu_seqlens)
    for mode in MODES:
        ms_r = do_bench_median(lambda m=mode: pool_score(*args_k, mode=m, backend="torch"), device="cpu")
        ms_b = do_bench_median(lambda m=mode: eager_baseline(p, m), device="cpu")
        nbytes = required_bytes(p, mode)
        report(f"reference (CPU) fwd {mode:<5} ({ms_r:.2f} ms)", gbps(nbytes, ms_r), "GB/s", copy_bw,
               gbps(nbytes, ms_b))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536, help="packed tokens T (GPU)")
    ap.add_argument("--hidden", type=int, default=4096, help="hidden size H (GPU)")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 256], help="sequence counts B (GPU)")
    ap.add_argument("--no-backward", action="store_true", help="skip the fwd+bwd timings (GPU)")
    ap.add_argument("--sweep", action="store_true", help="also sweep launch parameters (GPU)")
    args = ap.parse_args(argv)
    if torch.cuda.is_available():
        run_gpu(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
