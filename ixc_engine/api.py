"""Public Python API: `RewardEngine.from_pretrained(...)`, then `score`, `compare`, `rank`, `best_of_n`."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ixc_engine.checkpoint import load_model, resolve_checkpoint
from ixc_engine.config import ModelConfig
from ixc_engine.engine.engine import EngineConfig, ScoreResult, ScoringEngine
from ixc_engine.engine.runner import ModelRunner
from ixc_engine.engine.sequence import PreparedSample, Sample, SampleError
from ixc_engine.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None,
                         hidden_size: int | None = None):
    """Defaults: the first CUDA GPU in bf16 when there is one, else the CPU in fp32.

    dtype "auto": bf16 on a GPU; on a CPU bf16 only where it has bf16 matrix units and a same-run probe at the model's
    width (`hidden_size`) shows bf16 faster, else fp32 (`ixc_engine.engine.cpu.auto_cpu_dtype`, < 1 s)."""
    return _resolve_device_dtype(device, dtype, hidden_size)[:2]


def _resolve_device_dtype(device, dtype, hidden_size: int | None = None):
    """(device, dtype, CpuDtypeChoice or None): the choice when `auto` decided on a CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    choice = None
    if isinstance(dtype, str) and dtype == "auto":
        if device.type == "cpu":
            from ixc_engine.engine.cpu import auto_cpu_dtype

            choice = auto_cpu_dtype(hidden_size)
            dtype = choice.dtype
        else:
            dtype = torch.bfloat16
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES) + ['auto']}")
        dtype = DTYPES[dtype]
    return device, dtype, choice


