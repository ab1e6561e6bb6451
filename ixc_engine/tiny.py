"""Tiny random checkpoints in the exact release layout (config.json, sharded safetensors + index, tokenizer.model).

Used by tests, examples and benchmarks: every code path of the real 7B model runs, at a size a CPU handles.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from ixc_engine.config import ModelConfig, VisionConfig
from ixc_engine.models.reward_model import IXCRewardModel, meta_model

PACKAGED_TOKENIZER = Path(__file__).resolve().parent / "assets" / "tokenizer.model"


def tiny_config(**overrides) -> ModelConfig:
    """A small InternLM2 + ViT with the real vocabulary (so the real tokenizer applies) and real 560/14 geometry."""
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    base = ModelConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        rope_scaling_factor=2.0, plora_rank=8, plora_alpha=8, torch_dtype="float32", vision=vision,
    )
    return replace(base, **overrides)


def random_state_dict(model: IXCRewardModel, seed: int) -> dict[str, torch.Tensor]:
    """Weights with activations of order one: linear layers ~ N(0, 1/fan_in), norms ~ 1 + noise."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if name.endswith("norm.weight") or ".layer_norm" in name or "layrnorm.weight" in name:
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=gen)
        elif "tok_embeddings" in name or "embedding" in name or name.endswith("_GN"):
            t = torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            t = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        state[name] = t
    return state


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else by setting it back at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_file_mode(path: Path) -> None:
    """Give `path` the mode a plainly created file gets (0666 & ~umask), so other users can read checkpoints as the
    umask intends."""
    os.chmod(path, 0o666 & ~_umask())


def write_checkpoint(
    out_dir: str | Path, cfg: ModelConfig, state: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32,
    shards: int = 2, tokenizer: str | Path | None = None, fmt: str = "safetensors",
) -> Path:
    """Write `state` in the release layout: `fmt` 'safetensors' (model-0000i-of-0000n + index) or 'bin'."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(cfg, torch_dtype=str(dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    names = list(state)
    per = math.ceil(len(names) / shards)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(shards):
        part = {n: state[n].to(dtype).contiguous() for n in names[i * per:(i + 1) * per]}
        fname = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(part, str(out / fname), metadata={"format": "pt"})
            _normal_file_mode(out / fname)  # safetensors (0.8) creates its files with mode 0600 whatever the umask
        else:
            torch.save(part, out / fname)
        weight_map.update({n: fname for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    index_name = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (out / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    shutil.copyfile(tokenizer or PACKAGED_TOKENIZER, out / "tokenizer.model")
    return out


def init_tiny(
    out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, fmt: str = "safetensors",
    cfg: ModelConfig | None = None, extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Create a random tiny reward model at `out_dir`; `extra_tensors` lets tests add e.g. unused LoRA tensors."""
    cfg = cfg or tiny_config()
    model = meta_model(cfg, cfg.plora_rank or 8)
    state = random_state_dict(model, seed)
    state.update(extra_tensors or {})
    return write_checkpoint(out_dir, cfg, state, dtype=dtype, fmt=fmt)
