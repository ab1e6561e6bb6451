"""Vision path: CLIP ViT-L/14-560 encoder (transformers' CLIPVisionModel names, no transformers at run time),
the 2x2 merge, the separator tokens and the projector (../shared/MODEL.md section 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ixc_engine.config import ModelConfig, VisionConfig


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.grid * cfg.grid + 1, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [N, 1600, C]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]


class CLIPAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, c = x.shape
        hd = c // self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.num_heads, hd).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(o.transpose(1, 2).reshape(n, length, c))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.quick = cfg.hidden_act == "quick_gelu"
        self.fused_act: str | None = None  # "triton": one fused quick_gelu kernel at inference (set by the runner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.quick and self.fused_act and not torch.is_grad_enabled():
            from ixc_engine.kernels.quick_gelu import quick_gelu

            h = quick_gelu(h, out=h, backend=self.fused_act)
        else:
            h = h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h)
        return self.fc2(h)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPVisionTransformer(nn.Module):
    """`vision_model`: the scoring path uses the LAST layer's output before post_layernorm (not loaded)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: transformers' name
        self.encoder = CLIPEncoder(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels `[N, 3, 560, 560]` -> patch features `[N, 1600, C]` (CLS dropped)."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return x[:, 1:]


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg)


class ViT(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.vision_tower = VisionTower(cfg)


def merge_2x2(feats: torch.Tensor, grid: int) -> torch.Tensor:
    """`[N, grid*grid, C]` -> `[N, grid/2, grid/2, 4C]`; channel = di*2C + dj*C + c for the 2x2 cell (di, dj)."""
    n, _, c = feats.shape
    g = grid // 2
    x = feats.reshape(n, g, 2, g, 2, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, g, g, 4 * c)


def layout_image_tokens(
    merged: torch.Tensor, h: int, w: int, glb_gn: torch.Tensor, sub_gn: torch.Tensor
) -> torch.Tensor:
    """One image's tokens `[(h*w+1)*400 + 1 + (h+1)*20, 4C]` from its merged crops `[1 + h*w, 20, 20, 4C]`.

    Global grid rows each followed by a sub separator, then the global separator, then the sub-crops stitched into
    one (h*20) x (w*20) grid (raster order of crops), each row followed by a sub separator.
    """
    _, g, _, c4 = merged.shape
    sub_sep = sub_gn.reshape(1, c4).to(merged.dtype)
    glb = merged[0]  # [g, g, 4C]
    glb = torch.cat([glb, sub_sep.expand(g, 1, c4)], dim=1).reshape(-1, c4)
    subs = merged[1:].reshape(h, w, g, g, c4).permute(0, 2, 1, 3, 4).reshape(h * g, w * g, c4)
    subs = torch.cat([subs, sub_sep.expand(h * g, 1, c4)], dim=1).reshape(-1, c4)
    return torch.cat([glb, glb_gn.reshape(1, c4).to(merged.dtype), subs], dim=0)


class VisionProjector(nn.Sequential):
    """`vision_proj`: Linear(4C, H) -> exact GELU -> Linear(H, H)."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))


def vision_modules(cfg: ModelConfig) -> dict[str, nn.Module]:
    return {
        "vit": ViT(cfg.vision),
        "vision_proj": VisionProjector(cfg.vision.merged_width, cfg.hidden_size),
    }
