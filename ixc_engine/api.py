"""Public Python API: `RewardEngine.from_pretrained(...)`, then `score`, `compare`, `rank`, `best_of_n`."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ixc_engine.checkpoint import load_model
from ixc_engine.engine.engine import EngineConfig, ScoreResult, ScoringEngine
from ixc_engine.engine.runner import ModelRunner
from ixc_engine.engine.sequence import Sample, SampleError
from ixc_engine.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None):
    """Defaults: the first CUDA GPU in bf16 when there is one, else the CPU in fp32."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    return device, dtype


class RewardEngine:
    """Scores conversations (with images or videos) with an IXC-2.5-Reward checkpoint.

    `hd_num` is the HD crop budget per image: 9 is upstream's own setting in its README and benchmarks (this API's
    default); upstream's `get_score` defaulted to 24. Samples with several images use 6 per image, as upstream does.
    """

    def __init__(self, engine: ScoringEngine) -> None:
        self.engine = engine

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | os.PathLike, device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None, *, pooling: str | None = None, backend: str | None = None,
        config: EngineConfig | None = None,
    ) -> RewardEngine:
        device, dtype = resolve_device_dtype(device, dtype)
        model, ckpt = load_model(path_or_id, dtype=dtype, device=device, pooling=pooling)
        tok_path = Path(ckpt) / "tokenizer.model"
        if not tok_path.is_file():
            # every IXC-2.5 checkpoint uses the same InternLM2 tokenizer, which ships with this package
            from ixc_engine.tiny import PACKAGED_TOKENIZER

            warnings.warn(f"{ckpt}: no tokenizer.model, using the packaged InternLM2 tokenizer", stacklevel=2)
            tok_path = PACKAGED_TOKENIZER
        return cls.from_model(model, tok_path, backend=backend, config=config)

    @classmethod
    def from_model(
        cls, model, tokenizer_path: str | os.PathLike, *, backend: str | None = None,
        config: EngineConfig | None = None,
    ) -> RewardEngine:
        """Wrap an in-memory `IXCRewardModel` (already on its device and dtype): for benchmarks and training."""
        p = next(model.parameters())
        if backend is None:
            backend = "triton" if p.device.type == "cuda" else "torch"
        runner = ModelRunner(model, p.device, p.dtype, backend=backend)
        engine = ScoringEngine(
            runner, Tokenizer.from_file(tokenizer_path), str(tokenizer_path), model.cfg.pooling, model.cfg.max_length,
            config or EngineConfig(),
        )
        return cls(engine)

    @property
    def config(self):
        return self.engine.runner.model.cfg

    # --- scoring --------------------------------------------------------------------------------------------------
    def _samples(self, conversations, images) -> list[Sample]:
        if images is None:
            images = [None] * len(conversations)
        if len(images) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
        out = []
        for i, (conv, media) in enumerate(zip(conversations, images)):
            if media is None:
                media = []
            elif isinstance(media, (str, os.PathLike)) or hasattr(media, "convert"):
                media = [media]
            out.append(Sample(list(conv), list(media), id=i))
        return out

    def _score_samples(self, samples: list[Sample], hd_num: int) -> list[float]:
        self.engine.cfg.hd_num = hd_num
        results = list(self.engine.score_stream(samples))
        errors = [r for r in results if r.error is not None]
        if errors:
            detail = "; ".join(f"conversation {r.index}: {r.error}" for r in errors[:5])
            raise SampleError(f"{len(errors)} of {len(results)} conversations could not be scored: {detail}")
        return [r.score for r in results]

    def score(self, conversations: Sequence[list[dict]], images: Sequence[Any] | None = None, hd_num: int = 9):
        """One float per conversation (a list of {role, content} messages); images: per conversation a list of
        image/video paths or PIL images (or None)."""
        return self._score_samples(self._samples(conversations, images), hd_num)

    def compare(self, conv_a, conv_b, images_a=None, images_b=None, hd_num: int = 9) -> bool:
        """True when conversation a scores higher than conversation b."""
        a, b = self.score([conv_a, conv_b], [images_a, images_b], hd_num=hd_num)
        return a > b

    def rank(self, conversations, images=None, hd_num: int = 9) -> list[int]:
        """Indices of the conversations, best first (ties keep input order)."""
        scores = self.score(conversations, images, hd_num=hd_num)
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))

    def best_of_n(self, messages: list[dict], candidates: Sequence[str], images=None, hd_num: int = 9):
        """Score assistant replies `candidates` to the same `messages`; the shared prompt and image are encoded once
        (prefix cache). Returns (index of the best candidate, all scores)."""
        if not candidates:
            raise ValueError("best_of_n needs at least one candidate")
        convs = [list(messages) + [{"role": "assistant", "content": c}] for c in candidates]
        scores = self.score(convs, [images] * len(convs), hd_num=hd_num)
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        return best, scores

    def score_stream(self, samples: Iterable[Sample], hd_num: int = 9) -> Iterator[ScoreResult]:
        """Results in input order, one per sample (errors included, with `error` set): for corpus jobs."""
        self.engine.cfg.hd_num = hd_num
        return self.engine.score_stream(samples)

    def close(self) -> None:
        """Stop preprocessing worker processes (EngineConfig.workers > 0); the engine stays usable."""
        self.engine.close()

    def stats(self) -> dict[str, float | int]:
        """Tokens requested/computed, prefix tokens reused, ViT media/crops encoded, CPU/GPU seconds."""
        return self.engine.stats.as_dict()
