"""Bradley-Terry reward-model training on the engine's own forward path and fused score kernel.

One micro-batch of P pairs is ONE packed forward of 2P sequences (``ModelRunner.forward_hidden``: chosen replies
first, then rejected ones), the rewards come from ``pool_score`` (so the backward pass runs through the fused
norm + head + pooling kernel on GPU) and the loss is ``bt_loss_from_hidden``. AdamW, linear warmup then cosine
decay, gradient accumulation, gradient clipping, periodic held-out pairwise accuracy, checkpoints in the engine's
loadable layout (config.json, sharded safetensors + index, tokenizer.model) plus ``trainer_state.pt`` to resume.

Trained parameters (upstream recipe, ../shared/MODEL.md section 8): the LLM (embeddings, decoder layers with their
PLoRA, final norm) and the score head; the ViT, the projector and the two separator tokens are frozen, so the image
embeddings are computed without autograd and cached by content (``media_cache_size``). ``lora_rank > 0`` trains
instead a LoRA of that rank on every wqkv/wo/w1/w2/w3 weight (plus the score head); it is merged into the weights
whenever a checkpoint is written, so saved checkpoints load like any other. Two deviations from upstream, both off
by default, for models trained from scratch (whose vision path is random, see examples/make_demo_model.py):
``train_projector`` also trains the projector and the two separators while the ViT stays frozen, so the ViT's merged
features are computed once per picture (content digest) and cached, and only the cheap projector runs with
autograd; ``train_vision`` trains the ViT too (no cache: every step encodes its pictures).

Shared prefix (``share_prefix``, on by default): chosen and rejected start with the same image and prompt (for one
image, ~840 of ~870 tokens). The rejected sequence is packed as only its tokens after the longest common prefix and
attends to the chosen sequence's K/V there (``ForwardContext.parents``, a differentiable path of the model's torch
attention), so the prefix runs through the LLM once per pair and gets the gradients of both replies. Mean pooling
adds the chosen sequence's prefix scores to the rejected mean. Not shared: pairs with no common prefix, and pairs
longer than max_position_embeddings under dynamic-NTK RoPE (the rotary base then depends on each sequence's own
length). The image is encoded once per pair (content digest), and with the vision path frozen, once per training run
while it stays in the media cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..checkpoint import load_model
from ..engine.runner import ModelRunner, SeqPlan
from ..engine.sequence import PreparedSample, Sample, SampleError, prepare_sample
from ..models.internlm2 import ForwardContext
from ..models.reward_model import IXCRewardModel
from ..tiny import write_checkpoint
from ..tokenizer import Tokenizer
from .losses import bt_loss_from_hidden
from .pairs import PreferencePair

STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"
LORA_TARGETS = ("wqkv", "wo", "w1", "w2", "w3")
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class TrainConfig:
    """Hyper-parameters. Defaults are upstream's recipe (lr 1e-5 cosine, warmup 1%, weight decay 0.1, betas
    (0.9, 0.95), bf16 autocast, 1 epoch, hd_num 9, max_length 8192).

    batch_pairs: pairs per packed forward (micro-batch); one optimizer step sees batch_pairs * grad_accum pairs.
    eval_every / save_every: in optimizer steps; 0 = only at the end of every epoch / of training.
    save_dtype: dtype of the safetensors written ("float32" keeps resume exact; "bfloat16" is the release's).
    """

    lr: float = 1e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.01
    min_lr_ratio: float = 0.0  # the cosine decays from lr to lr * min_lr_ratio
    epochs: int = 1
    batch_pairs: int = 8
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    max_length: int = 8192
    hd_num: int = 9
    lora_rank: int = 0
    lora_alpha: float | None = None  # LoRA scale = alpha / rank (default alpha = rank, scale 1)
    margin: float = 0.0
    center_coef: float = 0.0
    eval_every: int = 0
    save_every: int = 0
    seed: int = 0
    bf16: bool = True  # autocast to bf16 on CUDA; ignored on CPU (fp32 there)
    train_vision: bool = False
    train_projector: bool = False  # train vision_proj and the separators, ViT frozen (its features cached)
    media_cache_size: int = 256  # projected image embeddings kept between steps (frozen vision path only)
    score_backend: str = "auto"  # pool_score backend: "auto" (Triton on CUDA), "triton", "torch"
    share_prefix: bool = True  # run a pair's common prompt/image prefix through the LLM once (see module docstring)
    save_dtype: str = "float32"
    save_shards: int = 2

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr > 0, "weight_decay": self.weight_decay >= 0, "epochs": self.epochs >= 1,
            "batch_pairs": self.batch_pairs >= 1, "grad_accum": self.grad_accum >= 1,
            "max_length": self.max_length >= 1, "hd_num": self.hd_num >= 1, "lora_rank": self.lora_rank >= 0,
            "center_coef": self.center_coef >= 0, "eval_every": self.eval_every >= 0,
            "save_every": self.save_every >= 0, "media_cache_size": self.media_cache_size >= 0,
            "save_shards": self.save_shards >= 1, "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError("TrainConfig: invalid " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig: betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"TrainConfig: max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.score_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"TrainConfig: score_backend must be auto, triton or torch, got {self.score_backend!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"TrainConfig: save_dtype must be one of {sorted(SAVE_DTYPES)}, got {self.save_dtype!r}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"TrainConfig: lora_alpha must be > 0, got {self.lora_alpha}")
        if self.train_vision and self.train_projector:
            raise ValueError("TrainConfig: train_vision already trains the projector; set train_projector=False")


# --- LoRA -----------------------------------------------------------------------------------------------------------


class LoRADelta(nn.Module):
    """Parametrization W -> W + scale * B @ A (A [r, in] ~ N(0, 1/in), B [out, r] = 0, so training starts at W)."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_B @ self.lora_A).to(weight.dtype) * self.scale


def add_lora(model: IXCRewardModel, rank: int, alpha: float | None, seed: int) -> list[nn.Parameter]:
    """Attach a LoRA parametrization to every wqkv/wo/w1/w2/w3 ``weight`` of the LLM; returns the new parameters.

    The base weights stay frozen; PLoRA (the image-position adapters) is untouched and frozen."""
    gen = torch.Generator().manual_seed(seed)
    scale = (alpha if alpha is not None else rank) / rank
    params: list[nn.Parameter] = []
    for name, mod in model.model.named_modules():
        if name.rsplit(".", 1)[-1] in LORA_TARGETS and hasattr(mod, "Plora_A"):
            w = mod.weight
            delta = LoRADelta(w.shape[0], w.shape[1], rank, scale, gen).to(device=w.device, dtype=torch.float32)
            parametrize.register_parametrization(mod, "weight", delta, unsafe=False)
            mod.parametrizations.weight.original.requires_grad_(False)
            params += [delta.lora_A, delta.lora_B]
    if not params:
        raise ValueError("add_lora: found no wqkv/wo/w1/w2/w3 layers in the model")
    return params


def export_state(model: IXCRewardModel, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The checkpoint tensors ``names`` of ``model`` with any LoRA merged in (detached, on the CPU)."""
    out = {}
    with torch.no_grad():
        for name in names:
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            out[name] = getattr(mod, attr).detach().to("cpu", copy=True)
    return out


# --- results --------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class EvalResult:
    accuracy: float  # fraction of pairs with r_chosen > r_rejected
    loss: float  # mean BT loss (without margin or centering)
    pairs: int
    mean_margin: float  # mean of r_chosen - r_rejected
    skipped: list[str] = field(default_factory=list)  # ids of pairs that could not be prepared


@dataclass(slots=True)
class TrainResult:
    steps: int
    seconds: float
    final_loss: float | None  # mean training loss over the last optimizer step
    train_accuracy: float | None  # over the last epoch's batches
    eval: EvalResult | None
    output_dir: Path | None
    skipped: list[str] = field(default_factory=list)
    # what the progress bar shows as avg_loss / avg_acc: exponential moving averages (weight 0.1 per optimizer step)
    avg_loss: float | None = None
    avg_acc: float | None = None


# --- schedule -------------------------------------------------------------------------------------------------------


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based): linear warmup over ``warmup`` steps
    (from 1/warmup to 1), then cosine from 1 down to ``min_ratio`` at step ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- resume ---------------------------------------------------------------------------------------------------------


def _pairs_digest(pairs: Sequence[PreferencePair]) -> str:
    """Content fingerprint of the training pairs, in order: a resume must continue on the same data."""
    h = hashlib.blake2b(digest_size=16)
    for p in pairs:
        h.update(json.dumps([p.id, p.messages, p.chosen, p.rejected, list(p.images)], sort_keys=True,
                            default=str).encode())
    return h.hexdigest()


# --- the trainer ----------------------------------------------------------------------------------------------------


class RewardTrainer:
    """Train ``model`` on ``train_pairs``; see the module docstring.

    ``model`` is an IXCRewardModel in fp32 (master weights; bf16 autocast on CUDA). ``tokenizer_path`` is copied
    into every checkpoint. ``output_dir`` receives periodic checkpoints (``checkpoint-<step>``) and the final one.
    """

    def __init__(
        self, model: IXCRewardModel, tokenizer_path: str | os.PathLike, train_pairs: Sequence[PreferencePair],
        cfg: TrainConfig | None = None, *, eval_pairs: Sequence[PreferencePair] | None = None,
        device: str | torch.device = "cpu", output_dir: str | os.PathLike | None = None,
    ) -> None:
        self.cfg = cfg or TrainConfig()
        if not train_pairs:
            raise ValueError("train_pairs: need at least one preference pair")
        self.device = torch.device(device)
        if next(model.parameters()).dtype != torch.float32:
            raise ValueError("model: train with fp32 master weights (load_model(..., dtype=torch.float32)); "
                             "bf16 autocast is applied on CUDA")
        self.model = model.to(self.device)
        self.tokenizer_path = Path(tokenizer_path)
        self.tokenizer = Tokenizer.from_file(self.tokenizer_path)
        self.train_pairs = list(train_pairs)
        self.eval_pairs = list(eval_pairs) if eval_pairs else []
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.checkpoint_names = [n for n, _ in model.named_parameters()]
        # Attention runs on the differentiable reference path (the paged kernel has no backward); the score
        # pooling goes through pool_score with cfg.score_backend.
        self.runner = ModelRunner(model, self.device, torch.float32, backend="torch",
                                  media_cache_size=0 if self._vision_in_graph else self.cfg.media_cache_size)
        # train_projector: the frozen ViT's merged features per image content digest (insertion order = age)
        self._merged_cache: dict[str, torch.Tensor] = {}
        self.llm_tokens = 0  # tokens run through the LLM by training steps (shared prefixes counted once)
        self.params = self._select_trainable()
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=self.cfg.lr, betas=self.cfg.betas,
                                           weight_decay=self.cfg.weight_decay)
        n_batches = math.ceil(len(self.train_pairs) / self.cfg.batch_pairs)
        self.steps_per_epoch = math.ceil(n_batches / self.cfg.grad_accum)
        self.total_steps = self.steps_per_epoch * self.cfg.epochs
        warmup = math.ceil(self.cfg.warmup_ratio * self.total_steps) if self.cfg.warmup_ratio > 0 else 0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, warmup, self.cfg.min_lr_ratio))
        self.step = 0
        self.skipped: dict[str, str] = {}
        self.last_eval: EvalResult | None = None

    # --- setup ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, train_pairs: Sequence[PreferencePair], cfg: TrainConfig | None = None, *,
        eval_pairs: Sequence[PreferencePair] | None = None, device: str | torch.device | None = None,
        output_dir: str | os.PathLike | None = None, pooling: str | None = None,
    ) -> RewardTrainer:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, ckpt = load_model(path, dtype=torch.float32, device=device, pooling=pooling)
        tok = Path(ckpt) / "tokenizer.model"
        if not tok.is_file():
            raise FileNotFoundError(f"{ckpt}: tokenizer.model not found")
        return cls(model, tok, train_pairs, cfg, eval_pairs=eval_pairs, device=device, output_dir=output_dir)

    @property
    def _vision_in_graph(self) -> bool:
        return self.cfg.train_vision or self.cfg.train_projector

    def _select_trainable(self) -> list[nn.Parameter]:
        m = self.model
        m.requires_grad_(False)
        if self.cfg.lora_rank:
            params = add_lora(m, self.cfg.lora_rank, self.cfg.lora_alpha, self.cfg.seed)
            m.score.weight.requires_grad_(True)
            params.append(m.score.weight)
        else:
            m.model.requires_grad_(True)
            m.score.requires_grad_(True)
            params = list(m.model.parameters()) + list(m.score.parameters())
        if self._vision_in_graph:
            for mod in (m.vit, m.vision_proj) if self.cfg.train_vision else (m.vision_proj,):
                mod.requires_grad_(True)
                params += list(mod.parameters())
            m.plora_glb_GN.requires_grad_(True)
            m.plora_sub_GN.requires_grad_(True)
            params += [m.plora_glb_GN, m.plora_sub_GN]
        return params

    def _param_groups(self) -> list[dict]:
        # Weight decay on matrices (embeddings and the score head included), not on norms, biases or separators.
        separators = {id(self.model.plora_glb_GN), id(self.model.plora_sub_GN)}
        decay = [p for p in self.params if p.dim() >= 2 and id(p) not in separators]
        ids = {id(p) for p in decay}
        no_decay = [p for p in self.params if id(p) not in ids]
        return [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.params)

    # --- data -------------------------------------------------------------------------------------------------------
    def _prepare_pairs(self, pairs: Sequence[PreferencePair]) -> list[tuple[PreparedSample, PreparedSample]]:
        """Template, tokenize and crop both replies of each pair; pairs that fail are recorded in ``skipped``."""
        cache: dict = {}
        out = []
        for pair in pairs:
            if pair.id in self.skipped:
                continue
            try:
                seqs = tuple(
                    prepare_sample(self.tokenizer, Sample(pair.messages + [{"role": "assistant", "content": reply}],
                                                          list(pair.images), id=pair.id),
                                   hd_num=self.cfg.hd_num, max_length=self.cfg.max_length, media_cache=cache)
                    for reply in (pair.chosen, pair.rejected)
                )
            except SampleError as exc:
                self.skipped[pair.id] = str(exc)
                continue
            out.append(seqs)
        return out

    def _epoch_order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_pairs), generator=gen).tolist()

    # --- forward ----------------------------------------------------------------------------------------------------
    def _autocast(self):
        enabled = self.cfg.bf16 and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _pair_plans(self, batch: list[tuple[PreparedSample, PreparedSample]]):
        """Plans of a micro-batch (chosen replies, then rejected ones), the in-batch parents and the rejected
        sequences' shared prefix lengths (0 where a pair does not share)."""
        n = len(batch)
        shared = [self._shared_prefix(c, r) if self.cfg.share_prefix else 0 for c, r in batch]
        plans = [SeqPlan(c) for c, _ in batch] + [SeqPlan(r, start=k) for (_, r), k in zip(batch, shared)]
        parents = [None] * n + [(i, k) if k else None for i, k in enumerate(shared)]
        return plans, (parents if any(shared) else None), shared

    def _shared_prefix(self, c: PreparedSample, r: PreparedSample) -> int:
        """Positions the two sequences share (same tokens and media), leaving each at least one token of its own."""
        mcfg = self.model.cfg
        if mcfg.rope_scaling_factor != 1.0 and max(c.n_tokens, r.n_tokens) > mcfg.max_position_embeddings:
            return 0
        kc, kr = c.content_keys(), r.content_keys()
        m = min(len(kc), len(kr)) - 1
        diff = np.flatnonzero(kc[:m] != kr[:m])
        return int(diff[0]) if diff.size else m

    def _hidden(self, plans: list[SeqPlan], parents=None):
        if not self._vision_in_graph:
            return self.runner.forward_hidden(plans, parents=parents)
        return self._forward_hidden_with_vision(plans, parents)

    def _merged(self, digest: str, pixels: torch.Tensor) -> torch.Tensor:
        """ViT + 2x2 merge of one image: with autograd (train_vision) or from the cache of frozen features."""
        if self.cfg.train_vision:
            return self.model.encode_crops(pixels.to(self.device))
        hit = self._merged_cache.get(digest)
        if hit is None:
            with torch.no_grad():
                hit = self.model.encode_crops(pixels.to(self.device))
            if self.cfg.media_cache_size:
                while len(self._merged_cache) >= self.cfg.media_cache_size:
                    self._merged_cache.pop(next(iter(self._merged_cache)))
                self._merged_cache[digest] = hit
        return hit

    def _forward_hidden_with_vision(self, plans: list[SeqPlan], parents=None):
        """forward_hidden with autograd through the projector and separators, and the ViT with train_vision.
        Each plan's positions [start, n_tokens) are packed (start > 0: a prefix shared through `parents`)."""
        encoded: dict[str, torch.Tensor] = {}
        pieces: list[torch.Tensor | list[int]] = []
        image_pos, lens = [], []
        offset = 0
        for p in plans:
            s = p.sample
            for start, end, piece in s.segments():
                lo = max(start, p.start)
                if end <= lo:
                    continue
                if isinstance(piece, list):
                    pieces.append(piece[lo - start:])
                    continue
                d, mc = s.media_digests[piece], s.media[piece]
                if d not in encoded:  # chosen and rejected share their image: encode it once
                    encoded[d] = self.model.image_tokens(self._merged(d, mc.pixel_values), mc.h, mc.w)
                pieces.append(encoded[d][lo - start:])
                image_pos.append(torch.arange(offset + lo - p.start, offset + end - p.start))
            lens.append(p.new_tokens)
            offset += p.new_tokens
        # One embedding lookup for all text (one dense gradient of the table instead of one per text piece).
        ids = torch.tensor([t for p in pieces if isinstance(p, list) for t in p], device=self.device)
        text = self.model.model.tok_embeddings(ids).split([len(p) for p in pieces if isinstance(p, list)])
        it = iter(text)
        embeds = torch.cat([next(it) if isinstance(p, list) else p for p in pieces])
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lens), 0)
        positions = torch.cat([torch.arange(p.start, p.sample.n_tokens) for p in plans])
        ctx = ForwardContext(
            cu_seqlens=cu.to(self.device), positions=positions.to(self.device),
            seq_lens_total=[p.sample.n_tokens for p in plans], new_lens=list(lens),
            image_index=torch.cat(image_pos).to(self.device) if image_pos else None, backend="torch", parents=parents,
        )
        return self.model.hidden_states(embeds, ctx), ctx

    def _pair_loss(self, batch: list[tuple[PreparedSample, PreparedSample]]):
        plans, parents, shared = self._pair_plans(batch)
        with self._autocast():
            hidden, ctx = self._hidden(plans, parents)
        m = self.model
        self.llm_tokens += int(ctx.cu_seqlens[-1])
        return bt_loss_from_hidden(
            hidden, m.model.norm.weight, m.score.weight, ctx.cu_seqlens, mode=m.cfg.pooling, eps=m.cfg.rms_norm_eps,
            backend=self.cfg.score_backend, margin=self.cfg.margin, center_coef=self.cfg.center_coef,
            rejected_prefix=shared,
        )

    # --- evaluation -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, pairs: Sequence[PreferencePair] | None = None, batch_pairs: int | None = None) -> EvalResult:
        """Held-out pairwise accuracy (and BT loss) of the current weights."""
        pairs = self.eval_pairs if pairs is None else list(pairs)
        if not pairs:
            raise ValueError("evaluate: no evaluation pairs (pass eval_pairs to the trainer or pairs here)")
        bp = batch_pairs or self.cfg.batch_pairs
        was_training = self.model.training
        self.model.eval()
        before = set(self.skipped)
        n = correct = 0
        loss_sum = margin_sum = 0.0
        for i in range(0, len(pairs), bp):
            batch = self._prepare_pairs(pairs[i:i + bp])
            if not batch:
                continue
            plans, parents, shared = self._pair_plans(batch)
            with self._autocast():
                hidden, ctx = self._hidden(plans, parents)
            out = bt_loss_from_hidden(hidden, self.model.model.norm.weight, self.model.score.weight, ctx.cu_seqlens,
                                      mode=self.model.cfg.pooling, eps=self.model.cfg.rms_norm_eps,
                                      backend=self.cfg.score_backend, rejected_prefix=shared)
            k = len(batch)
            n += k
            correct += int((out.chosen > out.rejected).sum())
            loss_sum += float(out.loss) * k
            margin_sum += float((out.chosen - out.rejected).sum())
        self.model.train(was_training)
        skipped = sorted(set(self.skipped) - before)
        if not n:
            raise ValueError("evaluate: none of the evaluation pairs could be prepared: " +
                             "; ".join(f"{k}: {self.skipped[k]}" for k in skipped[:3]))
        return EvalResult(correct / n, loss_sum / n, n, margin_sum / n, skipped)

    # --- checkpoints ------------------------------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike, *, dtype: str | None = None) -> Path:
        """Write the model (LoRA merged) in the engine's layout plus ``trainer_state.pt`` for resuming."""
        out = Path(out_dir)
        state = export_state(self.model, self.checkpoint_names)
        dt = SAVE_DTYPES[dtype or self.cfg.save_dtype]
        # config.json must agree with the tensors (the loader checks plora_rank against the Plora_A shapes)
        model_cfg = replace(self.model.cfg, plora_rank=self.model.model.layers[0].attention.wqkv.Plora_A.out_features)
        write_checkpoint(out, model_cfg, state, dtype=dt, shards=self.cfg.save_shards,
                         tokenizer=self.tokenizer_path)
        # LoRA mode: the safetensors hold merged weights, so the adapters and the other trained tensors (score head)
        # are kept unmerged here; the base weights come from the initial model again on resume.
        trained = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        torch.save({
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "trained": trained if self.cfg.lora_rank else {},
            "config": asdict(self.cfg),
            "skipped": dict(self.skipped),
            "rng_torch": torch.get_rng_state(),
            "rng_python": random.getstate(),
            "weights_dtype": str(dt).removeprefix("torch."),
            "n_train_pairs": len(self.train_pairs),
            "pairs_digest": _pairs_digest(self.train_pairs),
        }, out / STATE_FILE)
        return out

    def load_state(self, ckpt_dir: str | os.PathLike) -> None:
        """Resume from a directory written by ``save``: weights (full fine-tuning: from its safetensors; LoRA: the
        base model stays as given and the adapters and score head come from trainer_state.pt), optimizer, schedule,
        step and RNG states. Exact when the weights were saved in float32 (the default)."""
        ckpt = Path(ckpt_dir)
        path = ckpt / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"resume: {path} not found (not a checkpoint written by the trainer)")
        st = torch.load(path, map_location="cpu", weights_only=True)
        saved_cfg = st.get("config", {})
        for key in ("lora_rank", "lora_alpha", "batch_pairs", "grad_accum", "train_vision", "train_projector", "seed",
                    "margin", "center_coef", "hd_num", "max_length"):
            if saved_cfg.get(key) != getattr(self.cfg, key):
                raise ValueError(f"resume: {path} was written with {key}={saved_cfg.get(key)!r}, "
                                 f"but this run has {key}={getattr(self.cfg, key)!r}")
        if st.get("n_train_pairs") != len(self.train_pairs):
            raise ValueError(f"resume: {path} was trained on {st.get('n_train_pairs')} pairs, this run has "
                             f"{len(self.train_pairs)}; resume with the same pair file and filters")
        digest = _pairs_digest(self.train_pairs)
        if st.get("pairs_digest", digest) != digest:
            raise ValueError(f"resume: {path} was trained on other pairs (same count, different content or order); "
                             "resume with the same pair file and filters")
        if self.cfg.lora_rank:
            params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
            missing = sorted(set(params) - set(st["trained"]))
            if missing:
                raise ValueError(f"resume: {path} lacks trained tensors {missing[:3]}")
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(st["trained"][name])
        else:
            saved, _ = load_model(ckpt, dtype=torch.float32, device="cpu", pooling=self.model.cfg.pooling)
            with torch.no_grad():
                src = dict(saved.named_parameters())
                for name, p in self.model.named_parameters():
                    p.copy_(src[name])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.step = int(st["step"])
        self.skipped = dict(st.get("skipped", {}))
        torch.set_rng_state(st["rng_torch"])
        random.setstate(st["rng_python"])
        self.runner._media_cache.clear()

    # --- training ---------------------------------------------------------------------------------------------------
    def train(
        self, *, resume_from: str | os.PathLike | None = None, progress: bool = True,
        log: Callable[[dict], None] | None = None, max_steps: int | None = None,
    ) -> TrainResult:
        """Run the whole schedule (or up to ``max_steps`` optimizer steps in total, for tests and time limits).

        Every optimizer step averages the BT loss over all pairs of its micro-batches. Returns a TrainResult;
        with an output_dir the final model is written there.
        """
        if resume_from is not None:
            self.load_state(resume_from)
        cfg = self.cfg
        stop_at = self.total_steps if max_steps is None else min(max_steps, self.total_steps)
        t0 = time.perf_counter()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=stop_at, initial=self.step, unit="step", dynamic_ncols=True)
        self.model.train()
        last_loss = None
        epoch_correct = epoch_pairs = 0
        ema_loss = ema_acc = None
        while self.step < stop_at:
            epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
            order = self._epoch_order(epoch)
            if in_epoch == 0:
                epoch_correct = epoch_pairs = 0
            first = in_epoch * cfg.grad_accum * cfg.batch_pairs
            step_pairs = [self.train_pairs[i] for i in order[first:first + cfg.grad_accum * cfg.batch_pairs]]
            micro = [step_pairs[i:i + cfg.batch_pairs] for i in range(0, len(step_pairs), cfg.batch_pairs)]
            prepared = [self._prepare_pairs(mb) for mb in micro]
            n_step = sum(len(mb) for mb in prepared)
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            correct = 0
            for batch in prepared:
                if not batch:
                    continue
                out = self._pair_loss(batch)
                (out.loss * (len(batch) / n_step)).backward()
                loss_sum += float(out.loss.detach()) * len(batch)
                correct += int((out.chosen > out.rejected).sum())
            if n_step:
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
            lr_used = self.scheduler.get_last_lr()[0]  # the rate of this step (step() moves to the next one)
            self.scheduler.step()
            self.step += 1
            if n_step:
                last_loss = loss_sum / n_step
                acc = correct / n_step
                epoch_correct += correct
                epoch_pairs += n_step
                ema_loss = last_loss if ema_loss is None else 0.9 * ema_loss + 0.1 * last_loss
                ema_acc = acc if ema_acc is None else 0.9 * ema_acc + 0.1 * acc
            record = {"step": self.step, "epoch": epoch, "loss": last_loss, "acc": acc if n_step else None,
                      "lr": lr_used, "pairs": n_step,
                      "seconds": round(time.perf_counter() - t0, 3)}
            end_of_epoch = self.step % self.steps_per_epoch == 0
            if self.eval_pairs and ((cfg.eval_every and self.step % cfg.eval_every == 0) or end_of_epoch
                                    or self.step == stop_at):
                self.last_eval = self.evaluate()
                self.model.train()
                record.update(eval_acc=self.last_eval.accuracy, eval_loss=self.last_eval.loss)
            if self.output_dir is not None and cfg.save_every and self.step % cfg.save_every == 0:
                self.save(self.output_dir / f"checkpoint-{self.step}")
            self._log(record, log)
            if bar is not None:
                # smoothed (moving averages), named so they are not taken for the last step's values
                post = {"avg_loss": f"{ema_loss:.4f}" if ema_loss is not None else "-",
                        "avg_acc": f"{ema_acc:.3f}" if ema_acc is not None else "-"}
                if self.last_eval is not None:
                    post["eval_acc"] = f"{self.last_eval.accuracy:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
        if self.output_dir is not None:
            self.save(self.output_dir)
        return TrainResult(
            steps=self.step, seconds=time.perf_counter() - t0, final_loss=last_loss,
            train_accuracy=epoch_correct / epoch_pairs if epoch_pairs else None, eval=self.last_eval,
            output_dir=self.output_dir, skipped=sorted(self.skipped), avg_loss=ema_loss, avg_acc=ema_acc,
        )

    def _log(self, record: dict, log: Callable[[dict], None] | None) -> None:
        if log is not None:
            log(record)
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
