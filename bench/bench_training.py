"""One Bradley-Terry training step and one PPO critic step: fused pool_score vs an unfused torch head.

    python bench/bench_training.py                      # CPU: tiny model, says so
    python bench/bench_training.py --device cuda --layers 4 --pairs 8 --seq 1024   # real 7B layer shape, bf16

The backbone (InternLM2 layers with PLoRA, random weights) is the same in both variants; only the score head differs:
- fused: `pool_score` (final RMSNorm + head + pooling in one kernel, backward recomputes the norm);
- unfused: RMSNorm module -> `score` Linear on every token -> gather/mean, as upstream computes it.
Step = forward, loss, backward, AdamW step. Prints median step time and peak device memory for each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from ixc_engine.kernels.pool_score import pool_score
from ixc_engine.training import bradley_terry_loss, clipped_value_loss

from ixc_engine.config import ModelConfig
from ixc_engine.models.internlm2 import ForwardContext
from ixc_engine.models.reward_model import IXCRewardModel
from ixc_engine.tiny import tiny_config


def build(device: torch.device, dtype: torch.dtype, layers: int | None, tiny: bool) -> IXCRewardModel:
    cfg = tiny_config() if tiny else ModelConfig(vocab_size=92544)
    if layers:
        cfg.num_hidden_layers = layers
    with torch.device(device):
        model = IXCRewardModel(cfg, cfg.plora_rank or 256).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.vit.requires_grad_(False)
    model.vision_proj.requires_grad_(False)
    return model


def context(lens: list[int], device, backend: str) -> ForwardContext:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    pos = torch.cat([torch.arange(n) for n in lens])
    return ForwardContext(cu_seqlens=cu.to(device), positions=pos.to(device), seq_lens_total=list(lens),
                          new_lens=list(lens), backend=backend)


def scores_unfused(model, hidden, cu, mode):
    s = model.score(model.model.norm(hidden)).float()[:, 0]
    if mode == "token":
        return s
    ends = cu[1:].long() - 1
    return s[ends]


def step(model, opt, ids, ctx, kind, fused, backend, autocast):
    opt.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        hidden = model.hidden_states(model.model.tok_embeddings(ids), ctx)
    mode = "last" if kind == "bt" else "token"
    if fused:
        s = pool_score(hidden, model.model.norm.weight, model.score.weight, ctx.cu_seqlens, mode=mode,
                       eps=model.cfg.rms_norm_eps, backend=backend)
    else:
        s = scores_unfused(model, hidden, ctx.cu_seqlens, mode)
    if kind == "bt":
        half = s.shape[0] // 2
        loss = bradley_terry_loss(s[:half], s[half:])
    else:
        gen = torch.Generator(device="cpu").manual_seed(0)
        returns = torch.randn(s.shape, generator=gen).to(s.device)
        mask = torch.ones_like(s, dtype=torch.bool)
        loss = clipped_value_loss(s, s.detach() + 0.1, returns, mask)
    loss.backward()
    opt.step()
    return float(loss.detach())


def run(args) -> None:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    backend = "triton" if cuda else "torch"
    tiny = not cuda or args.tiny
    if not cuda:
        print("no GPU: tiny model on CPU, fp32, torch reference kernels (timings say nothing about a GPU)")
    model = build(device, dtype if not args.autocast else torch.float32, args.layers, tiny)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.95),
                            weight_decay=0.1, foreach=cuda)
    lens = [args.seq] * (2 * args.pairs)
    ctx = context(lens, device, backend)
    ids = torch.randint(0, model.cfg.vocab_size, (sum(lens),), device=device)
    print(f"shape: hidden {model.cfg.hidden_size}, {model.cfg.num_hidden_layers} layers, {len(lens)} sequences x "
          f"{args.seq} tokens, dtype {dtype}{' (autocast bf16)' if args.autocast else ''}, device {device}")
    for kind in ("bt", "critic"):
        for fused in (True, False):
            times = []
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            for i in range(args.warmup + args.iters):
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                step(model, opt, ids, ctx, kind, fused, backend, args.autocast)
                if cuda:
                    torch.cuda.synchronize(device)
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if cuda else "n/a (CPU)"
            name = f"{'BT step' if kind == 'bt' else 'critic step'} {'fused pool_score' if fused else 'unfused head'}"
            print(f"{name:<34} median {statistics.median(times) * 1e3:9.1f} ms  peak memory {peak}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: 4 on GPU, the tiny 2 on CPU)")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="tiny model also on GPU")
    p.add_argument("--autocast", action="store_true", help="fp32 master weights with bf16 autocast (GPU)")
    args = p.parse_args(argv)
    if args.layers is None and args.device.startswith("cuda") and not args.tiny:
        args.layers = 4
    run(args)


if __name__ == "__main__":
    main()
