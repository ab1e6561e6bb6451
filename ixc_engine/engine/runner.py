"""The model runner: the only place that touches the device. Batched ViT, embedding assembly, packed LLM forward,
fused score pooling."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ixc_engine.engine.sequence import PreparedSample
from ixc_engine.kernels.pool_score import pool_score
from ixc_engine.media.image import normalize_uint8
from ixc_engine.models.internlm2 import ForwardContext, KVCache
from ixc_engine.models.reward_model import IXCRewardModel


@dataclass(slots=True)
class SeqPlan:
    """One sequence of a batch: compute positions [start, sample.n_tokens); [0, start) is already in the KV cache."""

    sample: PreparedSample
    start: int = 0
    block_table: list[int] | None = None
    prefix_sum: float = 0.0  # mean pooling: sum of per-token scores over the cached prefix

    @property
    def new_tokens(self) -> int:
        return self.sample.n_tokens - self.start


@dataclass(slots=True)
class BatchResult:
    scores: list[float]
    block_sums: list[np.ndarray] | None  # mean pooling with a cache: per full block, the sum of token scores
    media_encoded: int = 0  # images/videos run through the ViT
    crops_encoded: int = 0


@dataclass(slots=True)
class PendingBatch:
    """A batch whose device work is queued: `ModelRunner.finish` reads its scores back (the batch's one sync)."""

    plans: list[SeqPlan]
    new_lens: list[int]
    scores: torch.Tensor
    token_scores: torch.Tensor | None
    media_encoded: int
    crops_encoded: int


@dataclass(slots=True)
class RunnerStats:
    gpu_seconds: float = 0.0
    forward_calls: int = 0


@dataclass(slots=True)
class ModelRunner:
    model: IXCRewardModel
    device: torch.device
    dtype: torch.dtype
    backend: str = "torch"  # "torch" reference ops, or "triton" kernels
    vit_batch: int = 32  # crops per ViT call
    media_cache_size: int = 8  # projected image embeddings kept (identical images within a job window)
    kv_cache: KVCache | None = None
    _media_cache: dict = field(default_factory=dict)
    stats: RunnerStats = field(default_factory=RunnerStats)
    _copy_stream: object = None  # CUDA side stream for host-to-device copies of crops

    # --- host -> device without synchronising ---------------------------------------------------------------------
    def upload(self, t: torch.Tensor, *, side_stream: bool = False) -> torch.Tensor:
        """A host tensor on the device without a stream sync (a plain `.to(cuda)` from pageable memory waits for
        the stream): staged in pinned memory, copied asynchronously; on a side stream that the compute stream then
        waits for when `side_stream` (big copies: they overlap the work queued before them). CPU: unchanged."""
        if self.device.type != "cuda":
            return t.to(self.device)
        pinned = t if t.is_pinned() else t.pin_memory()  # the caching host allocator keeps it until the copy is done
        if not side_stream:
            return pinned.to(self.device, non_blocking=True)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            out = pinned.to(self.device, non_blocking=True)
        main.wait_stream(self._copy_stream)
        out.record_stream(main)  # allocated on the side stream, used on the compute stream
        return out

    def media_pixels(self, mc) -> torch.Tensor:
        """ViT input of one MediaCrops on the device in the model dtype. Compact crops travel as uint8 and are
        normalised there (bit-identical to the host's fp32 normalisation); then one cast, as the host path did."""
        if mc.compact:
            glb = self.upload(mc.global_view, side_stream=True)
            subs = normalize_uint8(self.upload(mc.sub_uint8, side_stream=True))
            return torch.cat([glb, subs]).to(self.dtype)
        return self.upload(mc.pixel_values, side_stream=True).to(self.dtype)

    def __post_init__(self) -> None:
        if self.backend == "triton":  # the GPU path's fused layout of the PLoRA weights (views: names unchanged)
            self.model.prepare_for_inference(self.backend)

    # --- KV cache -------------------------------------------------------------------------------------------------
    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> KVCache:
        cfg = self.model.cfg
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        layers = range(cfg.num_hidden_layers)
        self.kv_cache = KVCache(
            k=[torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in layers],
            v=[torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in layers],
            block_size=block_size,
        )
        return self.kv_cache

    def kv_bytes_per_block(self, block_size: int) -> int:
        cfg = self.model.cfg
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem

    # --- vision ---------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _encode_media(self, todo: dict[str, object]) -> tuple[dict[str, torch.Tensor], int, int]:
        """Projected embeddings for each digest in `todo` (digest -> MediaCrops), crops of all media batched.

        Returns (embeddings, media run through the ViT, crops run through it); cached media count in neither."""
        out: dict[str, torch.Tensor] = {}
        missing = [(d, mc) for d, mc in todo.items() if d not in self._media_cache]
        for d in todo:
            if d in self._media_cache:
                out[d] = self._media_cache[d]
        n_crops = 0
        if missing:
            # ViT calls of vit_batch crops over all media's crops in order (the same chunks as one big concatenation);
            # each media's pixels go to the device as they are needed, so at most ~2 chunks are resident.
            merged, pending, pending_n = [], [], 0
            for _, mc in missing:
                pending.append(self.media_pixels(mc))
                pending_n += mc.n_crops
                while pending_n >= self.vit_batch:
                    cat = torch.cat(pending) if len(pending) > 1 else pending[0]
                    merged.append(self.model.encode_crops(cat[:self.vit_batch]))
                    pending, pending_n = [cat[self.vit_batch:]], pending_n - self.vit_batch
            if pending_n:
                merged.append(self.model.encode_crops(torch.cat(pending)))
            merged = torch.cat(merged)
            n_crops = merged.shape[0]
            offset = 0
            for d, mc in missing:
                k = mc.n_crops
                out[d] = self.model.image_tokens(merged[offset:offset + k], mc.h, mc.w)
                offset += k
                self._remember(d, out[d])
        return out, len(missing), n_crops

    def _remember(self, digest: str, emb: torch.Tensor) -> None:
        if self.media_cache_size <= 0:
            return
        self._media_cache[digest] = emb
        while len(self._media_cache) > self.media_cache_size:
            self._media_cache.pop(next(iter(self._media_cache)))

    # --- one packed forward ---------------------------------------------------------------------------------------
    def pack(self, plans: list[SeqPlan]) -> tuple[torch.Tensor, ForwardContext, int, int]:
        """Packed embeddings `[T, H]` of every plan's positions [start, n_tokens) and their ForwardContext.

        Media whose tokens all lie in a cached prefix are not encoded. Returns (embeds, ctx, media encoded, crops).
        """
        todo: dict[str, object] = {}
        for p in plans:
            for start, end, piece in p.sample.segments():
                if not isinstance(piece, list) and end > p.start:
                    todo[p.sample.media_digests[piece]] = p.sample.media[piece]
        with torch.no_grad():  # the vision path is frozen, also in training
            media_emb, n_media, n_crops = self._encode_media(todo)

        # one embedding lookup for all text of the batch (one dense gradient when training), then interleave
        text_ids: list[int] = []
        order: list[tuple[str, object]] = []  # ("text", n) or ("media", tensor slice), in packed order
        image_pos, new_lens, totals = [], [], []
        offset = 0
        for p in plans:
            for start, end, piece in p.sample.segments():
                lo, hi = max(start, p.start), end
                if hi <= lo:
                    continue
                if isinstance(piece, list):
                    text_ids.extend(piece[lo - start:hi - start])
                    order.append(("text", hi - lo))
                else:
                    order.append(("media", media_emb[p.sample.media_digests[piece]][lo - start:hi - start]))
                    image_pos.append(torch.arange(offset + lo - p.start, offset + hi - p.start))
            new_lens.append(p.new_tokens)
            totals.append(p.sample.n_tokens)
            offset += p.new_tokens
        text = self.model.model.tok_embeddings(self.upload(torch.tensor(text_ids, dtype=torch.long)))
        text_parts = iter(text.split([n for kind, n in order if kind == "text"]))
        chunks = [next(text_parts) if kind == "text" else x for kind, x in order]
        if any(n <= 0 for n in new_lens):
            raise ValueError("every planned sequence must compute at least one token")
        embeds = torch.cat(chunks)
        lens = torch.tensor(new_lens, dtype=torch.int32)
        cu = torch.zeros(len(plans) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens, 0)
        starts = torch.tensor([p.start for p in plans], dtype=torch.long)
        positions = torch.arange(offset, dtype=torch.long) - torch.repeat_interleave(cu[:-1].long() - starts, lens)
        ctx = ForwardContext(
            cu_seqlens=self.upload(cu),
            positions=self.upload(positions),
            seq_lens_total=totals,
            new_lens=new_lens,
            image_index=self.upload(torch.cat(image_pos)) if image_pos else None,
            backend=self.backend,
            metadata_checked=True,
        )
        return embeds, ctx, n_media, n_crops

    def forward_hidden(self, plans: list[SeqPlan], parents=None) -> tuple[torch.Tensor, ForwardContext]:
        """Final hidden states (before the norm) with autograd enabled: for training (no KV cache).

        parents: see ForwardContext; a plan with start > 0 then takes its first positions from its parent's."""
        embeds, ctx, _, _ = self.pack(plans)
        ctx.parents = parents
        return self.model.hidden_states(embeds, ctx), ctx

    @torch.inference_mode()
    def run(
        self, plans: list[SeqPlan], *, pooling: str, slot_mapping: np.ndarray | None = None,
        block_tables: np.ndarray | None = None, want_block_sums: bool = False,
    ) -> BatchResult:
        return self.finish(self.launch(plans, pooling=pooling, slot_mapping=slot_mapping, block_tables=block_tables,
                                       want_block_sums=want_block_sums))

    @torch.inference_mode()
    def launch(
        self, plans: list[SeqPlan], *, pooling: str, slot_mapping: np.ndarray | None = None,
        block_tables: np.ndarray | None = None, want_block_sums: bool = False,
    ) -> PendingBatch:
        """Queue one batch's device work (no device sync: every host-to-device copy is asynchronous and the kernels
        are told the metadata the host built); `finish` reads the scores back."""
        t0 = time.perf_counter()
        embeds, ctx, n_media, n_crops = self.pack(plans)
        starts = torch.tensor([p.start for p in plans], dtype=torch.long)
        if self.kv_cache is not None and slot_mapping is not None:
            ctx.kv_cache = self.kv_cache
            ctx.slot_mapping = self.upload(torch.from_numpy(slot_mapping))
            ctx.block_tables = self.upload(torch.from_numpy(block_tables))
            ctx.prefix_lens = self.upload(starts.to(torch.int32))
        hidden = self.model.hidden_states(embeds, ctx)

        norm_w = self.model.model.norm.weight
        head_w = self.model.score.weight
        eps = self.model.cfg.rms_norm_eps
        cu_host = [0, *np.cumsum(ctx.new_lens).tolist()]
        tok = None
        if pooling == "last":
            scores = pool_score(hidden, norm_w, head_w, ctx.cu_seqlens, mode="last", eps=eps, backend=self.backend,
                                host_metadata=cu_host)
        else:
            has_prefix = any(p.start for p in plans)
            prefix_sum = torch.tensor([p.prefix_sum for p in plans], dtype=torch.float32)
            scores = pool_score(
                hidden, norm_w, head_w, ctx.cu_seqlens, mode="mean", eps=eps, backend=self.backend,
                prefix_sum=self.upload(prefix_sum) if has_prefix else None,
                prefix_count=self.upload(starts) if has_prefix else None,
                host_metadata=cu_host + (starts.tolist() if has_prefix else []),
            )
            if want_block_sums:
                tok = pool_score(hidden, norm_w, head_w, ctx.cu_seqlens, mode="token", eps=eps, backend=self.backend,
                                 host_metadata=cu_host)
        self.stats.gpu_seconds += time.perf_counter() - t0
        return PendingBatch(plans, ctx.new_lens, scores, tok, n_media, n_crops)

    def finish(self, pending: PendingBatch) -> BatchResult:
        """Read one launched batch's scores back to the host (waits for its device work)."""
        t0 = time.perf_counter()
        scores = pending.scores
        # meta tensors (bench/roofline.py's model of this path) hold no values to read back
        result = [float("nan")] * len(pending.plans) if scores.is_meta else scores.float().cpu().tolist()
        block_sums = None
        if pending.token_scores is not None:
            tok = pending.token_scores
            tok_host = np.zeros(tok.shape[0]) if tok.is_meta else tok.double().cpu().numpy()
            block_sums = self._block_sums(tok_host, pending.plans, pending.new_lens)
        self.stats.gpu_seconds += time.perf_counter() - t0
        self.stats.forward_calls += 1
        return BatchResult(result, block_sums, pending.media_encoded, pending.crops_encoded)

    def _block_sums(self, tok: np.ndarray, plans: list[SeqPlan], new_lens: list[int]) -> list[np.ndarray]:
        """Per sequence, the token-score sum of every full block that ends inside the newly computed part."""
        bs = self.kv_cache.block_size if self.kv_cache is not None else 16
        out, off = [], 0
        for p, n in zip(plans, new_lens):
            seg = tok[off:off + n]
            first_block = p.start // bs  # starts are block-aligned
            n_full = p.sample.n_tokens // bs - first_block
            out.append(np.array([seg[i * bs:(i + 1) * bs].sum() for i in range(max(n_full, 0))]))
            off += n
        return out
