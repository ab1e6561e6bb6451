"""IXC-2.5-Reward: vision path + InternLM2 (PLoRA) + `score` head. Attribute names equal checkpoint prefixes."""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ixc_engine.config import ModelConfig
from ixc_engine.models.internlm2 import ForwardContext, InternLM2Model
from ixc_engine.models.vision import VisionProjector, ViT, layout_image_tokens, merge_2x2

# Tensors a release checkpoint holds that the scoring path never uses: never loaded into memory.
IGNORED_TENSORS = (
    re.compile(r".*\blora_(sft|dpo|web)_.*"),
    re.compile(r"vit\.vision_tower\.vision_model\.post_layernorm\..*"),
    re.compile(r".*\.position_ids$"),
    re.compile(r".*rotary_emb\.inv_freq$"),
)


def is_ignored_tensor(name: str) -> bool:
    return any(p.fullmatch(name) for p in IGNORED_TENSORS)


class _NoInitOnMeta(TorchFunctionMode):
    """Skips parameter initialisers (nn.init.*, Tensor.normal_ and the like) on meta tensors. torch runs `normal_` on a
    meta tensor through its Python reference, whose first call imports torch._dynamo: 2.0 s of the demo model's 2.2 s
    load, in every process that loads a model; and on meta an initialiser computes nothing anyway."""

    INITIALISERS = frozenset({"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                              "xavier_uniform_", "xavier_normal_", "zeros_", "ones_", "constant_", "zero_", "fill_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in self.INITIALISERS:
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def meta_model(cfg: ModelConfig, plora_rank: int) -> IXCRewardModel:
    """The model's structure on the meta device, no memory and no initialisation: for loading a checkpoint into
    (`checkpoint.load_model`), writing random weights (`tiny.init_tiny`), or modelling its cost (bench/roofline.py)."""
    with torch.device("meta"), _NoInitOnMeta():
        return IXCRewardModel(cfg, plora_rank)


class IXCRewardModel(nn.Module):
    def __init__(self, cfg: ModelConfig, plora_rank: int) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.vision.merged_width
        self.model = InternLM2Model(cfg, plora_rank)
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.vit = ViT(cfg.vision)
        self.vision_proj = VisionProjector(width, cfg.hidden_size)
        self.plora_glb_GN = nn.Parameter(torch.zeros(1, 1, width))
        self.plora_sub_GN = nn.Parameter(torch.zeros(1, 1, 1, width))

    def prepare_for_inference(self, backend: str) -> None:
        """Fused weight layout and kernels for `backend` "triton" (inference only; the parameters keep their names
        and values, so the torch path and training work on the same model)."""
        if backend == "triton":
            self.model.fuse_for_inference()
            for layer in self.vit.vision_tower.vision_model.encoder.layers:
                layer.mlp.fused_act = backend

    def encode_crops(self, pixels: torch.Tensor) -> torch.Tensor:
        """ViT + 2x2 merge for a batch of crops of any number of images: `[N, 3, 560, 560]` -> `[N, 20, 20, 4C]`."""
        feats = self.vit.vision_tower.vision_model(pixels)
        return merge_2x2(feats, self.cfg.vision.grid)

    def image_tokens(self, merged: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """One image's merged crops -> its projected LLM embeddings `[n_tokens, H]`."""
        tokens = layout_image_tokens(merged, h, w, self.plora_glb_GN, self.plora_sub_GN)
        return self.vision_proj(tokens)

    def hidden_states(self, embeds: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(embeds, ctx)
