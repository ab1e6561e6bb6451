"""`ixc-engine train-rm` arguments: help text (defaults stated, no stray %%), nonsensical numbers rejected by argparse,
plainly named loss figures, and the file mode of the checkpoints it writes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from ixc_engine.training.cli import build_parser

from ixc_engine.cli import main as cli_main
from ixc_engine.tiny import tiny_config, write_checkpoint

BASE = ["pairs.jsonl", "--model", "m", "-o", "out"]


def test_help_states_every_default_and_prints_percent_once(capsys):
    parser = build_parser()
    for action in parser._actions:
        if not action.option_strings or action.required or action.dest == "help":
            continue
        assert "default" in (action.help or ""), f"{action.option_strings[0]}: help does not state its default"
    with pytest.raises(SystemExit) as exc:
        cli_main(["train-rm", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help lines wrap at the terminal width
    assert "%%" not in text and "1% warmup" in text
    assert "peak learning rate of the cosine schedule (default 1e-5)" in text
    assert "last_step_loss" in text and "avg_loss" in text  # the summary's figures are explained


@pytest.mark.parametrize("opt, value", [
    ("--max-steps", "0"), ("--max-steps", "-3"), ("--epochs", "0"), ("--lr", "0"), ("--lr", "-1e-5"),
    ("--lr", "nan"), ("--lr", "inf"), ("--grad-accum", "0"), ("--batch-pairs", "0"), ("--hd-num", "0"),
    ("--max-length", "0"), ("--eval-fraction", "1"), ("--eval-fraction", "-0.1"), ("--warmup-ratio", "1"),
    ("--min-lr-ratio", "1.5"), ("--weight-decay", "-0.1"), ("--max-grad-norm", "-1"), ("--lora-rank", "-8"),
    ("--lora-alpha", "0"), ("--length-ratio", "0"), ("--length-ratio", "-2"), ("--center-coef", "-1"),
    ("--margin", "-0.5"), ("--eval-every", "-1"), ("--save-every", "-1"), ("--seed", "-1"), ("--epochs", "1.5"),
    ("--lr", "fast"),
])
def test_nonsensical_numbers_are_argparse_errors(capsys, opt, value):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*BASE, f"{opt}={value}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {opt}: " in err and ("must be" in err or "is not" in err), err


def test_edge_values_that_make_sense_are_accepted():
    args = build_parser().parse_args([*BASE, "--length-ratio", "inf", "--max-grad-norm", "0", "--eval-fraction", "0",
                                      "--min-lr-ratio", "1", "--warmup-ratio", "0", "--max-steps", "1",
                                      "--lora-rank", "0", "--lr", "3e-4"])
    assert args.length_ratio == float("inf") and args.max_grad_norm == 0 and args.max_steps == 1
    assert args.lr == pytest.approx(3e-4) and isinstance(args.max_steps, int)
    defaults = build_parser().parse_args(BASE)
    assert defaults.max_steps is None and defaults.epochs == 1 and defaults.eval_fraction == 0.0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_written_checkpoints_follow_the_umask(tmp_path, mask):
    cfg = tiny_config()
    state = {"a": torch.zeros(3), "b": torch.ones(2, 2)}
    old = os.umask(mask)
    try:
        out = write_checkpoint(tmp_path / "ck", cfg, state, shards=2)
    finally:
        os.umask(old)
    files = sorted(p for p in out.iterdir() if p.is_file())
    assert any(p.suffix == ".safetensors" for p in files)
    for p in files:
        assert _mode(p) == 0o666 & ~mask, f"{p.name}: {oct(_mode(p))}"


def test_train_rm_output_modes_and_loss_labels(tmp_path, tiny_ckpt, capsys):
    torch.set_num_threads(1)
    rows = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"Say {w}."}], "chosen": f"{w}.",
             "rejected": f"Not {w}, sorry."} for i, w in enumerate(["apple", "river"])]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        rc = cli_main(["train-rm", str(pairs), "--model", str(tiny_ckpt), "-o", str(out), "--batch-pairs", "2",
                       "--max-steps", "1", "--hd-num", "1", "--device", "cpu"])
    finally:
        os.umask(old)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "avg_loss=" in err and "avg_acc=" in err  # the progress bar names its smoothed figures
    summary = json.loads(err.strip().splitlines()[-1])
    assert "final_loss" not in summary
    assert summary["steps"] == 1 and summary["avg_loss"] == pytest.approx(summary["last_step_loss"])  # one step
    assert 0.0 <= summary["avg_acc"] <= 1.0
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) == 2
    for p in [*shards, out / "config.json", out / "trainer_state.pt", out / "tokenizer.model"]:
        assert _mode(p) == 0o644, f"{p.name}: {oct(_mode(p))}"
