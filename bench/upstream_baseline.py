"""A scorer that follows upstream's algorithm on the engine's own weights: the baseline of the end-to-end benchmarks.

Only the algorithm differs from the engine; weights (`IXCRewardModel` modules), preprocessing and tokenization
(`prepare_sample`) are the engine's. What upstream does, and this scorer does too:
- the ViT runs once per image, on that image's crops only (no batching across samples, no dedup of equal images);
- the request's sequences are right-padded to the longest one and run as one `[B, L, H]` batch (`batch_size`
  splits a request into consecutive padded batches when the whole request does not fit in memory);
- attention as upstream runs it: on a GPU flash attention (upstream's config falls back to flash_attention_2,
  which unpads each sequence and runs causal flash attention over its real tokens; here SDPA's flash kernel per
  sequence, GQA without repeating K/V); on a CPU eager attention: `q @ k^T * scale` in the model dtype, plus an
  additive causal+padding mask (dtype minimum), softmax in fp32 cast back, `@ v`, GQA by repeating K/V heads;
- PLoRA on the padded batch's image positions (`res[im_mask] += B(A(x[im_mask]))`; the positions are indexed by
  their flat offsets, known on the host, instead of the boolean mask: the same gather, add and scatter);
- RoPE over positions 0..L-1 with the dynamic-NTK base of the padded length L;
- the final norm and the score head on EVERY position, then a gather at each row's last real token;
- no prefix reuse: best-of-N candidates re-encode the shared prompt and image N times.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ixc_engine.engine.sequence import PreparedSample, Sample, prepare_sample
from ixc_engine.media.image import MediaCrops
from ixc_engine.models.reward_model import IXCRewardModel
from ixc_engine.tokenizer import Tokenizer


@dataclass(slots=True)
class BaselineStats:
    samples: int = 0
    tokens: int = 0  # real tokens of the scored sequences
    padded_tokens: int = 0  # B * L summed over the padded batches (what the LLM actually ran on)
    vit_calls: int = 0
    crops_encoded: int = 0
    batches: int = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


def _rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _plora(x: torch.Tensor, lin, im_idx: torch.Tensor | None) -> torch.Tensor:
    """`lin` is an engine PLoRALinear; only its weights are used. x `[B, L, in]`, im_idx int64 flat positions
    `b * L + j` of the image tokens (None: no image in the batch)."""
    res = F.linear(x, lin.weight)
    if im_idx is not None:
        flat = res.view(-1, res.shape[-1])
        part = x.reshape(-1, x.shape[-1])[im_idx]
        delta = F.linear(F.linear(part, lin.Plora_A.weight), lin.Plora_B.weight)
        flat[im_idx] += (delta * lin.scale) if lin.scale != 1.0 else delta
    return res


def _flash_attention(q, k, v, lens: list[int]) -> torch.Tensor:
    """Upstream's flash_attention_2 path on a right-padded batch: causal flash attention over each sequence's real
    tokens (q `[B, Hq, L, D]`, k/v `[B, Hkv, L, D]`); padded positions get zeros. Returns `[B, Hq, L, D]`."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = torch.zeros_like(q)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if q.is_cuda else _nullcontext():
        for b, n in enumerate(lens):
            out[b:b + 1, :, :n] = F.scaled_dot_product_attention(q[b:b + 1, :, :n], k[b:b + 1, :, :n],
                                                                 v[b:b + 1, :, :n], is_causal=True, enable_gqa=True)
    return out


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


def dense_crops(preps: list[PreparedSample]) -> list[PreparedSample]:
    """The samples with every crop in float32 (the engine's preparation keeps sub-crops in uint8 and normalises them
    on the device; upstream normalises all on the CPU and copies float32)."""
    out = []
    for p in preps:
        media = [mc if not mc.compact else MediaCrops(mc.pixel_values, mc.h, mc.w, mc.kind) for mc in p.media]
        out.append(dataclasses.replace(p, media=media))
    return out


