"""The GPU path's fused forward (fused add+RMSNorm, RoPE, SiLU*mul and quick_gelu kernels, PLoRA B from the base
GEMM) under Triton's interpreter, fp32, against the reference path on the same weights: packed batches mostly of
image rows (the dense PLoRA layout), with few image rows (PLoRA gathered), without any, and the ViT. Whole-engine
runs of the fused path (prefix cache included) are tests/test_triton_path.py's; short sequences here keep the
interpreted attention kernel fast."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from ixc_engine.models.internlm2 import ForwardContext
from ixc_engine.models.reward_model import IXCRewardModel
from ixc_engine.tiny import random_state_dict, tiny_config

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")


@pytest.fixture(scope="module")
def models():
    cfg = tiny_config(plora_alpha=16)  # PLoRA scale 2: the mask carries the scale
    ref = IXCRewardModel(cfg, cfg.plora_rank).eval()
    ref.load_state_dict(random_state_dict(ref, seed=3), strict=False)
    fused = IXCRewardModel(cfg, cfg.plora_rank).eval()
    fused.load_state_dict(ref.state_dict())
    fused.prepare_for_inference("triton")
    return ref, fused


def _ctx(lens: list[int], image_rows: list[int], backend: str) -> ForwardContext:
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lens])
    idx = torch.tensor(image_rows, dtype=torch.long) if image_rows else None
    return ForwardContext(cu_seqlens=cu, positions=positions, seq_lens_total=list(lens), new_lens=list(lens),
                          image_index=idx, backend=backend)


def test_fused_layout_keeps_names_and_values(models):
    ref, fused = models
    a, b = ref.state_dict(), fused.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for lin in (fused.model.layers[0].feed_forward.w3, fused.model.layers[1].attention.wqkv):
        storage = lin.fused.untyped_storage().data_ptr()  # W and B are views of one tensor: no second copy
        assert lin.weight.untyped_storage().data_ptr() == storage == lin.Plora_B.weight.untyped_storage().data_ptr()


@pytest.mark.parametrize(("lens", "rows"), [
    ([23, 9, 14], list(range(1, 20)) + list(range(24, 31)) + list(range(33, 44))),  # mostly image: dense PLoRA
    ([17, 30], [2, 3, 4, 40, 41]),  # few image rows: gathered PLoRA
    ([5, 12, 1], []),  # text only
])
def test_fused_forward_matches_reference(models, lens, rows):
    ref, fused = models
    t = sum(lens)
    embeds = torch.randn(t, ref.cfg.hidden_size, generator=torch.Generator().manual_seed(t))
    with torch.inference_mode():
        want = ref.hidden_states(embeds, _ctx(lens, rows, "torch"))
        assert fused.model._fused_path(embeds, _ctx(lens, rows, "triton"))
        got = fused.hidden_states(embeds, _ctx(lens, rows, "triton"))
        plain = fused.hidden_states(embeds, _ctx(lens, rows, "torch"))  # the fused layout on the reference path
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain, want, rtol=1e-5, atol=1e-5)


def test_fused_path_is_inference_only(models):
    _, fused = models
    embeds = torch.randn(6, fused.cfg.hidden_size, requires_grad=True)
    assert not fused.model._fused_path(embeds, _ctx([6], [], "triton"))  # autograd on: the differentiable path


def test_vit_quick_gelu(models):
    ref, fused = models
    pixels = torch.randn(2, 3, 560, 560, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(fused.encode_crops(pixels), ref.encode_crops(pixels), rtol=1e-5, atol=1e-5)
