"""Model configuration, read from a checkpoint's config.json (see ../shared/MODEL.md sections 3-4)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

POOLING_MODES = ("last", "mean")


def _check_field_types(obj, prefix: str = "") -> None:
    """Each field holds what its annotation says: an int (not a bool, float or str), a number for a float (an int is
    accepted and stored as a float; not a bool, str or non-finite), a str; ``| None`` fields may be None.

    config.json is written by hand and by other tools: "48" or 2.0 where an int belongs must fail here, by name,
    not deep inside the model build."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        kind = str(f.type).replace(" ", "")
        optional = kind.endswith("|None")
        kind = kind.removesuffix("|None")
        if optional and value is None:
            continue
        name = f"{prefix}{f.name}"
        got = f"got {type(value).__name__} {value!r}"
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, {got}")
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, {got}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, {got}")
            setattr(obj, f.name, float(value))
        elif kind == "str" and not isinstance(value, str):
            raise ValueError(f"{name} must be a string, {got}")


def _check_positive(obj, names: tuple[str, ...], prefix: str = "") -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise ValueError(f"{prefix}{name} must be positive, got {value}")


@dataclass(slots=True)
class VisionConfig:
    """CLIP ViT-L/14 at 560x560. The release's config.json has no vision config: these defaults are the real one."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 560
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_field_types(self, "vision_config.")
        _check_positive(self, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "layer_norm_eps"), "vision_config.")
        if self.image_size != 560 or self.patch_size != 14:
            raise ValueError(
                f"vision_config: image_size must be 560 and patch_size 14 (the 40x40 patch layout depends on it), "
                f"got {self.image_size} and {self.patch_size}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision_config: hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"vision_config: unsupported hidden_act {self.hidden_act!r}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size  # 40

    @property
    def merged_width(self) -> int:
        return 4 * self.hidden_size  # width of merged tokens and separators


@dataclass(slots=True)
class ModelConfig:
    """InternLM2 backbone with PLoRA plus the vision path and the score head."""

    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    intermediate_size: int = 14336
    vocab_size: int = 92544
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    rope_scaling_factor: float = 1.0  # dynamic NTK factor; 1.0 means no rescale
    max_position_embeddings: int = 24576
    max_length: int = 16384
    plora_rank: int | None = None  # read off Plora_A shapes at load time when absent
    plora_alpha: float | None = None
    pooling: str = "last"
    pad_token_id: int = 2
    bos_token_id: int = 1
    eos_token_id: int = 2
    reward_token_id: int = 92527
    torch_dtype: str = "bfloat16"
    vision: VisionConfig = field(default_factory=VisionConfig)

    def __post_init__(self) -> None:
        _check_field_types(self)
        if not isinstance(self.vision, VisionConfig):
            raise ValueError(f"vision must be a VisionConfig, got {type(self.vision).__name__}")  # noqa: TRY004
        _check_positive(self, (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size", "max_position_embeddings", "max_length", "plora_rank", "rms_norm_eps", "rope_theta",
            "rope_scaling_factor",
        ))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "reward_token_id"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {self.pooling!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not a multiple of heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        for name in ("num_hidden_layers", "intermediate_size", "vocab_size", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def plora_scale(self) -> float:
        if self.plora_rank is None:
            return 1.0
        alpha = self.plora_alpha if self.plora_alpha is not None else self.plora_rank
        return float(alpha) / float(self.plora_rank)

    def rope_base(self, seq_len: int) -> float:
        """RoPE base for a sequence of `seq_len` tokens: InternLM2's dynamic-NTK rule past max_position_embeddings."""
        if self.rope_scaling_factor == 1.0 or seq_len <= self.max_position_embeddings:
            return self.rope_theta
        f = self.rope_scaling_factor
        d = self.head_dim
        return self.rope_theta * ((f * seq_len / self.max_position_embeddings) - (f - 1)) ** (d / (d - 2))

    # --- (de)serialisation -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: must hold a JSON object, got {type(raw).__name__}")  # noqa: TRY004
        try:
            return cls._from_dict(raw, source)
        except (TypeError, ValueError) as exc:
            msg = str(exc)
            raise ValueError(msg if msg.startswith(f"{source}: ") else f"{source}: {msg}") from exc

    @classmethod
    def _from_dict(cls, raw: dict[str, Any], source: str) -> ModelConfig:
        kw: dict[str, Any] = {}
        simple = (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
            "rms_norm_eps", "rope_theta", "max_position_embeddings", "max_length", "plora_rank", "plora_alpha",
            "pooling", "pad_token_id", "bos_token_id", "eos_token_id", "reward_token_id", "torch_dtype",
        )
        for key in simple:
            if raw.get(key) is not None:
                kw[key] = raw[key]
        kw["num_key_value_heads"] = raw.get("num_key_value_heads") or raw.get("num_attention_heads", 32)
        scaling = raw.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise ValueError(f"rope_scaling must be an object such as {{\"type\": \"dynamic\", \"factor\": 2.0}} "
                             f"or null, got {type(scaling).__name__} {scaling!r}")
        if scaling:
            kind = scaling.get("type") or scaling.get("rope_type")
            if kind != "dynamic":
                raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'dynamic')")
            factor = scaling.get("factor", 1.0)
            if isinstance(factor, bool) or not isinstance(factor, (int, float)):
                raise ValueError(f"rope_scaling.factor must be a number, got {type(factor).__name__} {factor!r}")
            kw["rope_scaling_factor"] = factor
        vision_raw = raw.get("vision_config")
        if vision_raw is not None and not isinstance(vision_raw, dict):
            raise ValueError(f"vision_config must be an object or null, got {type(vision_raw).__name__}")
        if vision_raw:
            names = VisionConfig.__dataclass_fields__.keys()
            kw["vision"] = VisionConfig(**{k: v for k, v in vision_raw.items() if k in names})
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if k not in raw]
        if missing:
            raise ValueError(f"missing required fields {missing}")
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ModelConfig:
        with open(path, "rb") as fh:
            data = fh.read()
        try:
            raw = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """config.json in the real layout (plus a vision_config for non-default vision towers)."""
        out: dict[str, Any] = {
            "architectures": ["InternLMXComposer2ForCausalLM"],
            "model_type": "internlmxcomposer2",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "max_length": self.max_length,
            "hidden_act": "silu",
            "bias": False,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype,
            "pooling": self.pooling,
        }
        if self.rope_scaling_factor != 1.0:
            out["rope_scaling"] = {"type": "dynamic", "factor": self.rope_scaling_factor}
        if self.plora_rank is not None:
            out["plora_rank"] = self.plora_rank
        if self.plora_alpha is not None:
            out["plora_alpha"] = self.plora_alpha
        if self.vision != VisionConfig():
            out["vision_config"] = asdict(self.vision)
        return out
