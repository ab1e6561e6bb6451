"""Reproduce examples/demo-model, examples/corpus.jsonl, examples/pairs.jsonl and examples/images/.

    python examples/make_demo_model.py --threads 1           # data + training + held-out evaluation (CPU)
    python examples/make_demo_model.py --data-only           # regenerate only the corpus / pair example files
    python examples/make_demo_model.py report out/scores.jsonl   # precision/recall of the lowest scores

The demo model is a tiny reward model in the exact release layout (InternLM2 with PLoRA + CLIP ViT + projector +
score head, the real 92544-piece tokenizer) trained FROM SCRATCH by this package's RewardTrainer on synthetic
preference pairs: a picture of coloured shapes (training/shapes.py), chosen = its correct description, rejected =
the description with one attribute changed (colour, kind or count).

Deviations from the upstream recipe, on purpose (upstream fine-tunes a pretrained LLM next to a pretrained, frozen
ViT and projector; here every weight starts random):
- the ViT stays FROZEN AND RANDOM, but the projector and the two separator tokens are trained
  (``TrainConfig(train_projector=True)``): a random projector would hand the LLM a random mix of the ViT's
  features, and with the ViT frozen its features are computed once per picture and cached, so training the
  projector costs almost nothing per step;
- ``pooling = "mean"``: every reply token scores itself against the picture it attends to, and the image tokens,
  identical for both replies of a pair, cancel in the pair's difference; with last-token pooling the one final
  token must first learn to find the few reply words among ~860 tokens, which was much slower here;
- the score head starts 100x larger than the other layers (``INIT``), so that the few reply tokens can move the
  mean over ~860 tokens by more than a rounding error;
- a from-scratch learning rate (3e-3, not 1e-5) and a weak reward-centering term (see TRAIN).
Every figure this script prints is measured on the machine that runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# Model: hidden 48 keeps the (92544 x 48) embedding at 8.9 MB in bf16; the ViT is tiny_config's (hidden 32, 2 layers).
MODEL = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 96, "pooling": "mean", "plora_rank": 8, "plora_alpha": 8}
DATA = {"train_images": 200, "pairs_per_image": 3, "eval_images": 60, "max_shapes": 1}
TRAIN = {"lr": 3e-3, "weight_decay": 0.01, "warmup_ratio": 0.05, "epochs": 5, "batch_pairs": 8, "center_coef": 1e-4,
         "hd_num": 1, "max_length": 2048, "train_projector": True}
# The score head's random init is multiplied by this: with mean pooling the few tokens in which two replies differ
# are a few of the ~860 averaged, so a unit-scale head starts every pair at loss log 2 with almost no margin.
INIT = {"score_scale": 100.0}
SEEDS = {"init": 0, "train": 1, "eval": 2, "corpus": 3, "pairs": 4}
CORPUS = {"samples": 96, "wrong_fraction": 0.375}


def make_example_files(out: Path) -> None:
    """examples/corpus.jsonl (+ 3 deliberately bad lines), examples/pairs.jsonl and their images."""
    from ixc_engine.training.shapes import write_corpus, write_pairs

    corpus = out / "corpus.jsonl"
    records = write_corpus(corpus, CORPUS["samples"], seed=SEEDS["corpus"], wrong_fraction=CORPUS["wrong_fraction"],
                           image_dir=out / "images", prefix="img", max_shapes=DATA["max_shapes"])
    lines = [json.dumps(r) for r in records]
    bad = {
        9: json.dumps({"id": "bad-missing-image", "label": "bad", "images": ["images/no-such-picture.png"],
                       "messages": [{"role": "user", "content": "Describe the image."},
                                    {"role": "assistant", "content": "A red circle."}]}),
        24: '{"id": "bad-json", "messages": [{"role": "user", "content": "Describe the image."}',
        40: json.dumps({"id": "bad-role", "label": "bad", "images": [records[0]["images"][0]],
                        "messages": [{"role": "narrator", "content": "Describe the image."},
                                     {"role": "assistant", "content": "A red circle."}]}),
    }
    for pos in sorted(bad):
        lines.insert(pos, bad[pos])
    corpus.write_text("\n".join(lines) + "\n")
    write_pairs(out / "pairs.jsonl", 8, seed=SEEDS["pairs"], pairs_per_image=3, image_dir=out / "images",
                prefix="pair", max_shapes=DATA["max_shapes"])


def train(args) -> dict:
    from ixc_engine.training.pairs import load_pairs
    from ixc_engine.training.shapes import write_pairs
    from ixc_engine.training.trainer import RewardTrainer, TrainConfig

    from ixc_engine.models.reward_model import IXCRewardModel
    from ixc_engine.tiny import PACKAGED_TOKENIZER, random_state_dict, tiny_config

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    t_data = time.perf_counter()
    train_file, eval_file = work / "train.jsonl", work / "heldout.jsonl"
    write_pairs(train_file, DATA["train_images"], seed=SEEDS["train"], pairs_per_image=DATA["pairs_per_image"],
                prefix="train", max_shapes=DATA["max_shapes"])
    eval_records = write_pairs(eval_file, DATA["eval_images"], seed=SEEDS["eval"], pairs_per_image=3,
                               prefix="heldout", max_shapes=DATA["max_shapes"])
    train_pairs, eval_pairs = load_pairs(train_file), load_pairs(eval_file)
    t_data = time.perf_counter() - t_data

    cfg = tiny_config(**MODEL)
    torch.manual_seed(SEEDS["init"])
    model = IXCRewardModel(cfg, cfg.plora_rank)
    model.load_state_dict(random_state_dict(model, SEEDS["init"]))
    with torch.no_grad():
        model.score.weight.mul_(INIT["score_scale"])
    tcfg = TrainConfig(**TRAIN, seed=SEEDS["init"], media_cache_size=DATA["train_images"] + DATA["eval_images"],
                       eval_every=args.eval_every)
    trainer = RewardTrainer(model, PACKAGED_TOKENIZER, train_pairs, tcfg, eval_pairs=eval_pairs,
                            output_dir=work / "run")
    print(f"training {sum(p.numel() for p in trainer.trainable_parameters()):,} parameters on "
          f"{len(train_pairs)} pairs ({trainer.total_steps} steps), torch threads {torch.get_num_threads()}",
          file=sys.stderr)
    load0 = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    result = trainer.train(progress=not args.no_progress, max_steps=args.max_steps)
    t_train = time.perf_counter() - t0

    by_kind = {}
    corruption = {r["id"]: r["corruption"] for r in eval_records}
    for what in ("colour", "kind", "count"):
        subset = [p for p in eval_pairs if corruption[p.id] == what]
        by_kind[what] = trainer.evaluate(subset).accuracy
    out = Path(args.out)
    trainer.save(out, dtype="bfloat16")
    (out / "trainer_state.pt").unlink()  # the shipped model is for scoring; the state is in the work dir's run/
    size = sum(f.stat().st_size for f in out.iterdir())
    summary = {
        "train_pairs": len(train_pairs), "heldout_pairs": len(eval_pairs), "steps": result.steps,
        "data_seconds": round(t_data, 1), "train_seconds": round(t_train, 1),
        "heldout_accuracy_fp32": result.eval.accuracy if result.eval else None,
        "heldout_accuracy_by_corruption": by_kind, "final_train_loss": result.final_loss,
        "checkpoint_bytes": size, "torch_threads": torch.get_num_threads(), "load_average_at_start": load0,
        "model": MODEL, "data": DATA, "train": TRAIN, "init": INIT, "seeds": SEEDS,
    }
    # accuracy of the shipped (bf16) weights, through the scoring engine
    from ixc_engine.api import RewardEngine

    engine = RewardEngine.from_pretrained(out, device="cpu", dtype="float32")
    convs, images = [], []
    for p in eval_pairs:
        for reply in (p.chosen, p.rejected):
            convs.append(p.messages + [{"role": "assistant", "content": reply}])
            images.append(p.images)
    scores = engine.score(convs, images, hd_num=TRAIN["hd_num"])
    wins = sum(scores[2 * i] > scores[2 * i + 1] for i in range(len(eval_pairs)))
    summary["heldout_accuracy_shipped_bf16"] = wins / len(eval_pairs)
    (out / "TRAINING.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def report(corpus: Path, scores: Path) -> dict:
    """Rank the scored corpus lines; for K = 1..n, how many of the K lowest are labelled wrong."""
    labels = {}
    with open(corpus, encoding="utf-8") as fh:
        for ln, raw in enumerate(fh, 1):
            try:
                labels[ln] = json.loads(raw).get("label")
            except json.JSONDecodeError:
                labels[ln] = None
    rows = [json.loads(x) for x in scores.read_text().splitlines()]
    ranked = sorted(rows, key=lambda r: r["score"])
    n_wrong = sum(labels[r["line"]] == "wrong" for r in rows)
    out = {"scored": len(rows), "wrong": n_wrong, "by_k": []}
    for k in sorted({n_wrong // 2, n_wrong, round(1.5 * n_wrong)} - {0}):
        caught = sum(labels[r["line"]] == "wrong" for r in ranked[:k])
        out["by_k"].append({"drop_lowest": k, "wrong_caught": caught, "precision": round(caught / k, 3),
                            "recall": round(caught / n_wrong, 3) if n_wrong else None})
    # area under the ROC curve: P(score of a wrong sample < score of a correct one)
    wrong = [r["score"] for r in rows if labels[r["line"]] == "wrong"]
    right = [r["score"] for r in rows if labels[r["line"]] == "correct"]
    if wrong and right:
        out["auc"] = round(sum((w < c) + 0.5 * (w == c) for w in wrong for c in right) / (len(wrong) * len(right)), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        p = argparse.ArgumentParser(prog="make_demo_model.py report")
        p.add_argument("report")
        p.add_argument("scores", type=Path)
        p.add_argument("--corpus", type=Path, default=HERE / "corpus.jsonl")
        a = p.parse_args(argv)
        print(json.dumps(report(a.corpus, a.scores), indent=2))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(HERE / "demo-model"), help="where to write the trained model")
    p.add_argument("--examples", default=str(HERE), help="where corpus.jsonl, pairs.jsonl and images/ go")
    p.add_argument("--work", default="/tmp/ixc-demo-work", help="training data and the resumable run")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps (0: per epoch)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--data-only", action="store_true", help="only (re)write the example corpus and pair files")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    random.seed(0)
    make_example_files(Path(a.examples))
    if a.data_only:
        return 0
    print(json.dumps(train(a), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
