"""A reward function for TRL's GRPOTrainer (`reward_funcs=[IXCReward(...)]`), backed by an in-process engine or a
server URL.

TRL calls ``reward_func(prompts=..., completions=..., completion_ids=..., **columns)`` with one entry per generated
completion: ``prompts``/``completions`` are strings (plain datasets) or message lists (conversational: the prompt's
messages, the completion as ``[{"role": "assistant", "content": ...}]``); the dataset's other columns come as lists,
among them ``image`` (one image per row) or ``images`` (a list per row); trainer extras (``trainer_state``,
``log_extra``, ``log_metric``) are ignored here. For vision-language policies TRL puts the images into the prompt as
``{"type": "image", "image": <PIL.Image>}`` parts; those are used, and the column is then not added a second time.
Returns one float per completion (or None for a sample that cannot be scored, with ``on_error="none"``; TRL turns
None into NaN).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from ixc_engine.formats.parts import MediaResolver, resolve_media_ref

_MEDIA_PART_TYPES = ("image", "image_url", "input_image", "video", "video_url")


class IXCReward:
    """``IXCReward(engine)`` with a `RewardEngine`, ``IXCReward("http://host:8000")`` for a server, or
    ``IXCReward.from_pretrained(path)``.

    hd_num: the HD crop budget. on_error: "raise" (default: a sample that cannot be scored stops the step, naming it)
    or "none" (its reward is None, which TRL records as NaN, and a warning names it). client_kwargs go to
    `RewardClient` (api_key, retries, timeout, ...); local image files are then sent as data: URIs."""

    def __init__(self, backend: Any, *, hd_num: int = 9, on_error: str = "raise", name: str = "ixc_reward",
                 **client_kwargs) -> None:
        if on_error not in ("raise", "none"):
            raise ValueError(f"on_error must be 'raise' or 'none', got {on_error!r}")
        if isinstance(backend, str):
            from ixc_engine.client import RewardClient

            client_kwargs.setdefault("embed_media", True)
            self.client, self.engine = RewardClient(backend, **client_kwargs), None
        else:
            if client_kwargs:
                raise TypeError(f"client options {sorted(client_kwargs)} only apply to a URL backend")
            self.client, self.engine = None, backend
        self.hd_num, self.on_error = hd_num, on_error
        self.__name__ = name  # TRL names each reward function's logged column after it

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None, **kw) -> IXCReward:
        from ixc_engine.api import RewardEngine

        return cls(RewardEngine.from_pretrained(path, device=device, dtype=dtype), **kw)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids=None,
                 **kwargs) -> list[float | None]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        media_column = _media_column(kwargs, len(prompts))
        convs, media = [], []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            m, items = conversation(p, c, media_column[i], where=f"sample {i}")
            convs.append(m)
            media.append(items)
        if self.client is not None:
            results = self.client.score_results(convs, media, hd_num=self.hd_num)
            errors = [e for _, _, e in results]
            scores = [s for s, _, _ in results]
        else:
            from ixc_engine.api import Sample

            out = list(self.engine.score_stream([Sample(m, it, id=i) for i, (m, it) in enumerate(zip(convs, media))],
                                                hd_num=self.hd_num))
            scores, errors = [r.score for r in out], [r.error for r in out]
        bad = [(i, e) for i, e in enumerate(errors) if e is not None]
        if bad:
            detail = "; ".join(f"sample {i}: {e}" for i, e in bad[:5])
            if self.on_error == "raise":
                raise ValueError(f"{len(bad)} of {len(errors)} samples could not be scored: {detail}")
            warnings.warn(f"{self.__name__}: {len(bad)} samples got no reward (None): {detail}", stacklevel=2)
        return scores


def _media_column(kwargs: Mapping, n: int) -> list[list]:
    """The dataset's `images` (list per row) or `image` (one per row) column, as a media list per row."""
    if kwargs.get("images") is not None:
        col = kwargs["images"]
        rows = [[] if r is None else (list(r) if isinstance(r, (list, tuple)) else [r]) for r in col]
    elif kwargs.get("image") is not None:
        rows = [[] if r is None else [r] for r in kwargs["image"]]
    else:
        return [[] for _ in range(n)]
    if len(rows) != n:
        raise ValueError(f"the image column has {len(rows)} rows but there are {n} completions")
    return rows


def _has_media_payload(messages) -> bool:
    for m in messages:
        content = m.get("content") if isinstance(m, Mapping) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and part.get("type") in _MEDIA_PART_TYPES:
                    t = part["type"]
                    if part.get(t) is not None or part.get("url") is not None or part.get("path") is not None:
                        return True
    return False


_PATHS = MediaResolver()  # in-process: any readable path (the trainer's own dataset), data: URIs


def _resolve(ref, kind: str):
    if hasattr(ref, "convert") and hasattr(ref, "mode"):  # a PIL image, as TRL's VLM prompts carry
        return ref
    return resolve_media_ref(ref, kind, _PATHS)


def conversation(prompt: Any, completion: Any, column_media: list, where: str = "sample") -> tuple[list[dict], list]:
    """One TRL (prompt, completion) pair -> (plain messages, media) as the engine scores them."""
    from ixc_engine.formats.parts import flatten_messages
    from ixc_engine.serve.chat import ChatParseError, parse_chat

    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise TypeError(f"{where}: a plain (string) prompt needs a string completion, got "
                             f"{type(completion).__name__}")
        try:  # a prompt that already holds the chat template
            messages = parse_chat(prompt + completion)
        except ChatParseError:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return messages, list(column_media)
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    if not isinstance(prompt, (list, tuple)) or not isinstance(completion, (list, tuple)):
        raise TypeError(f"{where}: prompt and completion must be strings or lists of messages, got "
                         f"{type(prompt).__name__} and {type(completion).__name__}")
    messages = [*prompt, *completion]
    external = [] if _has_media_payload(messages) else list(column_media)
    flat, media = flatten_messages(messages, _resolve, external=external)
    return [{"role": m["role"], "content": m["content"]} if isinstance(m, Mapping) and "role" in m else m
            for m in flat], media
