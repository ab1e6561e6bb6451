"""Checkpoint loading: sharded safetensors (memory-mapped) or sharded .bin (weights_only), never shipped code."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ixc_engine.config import ModelConfig
from ixc_engine.models.reward_model import IXCRewardModel, is_ignored_tensor

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
DATA_PATTERNS = ["*.json", "*.safetensors", "*.bin", "tokenizer.model"]  # what a hub download may fetch: no *.py


class CheckpointError(RuntimeError):
    pass


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local directory, or a hub id fetched with huggingface_hub (data files only: no Python is downloaded)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists():
        raise CheckpointError(f"{text}: not a directory (expected a checkpoint directory with config.json)")
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise CheckpointError(f"{text}: no such checkpoint directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise CheckpointError(
            f"{text}: not a local directory, and huggingface_hub is not installed to fetch it from the hub "
            "(pip install 'ixc-engine[hub]', or download the checkpoint and pass its directory)"
        ) from exc
    try:
        return Path(snapshot_download(text, allow_patterns=DATA_PATTERNS))
    except Exception as exc:  # network errors come in many types
        raise CheckpointError(
            f"{text}: could not fetch from the hub ({type(exc).__name__}: {exc}). Without network access, download "
            "the checkpoint elsewhere and pass its local directory."
        ) from exc


def weight_files(ckpt: Path) -> list[Path]:
    """Shards in load order: safetensors (index or single file) first, else .bin (index or single file)."""
    for index_name, single in ((SAFE_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        index = ckpt / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: malformed index ({exc})") from exc
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (ckpt / f).is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard files missing: {missing}")
            return [ckpt / f for f in files]
        if (ckpt / single).is_file():
            return [ckpt / single]
    raise CheckpointError(
        f"{ckpt}: no weights found (expected {SAFE_INDEX}, model.safetensors, {BIN_INDEX} or pytorch_model.bin)"
    )


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) over all shards, skipping ignored tensors without reading them where the format allows."""
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if not is_ignored_tensor(name):
                        yield name, sf.get_tensor(name)
        else:
            try:
                state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise CheckpointError(f"{f}: cannot read as a weights-only torch pickle: {exc}") from exc
            for name, tensor in state.items():
                if not is_ignored_tensor(name):
                    yield name, tensor
            del state


def tensor_shapes(files: list[Path], suffix: str) -> dict[str, tuple[int, ...]]:
    """Shapes of tensors whose names end with `suffix` (reads safetensors headers only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if name.endswith(suffix):
                        shapes[name] = tuple(sf.get_slice(name).get_shape())
        else:
            state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            shapes.update({n: tuple(t.shape) for n, t in state.items() if n.endswith(suffix)})
    return shapes


def plora_rank(files: list[Path], cfg: ModelConfig) -> int:
    shapes = tensor_shapes(files, "Plora_A.weight")
    ranks = {s[0] for s in shapes.values()}
    if len(ranks) > 1:
        raise CheckpointError(f"Plora_A tensors disagree on the LoRA rank: {sorted(ranks)}")
    if ranks:
        rank = ranks.pop()
        if cfg.plora_rank is not None and cfg.plora_rank != rank:
            raise CheckpointError(f"config says plora_rank {cfg.plora_rank} but Plora_A tensors have rank {rank}")
        return rank
    if cfg.plora_rank is None:
        raise CheckpointError("no Plora_A tensors in the checkpoint and no plora_rank in config.json")
    return cfg.plora_rank


def _summary(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_model(
    path_or_id: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    pooling: str | None = None,
) -> tuple[IXCRewardModel, Path]:
    """Build the model from config.json and fill every parameter from the checkpoint, cast to `dtype`."""
    ckpt = resolve_checkpoint(path_or_id)
    config_path = ckpt / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{ckpt}: config.json not found")
    cfg = ModelConfig.from_file(config_path)
    if pooling is not None:
        cfg.pooling = pooling
        cfg.__post_init__()
    files = weight_files(ckpt)
    cfg.plora_rank = plora_rank(files, cfg)
    rank = cfg.plora_rank
    with torch.device("meta"):
        model = IXCRewardModel(cfg, rank)
    model = model.to(dtype).to_empty(device=device)  # no fp32 copy first: 7B in bf16 is 16.6 GB, in fp32 33 GB
    params = dict(model.named_parameters())
    seen: set[str] = set()
    unexpected: list[str] = []
    misshaped: list[str] = []
    with torch.no_grad():
        for name, tensor in iter_tensors(files):
            target = params.get(name)
            if target is None:
                unexpected.append(name)
                continue
            if tuple(tensor.shape) != tuple(target.shape):
                misshaped.append(f"{name} {tuple(tensor.shape)} (expected {tuple(target.shape)})")
                continue
            target.copy_(tensor.to(dtype))
            seen.add(name)
    missing = sorted(set(params) - seen)
    problems = []
    if missing:
        problems.append(f"missing tensors: {_summary(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_summary(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {_summary(misshaped)}")
    if problems:
        raise CheckpointError(f"{ckpt}: checkpoint does not match config.json: " + "; ".join(problems))
    model.eval().requires_grad_(False)
    return model, ckpt
