"""RewardTrainer, LoRA merging, checkpoint round trips, exact resume, the train-rm CLI and the shipped demo model.

Most runs use text-only pairs on a 1-2 layer model of hidden 32 (a sequence is ~30 tokens); the image path runs
on two generated shape pictures (hd_num 1: 841 image tokens each).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from ixc_engine.kernels.pool_score import pool_score
from ixc_engine.training.pairs import PreferencePair, load_pairs
from ixc_engine.training.shapes import make_example, write_pairs
from ixc_engine.training.trainer import RewardTrainer, TrainConfig, lr_factor

from ixc_engine.api import RewardEngine
from ixc_engine.checkpoint import load_model
from ixc_engine.cli import main as cli_main
from ixc_engine.engine.runner import ModelRunner, SeqPlan
from ixc_engine.engine.sequence import Sample, prepare_sample
from ixc_engine.models.reward_model import IXCRewardModel
from ixc_engine.tiny import PACKAGED_TOKENIZER, random_state_dict, tiny_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo-model"
N_DEMO = 30
DEMO_MIN_WINS = 25  # measured: 28 of these 30 (held-out accuracy in examples/demo-model/TRAINING.json: 97.8%)
WORDS = ["apple", "river", "stone", "cloud", "garden", "music", "winter", "candle", "forest", "window"]


def small_model(seed: int = 0, layers: int = 1, pooling: str = "last") -> IXCRewardModel:
    cfg = tiny_config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, pooling=pooling)
    torch.manual_seed(seed)
    model = IXCRewardModel(cfg, cfg.plora_rank)
    model.load_state_dict(random_state_dict(model, seed))
    return model


def text_pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        w = rng.choice(WORDS)
        out.append(PreferencePair(
            id=f"t{i}", messages=[{"role": "user", "content": f"Tell me about the {w}."}],
            chosen=f"The {w} is lovely, good and kind.", rejected=f"The {w} is awful, bad and cruel."))
    return out


def fast_cfg(**kw) -> TrainConfig:
    base = {"lr": 3e-3, "weight_decay": 0.0, "warmup_ratio": 0.0, "batch_pairs": 4, "hd_num": 1,
            "max_length": 2048, "score_backend": "torch"}
    base.update(kw)
    return TrainConfig(**base)


def rewards(model: IXCRewardModel, convs, images=None) -> torch.Tensor:
    """Independent of the trainer: prepare, one packed forward, pool_score (reference backend)."""
    from ixc_engine.tokenizer import Tokenizer

    tok = Tokenizer.from_file(PACKAGED_TOKENIZER)
    images = images or [[] for _ in convs]
    preps = [prepare_sample(tok, Sample(c, im), hd_num=1, max_length=4096) for c, im in zip(convs, images)]
    runner = ModelRunner(model, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        hidden, ctx = runner.forward_hidden([SeqPlan(p) for p in preps])
        return pool_score(hidden, model.model.norm.weight, model.score.weight, ctx.cu_seqlens,
                          mode=model.cfg.pooling, eps=model.cfg.rms_norm_eps, backend="torch")


def convs_of(pairs):
    return [p.messages + [{"role": "assistant", "content": r}] for p in pairs for r in (p.chosen, p.rejected)]


def test_lr_schedule():
    assert lr_factor(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 5, 0, 0.0) == pytest.approx(1.0)


def test_config_validation():
    with pytest.raises(ValueError, match="batch_pairs"):
        TrainConfig(batch_pairs=0)
    with pytest.raises(ValueError, match="betas"):
        TrainConfig(betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="save_dtype"):
        TrainConfig(save_dtype="int8")


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_loss_falls_and_vision_stays_frozen(pooling):
    model = small_model(pooling=pooling)
    pairs = text_pairs(8)
    vit_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("vit.", "vision_proj."))}
    tr = RewardTrainer(model, PACKAGED_TOKENIZER, pairs, fast_cfg(epochs=6), eval_pairs=pairs)
    before = tr.evaluate()
    result = tr.train(progress=False)
    assert result.steps == 12
    after = result.eval
    assert after.loss < 0.7 * before.loss, (before, after)
    assert after.accuracy == 1.0
    for k, v in model.state_dict().items():
        if k in vit_before:
            assert torch.equal(v, vit_before[k]), k


def test_grad_accumulation_matches_one_big_batch():
    pairs = text_pairs(4, seed=3)
    grads = []
    for bp, ga in ((4, 1), (2, 2), (1, 4)):
        tr = RewardTrainer(small_model(seed=5), PACKAGED_TOKENIZER, pairs, fast_cfg(batch_pairs=bp, grad_accum=ga,
                                                                                    max_grad_norm=None))
        captured = {}
        tr.optimizer.register_step_pre_hook(
            lambda opt, a, k, c=captured, t=tr: c.update({n: p.grad.clone() for n, p in t.model.named_parameters()
                                                          if p.grad is not None}))
        tr.train(progress=False)
        assert tr.step == 1
        grads.append(captured)
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for n in grads[0]:
            torch.testing.assert_close(other[n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def test_lora_trains_only_adapters_and_merges_on_save(tmp_path):
    model = small_model(seed=2, layers=2)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    pairs = text_pairs(8, seed=1)
    tr = RewardTrainer(model, PACKAGED_TOKENIZER, pairs, fast_cfg(lora_rank=4, lora_alpha=8.0, epochs=3),
                       output_dir=tmp_path / "out")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n or n == "score.weight" for n in names)
    tr.train(progress=False)
    for name, p in model.named_parameters():
        if ".lora_" in name or name == "score.weight":
            continue
        key = name.replace(".parametrizations.weight.original", ".weight")
        assert torch.equal(p, init[key]), f"{name} changed in LoRA mode"
    assert not torch.equal(model.score.weight, init["score.weight"])
    # the saved checkpoint holds W + (alpha / r) * B @ A in the plain layout
    saved, _ = load_model(tmp_path / "out", dtype=torch.float32)
    wqkv = model.model.layers[1].attention.wqkv
    delta = wqkv.parametrizations.weight[0]
    assert delta.lora_B.abs().sum() > 0
    merged = init["model.layers.1.attention.wqkv.weight"] + 2.0 * delta.lora_B.detach() @ delta.lora_A.detach()
    torch.testing.assert_close(saved.model.layers[1].attention.wqkv.weight, merged, rtol=1e-5, atol=1e-6)
    assert not any(".lora_" in n or "parametrizations" in n for n, _ in saved.named_parameters())
    convs = convs_of(pairs[:3])
    torch.testing.assert_close(rewards(saved, convs), rewards(model, convs), rtol=1e-5, atol=1e-5)


def test_save_load_gives_same_scores_through_the_engine(tmp_path):
    model = small_model(seed=4, layers=2)
    pairs = text_pairs(6, seed=2)
    tr = RewardTrainer(model, PACKAGED_TOKENIZER, pairs, fast_cfg(batch_pairs=3, epochs=2), output_dir=tmp_path / "m")
    tr.train(progress=False)
    convs = convs_of(pairs[:3])
    ours = rewards(model, convs)
    engine = RewardEngine.from_pretrained(tmp_path / "m", device="cpu", dtype="float32")
    theirs = torch.tensor(engine.score(convs))
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == PACKAGED_TOKENIZER.read_bytes()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["hidden_size"] == 32
    log = [json.loads(x) for x in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_resume_equals_uninterrupted_run(tmp_path, lora_rank):
    pairs = text_pairs(6, seed=7)
    cfg = {"batch_pairs": 2, "epochs": 2, "lora_rank": lora_rank, "warmup_ratio": 0.2, "weight_decay": 0.1}
    full = RewardTrainer(small_model(seed=9), PACKAGED_TOKENIZER, pairs, fast_cfg(**cfg))
    full.train(progress=False)
    assert full.step == 6

    first = RewardTrainer(small_model(seed=9), PACKAGED_TOKENIZER, pairs, fast_cfg(**cfg), output_dir=tmp_path / "a")
    first.train(progress=False, max_steps=4)  # stops inside the second epoch and saves
    assert first.step == 4
    second = RewardTrainer(small_model(seed=9), PACKAGED_TOKENIZER, pairs, fast_cfg(**cfg), output_dir=tmp_path / "b")
    second.train(progress=False, resume_from=tmp_path / "a")
    assert second.step == 6
    for (n, p), (_, q) in zip(full.model.named_parameters(), second.model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-7, msg=n)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [5, 6]
    with pytest.raises(ValueError, match="batch_pairs"):
        RewardTrainer(small_model(seed=9), PACKAGED_TOKENIZER, pairs,
                      fast_cfg(**{**cfg, "batch_pairs": 3})).train(progress=False, resume_from=tmp_path / "a")


@pytest.fixture(scope="module")
def shape_pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("shapes") / "pairs.jsonl"
    write_pairs(path, 2, seed=11)
    return load_pairs(path)


@pytest.mark.parametrize("mode", ["frozen", "projector", "vision"])
def test_image_pairs_train_llm_and_optionally_vision(shape_pairs, mode):
    model = small_model(seed=1)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = fast_cfg(batch_pairs=2, train_vision=mode == "vision", train_projector=mode == "projector")
    tr = RewardTrainer(model, PACKAGED_TOKENIZER, shape_pairs, cfg)
    result = tr.train(progress=False)
    assert result.steps == 1 and result.final_loss is not None and not result.skipped
    after = model.state_dict()
    changed = {k for k in init if not torch.equal(init[k], after[k])}
    assert "score.weight" in changed and "model.layers.0.attention.wqkv.Plora_A.weight" in changed
    vit = {k for k in init if k.startswith("vit.")}
    proj = {k for k in init if k.startswith(("vision_proj.", "plora_"))}
    assert bool(changed & vit) == (mode == "vision")
    if mode == "frozen":
        assert not changed & proj
    else:
        assert {"vision_proj.0.weight", "vision_proj.2.weight", "plora_sub_GN", "plora_glb_GN"} <= changed
    if mode == "projector":  # frozen ViT features cached once per picture
        assert len(tr._merged_cache) == len({p.images[0] for p in shape_pairs})


def test_train_projector_evaluates_the_current_projector(shape_pairs):
    """After projector steps, evaluate() sees the new projector (no stale cached image embeddings)."""
    model = small_model(seed=6)
    tr = RewardTrainer(model, PACKAGED_TOKENIZER, shape_pairs, fast_cfg(batch_pairs=2, train_projector=True, lr=1e-2,
                                                                       epochs=3), eval_pairs=shape_pairs)
    tr.evaluate()
    tr.train(progress=False)
    ev = tr.evaluate()
    ref = rewards(model, convs_of(shape_pairs), [p.images for p in shape_pairs for _ in range(2)])
    margin = (ref[0::2] - ref[1::2]).mean()
    assert ev.mean_margin == pytest.approx(float(margin), rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="train_projector"):
        TrainConfig(train_vision=True, train_projector=True)


def test_train_vision_forward_matches_runner(shape_pairs):
    """The trainer's own differentiable packing (train_vision) gives the runner's hidden states."""
    model = small_model(seed=3)
    tr = RewardTrainer(model, PACKAGED_TOKENIZER, shape_pairs, fast_cfg(batch_pairs=2, train_vision=True))
    batch = tr._prepare_pairs(shape_pairs)
    plans = [SeqPlan(c) for c, _ in batch] + [SeqPlan(r) for _, r in batch]
    with torch.no_grad():
        ours, ctx = tr._forward_hidden_with_vision(plans)
        ref, ctx_ref = tr.runner.forward_hidden(plans)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(ctx.cu_seqlens, ctx_ref.cu_seqlens) and torch.equal(ctx.image_index, ctx_ref.image_index)


def test_too_long_pairs_are_skipped_and_reported():
    pairs = text_pairs(3)
    pairs[1].chosen = "word " * 400
    tr = RewardTrainer(small_model(), PACKAGED_TOKENIZER, pairs, fast_cfg(max_length=200, batch_pairs=3))
    result = tr.train(progress=False)
    assert result.skipped == ["t1"]
    assert "max_length" in tr.skipped["t1"]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_cli_end_to_end(tmp_path, tiny_ckpt, capsys):
    rows = [{"id": p.id, "messages": p.messages, "chosen": p.chosen, "rejected": p.rejected} for p in text_pairs(5)]
    rows.append({"id": "long", "messages": [{"role": "user", "content": "Hi"}],
                 "chosen": "a much longer reply " * 10, "rejected": "short"})
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    rc = cli_main(["train-rm", str(pairs), "--model", str(tiny_ckpt), "-o", str(out), "--batch-pairs", "2",
                   "--lr", "1e-3", "--length-ratio", "2", "--eval-fraction", "0.4", "--save-every", "1",
                   "--no-progress", "--hd-num", "1"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "removed 1 of" in err and "long" in err
    summary = json.loads(err.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["eval_pairs"] == 2 and summary["length_filter_removed"] == 1
    assert (out / "checkpoint-1" / "trainer_state.pt").is_file()
    load_model(out)
    # resume from the latest checkpoint: nothing left to do, the step count is kept
    rc = cli_main(["train-rm", str(pairs), "--model", str(tiny_ckpt), "-o", str(out), "--batch-pairs", "2",
                   "--lr", "1e-3", "--length-ratio", "2", "--eval-fraction", "0.4", "--resume", "--no-progress",
                   "--hd-num", "1"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert json.loads(err.strip().splitlines()[-1])["steps"] == 2


def test_resume_refuses_other_pairs_or_settings(tmp_path):
    pairs = text_pairs(8, seed=2)
    tr = RewardTrainer(small_model(), PACKAGED_TOKENIZER, pairs, cfg=fast_cfg(), output_dir=tmp_path)
    tr.train(progress=False, max_steps=1)
    ckpt = tr.save(tmp_path / "ck")
    edited = pairs[:3] + [PreferencePair(id=pairs[3].id, messages=pairs[3].messages, chosen="changed",
                                         rejected=pairs[3].rejected)] + pairs[4:]
    with pytest.raises(ValueError, match="other pairs"):
        RewardTrainer(small_model(), PACKAGED_TOKENIZER, edited, cfg=fast_cfg()).load_state(ckpt)
    with pytest.raises(ValueError, match="seed=0.*seed=7"):
        RewardTrainer(small_model(), PACKAGED_TOKENIZER, pairs, cfg=fast_cfg(seed=7)).load_state(ckpt)
    RewardTrainer(small_model(), PACKAGED_TOKENIZER, pairs, cfg=fast_cfg()).load_state(ckpt)


def test_log_records_the_rate_each_step_used(tmp_path):
    cfg = fast_cfg(warmup_ratio=0.5, batch_pairs=2, min_lr_ratio=0.1)
    tr = RewardTrainer(small_model(), PACKAGED_TOKENIZER, text_pairs(8), cfg=cfg, output_dir=tmp_path / "m")
    tr.train(progress=False)
    log = [json.loads(x) for x in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    total = tr.total_steps
    want = [cfg.lr * lr_factor(k, total, math.ceil(cfg.warmup_ratio * total), cfg.min_lr_ratio) for k in range(4)]
    assert [r["lr"] for r in log if "lr" in r] == pytest.approx(want, rel=1e-9)


def test_cli_reports_bad_lines_with_file_and_line(tmp_path, tiny_ckpt, capsys):
    good = {"id": "a", "messages": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away."}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, "{not json", {**good, "id": "b", "messages": [
        {"role": "robot", "content": "x"}]}])
    rc = cli_main(["train-rm", str(path), "--model", str(tiny_ckpt), "-o", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{path}:2" in err and "invalid JSON" in err
    assert f"{path}:3" in err and "['role'] is 'robot'" in err
    rc = cli_main(["train-rm", str(tmp_path / "missing.jsonl"), "--model", str(tiny_ckpt), "-o", str(tmp_path)])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_cli_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["train-rm", "x.jsonl", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--model", "--eval", "--epochs", "--lr", "--batch-pairs", "--lora-rank", "--length-ratio", "--device",
                "--resume"):
        assert opt in text


def test_demo_model_ranks_correct_descriptions_higher(tmp_path):
    """The shipped demo model, on pictures it never saw (a seed the training script does not use)."""
    assert (DEMO / "config.json").is_file(), "examples/demo-model is missing (run examples/make_demo_model.py)"
    engine = RewardEngine.from_pretrained(DEMO, device="cpu", dtype="float32")
    trained_on = json.loads((DEMO / "TRAINING.json").read_text())
    rng = random.Random(987_654)
    convs, images = [], []
    from ixc_engine.training.shapes import draw

    for i in range(N_DEMO):
        ex = make_example(rng, max_shapes=trained_on["data"]["max_shapes"])
        img = tmp_path / f"{i}.png"
        draw(ex.scene).save(img)
        for reply in (ex.correct, ex.wrong):
            convs.append([{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": reply}])
            images.append([str(img)])
    scores = engine.score(convs, images, hd_num=1)
    wins = sum(scores[2 * i] > scores[2 * i + 1] for i in range(N_DEMO))
    assert wins >= DEMO_MIN_WINS, scores


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("train_projector", [False, True])
def test_shared_prefix_gives_the_unshared_loss_and_gradients(tmp_path, pooling, train_projector):
    """With share_prefix the rejected reply runs only its own tokens, attending to the chosen reply's K/V over the
    common image + prompt prefix: loss, rewards and every gradient equal the two-full-sequence computation."""
    from PIL import Image

    img = tmp_path / "p.png"
    pic = Image.new("RGB", (120, 90), (200, 40, 40))
    for x in range(0, 120, 3):
        pic.putpixel((x, (x * 5) % 90), (10, 220, 30))
    pic.save(img)
    pairs = [PreferencePair(id=f"i{k}", messages=[{"role": "user", "content": f"What is shown? (take {k})"}],
                            chosen="A red picture with green dots." * (k + 1), rejected="A blue square.",
                            images=[str(img)]) for k in range(2)]
    pairs += text_pairs(2, seed=3)
    runs = {}
    for share in (False, True):
        model = small_model(seed=5, layers=2, pooling=pooling)
        tr = RewardTrainer(model, PACKAGED_TOKENIZER, pairs, cfg=fast_cfg(share_prefix=share,
                                                                           train_projector=train_projector))
        batch = tr._prepare_pairs(pairs)
        out = tr._pair_loss(batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs[share] = (out, grads, tr.llm_tokens, sum(c.n_tokens + r.n_tokens for c, r in batch))
    (o0, g0, t0, n), (o1, g1, t1, _) = runs[False], runs[True]
    assert t0 == n and t1 < 0.6 * n  # the two image prompts (~860 tokens each) run once
    torch.testing.assert_close(o1.loss, o0.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o1.chosen, o0.chosen, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o1.rejected, o0.rejected, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and (not train_projector or any("vision_proj" in k for k in g1))
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)
