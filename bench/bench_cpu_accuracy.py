"""bf16 against fp32 on the CPU path, on the same weights: random checkpoints of several sizes, a few hundred samples.

    python bench/bench_cpu_accuracy.py [--sizes tiny,small,mid] [--text 240] [--images 24] [--json OUT]

Per size: one random model (bench_e2e.init_random_), scored three ways through `RewardEngine.score`: bf16, fp32 on the
bf16-rounded weights (only the arithmetic differs: what bf16 costs) and fp32 on the original fp32 weights (what a user
switching dtype sees). Samples: `--text` text-only chats of 10-200 words and `--images` single-image samples (distinct
synthetic photos at hd_num 1-2). Prints, per pair: max and median relative difference, max absolute difference
against the spread (std) of the fp32 scores, and Kendall's tau (rank agreement) over all samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_e2e import WORDS, init_random_, kendall_tau, mid_config, synthetic_photo

from ixc_engine.api import RewardEngine
from ixc_engine.config import VisionConfig
from ixc_engine.engine.engine import EngineConfig
from ixc_engine.models.reward_model import meta_model
from ixc_engine.tiny import PACKAGED_TOKENIZER, tiny_config


def small_config():
    vision = VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
    return tiny_config(hidden_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                       intermediate_size=896, plora_rank=16, plora_alpha=16, vision=vision)


CONFIGS = {"tiny": tiny_config, "small": small_config, "mid": mid_config}


def samples(tmp: Path, n_text: int, n_images: int, seed: int):
    rng = np.random.default_rng(seed)
    vocab = WORDS.split()

    def words(lo, hi):
        return " ".join(rng.choice(vocab, int(rng.integers(lo, hi + 1))))

    convs, images = [], []
    for i in range(n_text + n_images):
        conv = [{"role": "user", "content": words(5, 30) + "?"}, {"role": "assistant", "content": words(10, 200)}]
        if i % 7 == 3:
            conv.insert(0, {"role": "system", "content": words(5, 15)})
        media = None
        if i >= n_text:
            w, h = [(800, 600), (640, 480), (600, 900), (1000, 560)][i % 4]
            media = [str(synthetic_photo(tmp / f"acc_{seed}_{i}.jpg", w, h, seed * 7919 + i))]
        convs.append(conv)
        images.append(media)
    return convs, images


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-6)
    return {"max_rel_diff": float(rel.max()), "median_rel_diff": float(np.median(rel)),
            "max_abs_diff_over_std": float(np.abs(a - b).max() / max(float(b.std()), 1e-12)),
            "kendall_tau": kendall_tau(a, b), "n": len(a)}


def model_of(cfg, dtype: torch.dtype, seed: int):
    m = meta_model(cfg, cfg.plora_rank)
    m = m.to(dtype).to_empty(device="cpu")
    init_random_(m, seed)
    return m.eval().requires_grad_(False)


def score(model, convs, images, hd_num: int) -> tuple[np.ndarray, float]:
    eng = RewardEngine.from_model(model, PACKAGED_TOKENIZER, config=EngineConfig(hd_num=hd_num))
    t0 = time.perf_counter()
    out = np.array(eng.score(convs, images, hd_num=hd_num), dtype=np.float64)
    return out, time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,small,mid")
    ap.add_argument("--text", type=int, default=240, help="text-only samples per size")
    ap.add_argument("--images", type=int, default=24, help="single-image samples per size")
    ap.add_argument("--hd-num", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"command": "bench_cpu_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "load_average": os.getloadavg()[0], "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="ixc_acc_") as tmp:
        convs, images = samples(Path(tmp), args.text, args.images, args.seed)
        for name in args.sizes.split(","):
            cfg = CONFIGS[name]()
            m32 = model_of(cfg, torch.float32, args.seed)
            m16 = model_of(cfg, torch.float32, args.seed).bfloat16()
            m32r = model_of(cfg, torch.float32, args.seed)
            with torch.no_grad():
                for p in m32r.parameters():
                    p.copy_(p.bfloat16().float())
            s16, t16 = score(m16, convs, images, args.hd_num)
            s32r, t32r = score(m32r, convs, images, args.hd_num)
            s32, t32 = score(m32, convs, images, args.hd_num)
            res = {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                   "vit": f"{cfg.vision.num_hidden_layers}x{cfg.vision.hidden_size}", "samples": len(convs),
                   "bf16_vs_fp32_same_rounded_weights": compare(s16, s32r),
                   "bf16_vs_fp32_original_weights": compare(s16, s32),
                   "seconds": {"bf16": round(t16, 2), "fp32 (rounded weights)": round(t32r, 2), "fp32": round(t32, 2)}}
            out["sizes"][name] = res
            print(f"{name}: hidden {cfg.hidden_size} x {cfg.num_hidden_layers} layers, ViT {res['vit']}, "
                  f"{len(convs)} samples ({args.images} with an image, hd_num {args.hd_num}); fp32 score std "
                  f"{s32.std():.3g}", flush=True)
            for k in ("bf16_vs_fp32_same_rounded_weights", "bf16_vs_fp32_original_weights"):
                c = res[k]
                print(f"  {k}: max rel {c['max_rel_diff']:.3g}, median rel {c['median_rel_diff']:.3g}, max |diff| / "
                      f"std {c['max_abs_diff_over_std']:.3g}, Kendall tau {c['kendall_tau']:.4f}", flush=True)
            print(f"  seconds: {res['seconds']}", flush=True)
    out["load_average_end"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