@dataclass(slots=True)
class UpstreamBaseline:
    """Scores samples the way upstream's `get_scores` does (see the module docstring).

    `batch_size`: samples per right-padded forward; None puts the whole request in one batch as upstream does.
    """

    model: IXCRewardModel
    tokenizer: Tokenizer
    hd_num: int = 9
    batch_size: int | None = None
    stats: BaselineStats = field(default_factory=BaselineStats)

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {self.batch_size}")
        if self.hd_num < 1:
            raise ValueError(f"hd_num must be >= 1, got {self.hd_num}")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # --- request level --------------------------------------------------------------------------------------------
    def prepare(self, samples: list[Sample]) -> list[PreparedSample]:
        """Template, tokens and crops of every sample, each image loaded for each sample that holds it (no cache);
        crops as upstream makes them: every one normalised to float32 on the CPU."""
        return dense_crops([prepare_sample(self.tokenizer, s, hd_num=self.hd_num, max_length=self.model.cfg.max_length)
                            for s in samples])

    def score(self, samples: list[Sample]) -> list[float]:
        return self.score_prepared(self.prepare(samples))

    def score_conversations(self, conversations: list[list[dict]], images: list | None = None) -> list[float]:
        images = images if images is not None else [None] * len(conversations)
        if len(images) != len(conversations):
            raise ValueError(f"images: {len(images)} image lists for {len(conversations)} conversations")
        samples = [Sample(list(c), [] if m is None else list(m), id=i)
                   for i, (c, m) in enumerate(zip(conversations, images))]
        return self.score(samples)

    def best_of_n(self, messages: list[dict], candidates: list[str], images=None) -> list[float]:
        """Every candidate as a full conversation (prompt and image encoded again for each)."""
        convs = [list(messages) + [{"role": "assistant", "content": c}] for c in candidates]
        return self.score_conversations(convs, [images] * len(convs))

    @torch.inference_mode()
    def score_prepared(self, preps: list[PreparedSample]) -> list[float]:
        if not preps:
            return []
        step = self.batch_size or len(preps)
        out: list[float] = []
        for i in range(0, len(preps), step):
            out.extend(self._score_batch(preps[i:i + step]))
        return out

    # --- one padded batch -----------------------------------------------------------------------------------------
    def _embed(self, p: PreparedSample) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings `[n, H]` and im_mask `[n]` of one sample; each image through the ViT on its own, with the
        ViT's own eager ops (not the engine's fused kernels, should an engine have set them on the shared model)."""
        mlps = [layer.mlp for layer in self.model.vit.vision_tower.vision_model.encoder.layers]
        saved = [m.fused_act for m in mlps]
        for m in mlps:
            m.fused_act = None
        try:
            return self._embed_eager(p)
        finally:
            for m, f in zip(mlps, saved):
                m.fused_act = f

    def _embed_eager(self, p: PreparedSample) -> tuple[torch.Tensor, torch.Tensor]:
        emb_table = self.model.model.tok_embeddings.weight
        parts, masks = [], []
        for piece in p.pieces:
            if isinstance(piece, list):
                parts.append(emb_table[torch.tensor(piece, dtype=torch.long, device=self.device)])
                masks.append(torch.zeros(len(piece), dtype=torch.bool, device=self.device))
            else:
                mc = p.media[piece]
                merged = self.model.encode_crops(mc.pixel_values.to(self.device, self.dtype))
                emb = self.model.image_tokens(merged, mc.h, mc.w)
                self.stats.vit_calls += 1
                self.stats.crops_encoded += mc.n_crops
                parts.append(emb)
                masks.append(torch.ones(emb.shape[0], dtype=torch.bool, device=self.device))
        return torch.cat(parts), torch.cat(masks)

    def _score_batch(self, preps: list[PreparedSample]) -> list[float]:
        model, cfg = self.model, self.model.cfg
        dev, dt = self.device, self.dtype
        seqs = [self._embed(p) for p in preps]
        lens = [e.shape[0] for e, _ in seqs]
        B, L, Hd = len(seqs), max(lens), cfg.hidden_size
        pad = model.model.tok_embeddings.weight[cfg.pad_token_id]
        x = pad.expand(B, L, Hd).clone()
        valid = torch.zeros(B, L, dtype=torch.bool, device=dev)
        for b, (e, _) in enumerate(seqs):
            x[b, : e.shape[0]] = e
            valid[b, : e.shape[0]] = True
        # image positions from the host-side layout (the same positions as the per-sample masks)
        img = [b * L + j for b, p in enumerate(preps) for s, e, piece in p.segments() if not isinstance(piece, list)
               for j in range(s, e)]
        im_idx = torch.tensor(img, dtype=torch.long).to(dev) if img else None
        self.stats.samples += B
        self.stats.tokens += sum(lens)
        self.stats.padded_tokens += B * L
        self.stats.batches += 1

        flash = dev.type != "cpu"  # upstream attends with flash attention on a GPU, eagerly on a CPU
        mask = None
        if not flash:
            # Additive mask [B, 1, L, L]: 0 where key j <= query i and j is a real token, the dtype minimum elsewhere.
            keep = torch.tril(torch.ones(L, L, dtype=torch.bool, device=dev))[None, None] & valid[:, None, None, :]
            mask = torch.zeros(B, 1, L, L, dtype=dt, device=dev).masked_fill_(~keep, torch.finfo(dt).min)
            del keep

        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        groups = cfg.num_kv_groups
        inv_freq = 1.0 / (cfg.rope_base(L) ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd))
        freqs = torch.outer(torch.arange(L, device=dev, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dt)[None, None], emb.sin().to(dt)[None, None]  # [1, 1, L, D]
        eps = cfg.rms_norm_eps
        for layer in model.model.layers:
            att, ffn = layer.attention, layer.feed_forward
            h = _rmsnorm(x, layer.attention_norm.weight, eps)
            qkv = _plora(h, att.wqkv, im_idx).view(B, L, nkv, groups + 2, hd)
            q = qkv[:, :, :, :groups].reshape(B, L, nh, hd).transpose(1, 2)  # [B, Hq, L, D]
            k = qkv[:, :, :, -2].transpose(1, 2)  # [B, Hkv, L, D]
            v = qkv[:, :, :, -1].transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if flash:
                o = _flash_attention(q, k, v, lens).transpose(1, 2).reshape(B, L, nh * hd)
            else:
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
                w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(hd) + mask
                w = torch.softmax(w, dim=-1, dtype=torch.float32).to(dt)
                o = torch.matmul(w, v).transpose(1, 2).reshape(B, L, nh * hd)
                del w
            del q, k, v, qkv
            x = x + _plora(o, att.wo, im_idx)
            h = _rmsnorm(x, layer.ffn_norm.weight, eps)
            g = F.silu(_plora(h, ffn.w1, im_idx)) * _plora(h, ffn.w3, im_idx)
            x = x + _plora(g, ffn.w2, im_idx)
        x = _rmsnorm(x, model.model.norm.weight, eps)
        scores = F.linear(x, model.score.weight).float()[..., 0]  # [B, L]: the head on every position
        if cfg.pooling == "mean":
            per = (scores * valid).sum(1) / valid.sum(1)
        else:
            last = valid.long().cumsum(1).argmax(1)  # index of each row's last real token
            per = scores.gather(1, last[:, None])[:, 0]
        return [float("nan")] * B if per.is_meta else per.cpu().tolist()  # meta: bench/roofline.py's model
