"""Checkpoint loading: sharded safetensors (memory-mapped) or sharded .bin (weights_only), never shipped code."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ixc_engine.config import ModelConfig
from ixc_engine.models.reward_model import IXCRewardModel, is_ignored_tensor, meta_model

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
                weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: malformed index ({type(exc).__name__}: {exc})") from exc
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _load_state_dict(f: Path) -> dict[str, torch.Tensor]:
    """A .bin shard: a weights-only torch pickle holding a flat {name: tensor} dict, else CheckpointError."""
    try:
        state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, OSError ... depending on the damage
        raise CheckpointError(f"{f}: cannot read as a weights-only torch pickle ({_first_line(exc)})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{f}: holds a {type(state).__name__}, not a state dict of tensors")
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            what = type(tensor).__name__
            hint = " (a nested checkpoint? save model.state_dict() itself)" if isinstance(tensor, dict) else ""
            raise CheckpointError(f"{f}: entry {name!r} is a {what}, not a tensor: not a plain state dict{hint}")
    return state


def _safe_open(f: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(f), framework="pt")
    except Exception as exc:  # SafetensorError (truncated, bad header), OSError
        raise CheckpointError(f"{f}: cannot read as safetensors ({_first_line(exc)})") from exc


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) over all shards, skipping ignored tensors without reading them where the format allows."""
    for f in files:
        if f.suffix == ".safetensors":
            with _safe_open(f) as sf:
                for name in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if not is_ignored_tensor(name):
                        try:
                            tensor = sf.get_tensor(name)
                        except Exception as exc:
                            raise CheckpointError(f"{f}: cannot read tensor {name} ({_first_line(exc)})") from exc
                        yield name, tensor
        else:
            state = _load_state_dict(f)
            for name, tensor in state.items():
                if not is_ignored_tensor(name):
                    yield name, tensor
            del state


def tensor_shapes(files: list[Path], suffix: str) -> dict[str, tuple[int, ...]]:
    """Shapes of tensors whose names end with `suffix` (reads safetensors headers only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        if f.suffix == ".safetensors":
            with _safe_open(f) as sf:
                for name in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if name.endswith(suffix):
                        shapes[name] = tuple(sf.get_slice(name).get_shape())
        else:
            state = _load_state_dict(f)
            shapes.update({n: tuple(t.shape) for n, t in state.items() if n.endswith(suffix)})
    return shapes


def plora_rank(files: list[Path], cfg: ModelConfig) -> int:
    shapes = tensor_shapes(files, "Plora_A.weight")
    if bad := sorted(n for n, s in shapes.items() if len(s) != 2):
        raise CheckpointError(f"{bad[0]} has shape {shapes[bad[0]]}: a Plora_A weight must be 2-D [rank, in]")
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
    model = meta_model(cfg, rank)
    # Cast while still on meta (free), then allocate in the final dtype: the device holds only the final-size weights
    # (the release: ~16.6 GB in bf16, not 33 GB of fp32 first). Each tensor is cast on the CPU before its copy.
    model = model.to(dtype).to_empty(device=device)
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
            if not tensor.is_floating_point():
                raise CheckpointError(f"{ckpt}: tensor {name} has dtype {tensor.dtype}, not a floating-point dtype")
            target.copy_(tensor.to(dtype))  # tensor is on the CPU: the cast's temporary is host memory
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
