"""End-to-end benchmark: the engine against the upstream-algorithm baseline (bench/upstream_baseline.py), same weights,
same run.

    python bench/bench_e2e.py [--device cuda] [--model real|tiny] [--layers 32] [--n-samples 48] [--ns 4,8,16]
                              [--baseline-batch 4] [--json OUT]

(a) corpus: single-image samples at hd_num 9 (one distinct photo each, varied sizes, a short chat each), scored
    end to end (from image files: decode, resize, tokenize, ViT, LLM) and model only (samples prepared beforehand,
    untimed); engine vs baseline samples/s and tokens/s, and MFU.
(b) best-of-N: N = 4, 8, 16 candidate replies to one image prompt (hd_num 9); candidates/s of the engine with prefix
    sharing on, off (EngineConfig(prefix_cache=False)) and the baseline (prompt and image re-encoded per candidate).

Models: `--model real` is the IXC-2.5-Reward shape (InternLM2-7B + PLoRA rank 256 + ViT-L/14-560) with random weights
built directly on the device in the run dtype (bf16 on CUDA); `--layers` cuts the LLM depth for memory or time.
`--model tiny` is `ixc_engine.tiny.tiny_config()` (the default on CPU: figures then say nothing about GPU speed).
Every timed call gets a fresh engine (cold prefix cache and media cache) and images no earlier call has seen; one
warm-up call per scorer and shape family runs first, on other images. Times are wall-clock around the whole call,
with torch.cuda.synchronize() on both sides on CUDA.

MFU = useful FLOP/s / peak FLOP/s, the peak measured in this run by a large dense matmul in the run dtype. FLOP rule
(printed by the script, see FLOP_RULE): only the work a sample needs, the same count for engine and baseline
(padding, recomputed prefixes and the score head on every position are not useful work).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from harness import do_bench_median
from PIL import Image
from upstream_baseline import UpstreamBaseline, dense_crops

from ixc_engine.api import RewardEngine
from ixc_engine.config import ModelConfig, VisionConfig
from ixc_engine.engine.engine import EngineConfig
from ixc_engine.engine.sequence import PreparedSample, Sample
from ixc_engine.media.image import image_token_count
from ixc_engine.models.reward_model import IXCRewardModel, meta_model
from ixc_engine.tiny import PACKAGED_TOKENIZER, tiny_config
from ixc_engine.tokenizer import Tokenizer

FLOP_RULE = (
    "useful FLOPs per sample = 2*P_llm*T + 2*P_plora*T_img + 4*Hq*D*layers*T(T+1)/2 (causal attention)\n"
    "  + per image: crops*(2*P_vit*1601 + 4*1601^2*C_vit*layers_vit + 2*1600*P_patch) + 2*P_proj*T_img\n"
    "  P_llm = decoder matmul weights (wqkv, wo, w1, w2, w3 of every layer; embedding lookup and score head not\n"
    "  counted), P_plora = PLoRA A+B weights (run on image tokens only), T = real tokens of the sample, T_img = its\n"
    "  image tokens; counted on real tokens only, identical for engine and baseline"
)

SIZES = [(1920, 1080), (1280, 960), (1024, 768), (1080, 1350), (800, 600), (1600, 1200), (2048, 1365), (720, 1280),
         (1280, 720), (640, 480), (3000, 2000), (1000, 1000)]  # (width, height) of the synthetic photos, cycled
WORDS = ("the a small red large blue car street building person dog tree sky window light shadow left right behind "
         "near holds looks shows image picture photo detail colour bright dark wooden metal glass road sign two three "
         "people standing sitting walking front background corner center table water mountain cloud")


# --- inputs -----------------------------------------------------------------------------------------------------------
def _words(rng: np.random.Generator, lo: int, hi: int) -> str:
    n = int(rng.integers(lo, hi + 1))
    text = " ".join(rng.choice(WORDS.split(), n))
    return text[0].upper() + text[1:] + "."


def synthetic_photo(path: Path, width: int, height: int, seed: int) -> Path:
    """A JPEG with smooth colour gradients, a few blobs and sensor-like noise: photo-sized and photo-compressible.
    The smooth part is drawn at quarter resolution and upsampled (cheap for 3000x2000)."""
    rng = np.random.default_rng(seed)
    w4, h4 = max(1, width // 4), max(1, height // 4)
    yy, xx = np.mgrid[0:h4, 0:w4].astype(np.float32)
    img = np.zeros((h4, w4, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
        img[..., c] = 128 + 80 * np.sin(2 * np.pi * (fx * xx / w4 + fy * yy / h4) + ph)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w4), rng.uniform(0, h4), rng.uniform(0.05, 0.3) * min(w4, h4)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-100, 100, 3).astype(np.float32)
    small = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    full = np.asarray(small.resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16)
    full = full + rng.integers(-12, 13, full.shape, dtype=np.int16)
    Image.fromarray(np.clip(full, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def source_photos(media_dir: str | None) -> list[Path]:
    if media_dir is None:
        return []
    exts = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
    out = sorted(p for p in Path(media_dir).iterdir() if p.suffix.lower() in exts)
    if not out:
        raise ValueError(f"--media-dir {media_dir}: no image files (.jpg .jpeg .png .webp .bmp) in it")
    return out


def make_photo(out_dir: Path, index: int, seed: int, sources: list[Path]) -> Path:
    """Photo number `index`: synthetic (size cycled from SIZES) or a random crop of a source photo, re-encoded so
    that no two photos share bytes (the engine would encode identical images once: not what a corpus looks like)."""
    path = out_dir / f"photo_{seed}_{index}.jpg"
    if not sources:
        w, h = SIZES[index % len(SIZES)]
        return synthetic_photo(path, w, h, seed * 100_003 + index)
    rng = np.random.default_rng(seed * 100_003 + index)
    with Image.open(sources[index % len(sources)]) as im:
        im = im.convert("RGB")
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.7, 1.0)), int(h * rng.uniform(0.7, 1.0))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im.crop((x0, y0, x0 + cw, y0 + ch)).save(path, quality=90)
    return path


def corpus_samples(out_dir: Path, n: int, seed: int, sources: list[Path]) -> list[Sample]:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        photo = make_photo(out_dir, i, seed, sources)
        messages = [{"role": "user", "content": "Describe this photo. " + _words(rng, 5, 25)},
                    {"role": "assistant", "content": _words(rng, 30, 120)}]
        samples.append(Sample(messages, [str(photo)], id=i))
    return samples


def best_of_n_request(out_dir: Path, n: int, seed: int, sources: list[Path]) -> tuple[list[dict], list[str], str]:
    """One 1920x1080 (or source) photo prompt and n candidate replies of 20-150 words."""
    rng = np.random.default_rng(seed)
    if sources:
        photo = make_photo(out_dir, 0, seed, sources)
    else:
        photo = synthetic_photo(out_dir / f"prompt_{seed}.jpg", 1920, 1080, seed)
    messages = [{"role": "user", "content": "What is happening in this picture? " + _words(rng, 10, 30)}]
    return messages, [_words(rng, 20, 150) for _ in range(n)], str(photo)


# --- models -----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def init_random_(model: torch.nn.Module, seed: int) -> None:
    """In place: linear/conv weights ~ N(0, 1/fan_in), norms 1 + N(0, 0.1^2), biases N(0, 0.02^2), embeddings and
    separators N(0, 1) (activations of order one through all layers, also in bf16)."""
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or ".layer_norm" in name or "layrnorm.weight" in name:
            p.normal_(1.0, 0.1, generator=gen)
        elif name.endswith(".bias"):
            p.normal_(0.0, 0.02, generator=gen)
        elif "tok_embeddings" in name or "embedding" in name or name.endswith("_GN"):
            p.normal_(0.0, 1.0, generator=gen)
        else:
            p.normal_(0.0, 1.0 / math.sqrt(math.prod(p.shape[1:])), generator=gen)


def mid_config() -> ModelConfig:
    """The CPU mid-size shape: hidden 1024 x 4 layers (8 query heads of 128, 2 KV heads, FFN 3584, PLoRA rank 64: the
    release's ratios at 1/4 width), ViT 256 x 4 layers (4 heads of 64), real 560/14 geometry and vocabulary."""
    vision = VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
    return ModelConfig(hidden_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                       intermediate_size=3584, plora_rank=64, plora_alpha=64, vision=vision)


def build_model(kind: str, device: torch.device, dtype: torch.dtype, layers: int | None, seed: int,
                vit_layers: int | None = None) -> IXCRewardModel:
    """Random-weight model built on the meta device, cast, then materialised on `device` in `dtype` (no fp32 copy of
    the 8B parameters on the host first)."""
    if kind == "real":
        cfg = ModelConfig(plora_rank=256, plora_alpha=256)
    elif kind == "mid":
        cfg = mid_config()
    elif kind == "tiny":
        cfg = tiny_config()
    else:
        raise ValueError(f"--model must be 'real', 'mid' or 'tiny', got {kind!r}")
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
        cfg.num_hidden_layers = layers
    if vit_layers is not None:
        if vit_layers < 1:
            raise ValueError(f"--vit-layers must be >= 1, got {vit_layers}")
        cfg.vision.num_hidden_layers = vit_layers
    model = meta_model(cfg, cfg.plora_rank)
    model = model.to(dtype).to_empty(device=device)
    init_random_(model, seed)
    return model.eval()


def param_counts(cfg: ModelConfig, rank: int) -> dict[str, int]:
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * D
    shapes = [(H, qkv), (cfg.num_attention_heads * D, H), (H, I), (H, I), (I, H)]  # (in, out) of the PLoRA linears
    v = cfg.vision
    return {
        "llm": cfg.num_hidden_layers * sum(i * o for i, o in shapes),
        "plora": cfg.num_hidden_layers * sum(rank * (i + o) for i, o in shapes),
        "vit_layer": 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size,
        "patch": 3 * v.patch_size**2 * v.hidden_size,
        "proj": v.merged_width * H + H * H,
    }


@dataclass(slots=True)
class FlopCount:
    llm: float = 0.0
    plora: float = 0.0
    attention: float = 0.0
    vit: float = 0.0
    projector: float = 0.0

    @property
    def total(self) -> float:
        return self.llm + self.plora + self.attention + self.vit + self.projector

    def add(self, other: FlopCount) -> None:
        for k in self.__slots__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


def sample_flops(cfg: ModelConfig, rank: int, n_tokens: int, image_grids: list[tuple[int, int]]) -> FlopCount:
    """FLOP_RULE for one sample of `n_tokens` tokens holding images with crop grids (h, w)."""
    pc = param_counts(cfg, rank)
    v = cfg.vision
    n_vit_tok = v.grid * v.grid + 1
    per_crop = v.num_hidden_layers * (2 * pc["vit_layer"] * n_vit_tok + 4 * n_vit_tok**2 * v.hidden_size)
    per_crop += 2 * v.grid * v.grid * pc["patch"]
    t_img = sum(image_token_count(h, w) for h, w in image_grids)
    crops = sum(1 + h * w for h, w in image_grids)
    return FlopCount(
        llm=2.0 * pc["llm"] * n_tokens,
        plora=2.0 * pc["plora"] * t_img,
        attention=4.0 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers * n_tokens * (n_tokens + 1) / 2,
        vit=float(per_crop * crops),
        projector=2.0 * pc["proj"] * t_img,
    )


def prepared_flops(cfg: ModelConfig, rank: int, preps: list[PreparedSample]) -> FlopCount:
    out = FlopCount()
    for p in preps:
        out.add(sample_flops(cfg, rank, p.n_tokens, [(m.h, m.w) for m in p.media]))
    return out


# --- timing -----------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def matmul_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Measured dense matmul FLOP/s in `dtype`: the MFU ceiling. CUDA: 8192^3, median of do_bench. CPU: 2048^3
    F.linear (the model's own op: oneDNN where the CPU has bf16 units; a bare bf16 `a @ b` can take a far slower
    path), the fastest of 5 calls (a shared CPU's median understates what the cores can do)."""
    n = 8192 if device.type == "cuda" else 2048
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    name = f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')} matmul"
    if device.type == "cuda":
        ms = do_bench_median(lambda: a @ b, device=device, warmup_ms=100, rep_ms=500)
        return 2.0 * n**3 / (ms * 1e-3), name + ", median of do_bench"
    with torch.inference_mode():
        torch.nn.functional.linear(a, b)
        secs = min(timed(lambda: torch.nn.functional.linear(a, b), device)[0] for _ in range(5))
    return 2.0 * n**3 / secs, name + " (F.linear), fastest of 5"


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- benchmark runs ---------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Row:
    bench: str
    scorer: str
    seconds: float
    items: int  # samples or candidates
    tokens: int  # tokens requested (the samples' full lengths)
    items_per_s: float
    tokens_per_s: float
    mfu: float | None = None
    speedup: float | None = None  # over the baseline row of the same bench
    extra: dict = field(default_factory=dict)


@dataclass(slots=True)
class Bench:
    model: IXCRewardModel
    tokenizer_path: str
    device: torch.device
    hd_num: int
    max_batch_tokens: int
    baseline_batch: int | None
    workers: int
    window: int
    peak_flops: float
    rank: int
    rows: list[Row] = field(default_factory=list)

    def engine(self, prefix_cache: bool = True) -> RewardEngine:
        cfg = EngineConfig(hd_num=self.hd_num, max_batch_tokens=self.max_batch_tokens, prefix_cache=prefix_cache,
                           workers=self.workers, window=self.window)
        return RewardEngine.from_model(self.model, self.tokenizer_path, config=cfg)

    def baseline(self) -> UpstreamBaseline:
        return UpstreamBaseline(self.model, Tokenizer.from_file(self.tokenizer_path), hd_num=self.hd_num,
                                batch_size=self.baseline_batch)

    def run_baseline(self, fn: Callable[[UpstreamBaseline], object]) -> tuple[float, object, UpstreamBaseline]:
        """Time fn(baseline); on out-of-memory halve the padded batch and run again (the batch used is reported)."""
        while True:
            base = self.baseline()
            try:
                secs, out = timed(functools.partial(fn, base), self.device)
                return secs, out, base
            except torch.cuda.OutOfMemoryError:
                free_memory(self.device)
                cur = self.baseline_batch or 1 << 30
                if cur <= 1:
                    raise
                self.baseline_batch = max(1, min(cur, 64) // 2)
                print(f"  baseline out of memory: padded batch now {self.baseline_batch}", flush=True)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        mfu = f"{100 * row.mfu:5.1f}%" if row.mfu is not None else "    - "
        spd = f"{row.speedup:6.2f}x" if row.speedup is not None else "     - "
        print(f"  {row.bench:<24} {row.scorer:<22} {row.items_per_s:9.3f} /s {row.tokens_per_s:11.1f} tok/s "
              f"MFU {mfu}  vs baseline {spd}  ({row.seconds:.2f} s)", flush=True)
        return row


def check_scores(name: str, scores) -> None:
    bad = [s for s in scores if not math.isfinite(s)]
    if bad:
        raise RuntimeError(f"{name}: {len(bad)} non-finite scores (random weights overflowed or a bug): {bad[:3]}")


def bench_corpus(b: Bench, tmp: Path, n: int, warm: int, seed: int, sources: list[Path], modes: list[str], *,
                 baseline: bool = True, warm_up: bool = True, tag: str = "") -> None:
    """(a): samples/s and tokens/s of engine vs baseline, end to end and model only, plus MFU. `tag` (the dtype in a
    --dtype fp32,bf16 run) is appended to the scorer names; baseline=False runs the engine only."""
    cfg = b.model.cfg
    samples = corpus_samples(tmp, n, seed, sources)
    warm_samples = corpus_samples(tmp, warm, seed + 1, sources)
    preps = b.engine(prefix_cache=False).engine.prepare(samples)
    errors = [p for p in preps if not isinstance(p, PreparedSample)]
    if errors:
        raise RuntimeError(f"corpus sample could not be prepared: {errors[0]}")
    tokens = sum(p.n_tokens for p in preps)
    flops = prepared_flops(cfg, b.rank, preps)
    print(f"(a) corpus: {n} single-image samples at hd_num {b.hd_num}, {tokens} tokens "
          f"({tokens / n:.0f} per sample, {sum(len(p.media) for p in preps)} images, "
          f"{sum(m.n_crops for p in preps for m in p.media)} crops); useful work {flops.total:.3e} FLOP "
          f"(LLM {flops.llm:.2e}, PLoRA {flops.plora:.2e}, attention {flops.attention:.2e}, ViT {flops.vit:.2e}, "
          f"projector {flops.projector:.2e})", flush=True)
    convs = [s.messages for s in samples]
    images = [s.media for s in samples]
    warm_convs, warm_images = [s.messages for s in warm_samples], [s.media for s in warm_samples]

    if warm_up:
        b.engine().score(warm_convs, warm_images, hd_num=b.hd_num)
        if baseline:
            b.run_baseline(lambda base: base.score_conversations(warm_convs, warm_images))
        free_memory(b.device)
    sfx = f" {tag}" if tag else ""

    for mode in modes:
        eng = b.engine()
        if mode == "end-to-end":
            secs_e, s_e = timed(functools.partial(eng.score, convs, images, hd_num=b.hd_num), b.device)
        else:
            secs_e, s_e = timed(functools.partial(eng.engine.score_prepared, preps), b.device)
        st = eng.stats()
        del eng
        free_memory(b.device)
        check_scores("engine", s_e)
        name = f"corpus {mode}"
        extra = {"tokens_computed": st["tokens_computed"], "batches": st["batches"],
                 "cpu_seconds": round(st["cpu_seconds"], 3), "gpu_seconds": round(st["gpu_seconds"], 3),
                 "scores": list(s_e)}
        if not baseline:
            b.add(Row(name, "engine" + sfx, secs_e, n, tokens, n / secs_e, tokens / secs_e,
                      mfu=flops.total / secs_e / b.peak_flops, extra=extra))
            print(f"    engine split: {st['cpu_seconds']:.2f} s preparation, {st['gpu_seconds']:.2f} s in the runner",
                  flush=True)
            continue
        if mode == "end-to-end":
            secs_b, s_b, base = b.run_baseline(lambda base: base.score_conversations(convs, images))
        else:
            base_preps = dense_crops(preps)  # upstream's float32 crops, made before timing as the engine's were
            secs_b, s_b, base = b.run_baseline(lambda base, bp=base_preps: base.score_prepared(bp))
        check_scores("baseline", s_b)
        diff = max(abs(x - y) for x, y in zip(s_e, s_b))
        b.add(Row(name, "upstream baseline" + sfx, secs_b, n, tokens, n / secs_b, tokens / secs_b,
                  mfu=flops.total / secs_b / b.peak_flops,
                  extra={"padded_tokens": base.stats.padded_tokens, "padded_batch": b.baseline_batch,
                         "vit_calls": base.stats.vit_calls}))
        extra["max_abs_score_diff_vs_baseline"] = diff
        b.add(Row(name, "engine" + sfx, secs_e, n, tokens, n / secs_e, tokens / secs_e,
                  mfu=flops.total / secs_e / b.peak_flops, speedup=secs_b / secs_e, extra=extra))
        print(f"    engine split: {st['cpu_seconds']:.2f} s preparation, {st['gpu_seconds']:.2f} s in the runner; "
              f"baseline ran {base.stats.padded_tokens} padded tokens for {tokens} real; "
              f"max |score engine - baseline| {diff:.3g}", flush=True)


def bench_best_of_n(b: Bench, tmp: Path, ns: list[int], seed: int, sources: list[Path], *, baseline: bool = True,
                    warm_up: bool = True, tag: str = "") -> None:
    """(b): candidates/s with sharing on vs off vs the baseline, N candidates on one image prompt."""
    sfx = f" {tag}" if tag else ""
    for mode_seed, run in enumerate(("warm-up", *ns)):
        if run == "warm-up" and not warm_up:
            continue
        n = 2 if run == "warm-up" else run
        messages, cands, photo = best_of_n_request(tmp, n, seed + 1000 + mode_seed, sources)
        figures: dict[str, tuple[float, int, dict]] = {}
        for scorer in ("sharing on", "sharing off"):
            eng = b.engine(prefix_cache=scorer == "sharing on")
            call = functools.partial(eng.best_of_n, messages, cands, images=[photo], hd_num=b.hd_num)
            secs, (_, scores) = timed(call, b.device)
            check_scores(scorer, scores)
            figures[scorer] = (secs, eng.stats()["tokens_requested"], eng.stats())
            del eng
            free_memory(b.device)
        if baseline:
            secs, scores, base = b.run_baseline(functools.partial(UpstreamBaseline.best_of_n, messages=messages,
                                                                  candidates=cands, images=[photo]))
            check_scores("baseline", scores)
            figures["upstream baseline"] = (secs, base.stats.tokens, base.stats.as_dict())
        if run == "warm-up":
            continue
        name = f"best-of-{n}"
        base_secs = figures["upstream baseline"][0] if baseline else None
        for scorer in ("upstream baseline", "sharing off", "sharing on"):
            if scorer not in figures:
                continue
            secs, tokens, st = figures[scorer]
            extra = {"tokens_computed": st["tokens_computed"], "prefix_tokens_reused": st["prefix_tokens_reused"]} \
                if scorer != "upstream baseline" else {"padded_tokens": st["padded_tokens"]}
            if scorer == "sharing on":
                extra["speedup_vs_sharing_off"] = figures["sharing off"][0] / secs
            speedup = None if scorer == "upstream baseline" or base_secs is None else base_secs / secs
            b.add(Row(name, ("engine " + scorer if scorer != "upstream baseline" else scorer) + sfx, secs, n, tokens,
                      n / secs, tokens / secs, speedup=speedup, extra=extra))
        on, off = figures["sharing on"], figures["sharing off"]
        print(f"    sharing on/off: {off[0] / on[0]:.2f}x candidates/s; tokens computed {on[2]['tokens_computed']} vs "
              f"{off[2]['tokens_computed']} of {on[1]} requested", flush=True)


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", choices=("real", "mid", "tiny"), default=None,
                    help="default: real on CUDA, tiny on CPU; mid: hidden 1024 x 4 layers, ViT 256 x 4 (mid_config)")
    ap.add_argument("--layers", type=int, default=None, help="LLM layers (default: the config's, 32 for real)")
    ap.add_argument("--vit-layers", type=int, default=None, help="ViT layers (default: the config's, 24 for real)")
    ap.add_argument("--dtype", default=None,
                    help="bf16, fp32, or a comma list such as fp32,bf16: every dtype runs on the same weights "
                    "(rounded), interleaved within each round (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every timed call this many times, dtypes interleaved (their order alternating "
                    "between rounds); the summary gives medians (default 1)")
    ap.add_argument("--baseline-dtype", default=None,
                    help="the dtype(s) the baseline runs in, comma separated, or none (default: the first of "
                    "--dtype)")
    ap.add_argument("--n-samples", type=int, default=None, help="corpus samples (default 48 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup-samples", type=int, default=None, help="default 4 on CUDA, 1 on CPU")
    ap.add_argument("--ns", default=None, help="best-of-N candidate counts, comma separated (default 4,8,16 on "
                    "CUDA, 4,8 on CPU)")
    ap.add_argument("--hd-num", type=int, default=9)
    ap.add_argument("--baseline-batch", type=int, default=None,
                    help="samples per right-padded baseline batch (default 4; 0: the whole request as upstream, which "
                    "on a CPU needs ~10 bytes x 32 heads x B x L^2 for eager attention: over 50 GB for 16 x 3.2k "
                    "tokens; on a GPU the baseline attends with flash attention per sequence, as upstream)")
    ap.add_argument("--max-batch-tokens", type=int, default=16384)
    ap.add_argument("--workers", type=int, default=0, help="engine preprocessing processes (EngineConfig.workers)")
    ap.add_argument("--window", type=int, default=EngineConfig().window,
                    help="samples per engine window (EngineConfig.window); with --workers the next window is "
                    "prepared while the current one runs")
    ap.add_argument("--media-dir", default=None, help="crop photos from this folder instead of synthetic ones")
    ap.add_argument("--skip", choices=("end-to-end", "model-only", "best-of-n"), action="append", default=[],
                    help="leave out a part (repeatable)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 on CPU: steady timings on a shared machine; "
                    "torch's own on CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write all figures to this JSON file")
    args = ap.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA GPU")
    gpu = args.device.type == "cuda"
    args.model = args.model or ("real" if gpu else "tiny")
    names = {"bf16": torch.bfloat16, "fp32": torch.float32}
    dtype_list = [x.strip() for x in (args.dtype or ("bf16" if gpu else "fp32")).split(",") if x.strip()]
    base_list = [x.strip() for x in (args.baseline_dtype or dtype_list[0]).split(",") if x.strip()]
    base_list = [] if base_list == ["none"] else base_list
    for x in dtype_list + base_list:
        if x not in names:
            ap.error(f"--dtype / --baseline-dtype: unknown dtype {x!r} (bf16 or fp32)")
    if len(set(dtype_list)) != len(dtype_list) or not set(base_list) <= set(dtype_list):
        ap.error("--dtype: each dtype once; --baseline-dtype: a subset of --dtype")
    args.dtypes = [names[x] for x in dtype_list]
    args.baseline_dtypes = [names[x] for x in base_list]
    args.dtype = args.dtypes[0]
    args.n_samples = args.n_samples if args.n_samples is not None else (48 if gpu else 3)
    args.warmup_samples = args.warmup_samples if args.warmup_samples is not None else (4 if gpu else 1)
    args.ns = args.ns or ("4,8,16" if gpu else "4,8")
    args.threads = args.threads if args.threads is not None or gpu else 1
    if args.baseline_batch is None:
        args.baseline_batch = 4
    args.baseline_batch = args.baseline_batch or None
    try:
        args.ns = [int(x) for x in args.ns.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--ns must be comma-separated integers, got {args.ns!r}")
    for name in ("n_samples", "warmup_samples", "hd_num", "max_batch_tokens", "window", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.ns or min(args.ns) < 1:
        ap.error(f"--ns needs positive candidate counts, got {args.ns}")
    return args


def _dt(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype).removeprefix("torch."))


def kendall_tau(a, b) -> float:
    """Kendall's tau-a of two score lists (O(n^2)): 1 = same order, -1 = reversed; ties count as discordant-free 0."""
    n, s = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            s += int(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]))
    return s / (n * (n - 1) / 2) if n > 1 else 1.0


def summarize(rows: list[Row], peaks: dict[str, float], dtypes: list[str]) -> dict:
    """Medians over rounds per (bench, scorer), and the same-run ratios: each dtype's engine vs the first dtype's
    engine and vs the baseline, each from per-round medians."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.bench, r.scorer), []).append(r)
    med = {}
    print("summary (medians over rounds):", flush=True)
    for (bench, scorer), rs in groups.items():
        secs = float(np.median([r.seconds for r in rs]))
        mfus = [r.mfu for r in rs if r.mfu is not None]
        entry = {"bench": bench, "scorer": scorer, "rounds": len(rs), "median_seconds": secs,
                 "seconds": [round(r.seconds, 3) for r in rs], "items_per_s": rs[0].items / secs,
                 "tokens_per_s": rs[0].tokens / secs, "mfu": float(np.median(mfus)) if mfus else None}
        gpu = [r.extra.get("gpu_seconds") for r in rs if r.extra.get("gpu_seconds") is not None]
        if gpu:
            entry["median_runner_seconds"] = float(np.median(gpu))
        med[(bench, scorer)] = entry
        mfu = f"MFU {100 * entry['mfu']:5.1f}%" if entry["mfu"] is not None else "           "
        print(f"  {bench:<24} {scorer:<27} {entry['items_per_s']:9.3f} /s {entry['tokens_per_s']:10.1f} tok/s {mfu}"
              f"  median of {len(rs)}: {secs:.2f} s {entry['seconds']}", flush=True)
    ratios = []
    benches = list(dict.fromkeys(r.bench for r in rows))
    first = dtypes[0]
    for bench in benches:
        for scorer_base in ("engine", "engine sharing on", "engine sharing off"):
            ref = med.get((bench, f"{scorer_base} {first}")) if len(dtypes) > 1 else med.get((bench, scorer_base))
            for d in dtypes[1:]:
                cur = med.get((bench, f"{scorer_base} {d}"))
                if ref is None or cur is None:
                    continue
                line = {"bench": bench, "what": f"{scorer_base} {d} vs {first}",
                        "ratio": ref["median_seconds"] / cur["median_seconds"]}
                if "median_runner_seconds" in ref and "median_runner_seconds" in cur:
                    line["runner_ratio"] = ref["median_runner_seconds"] / cur["median_runner_seconds"]
                ratios.append(line)
            for d in dtypes:
                name = f"{scorer_base} {d}" if len(dtypes) > 1 else scorer_base
                cur = med.get((bench, name))
                for bd in dtypes:
                    base = med.get((bench, f"upstream baseline {bd}" if len(dtypes) > 1 else "upstream baseline"))
                    if cur is None or base is None:
                        continue
                    ratios.append({"bench": bench, "what": f"{name} vs upstream baseline"
                                   + (f" {bd}" if len(dtypes) > 1 else ""),
                                   "ratio": base["median_seconds"] / cur["median_seconds"]})
    for r in ratios:
        extra = f" (runner time {r['runner_ratio']:.2f}x)" if "runner_ratio" in r else ""
        print(f"  {r['bench']:<24} {r['what']:<45} {r['ratio']:6.2f}x{extra}", flush=True)
    agreement = []
    if len(dtypes) > 1:  # scores of the same samples in each dtype (same weights, rounded): rank and relative gap
        for bench in benches:
            ref = [r for r in rows if r.bench == bench and r.scorer == f"engine {first}" and "scores" in r.extra]
            for d in dtypes[1:]:
                cur = [r for r in rows if r.bench == bench and r.scorer == f"engine {d}" and "scores" in r.extra]
                if ref and cur:
                    a, b = np.array(ref[0].extra["scores"]), np.array(cur[0].extra["scores"])
                    rel = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-6)))
                    agreement.append({"bench": bench, "what": f"{d} vs {first}", "max_rel_diff": rel,
                                      "kendall_tau": kendall_tau(a, b), "n": len(a)})
                    print(f"  {bench:<24} scores {d} vs {first}: max relative difference {rel:.3g}, Kendall tau "
                          f"{agreement[-1]['kendall_tau']:.3f} over {len(a)} samples", flush=True)
    return {"medians": list(med.values()), "ratios": ratios, "agreement": agreement,
            "peaks": {d: peaks[d] for d in dtypes}}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    dev = args.device
    if dev.type == "cpu":
        print("NOTE: CPU run: torch reference ops; figures say nothing about GPU performance.", flush=True)
    first = build_model(args.model, dev, args.dtypes[0], args.layers, args.seed, args.vit_layers)
    models = {_dt(args.dtypes[0]): first}
    for d in args.dtypes[1:]:  # the same weights, rounded to d
        m = build_model(args.model, dev, d, args.layers, args.seed, args.vit_layers)
        with torch.no_grad():
            for (_, pa), (_, pb) in zip(first.named_parameters(), m.named_parameters()):
                pb.copy_(pa)
        models[_dt(d)] = m
    cfg = first.cfg
    rank = first.model.layers[0].attention.wqkv.Plora_A.weight.shape[0]
    n_params = sum(p.numel() for p in first.parameters())
    dts = list(models)
    print(f"model: {args.model}, {cfg.num_hidden_layers} LLM layers, hidden {cfg.hidden_size}, PLoRA rank {rank}, "
          f"ViT {cfg.vision.num_hidden_layers}x{cfg.vision.hidden_size}; {n_params / 1e9:.3f}B params in "
          f"{', '.join(dts)} on {dev} ({machine().get('gpu', platform.processor() or 'cpu')}), torch threads "
          f"{torch.get_num_threads()}, built in {time.perf_counter() - t_start:.1f} s; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    peaks, peak_how = {}, {}
    for _ in range(2 if len(dts) > 1 else 1):  # interleaved: a burst of load hits every dtype
        for d, dtype in zip(dts, args.dtypes):
            f, how = matmul_peak(dev, dtype)
            peaks[d], peak_how[d] = max(peaks.get(d, 0.0), f), how
    pc = param_counts(cfg, rank)
    per_tok = 2.0 * pc["llm"]
    for d in dts:
        print(f"peak {d}: {peaks[d] / 1e12:.3f} TFLOP/s ({peak_how[d]}); LLM linear FLOPs per token {per_tok:.3e} -> "
              f"at most {peaks[d] / per_tok:.0f} tokens/s before attention, ViT and PLoRA", flush=True)
    print("FLOP rule: " + FLOP_RULE, flush=True)
    attn = "eager attention" if dev.type == "cpu" else "flash attention per sequence"
    print(f"baseline: right-padded batches of {args.baseline_batch or 'the whole request'} samples, {attn}, "
          f"per-image ViT, in {', '.join(_dt(x) for x in args.baseline_dtypes) or 'no dtype (not run)'}; engine: "
          f"max_batch_tokens {args.max_batch_tokens}, workers {args.workers}, window {args.window}", flush=True)
    benches = {d: Bench(models[d], str(PACKAGED_TOKENIZER), dev, args.hd_num, args.max_batch_tokens,
                        args.baseline_batch, args.workers, args.window, peaks[d], rank) for d in dts}
    with_base = {_dt(x) for x in args.baseline_dtypes}
    tag = len(dts) > 1
    sources = source_photos(args.media_dir)
    loads = []
    with tempfile.TemporaryDirectory(prefix="ixc_bench_") as tmp:
        modes = [m for m in ("end-to-end", "model-only") if m not in args.skip]
        for rnd in range(args.rounds):
            order = dts if rnd % 2 == 0 else dts[::-1]
            loads.append(os.getloadavg()[0])
            if args.rounds > 1:
                print(f"--- round {rnd + 1} of {args.rounds} (order {', '.join(order)}; load average {loads[-1]:.2f})",
                      flush=True)
            if modes:
                for d in order:
                    bench_corpus(benches[d], Path(tmp), args.n_samples, args.warmup_samples, args.seed, sources,
                                 modes, baseline=d in with_base, warm_up=rnd == 0, tag=d if tag else "")
            if "best-of-n" not in args.skip:
                print(f"(b) best-of-N on one image prompt at hd_num {args.hd_num}, N = {args.ns}", flush=True)
                for d in order:
                    bench_best_of_n(benches[d], Path(tmp), args.ns, args.seed, sources, baseline=d in with_base,
                                    warm_up=rnd == 0, tag=d if tag else "")
    loads.append(os.getloadavg()[0])
    rows = [r for d in dts for r in benches[d].rows]
    summary = summarize(rows, peaks, dts)
    wall = time.perf_counter() - t_start
    print(f"total wall time {wall:.1f} s; load average at each round's start and the end: "
          f"{', '.join(f'{x:.2f}' for x in loads)}", flush=True)
    result = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "device": str(dev),
        "model": args.model,
        "layers": cfg.num_hidden_layers,
        "vit_layers": cfg.vision.num_hidden_layers,
        "dtype": dts[0] if len(dts) == 1 else dts,
        "hd_num": args.hd_num,
        "peak_flops": peaks[dts[0]],
        "peak_how": peak_how[dts[0]],
        "peaks": peaks,
        "flop_rule": FLOP_RULE,
        "baseline_batch": benches[dts[0]].baseline_batch,
        "max_batch_tokens": args.max_batch_tokens,
        "rounds": args.rounds,
        "load_averages": loads,
        "wall_seconds": wall,
        "summary": summary,
        "rows": [asdict(r) for r in rows],
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
