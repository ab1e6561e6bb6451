"""IXC-2.5-Reward: vision path + InternLM2 (PLoRA) + `score` head. Attribute names equal checkpoint prefixes."""

from __future__ import annotations

import re

import torch
from torch import nn

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