class RewardEngine:
    """Scores conversations (with images or videos) with an IXC-2.5-Reward checkpoint.

    `hd_num` is the HD crop budget per image: 9 is upstream's own setting in its README and benchmarks (this API's
    default); upstream's `get_score` defaulted to 24. Samples with several images use 6 per image, as upstream does.
    """

    def __init__(self, engine: ScoringEngine) -> None:
        self.engine = engine
        self.dtype_choice = None  # what dtype="auto" measured and chose on a CPU (CpuDtypeChoice), else None

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | os.PathLike, device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None, *, pooling: str | None = None, backend: str | None = None,
        config: EngineConfig | None = None,
    ) -> RewardEngine:
        hidden = None
        if isinstance(dtype, str) and dtype == "auto":  # the probe runs at the model's own width
            path_or_id = resolve_checkpoint(path_or_id)
            if (Path(path_or_id) / "config.json").is_file():  # else load_model says what is missing
                hidden = ModelConfig.from_file(Path(path_or_id) / "config.json").hidden_size
        device, dtype, choice = _resolve_device_dtype(device, dtype, hidden)
        model, ckpt = load_model(path_or_id, dtype=dtype, device=device, pooling=pooling)
        tok_path = Path(ckpt) / "tokenizer.model"
        if not tok_path.is_file():
            # every IXC-2.5 checkpoint uses the same InternLM2 tokenizer, which ships with this package
            from ixc_engine.tiny import PACKAGED_TOKENIZER

            warnings.warn(f"{ckpt}: no tokenizer.model, using the packaged InternLM2 tokenizer", stacklevel=2)
            tok_path = PACKAGED_TOKENIZER
        engine = cls.from_model(model, tok_path, backend=backend, config=config)
        engine.dtype_choice = choice
        return engine

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
    def _samples(self, conversations, images, method: str = "score") -> list[Sample]:
        _check_conversations(conversations, method)
        if images is None:
            images = [None] * len(conversations)
        elif isinstance(images, (str, bytes, os.PathLike, Mapping)) or hasattr(images, "convert"):
            raise ValueError(f"{method}: images must be a list with one entry per conversation (a list of image/video "
                             f"paths or PIL images, or None), got a single {type(images).__name__}; for one "
                             f"conversation with one image: images=[[path]]")
        if len(images) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
        out = []
        for i, (conv, media) in enumerate(zip(conversations, images)):
            if media is None:
                media = []
            elif isinstance(media, (str, os.PathLike)) or hasattr(media, "convert"):
                media = [media]
            # a str or dict is passed as is, so that the template check names its type (list() would split it up)
            conv = conv if isinstance(conv, (str, bytes, Mapping)) or not isinstance(conv, Iterable) else list(conv)
            out.append(Sample(conv, list(media), id=i))
        return out

    def _score_samples(self, samples: list[Sample], hd_num: int) -> list[float]:
        results = list(self.engine.score_stream(samples, hd_num=hd_num))
        errors = [r for r in results if r.error is not None]
        if errors:
            detail = "; ".join(f"conversation {r.index}: {r.error}" for r in errors[:5])
            raise SampleError(f"{len(errors)} of {len(results)} conversations could not be scored: {detail}")
        return [r.score for r in results]

    def score(self, conversations: Sequence[list[dict]], images: Sequence[Any] | None = None, hd_num: int = 9):
        """One float per conversation (a list of {role, content} messages); images: per conversation a list of
        image/video paths or PIL images (or None)."""
        return self._score(conversations, images, hd_num, "score")

    def _score(self, conversations, images, hd_num: int, method: str) -> list[float]:
        return self._score_samples(self._samples(conversations, images, method), hd_num)

    def compare(self, conv_a, conv_b, images_a=None, images_b=None, hd_num: int = 9) -> bool:
        """True when conversation a scores higher than conversation b."""
        a, b = self.score([conv_a, conv_b], [images_a, images_b], hd_num=hd_num)
        return a > b

    def rank(self, conversations, images=None, hd_num: int = 9) -> list[int]:
        """Indices of the conversations, best first (ties keep input order)."""
        scores = self._score(conversations, images, hd_num, "rank")
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))

    def best_of_n(self, messages: list[dict], candidates: Sequence[str], images=None, hd_num: int = 9):
        """Score assistant replies `candidates` (a list of str) to the same `messages`; the shared prompt and its
        images (None, one path or PIL image, or a list of them) are encoded once (prefix cache). Returns (index of the
        best candidate, all scores)."""
        what = "the shared conversation, a list of {role, content} dicts"
        if isinstance(messages, Mapping):
            msg = f"best_of_n: messages must be {what}; got a single dict (one message: pass [message])"
            raise ValueError(msg)  # noqa: TRY004
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ValueError(f"best_of_n: messages must be {what}, got {type(messages).__name__}")  # noqa: TRY004
        what = "a list or tuple of assistant replies (str)"
        if isinstance(candidates, (str, bytes)):
            msg = (f"best_of_n: candidates must be {what}, got a single {type(candidates).__name__} (each of its "
                   f"characters would be scored as a reply); for one reply pass [reply]")
            raise ValueError(msg)  # noqa: TRY004
        if not isinstance(candidates, (list, tuple)):
            raise ValueError(f"best_of_n: candidates must be {what}, got {type(candidates).__name__}")  # noqa: TRY004
        if not candidates:
            raise ValueError("best_of_n needs at least one candidate")
        for i, c in enumerate(candidates):
            if not isinstance(c, str):
                msg = f"best_of_n: candidates[{i}] has type {type(c).__name__}, not str (one assistant reply's text)"
                raise ValueError(msg)  # noqa: TRY004
        media = _shared_media(images)
        convs = [list(messages) + [{"role": "assistant", "content": c}] for c in candidates]
        scores = self._score(convs, [media] * len(convs), hd_num, "best_of_n")
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        return best, scores

    def score_stream(
        self, samples: Iterable[Sample | tuple[int, Sample | SampleError]], hd_num: int = 9
    ) -> Iterator[ScoreResult]:
        """Results in input order, one per sample: for corpus jobs. Items are `Sample(messages, media, id)`s or
        `(index, Sample | SampleError)` pairs (the index is reported back as `ScoreResult.index`); a `PreparedSample`
        made elsewhere with `self.engine.preparation()`'s settings and this hd_num may stand in for a Sample (the
        server prepares text samples in its HTTP process). A sample that cannot
        be scored (bad messages, media, length) gives a result with `error` set; an item of any other type raises
        TypeError (at once for a list or tuple, when it is reached for other iterables)."""
        if isinstance(samples, (Sample, str, bytes, Mapping)) or not isinstance(samples, Iterable):
            raise TypeError(f"score_stream: samples must be an iterable of {_STREAM_FORMS}, got "
                            f"{type(samples).__name__}" + ("; for one sample pass [sample]"
                                                           if isinstance(samples, Sample) else ""))
        if isinstance(samples, (list, tuple)):
            for pos, item in enumerate(samples):
                _check_stream_item(pos, item)
            checked: Iterable = samples
        else:
            checked = (_check_stream_item(pos, item) for pos, item in enumerate(samples))
        return self.engine.score_stream(checked, hd_num=hd_num)

    def close(self) -> None:
        """Stop preprocessing worker processes (EngineConfig.workers > 0); the engine stays usable."""
        self.engine.close()

    def stats(self) -> dict[str, float | int]:
        """Tokens requested/computed, prefix tokens reused, ViT media/crops encoded, CPU/GPU seconds."""
        return self.engine.stats.as_dict()


