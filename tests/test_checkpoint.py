"""Config parsing and checkpoint loading: formats, skipped tensors, and the errors for broken checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from ixc_engine.checkpoint import CheckpointError, load_model, resolve_checkpoint
from ixc_engine.config import ModelConfig, VisionConfig
from ixc_engine.tiny import init_tiny, tiny_config

REAL_CONFIG = {
    "architectures": ["InternLMXComposer2ForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 92544,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0},
    "max_position_embeddings": 24576, "max_length": 16384, "bias": False, "torch_dtype": "bfloat16",
}


def test_real_config_defaults():
    cfg = ModelConfig.from_dict(REAL_CONFIG)
    assert cfg.head_dim == 128 and cfg.num_kv_groups == 4
    assert cfg.vision == VisionConfig()  # no vision_config: ViT-L/14 at 560
    assert cfg.vision.merged_width == 4096 and cfg.vision.grid == 40
    assert cfg.pooling == "last"
    assert cfg.rope_base(16384) == 1e6
    d = 128
    expected = 1e6 * ((2.0 * 30000 / 24576) - 1.0) ** (d / (d - 2))
    assert cfg.rope_base(30000) == pytest.approx(expected)


@pytest.mark.parametrize("bad, match", [
    ({"pooling": "max"}, "pooling"),
    ({"num_key_value_heads": 5}, "multiple"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
    ({"vision_config": {"image_size": 336}}, "560"),
])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict({**REAL_CONFIG, **bad})


def test_config_round_trip():
    cfg = tiny_config()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_formats_load_identically(tmp_path, fmt):
    a = init_tiny(tmp_path / fmt, seed=3, fmt=fmt)
    model, _ = load_model(a)
    ref = init_tiny(tmp_path / "ref", seed=3)
    model_ref, _ = load_model(ref)
    for (n, p), (_, q) in zip(model.named_parameters(), model_ref.named_parameters()):
        assert torch.equal(p, q), n
    assert model.model.layers[0].attention.wqkv.Plora_A.weight.shape[0] == 8


def test_dtype_cast(tmp_path):
    ckpt = init_tiny(tmp_path / "m", dtype=torch.bfloat16)
    model, _ = load_model(ckpt, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_unused_lora_tensors_are_skipped(tmp_path):
    extra = {
        "model.layers.0.attention.wqkv.lora_sft_A.weight": torch.zeros(4, 64),
        "model.layers.0.feed_forward.w1.lora_dpo_B.weight": torch.zeros(96, 4),
        "vit.vision_tower.vision_model.post_layernorm.weight": torch.ones(32),
    }
    model, _ = load_model(init_tiny(tmp_path / "m", extra_tensors=extra))
    assert not any("lora_sft" in n or "post_layernorm" in n for n, _ in model.named_parameters())


def _edit_shard(ckpt, fn):
    from safetensors.torch import load_file, save_file

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = ckpt / min(index["weight_map"].values())
    state = load_file(str(shard))
    fn(state)
    save_file(state, str(shard))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in state})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_unexpected_misshaped_named(tmp_path):
    ckpt = init_tiny(tmp_path / "m")

    def damage(state):
        state.pop(next(k for k in state if k.endswith("Plora_B.weight")))
        state["model.layers.0.attention.bogus.weight"] = torch.zeros(2)
        name = next(k for k in state if k.endswith("norm.weight"))
        state[name] = torch.zeros(3)

    _edit_shard(ckpt, damage)
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt)
    text = str(err.value)
    assert "missing tensors" in text and "unexpected tensors: model.layers.0.attention.bogus.weight" in text
    assert "mis-shaped tensors" in text and "(3,)" in text


def test_missing_files_and_dirs(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(tmp_path / "empty")
    ckpt = init_tiny(tmp_path / "m")
    next(ckpt.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard files missing"):
        load_model(ckpt)


def test_never_executes_checkpoint_code(tmp_path):
    ckpt = init_tiny(tmp_path / "m")
    marker = tmp_path / "executed"
    (ckpt / "modeling_internlm_xcomposer2.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    load_model(ckpt)
    assert not marker.exists()


def test_hub_id_without_network_gives_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match="huggingface_hub is not installed"):
        resolve_checkpoint("internlm/internlm-xcomposer2d5-7b-reward")


def test_loading_builds_the_model_on_meta_without_its_initialisers(tmp_path):
    """The model is built on meta with nn.init and friends skipped: torch runs normal_ on a meta tensor through a
    Python reference whose first call imports torch._dynamo (2.0 of the demo model's 2.2 s load, in every process that
    loads a model). A fresh process proves it; real tensors are still initialised as usual."""
    import subprocess
    import sys

    from ixc_engine.models.reward_model import _NoInitOnMeta, meta_model

    ckpt = init_tiny(tmp_path / "m")
    code = ("import sys; from ixc_engine.checkpoint import load_model; m, _ = load_model(sys.argv[1]); "
            "print(sum(p.numel() for p in m.parameters()) > 0, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"], out.stderr[-2000:]
    model = meta_model(tiny_config(), 8)
    assert all(p.is_meta for p in model.parameters())
    with _NoInitOnMeta():
        t = torch.nn.init.normal_(torch.zeros(64))
    assert t.abs().sum() > 0  # only meta tensors are left alone
