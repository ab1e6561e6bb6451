"""A modelled roofline of the engine's own GPU code path, runnable on a CPU (no GPU: every figure is a MODEL).

    python bench/roofline.py [--json PATH] [--corpus-samples 12]

The released architecture (InternLM2-7B + PLoRA rank 256, CLIP ViT-L/14-560, `ModelConfig()` defaults) is built on
the `meta` device in bf16 and run through the engine's own scoring path with backend "triton": `ScoringEngine` ->
`ModelRunner` -> `IXCRewardModel` -> the kernels' host wrappers, the same code a GPU runs (not a copy). Meta tensors
have shapes but no storage, so every device op is recorded instead of run:
- aten ops through a `TorchDispatchMode`: FLOPs as `torch.utils.flop_counter` counts them (matmul-class ops only),
  bytes = the sizes of every input and output tensor; views and allocations are free and are not launches; a copy
  from a CPU tensor is a host-to-device transfer (PCIe bandwidth); in-place scatters (`index_add_`, `index_put_`,
  `index_copy_`) count the rows they touch, not their whole destination.
- `F.scaled_dot_product_attention` on meta tensors would decompose into the math path, which CUDA does not run for
  bf16 without a mask: it is recorded as the flash kernel CUDA picks (FLOPs of the attended pairs: all pairs, or the
  causal half with is_causal; bytes = q, k, v and the output).
- every Triton launch through the hook in its host wrapper (`ixc_engine.kernels._meta`): (kernel, FLOPs, bytes)
  from the launch shapes.
Per op, modelled time = max(FLOPs / matmul rate, bytes / (efficiency x HBM peak), launch floor) for a named GPU, the
assumptions in `Assumptions`. The host time to issue one batch's ops is measured on this CPU by running the same
path on meta tensors without recording (Python, dispatcher and the runner's own host work; no CUDA driver).

The ceiling: every token pays at least 2 FLOPs per decoder weight it passes (the linears of all layers plus the
PLoRA A and B on image tokens), at the dense bf16 rate: ceiling tok/s = peak / (2 * (P_linears + P_plora)), computed
from the config (the design's "2 x 8e9 FLOPs at 790 TFLOP/s ~ 49k tok/s" rounds P up to 8e9).
`bench/upstream_baseline.py` (upstream's algorithm: per-sample ViT, right-padded batches, flash attention per
sequence as upstream's flash_attention_2 path) is modelled the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))

from upstream_baseline import UpstreamBaseline

from ixc_engine.config import ModelConfig
from ixc_engine.engine.engine import EngineConfig, ScoringEngine
from ixc_engine.engine.runner import ModelRunner
from ixc_engine.engine.sequence import PreparedSample
from ixc_engine.media.image import CROP, MediaCrops, hd_canvas_size
from ixc_engine.models.reward_model import IXCRewardModel, meta_model
from ixc_engine.template import build_sample
from ixc_engine.tiny import PACKAGED_TOKENIZER
from ixc_engine.tokenizer import Tokenizer

aten = torch.ops.aten
META = torch.device("meta")
GPUS = ("H100", "H200")


@dataclass(slots=True, frozen=True)
class Assumptions:
    """Everything the model assumes (written to --json as it is)."""

    matmul_flops_per_s: float = 700e12  # matmul-class ops (~89% of the 790 TFLOP/s a large bf16 GEMM reaches)
    ceiling_flops_per_s: float = 790e12  # dense bf16 matmul peak measured on H100/H200 machines (the ceiling)
    hbm_bytes_per_s: tuple[tuple[str, float], ...] = (("H100", 3.35e12), ("H200", 4.8e12))  # H100 SXM, H200
    hbm_efficiency: float = 0.8  # share of the HBM peak a streaming kernel reaches
    launch_floor_s: float = 2e-6  # no kernel takes less
    pcie_bytes_per_s: float = 25e9  # host-to-device copies (PCIe Gen5 x16, pageable memory)
    # Host: the run's Python measured on this CPU, plus the CPU cost of each launch, which a meta run cannot show
    host_aten_launch_s: float = 5e-6  # an eager aten op on CUDA: dispatcher + cudaLaunchKernel
    host_triton_launch_s: float = 15e-6  # a Triton JIT launch from Python (argument binding, cache look-up)
    dtype: str = "bfloat16"
    backend: str = "triton"
    hd_num: int = 9
    corpus_samples: int = 12  # single-image samples, photo sizes cycled from bench_e2e.SIZES
    max_batch_tokens: int = 16384  # EngineConfig default
    bon_n: int = 8
    bon_image: tuple[int, int] = (1920, 1080)  # 2861 image tokens at hd_num 9
    bon_reply_words: int = 290  # ~300 tokens a reply (a word of WORDS is about one token)
    baseline_batch: int = 4  # the baseline's right-padded batch (bench_e2e's GPU default)

    def hbm(self, gpu: str) -> float:
        return dict(self.hbm_bytes_per_s)[gpu]


PARTS = {
    "base_gemm": "LLM base GEMMs",
    "plora_gemm": "PLoRA GEMMs",
    "plora_gather_scatter": "PLoRA gather/scatter",
    "glue": "norms/RoPE/act/residual glue",
    "attention": "attention",
    "vit": "ViT + projector",
    "h2d": "host-to-device copies",
    "other": "embed/pack/score/metadata",
}

# Ops that launch nothing: allocations and metadata-only results (views are found by their schema).
_FREE = {aten.empty.memory_format, aten.empty_strided.default, aten._unsafe_view.default, aten.detach.default,
         aten.lift_fresh.default, aten.alias.default, aten.empty_like.default, aten.new_empty.default,
         aten.new_empty_strided.default, aten.set_.source_Storage_storage_offset}
# In-place scatters: they read and write only the destination rows they touch.
_SCATTER = {aten.index_add_.default, aten.index_copy_.default, aten.index_put_.default,
            aten._index_put_impl_.default}
# Gathers: they read only the rows of their table (first argument) that they return.
_GATHER = {aten.embedding.default, aten.index_select.default, aten.index.Tensor}
_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd
_MM = {aten.mm.default, aten.mm.out, aten.addmm.default}


def _tensors(tree, acc: list | None = None) -> list[torch.Tensor]:
    """The tensors in nested lists, tuples and dicts (a faster tree_flatten for op arguments)."""
    acc = [] if acc is None else acc
    if isinstance(tree, torch.Tensor):
        acc.append(tree)
    elif isinstance(tree, (list, tuple)):
        for t in tree:
            _tensors(t, acc)
    elif isinstance(tree, dict):
        for t in tree.values():
            _tensors(t, acc)
    return acc


def _size(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(slots=True)
class Op:
    name: str
    part: str
    flops: int
    nbytes: int
    h2d: bool = False
    in_layer: bool = False
    triton: bool = False  # a Triton launch (or the flash kernel SDPA picks), not an aten op
    plora_share: float = 0.0  # a base GEMM with PLoRA's B fused in (K = rank + in): B's share of its FLOPs


def attention_pairs(lq: int, lk: int, causal: bool) -> int:
    """(query, key) pairs an attention kernel computes; causal: bottom-right aligned as flash does (lq <= lk)."""
    if not causal:
        return lq * lk
    return lq * (lk - lq) + lq * (lq + 1) // 2


def _sdpa_as_flash(rec: Recorder, args, kwargs) -> torch.Tensor:
    """aten.scaled_dot_product_attention on meta tensors would decompose into the math path, which CUDA does not run
    for bf16: record the flash kernel CUDA picks and return an empty result."""
    q, k, v = args[:3]
    mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
    causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
    # CUDA's flash kernel allocates its output as [..., L, H, D] and returns the [..., H, L, D] view of it
    out = q.new_empty((*q.shape[:-3], q.shape[-2], q.shape[-3], v.shape[-1])).transpose(-2, -3)
    heads, batch = q.shape[-3], math.prod(q.shape[:-3])
    flops = 2 * batch * heads * (q.shape[-1] + v.shape[-1]) * attention_pairs(q.shape[-2], k.shape[-2], causal)
    extra = [mask] if isinstance(mask, torch.Tensor) else []
    rec.record_kernel("sdpa_flash", flops, sum(_size(t) for t in (q, k, v, out, *extra)), triton=False)
    return out


class Recorder(TorchDispatchMode):
    """Records every device op of the run it wraps, tagged with the module scope it ran in."""

    def __init__(self, unscoped: str = "other", cfg: ModelConfig | None = None) -> None:
        super().__init__()
        # PLoRA rank and the linears' input widths: to tell PLoRA's share of the fused GEMMs
        self.rank = cfg.plora_rank if cfg is not None else 0
        self.in_features = {cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.intermediate_size} if cfg \
            else set()
        self.unscoped = unscoped  # the part of non-matmul ops outside the model's modules
        self.ops: list[Op] = []
        self.scope: list[str] = []
        self.in_ops_seconds = 0.0  # wall time inside device ops (meta kernels run in Python here, not on a GPU)
        self._depth = 0
        self._cache: dict = {}
        self.n_dispatch = 0  # ops that entered this mode from the traced code

    # --- module scopes (forward hooks on the modules of the model) ---------------------------------------------
    def attach(self, model: torch.nn.Module) -> list:
        handles = []
        for m in model.modules():
            name = type(m).__name__
            handles.append(m.register_forward_pre_hook(lambda _m, _a, n=name: self._enter(n)))
            handles.append(m.register_forward_hook(lambda _m, _a, _o: self._leave()))
        return handles

    def _enter(self, name: str) -> None:
        self.scope.append(name)

    def _leave(self) -> None:
        self.scope.pop()

    def classify(self, name: str, flops: int, h2d: bool) -> str:
        s = self.scope
        if h2d:
            return "h2d"
        if "CLIPVisionTransformer" in s or "VisionProjector" in s:
            return "vit"
        if name in ("paged_prefix_attention", "write_kv_cache", "sdpa_flash"):
            return "attention"
        if "plora" in name.lower():
            return "plora_gemm" if flops else "plora_gather_scatter"
        if "PLoRALinear" in s:
            if s[-1] == "Linear":  # Plora_A / Plora_B
                return "plora_gemm" if flops else "plora_gather_scatter"
            return "base_gemm" if flops else "plora_gather_scatter"
        if "DecoderLayer" in s or "InternLM2Model" in s:
            return "base_gemm" if flops else "glue"
        return "base_gemm" if flops else self.unscoped

    def _add(self, name: str, flops: int, nbytes: int, h2d: bool = False, triton: bool = False, part: str | None = None,
             plora_share: float = 0.0) -> None:
        self.ops.append(Op(name, part or self.classify(name, flops, h2d), flops, nbytes, h2d,
                           "DecoderLayer" in self.scope, triton, plora_share))

    def record_kernel(self, name: str, flops: int, nbytes: int, triton: bool = True) -> None:
        """Called by the Triton host wrappers on meta tensors (ixc_engine.kernels._meta.record_launch)."""
        t0 = time.thread_time()
        self._add(name, flops, nbytes, triton=triton)
        self.in_ops_seconds += time.thread_time() - t0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._depth:
            return self._dispatch(func, args, kwargs)
        self.n_dispatch += 1
        t0 = time.thread_time()
        self._depth += 1
        try:
            out = self._dispatch(func, args, kwargs)
        finally:
            self._depth -= 1
        if any(t.is_meta for t in _tensors((args, kwargs, out))):
            self.in_ops_seconds += time.thread_time() - t0
        return out

    def _run_cached(self, func, args, kwargs):
        """func(*args, **kwargs), but a meta op that returns fresh tensors is computed once per distinct signature:
        meta kernels run as Python references (~1 ms each here), and 32 layers repeat the same shapes."""
        if func.is_view or func._schema.is_mutable or func in _FREE:
            return func(*args, **kwargs)
        leaves = tree_flatten((args, kwargs))[0]
        if not any(isinstance(t, torch.Tensor) and t.is_meta for t in leaves):
            return func(*args, **kwargs)
        try:
            key = (func, *((t.shape, t.stride(), t.dtype, t.device.type, t.storage_offset())
                           if isinstance(t, torch.Tensor) else t for t in leaves))
            hit = self._cache.get(key)
        except TypeError:  # an unhashable argument
            return func(*args, **kwargs)
        if hit is None:
            out = func(*args, **kwargs)
            flat, spec = tree_flatten(out)
            if not all(isinstance(t, torch.Tensor) and t.is_meta or not isinstance(t, torch.Tensor) for t in flat):
                return out
            self._cache[key] = ([(t.shape, t.stride(), t.dtype) if isinstance(t, torch.Tensor) else t for t in flat],
                                spec)
            return out
        flat, spec = hit
        return tree_unflatten([torch.empty_strided(t[0], t[1], dtype=t[2], device=META) if isinstance(t, tuple)
                               and len(t) == 3 and isinstance(t[2], torch.dtype) else t for t in flat], spec)

    def _dispatch(self, func, args, kwargs):
        ins = _tensors((args, kwargs))
        if func is aten.scaled_dot_product_attention.default and ins[0].is_meta:
            return _sdpa_as_flash(self, args, kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _COMPOSITE):
            # Under inference_mode composite ops (linear, reshape, to, matmul, ...) reach this mode whole; run their
            # decomposition here so that what they launch (mm, a copy, or nothing for a view) is seen.
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = self._run_cached(func, args, kwargs)
        if func in _FREE or func.is_view:
            return out
        outs = _tensors(out)
        if not any(t.is_meta for t in outs + ins):
            return out  # host-side tensor math (metadata built on the CPU)
        cpu_in = [t for t in ins if not t.is_meta]
        if cpu_in and all(t.is_meta for t in outs):
            self._add(str(func.overloadpacket), 0, sum(_size(t) for t in cpu_in), h2d=True)
            return out
        flops = 0
        fn = flop_registry.get(func.overloadpacket)
        if fn is not None:
            flops = int(fn(*args, **kwargs, out_val=out))
        if flops and "PLoRALinear" in self.scope and func in _MM and self.rank:
            a, b = (args[1], args[2]) if func is aten.addmm.default else (args[0], args[1])
            if b.shape[1] == self.rank:  # PLoRA A (fused layout: A x is its own small GEMM)
                self._add("plora_A." + str(func.overloadpacket), flops, self._bytes(func, ins, outs), part="plora_gemm")
                return out
            if a.shape[1] > self.rank and a.shape[1] - self.rank in self.in_features:  # [a | x] @ [B | W]^T
                self._add(str(func.overloadpacket), flops, self._bytes(func, ins, outs),
                          plora_share=self.rank / a.shape[1])
                return out
        self._add(str(func.overloadpacket), flops, self._bytes(func, ins, outs))
        return out

    @staticmethod
    def _bytes(func, ins, outs) -> int:
        if func in _SCATTER:  # self is read and written only where indexed: twice the source's size
            return sum(_size(t) for t in ins[1:]) + 2 * _size(ins[-1])
        if func in _GATHER:  # the table is read only where indexed: as much as the output
            return sum(_size(t) for t in ins[1:]) + 2 * sum(_size(t) for t in outs)
        return sum(_size(t) for t in ins) + sum(_size(t) for t in outs)


# --- the model of time ---------------------------------------------------------------------------------------------
def op_seconds(op: Op, a: Assumptions, gpu: str) -> float:
    if op.h2d:
        return max(op.nbytes / a.pcie_bytes_per_s, a.launch_floor_s)
    return max(op.flops / a.matmul_flops_per_s, op.nbytes / (a.hbm_efficiency * a.hbm(gpu)), a.launch_floor_s)


def param_counts(cfg: ModelConfig, rank: int) -> dict[str, int]:
    """Matmul weights a token passes: decoder linears, and PLoRA A + B (image tokens only)."""
    h, d = cfg.hidden_size, cfg.head_dim
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    shapes = [(h, qkv), (cfg.num_attention_heads * d, h), (h, cfg.intermediate_size), (h, cfg.intermediate_size),
              (cfg.intermediate_size, h)]  # (in, out) of wqkv, wo, w1, w3, w2
    return {"linears": cfg.num_hidden_layers * sum(i * o for i, o in shapes),
            "plora": cfg.num_hidden_layers * sum(rank * (i + o) for i, o in shapes)}


def ceiling_tokens_per_s(cfg: ModelConfig, rank: int, a: Assumptions) -> float:
    p = param_counts(cfg, rank)
    return a.ceiling_flops_per_s / (2 * (p["linears"] + p["plora"]))


@dataclass(slots=True)
class Measured:
    """One recorded run of a workload."""

    ops: list[Op]
    tokens: int  # tokens computed by the LLM
    samples: int
    batches: int
    layers_run: int  # decoder layer forwards (layers x LLM forwards)
    host_python_seconds: float = 0.0  # the run's own host work on this CPU (device ops and recording excluded)


def summarise(m: Measured, a: Assumptions, gpu: str, ceiling: float) -> dict:
    parts: dict[str, dict] = {k: {"us_per_token": 0.0, "launches": 0, "flops": 0, "bytes": 0} for k in PARTS}
    total = 0.0
    for op in m.ops:
        t = op_seconds(op, a, gpu)
        total += t
        p = parts[op.part]
        f = op.plora_share  # a base GEMM with PLoRA B fused in: B's share of time and FLOPs goes to PLoRA GEMMs
        p["us_per_token"] += (1 - f) * t * 1e6 / m.tokens
        p["launches"] += 1
        p["flops"] += round((1 - f) * op.flops)
        p["bytes"] += op.nbytes
        if f:
            parts["plora_gemm"]["us_per_token"] += f * t * 1e6 / m.tokens
            parts["plora_gemm"]["flops"] += round(f * op.flops)
    us = total * 1e6 / m.tokens
    for p in parts.values():
        p["share"] = p["us_per_token"] / us
    device_per_batch = total / m.batches
    n_triton = sum(op.triton for op in m.ops)
    launch_cpu = n_triton * a.host_triton_launch_s + (len(m.ops) - n_triton) * a.host_aten_launch_s
    host_per_batch = (m.host_python_seconds + launch_cpu) / m.batches
    tps = 1e6 / us
    return {
        "label": "model",
        "us_per_token": us, "tokens_per_s": tps, "pct_of_ceiling": 100 * tps / ceiling,
        "tokens": m.tokens, "samples": m.samples, "batches": m.batches,
        "device_ms_per_batch": device_per_batch * 1e3, "host_ms_per_batch": host_per_batch * 1e3,
        "host_over_device": host_per_batch / device_per_batch,
        "host_python_ms_per_batch": m.host_python_seconds / m.batches * 1e3,
        "host_launch_ms_per_batch": launch_cpu / m.batches * 1e3,
        "launches_per_decoder_layer": sum(op.in_layer for op in m.ops) / max(m.layers_run, 1),
        "bytes_per_token": sum(op.nbytes for op in m.ops) / m.tokens,
        "flops_per_token": sum(op.flops for op in m.ops) / m.tokens,
        "parts": parts,
    }


# --- workloads -----------------------------------------------------------------------------------------------------
SIZES = [(1920, 1080), (1280, 960), (1024, 768), (1080, 1350), (800, 600), (1600, 1200), (2048, 1365), (720, 1280),
         (1280, 720), (640, 480), (3000, 2000), (1000, 1000)]  # as bench_e2e.SIZES (width, height), cycled
WORDS = ("the", "a", "small", "red", "large", "blue", "car", "street", "building", "person", "dog", "tree", "sky",
         "window", "light", "shadow", "left", "right", "behind", "near", "holds", "looks", "shows", "image",
         "picture", "photo", "detail", "colour", "bright", "dark", "wooden", "metal", "glass", "road", "sign", "two",
         "three", "people", "standing", "sitting", "walking", "front", "background", "corner", "center", "table",
         "water", "mountain", "cloud")


def _text(n_words: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + 13 * i) % len(WORDS)] for i in range(n_words)) + "."


def _media(width: int, height: int, hd_num: int) -> MediaCrops:
    cw, ch = hd_canvas_size(width, height, hd_num)
    h, w = ch // CROP, cw // CROP
    # The crops' values never matter here; an uninitialised host buffer has the real size (the H2D copy counts it).
    return MediaCrops(torch.empty(1 + h * w, 3, CROP, CROP), h, w)


def _prepared(tok: Tokenizer, messages: list[dict], media: MediaCrops, digest: str, hd_num: int, sid) -> PreparedSample:
    templ = build_sample(tok, messages, 1, hd_num)
    return PreparedSample(sid, templ.pieces, [media], [digest], templ.n_tokens([media.n_tokens]))


def corpus_workload(tok: Tokenizer, a: Assumptions) -> list[PreparedSample]:
    """Single-image samples at hd_num 9 with the real token layout: a question and a 60-110 word answer each."""
    out = []
    for i in range(a.corpus_samples):
        w, h = SIZES[i % len(SIZES)]
        msgs = [{"role": "user", "content": "Describe this photo. " + _text(5 + 3 * (i % 7), i)},
                {"role": "assistant", "content": _text(60 + 10 * (i % 6), i + 100)}]
        out.append(_prepared(tok, msgs, _media(w, h, a.hd_num), f"corpus-{i}", a.hd_num, i))
    return out


def bon_workload(tok: Tokenizer, a: Assumptions) -> list[PreparedSample]:
    """One image prompt and N replies: the same image (one digest) in every candidate."""
    media = _media(*a.bon_image, a.hd_num)
    prompt = [{"role": "user", "content": "What is happening in this picture? " + _text(25, 1)}]
    return [_prepared(tok, prompt + [{"role": "assistant", "content": _text(a.bon_reply_words, 50 + j)}], media,
                      "bon-image", a.hd_num, j) for j in range(a.bon_n)]


def build_meta_model(cfg: ModelConfig, dtype: torch.dtype) -> IXCRewardModel:
    model = meta_model(cfg, cfg.plora_rank)
    return model.to(dtype).eval()


def _engine(model, tok: Tokenizer, a: Assumptions, prefix_cache: bool) -> ScoringEngine:
    runner = ModelRunner(model, META, getattr(torch, a.dtype), backend=a.backend)
    cfg = EngineConfig(hd_num=a.hd_num, max_batch_tokens=a.max_batch_tokens, prefix_cache=prefix_cache)
    return ScoringEngine(runner, tok, str(PACKAGED_TOKENIZER), model.cfg.pooling, model.cfg.max_length, cfg)


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def dispatch_overhead_s(n: int = 3000) -> float:
    """CPU seconds a dispatch mode adds to each op outside its own __torch_dispatch__ body (entering and leaving
    Python): measured here, as the thread time of n meta ops under a pass-through mode less without one."""
    x = torch.empty(8, device=META)
    best = math.inf
    for _ in range(3):
        t0 = time.thread_time()
        for _ in range(n):
            torch.neg(x)
        plain = time.thread_time() - t0
        with _PassThrough():
            t0 = time.thread_time()
            for _ in range(n):
                torch.neg(x)
            moded = time.thread_time() - t0
        best = min(best, max(moded - plain, 0.0) / n)
    return best


def _record(model, fn, unscoped: str = "other", overhead_s: float = 0.0) -> tuple[Recorder, float]:
    """Run fn() under the recorder; returns it and the host seconds: the run's CPU time less the time inside device
    ops (meta kernels, which run in Python here and on the GPU there), less the recorder's own bookkeeping and less
    `overhead_s` per op for entering the mode (see dispatch_overhead_s)."""
    rec = Recorder(unscoped, model.cfg)
    handles = rec.attach(model)
    try:
        t0 = time.thread_time()  # CPU time of this thread: the figure does not depend on the machine's load
        with rec:
            fn()
        wall = time.thread_time() - t0
    finally:
        for h in handles:
            h.remove()
    return rec, max(wall - rec.in_ops_seconds - rec.n_dispatch * overhead_s, 0.0)


def run_engine(model, tok, preps: list[PreparedSample], a: Assumptions, prefix_cache: bool,
               overhead_s: float = 0.0) -> Measured:
    """One engine run (fresh engine: cold prefix and media caches)."""
    eng = _engine(model, tok, a, prefix_cache)
    rec, host = _record(model, lambda: eng.score_prepared(preps), overhead_s=overhead_s)
    layers = model.cfg.num_hidden_layers * eng.stats.batches
    return Measured(rec.ops, eng.stats.tokens_computed, len(preps), eng.stats.batches, layers, host)


def run_baseline(model, preps: list[PreparedSample], a: Assumptions, tok: Tokenizer,
                 overhead_s: float = 0.0) -> Measured:
    base = UpstreamBaseline(model, tok, hd_num=a.hd_num, batch_size=a.baseline_batch)
    # the baseline calls the weights' F.linear directly (no module scopes): its GEMMs are all "base", the rest glue
    rec, host = _record(model, lambda: base.score_prepared(preps), unscoped="glue", overhead_s=overhead_s)
    layers = model.cfg.num_hidden_layers * base.stats.batches
    return Measured(rec.ops, base.stats.tokens, len(preps), base.stats.batches, layers, host)


@dataclass(slots=True)
class Report:
    assumptions: Assumptions
    ceiling: float
    runs: dict[str, Measured] = field(default_factory=dict)
    dispatch_overhead_s: float = 0.0

    def as_dict(self) -> dict:
        a = self.assumptions
        out: dict = {}
        for gpu in GPUS:
            g = {name: summarise(m, a, gpu, self.ceiling) for name, m in self.runs.items()}
            on, off = g.pop("bon8_on"), g.pop("bon8_off")
            # candidates/s ratio = modelled time with sharing off / on, same N candidates
            g["bon8"] = {"label": "model", "on_over_off": (off["us_per_token"] * off["tokens"])
                         / (on["us_per_token"] * on["tokens"]), "on": on, "off": off}
            out[gpu] = g
        out["assumptions"] = asdict(a)
        out["ceiling_tokens_per_s"] = self.ceiling
        out["host_dispatch_overhead_us"] = self.dispatch_overhead_s * 1e6  # measured, subtracted per recorded op
        out["ceiling_formula"] = ("ceiling_flops_per_s / (2 * (P_linears + P_plora)) with P from the release config: "
                                  "decoder linears (wqkv, wo, w1, w3, w2 of all layers) and PLoRA A + B")
        return out


def measure(a: Assumptions | None = None, cfg: ModelConfig | None = None) -> Report:
    a = a or Assumptions()
    cfg = cfg or ModelConfig(plora_rank=256, plora_alpha=256)
    tok = Tokenizer.from_file(PACKAGED_TOKENIZER)
    model = build_meta_model(cfg, getattr(torch, a.dtype))
    rep = Report(a, ceiling_tokens_per_s(cfg, cfg.plora_rank, a))
    corpus = corpus_workload(tok, a)
    bon = bon_workload(tok, a)
    with torch.inference_mode():  # as the runner and the baseline run
        ov = rep.dispatch_overhead_s = dispatch_overhead_s()
        rep.runs["corpus"] = run_engine(model, tok, corpus, a, prefix_cache=True, overhead_s=ov)
        rep.runs["bon8_on"] = run_engine(model, tok, bon, a, prefix_cache=True, overhead_s=ov)
        rep.runs["bon8_off"] = run_engine(model, tok, bon, a, prefix_cache=False, overhead_s=ov)
        rep.runs["baseline_corpus"] = run_baseline(model, corpus, a, tok, overhead_s=ov)
    return rep


# --- printing ------------------------------------------------------------------------------------------------------
def table(d: dict, title: str) -> str:
    lines = [f"{title} [MODEL, not measured]: {d['samples']} samples, {d['tokens']} tokens, {d['batches']} batches",
             "| part | us/token (model) | share | launches | GFLOP/token | MB/token |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, label in PARTS.items():
        p = d["parts"][key]
        if not p["launches"] and not p["us_per_token"]:
            continue
        lines.append(f"| {label} | {p['us_per_token']:.2f} | {100 * p['share']:.0f}% | {p['launches']} | "
                     f"{p['flops'] / d['tokens'] / 1e9:.2f} | {p['bytes'] / d['tokens'] / 1e6:.2f} |")
    lines.append(f"| total | {d['us_per_token']:.2f} | 100% | {sum(p['launches'] for p in d['parts'].values())} | "
                 f"{d['flops_per_token'] / 1e9:.2f} | {d['bytes_per_token'] / 1e6:.2f} |")
    lines.append(f"model: {d['tokens_per_s']:,.0f} tok/s = {d['pct_of_ceiling']:.1f}% of the ceiling; "
                 f"{d['launches_per_decoder_layer']:.1f} launches per decoder layer; device "
                 f"{d['device_ms_per_batch']:.1f} ms/batch (model) vs host issue {d['host_ms_per_batch']:.1f} ms/batch "
                 f"(model: {d['host_python_ms_per_batch']:.1f} ms of the path's own host work measured on this CPU + "
                 f"{d['host_launch_ms_per_batch']:.1f} ms of launch cost) = {100 * d['host_over_device']:.0f}%")
    return "\n".join(lines)


def render(out: dict) -> str:
    a = out["assumptions"]
    lines = [("Roofline MODEL of the engine's GPU path (bf16, backend triton), run on meta tensors on a CPU: no figure "
              "below was measured on a GPU."),
             f"assumptions: {a}",
             f"ceiling (model): {out['ceiling_tokens_per_s']:,.0f} tok/s = {out['ceiling_formula']}"]
    for gpu in GPUS:
        g = out[gpu]
        speedup = g["baseline_corpus"]["us_per_token"] / g["corpus"]["us_per_token"]
        lines += ["", f"## {gpu} (HBM {dict(a['hbm_bytes_per_s'])[gpu] / 1e12:.2f} TB/s)",
                  table(g["corpus"], "corpus"), "",
                  table(g["baseline_corpus"], "upstream-algorithm baseline, corpus"),
                  f"model: engine / baseline = {speedup:.2f}x", "",
                  table(g["bon8"]["on"], "best-of-8, sharing on"), "",
                  table(g["bon8"]["off"], "best-of-8, sharing off"),
                  f"model: best-of-8 candidates/s on/off = {g['bon8']['on_over_off']:.2f}x"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the modelled figures as JSON here")
    ap.add_argument("--corpus-samples", type=int, default=Assumptions().corpus_samples)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rep = measure(Assumptions(corpus_samples=args.corpus_samples))
    out = rep.as_dict()
    print(render(out))
    print(f"\n(roofline model computed in {time.perf_counter() - t0:.1f} s on this CPU)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