_STREAM_FORMS = "Sample(messages, media, id)s or (index, Sample) tuples"


def _describe(obj) -> str:
    if isinstance(obj, tuple):
        return f"a tuple ({', '.join(type(x).__name__ for x in obj)})"
    return f"a {type(obj).__name__}"


def _looks_like_conversation(obj) -> bool:
    return (isinstance(obj, (list, tuple)) and len(obj) > 0
            and all(isinstance(m, Mapping) and "role" in m for m in obj))


def _check_stream_item(pos: int, item):
    """A score_stream item as the engine takes it, or TypeError naming the accepted forms and what came."""
    if isinstance(item, (Sample, PreparedSample)):
        return item
    if (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int) and not isinstance(item[0], bool)
            and isinstance(item[1], (Sample, SampleError, PreparedSample))):
        return item
    hint = ""
    if _looks_like_conversation(item) or (isinstance(item, tuple) and any(map(_looks_like_conversation, item))):
        hint = "; a conversation and its media go in as Sample(messages, media)"
    elif isinstance(item, Mapping):
        hint = "; build a Sample(messages, media, id) from it"
    raise TypeError(f"score_stream: item {pos} is {_describe(item)}; each item must be a Sample(messages, media, "
                    f"id) or an (index, Sample) tuple with an int index{hint}")


def _check_conversations(conversations, method: str) -> None:
    """`conversations` is a list of conversations; a single conversation (a list of message dicts) is a common slip."""
    if isinstance(conversations, (str, bytes, Mapping)) or not isinstance(conversations, Sequence):
        msg = (f"{method}: conversations must be a list of conversations (each a list of {{role, content}} dicts), "
               f"got {type(conversations).__name__}")
        raise ValueError(msg)  # noqa: TRY004
    for i, conv in enumerate(conversations):
        if isinstance(conv, Mapping) and "role" in conv:
            raise ValueError(f"{method}: conversations[{i}] is a single message ({{'role': {conv['role']!r}, ...}}), "
                             f"not a conversation: {method} takes a list of conversations; to {method} one "
                             f"conversation, wrap it: engine.{method}([messages])")


def _shared_media(images) -> list:
    """best_of_n's images: None, one path or PIL image, or a list/tuple of them (the shared prompt's media)."""
    if images is None:
        return []
    if isinstance(images, (str, os.PathLike)) or hasattr(images, "convert"):
        return [images]
    if isinstance(images, (bytes, Mapping)) or not isinstance(images, (list, tuple)):
        msg = (f"best_of_n: images must be None, a path or PIL image, or a list of them (the shared prompt's images, "
               f"used for every candidate), got {type(images).__name__}")
        raise ValueError(msg)  # noqa: TRY004
    for i, m in enumerate(images):
        if not (isinstance(m, (str, os.PathLike)) or hasattr(m, "convert")):
            extra = " (images are shared by all candidates, not given per candidate)" if isinstance(
                m, (list, tuple)) else ""
            raise ValueError(f"best_of_n: images[{i}] has type {type(m).__name__}, not an image/video path or "
                             f"PIL image{extra}")
    return list(images)
