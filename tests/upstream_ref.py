"""An independent, naive re-computation of IXC-2.5-Reward scores straight from checkpoint tensors, in float64.

Written from ../shared/MODEL.md the way upstream computes (one right-padded batch, eager attention with an additive
mask, the score head on every position then a gather at the last real token, per-image ViT calls, reshape/permute
merge) and sharing no model code with ixc_engine: tests compare the engine against it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

D = torch.float64


def load_state(ckpt: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    cfg = json.loads((ckpt / "config.json").read_text())
    state = {}
    index = ckpt / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    for f in files:
        state.update({k: v.to(D) for k, v in load_file(str(ckpt / f)).items()})
    return cfg, state


def rmsnorm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def plora(x, st, name, im_mask, scale):
    res = x @ st[f"{name}.weight"].T
    if im_mask.any():
        part = x[im_mask]
        res[im_mask] += (part @ st[f"{name}.Plora_A.weight"].T) @ st[f"{name}.Plora_B.weight"].T * scale
    return res


def vit_features(pixels, st, vcfg):
    """HF CLIPVisionModel hidden_states[-1][:, 1:] for pixels [N, 3, 560, 560]."""
    p = "vit.vision_tower.vision_model."
    c, heads, ps = vcfg["hidden_size"], vcfg["num_attention_heads"], vcfg["patch_size"]
    eps = vcfg["layer_norm_eps"]
    x = F.conv2d(pixels, st[p + "embeddings.patch_embedding.weight"], stride=ps).flatten(2).transpose(1, 2)
    cls = st[p + "embeddings.class_embedding"].expand(x.shape[0], 1, c)
    x = torch.cat([cls, x], 1) + st[p + "embeddings.position_embedding.weight"]
    x = F.layer_norm(x, (c,), st[p + "pre_layrnorm.weight"], st[p + "pre_layrnorm.bias"], eps)
    hd = c // heads
    for i in range(vcfg["num_hidden_layers"]):
        q = p + f"encoder.layers.{i}."
        h = F.layer_norm(x, (c,), st[q + "layer_norm1.weight"], st[q + "layer_norm1.bias"], eps)
        n, L, _ = h.shape

        def proj(nm, t, q=q):
            return t @ st[q + f"self_attn.{nm}.weight"].T + st[q + f"self_attn.{nm}.bias"]

        qs = (proj("q_proj", h) * hd**-0.5).view(n, L, heads, hd).transpose(1, 2)
        ks = proj("k_proj", h).view(n, L, heads, hd).transpose(1, 2)
        vs = proj("v_proj", h).view(n, L, heads, hd).transpose(1, 2)
        a = torch.softmax(qs @ ks.transpose(-1, -2), -1) @ vs
        x = x + proj("out_proj", a.transpose(1, 2).reshape(n, L, c))
        h = F.layer_norm(x, (c,), st[q + "layer_norm2.weight"], st[q + "layer_norm2.bias"], eps)
        h = h @ st[q + "mlp.fc1.weight"].T + st[q + "mlp.fc1.bias"]
        h = h * torch.sigmoid(1.702 * h)
        x = x + h @ st[q + "mlp.fc2.weight"].T + st[q + "mlp.fc2.bias"]
    return x[:, 1:]


def image_embeds(crops, h, w, st, vcfg):
    """Upstream-style layout of one image: global grid + separators, glb_GN, stitched sub-crops + separators."""
    feats = vit_features(crops.to(D), st, vcfg)
    C = feats.shape[-1]
    H = int(math.sqrt(feats.shape[1]))
    glb = feats[:1].reshape(1, H, H, C).reshape(1, H // 2, 2, H // 2, 2, C).permute(0, 1, 3, 2, 4, 5)
    glb = glb.reshape(1, H // 2, H // 2, 4 * C)
    glb = torch.cat([glb, st["plora_sub_GN"].repeat(1, H // 2, 1, 1)], dim=2).reshape(1, -1, 4 * C)
    sub = feats[1:].reshape(-1, H, H, C).reshape(-1, H // 2, 2, H // 2, 2, C).permute(0, 1, 3, 2, 4, 5)
    sub = sub.reshape(-1, (H // 2) ** 2, 4 * C).reshape(1, h, w, H // 2, H // 2, -1).permute(0, 1, 3, 2, 4, 5)
    sub = sub.reshape(1, h * H // 2, w * H // 2, 4 * C)
    sub = torch.cat([sub, st["plora_sub_GN"].repeat(1, h * H // 2, 1, 1)], dim=2).reshape(1, -1, 4 * C)
    tokens = torch.cat([glb, st["plora_glb_GN"], sub], dim=1)[0]
    x = tokens @ st["vision_proj.0.weight"].T + st["vision_proj.0.bias"]
    x = F.gelu(x)
    return x @ st["vision_proj.2.weight"].T + st["vision_proj.2.bias"]


def llm_scores(seqs, st, cfg, pooling="last"):
    """seqs: list of (embeds [L, H], im_mask [L]); one right-padded batch, eager attention."""
    B = len(seqs)
    L = max(e.shape[0] for e, _ in seqs)
    Hd = cfg["hidden_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = Hd // nh
    gs = nh // nkv
    eps = cfg["rms_norm_eps"]
    rank = st["model.layers.0.attention.wqkv.Plora_A.weight"].shape[0]
    scale = cfg.get("plora_alpha", rank) / cfg.get("plora_rank", rank)
    x = torch.zeros(B, L, Hd, dtype=D)
    att = torch.zeros(B, L, dtype=torch.bool)
    im = torch.zeros(B, L, dtype=torch.bool)
    for b, (e, m) in enumerate(seqs):
        x[b, : e.shape[0]] = e
        att[b, : e.shape[0]] = True
        im[b, : e.shape[0]] = m
    base = cfg["rope_theta"]
    factor = (cfg.get("rope_scaling") or {}).get("factor", 1.0)
    if L > cfg["max_position_embeddings"] and factor != 1.0:
        base = base * ((factor * L / cfg["max_position_embeddings"]) - (factor - 1)) ** (hd / (hd - 2))
    inv = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=D) / hd))
    fr = torch.outer(torch.arange(L, dtype=D), inv)
    emb = torch.cat([fr, fr], -1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]

    def rot(t):
        return torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1)

    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    mask = causal[None, None] & att[:, None, None, :]
    add = torch.zeros(B, 1, L, L, dtype=D).masked_fill(~mask, torch.finfo(D).min)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rmsnorm(x, st[p + "attention_norm.weight"], eps)
        qkv = plora(h, st, p + "attention.wqkv", im, scale).view(B, L, nkv, gs + 2, hd)
        q = qkv[..., :gs, :].reshape(B, L, nh, hd).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2)
        v = qkv[..., -1, :].transpose(1, 2)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k = k.repeat_interleave(gs, dim=1)
        v = v.repeat_interleave(gs, dim=1)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + add, -1)
        o = (w @ v).transpose(1, 2).reshape(B, L, nh * hd)
        x = x + plora(o, st, p + "attention.wo", im, scale)
        h = rmsnorm(x, st[p + "ffn_norm.weight"], eps)
        g = F.silu(plora(h, st, p + "feed_forward.w1", im, scale)) * plora(h, st, p + "feed_forward.w3", im, scale)
        x = x + plora(g, st, p + "feed_forward.w2", im, scale)
    x = rmsnorm(x, st["model.norm.weight"], eps)
    s = (x @ st["score.weight"].T)[..., 0]
    if pooling == "mean":
        return [(s[b, : seqs[b][0].shape[0]].mean()).item() for b in range(B)]
    ends = att.long().cumsum(1).argmax(1)
    return [s[b, ends[b]].item() for b in range(B)]


def reference_scores(ckpt: Path, tokenizer, samples, hd_num=9, pooling="last"):
    """samples: list of (messages, media list). Uses the engine's tokenizer/template and media crops (tested on their
    own); everything from the crops to the score is recomputed here."""
    from ixc_engine.media.loader import load_media
    from ixc_engine.template import build_sample

    cfg, st = load_state(Path(ckpt))
    vcfg = {"hidden_size": 1024, "num_attention_heads": 16, "patch_size": 14, "layer_norm_eps": 1e-5,
            "num_hidden_layers": 24, **cfg.get("vision_config", {})}
    seqs = []
    for messages, media in samples:
        t = build_sample(tokenizer, messages, len(media), hd_num)
        parts, masks = [], []
        for piece in t.pieces:
            if isinstance(piece, list):
                parts.append(st["model.tok_embeddings.weight"][torch.tensor(piece)])
                masks.append(torch.zeros(len(piece), dtype=torch.bool))
            else:
                mc = load_media(media[piece], t.hd_num)
                e = image_embeds(mc.pixel_values, mc.h, mc.w, st, vcfg)
                parts.append(e)
                masks.append(torch.ones(e.shape[0], dtype=torch.bool))
        seqs.append((torch.cat(parts), torch.cat(masks)))
    return llm_scores(seqs, st, cfg, pooling)
