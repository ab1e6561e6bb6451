"""Broken checkpoints (issue 9 item 7): `ixc-engine score` exits 2 with one line naming the file and the field or
tensor, no traceback, and creates no output file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ixc_engine.cli import main
from ixc_engine.config import ModelConfig
from ixc_engine.tiny import init_tiny

SHARD1 = "model-00001-of-00002.safetensors"
BIN1 = "pytorch_model-00001-of-00002.bin"


@pytest.fixture(scope="module")
def bin_ckpt(tmp_path_factory) -> Path:
    return init_tiny(tmp_path_factory.mktemp("bin") / "model", seed=1, fmt="bin")


def _config_edit(**fields):
    def edit(ckpt: Path) -> None:
        path = ckpt / "config.json"
        cfg = json.loads(path.read_text())
        cfg.update(fields)
        path.write_text(json.dumps(cfg))
    return edit


def _truncate(name: str, keep):
    def edit(ckpt: Path) -> None:
        path = ckpt / name
        data = path.read_bytes()
        path.write_bytes(data[: keep(len(data))])
    return edit


def _bin_shard(make):
    def edit(ckpt: Path) -> None:
        path = ckpt / BIN1
        torch.save(make(torch.load(path, weights_only=True)), path)
    return edit


def _reshape_first_norm(ckpt: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt / SHARD1))
    name = next(k for k in state if k.endswith("attention_norm.weight"))
    state[name] = torch.zeros(3)
    save_file(state, str(ckpt / SHARD1))


# (case id, edit, which checkpoint, what the one error line must hold)
CASES = [
    ("safetensors-truncated-data", _truncate(SHARD1, lambda n: n // 2), "st", [SHARD1]),
    ("safetensors-truncated-header", _truncate(SHARD1, lambda n: 5), "st", [SHARD1]),
    ("hidden_size-str", _config_edit(hidden_size="48"), "st",
     ["config.json", "hidden_size must be an integer, got str '48'"]),
    ("num_hidden_layers-float", _config_edit(num_hidden_layers=2.0), "st",
     ["config.json", "num_hidden_layers must be an integer, got float 2.0"]),
    ("rope_scaling-str", _config_edit(rope_scaling="dynamic"), "st",
     ["config.json", "rope_scaling must be an object", "got str 'dynamic'"]),
    ("rms_norm_eps-str", _config_edit(rms_norm_eps="1e-5"), "st",
     ["config.json", "rms_norm_eps must be a number, got str '1e-5'"]),
    ("vocab_size-bool", _config_edit(vocab_size=True), "st", ["config.json", "vocab_size must be an integer"]),
    ("heads-zero", _config_edit(num_attention_heads=0), "st", ["config.json", "num_attention_heads must be positive"]),
    ("vision_config-str", _config_edit(vision_config="clip"), "st", ["config.json", "vision_config must be an object"]),
    ("vision-hidden-str", _config_edit(vision_config={"hidden_size": "32"}), "st",
     ["config.json", "vision_config.hidden_size must be an integer"]),
    ("config-list", lambda c: (c / "config.json").write_text("[1, 2]"), "st", ["config.json", "JSON object"]),
    ("config-not-utf8", lambda c: (c / "config.json").write_bytes(b'{"hidden_size": "\xff"}'), "st",
     ["config.json", "not UTF-8"]),
    ("index-weight_map-list", lambda c: (c / "model.safetensors.index.json").write_text('{"weight_map": [1]}'),
     "st", ["model.safetensors.index.json", "weight_map"]),
    ("misshaped-tensor", _reshape_first_norm, "st", ["attention_norm.weight (3,)"]),
    ("bin-nested-state-dict", _bin_shard(lambda sd: {"state_dict": sd, "epoch": 3}), "bin",
     [BIN1, "entry 'state_dict' is a dict, not a tensor"]),
    ("bin-list", _bin_shard(lambda sd: list(sd.values())), "bin", [BIN1, "holds a list, not a state dict"]),
    ("bin-truncated", _truncate(BIN1, lambda n: n // 2), "bin", [BIN1, "cannot read as a weights-only torch pickle"]),
]


def _corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus.jsonl"
    line = {"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    corpus.write_text(json.dumps(line) + "\n")
    return corpus


@pytest.mark.parametrize(("edit", "kind", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_checkpoint_is_one_line_and_no_output(tmp_path, capsys, tiny_ckpt, bin_ckpt, edit, kind, needles):
    ckpt = tmp_path / "model"
    shutil.copytree(tiny_ckpt if kind == "st" else bin_ckpt, ckpt)
    edit(ckpt)
    out_dir = tmp_path / "out"
    capsys.readouterr()
    rc = main(["score", str(_corpus(tmp_path)), "--model", str(ckpt), "-o", str(out_dir / "scores.jsonl"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("W0000", "WARNING: All log"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out_dir.exists() or not any(out_dir.iterdir()), sorted(p.name for p in out_dir.iterdir())


def test_good_config_types_still_load():
    raw = ModelConfig().to_dict() | {"rope_theta": 1000000, "rms_norm_eps": 1e-05, "plora_alpha": 256}
    cfg = ModelConfig.from_dict(raw)
    assert isinstance(cfg.rope_theta, float) and cfg.rope_theta == 1e6 and cfg.plora_alpha == 256.0
    assert ModelConfig.from_dict(raw | {"rope_scaling": None}).rope_scaling_factor == 1.0


def test_cli_process_prints_no_traceback(tmp_path, tiny_ckpt):
    ckpt = tmp_path / "model"
    shutil.copytree(tiny_ckpt, ckpt)
    _truncate(SHARD1, lambda n: n // 2)(ckpt)
    out = tmp_path / "out" / "scores.jsonl"
    proc = subprocess.run([sys.executable, "-m", "ixc_engine.cli", "score", str(_corpus(tmp_path)), "--model",
                           str(ckpt), "-o", str(out), "--no-progress"], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and f"{ckpt / SHARD1}: cannot read as safetensors" in proc.stderr
    assert not out.parent.exists() or not any(out.parent.iterdir())
