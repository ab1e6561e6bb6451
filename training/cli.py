"""`ixc-engine train-rm PAIRS.jsonl --model INIT_DIR -o OUT_DIR ...`: Bradley-Terry reward-model training."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

EXAMPLES = """\
pair file (JSONL, one pair a line; media paths relative to the file):
  {"id": "p1", "messages": [{"role": "user", "content": "Describe the image."}],
   "chosen": "A red circle.", "rejected": "A blue circle.", "images": ["images/p1.png"]}
  upstream form: {"conversations_a": [...], "conversations_b": [...], "preference": "a", "images": [...]}

examples:
  ixc-engine train-rm examples/pairs.jsonl --model examples/demo-model -o out/rm --epochs 1 --lr 1e-5
  ixc-engine train-rm pairs.jsonl --model /models/ixc-2.5-reward -o out/rm --lora-rank 64 --length-ratio 2.5 \\
      --eval heldout.jsonl --eval-every 200 --save-every 1000
  ixc-engine train-rm pairs.jsonl --model /models/ixc-2.5-reward -o out/rm --resume     # continue the last run

The output directory (and every checkpoint-<step> in it) loads like any checkpoint:
  ixc-engine score corpus.jsonl --model out/rm -o scores.jsonl
"""


def _number(kind, lo=None, hi=None, lo_open=False, hi_open=False, allow_inf=False):
    """An argparse type: `kind` (int or float) within [lo, hi] (open ends where asked), finite unless allow_inf."""
    if lo is not None and hi is not None:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        want = f"a number in {rng}"
    elif lo is not None:
        want = f"{'an integer' if kind is int else 'a number'} {'>' if lo_open else '>='} {lo}"
    else:
        want = "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        bad = (not allow_inf and not math.isfinite(value)) or math.isnan(value)
        if lo is not None:
            bad = bad or value < lo or (lo_open and value == lo)
        if hi is not None:
            bad = bad or value > hi or (hi_open and value == hi)
        if bad:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


POS_INT, NONNEG_INT, NONNEG = _number(int, lo=1), _number(int, lo=0), _number(float, lo=0)


SUMMARY_NOTE = """\
progress and summary: the progress bar's avg_loss / avg_acc and the final summary's avg_loss / avg_acc are the
same exponential moving average (over about the last 10 optimizer steps); the summary's last_step_loss is the mean
loss of the last optimizer step alone, and train_accuracy the pairwise accuracy over the last epoch's batches.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ixc-engine train-rm",
        description="Train a reward model on preference pairs with the Bradley-Terry loss\n"
        "-log sigmoid(r_chosen - r_rejected). Full fine-tuning of the LLM and score head (default) or LoRA;\n"
        "the ViT and projector stay frozen. Defaults follow the IXC-2.5-Reward recipe (lr 1e-5 cosine,\n"
        "1% warmup, weight decay 0.1, betas 0.9/0.95, bf16 autocast on GPU, 1 epoch, hd_num 9, max_length 8192).",
        epilog=EXAMPLES + "\n" + SUMMARY_NOTE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pairs", type=Path, help="training pairs (JSONL)")
    p.add_argument("--model", required=True, help="initial checkpoint directory (engine layout)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output directory: final model, checkpoint-<step>/ subdirectories, train_log.jsonl")
    g = p.add_argument_group("data")
    g.add_argument("--eval", type=Path, default=None,
                   help="held-out pairs (JSONL) for pairwise accuracy (default: none, see --eval-fraction)")
    g.add_argument("--eval-fraction", type=_number(float, 0, 1, hi_open=True), default=0.0,
                   help="without --eval: hold out this fraction of the training pairs (seeded shuffle; default 0: "
                   "no evaluation)")
    g.add_argument("--length-ratio", type=_number(float, lo=0, lo_open=True, allow_inf=True),
                   default=math.inf, metavar="R",
                   help="drop training pairs whose chosen reply is more than R times as long (in tokens) as the "
                   "rejected one (paper's length constraint; default: inf, keep all, report only)")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="train on the valid lines of a pair file that has bad ones (default: list errors, stop)")
    g.add_argument("--hd-num", type=POS_INT, default=9, help="HD crop budget per image (default 9)")
    g.add_argument("--max-length", type=POS_INT, default=8192,
                   help="longest sequence in tokens; longer pairs are skipped and reported (default 8192)")
    t = p.add_argument_group("optimisation")
    t.add_argument("--epochs", type=POS_INT, default=1, help="passes over the training pairs (default 1)")
    t.add_argument("--lr", type=_number(float, lo=0, lo_open=True), default=1e-5,
                   help="peak learning rate of the cosine schedule (default 1e-5)")
    t.add_argument("--min-lr-ratio", type=_number(float, 0, 1), default=0.0,
                   help="cosine floor as a fraction of --lr (default 0)")
    t.add_argument("--weight-decay", type=NONNEG, default=0.1,
                   help="AdamW weight decay (default 0.1)")
    t.add_argument("--warmup-ratio", type=_number(float, 0, 1, hi_open=True), default=0.01,
                   help="linear warmup as a fraction of the optimizer steps (default 0.01)")
    t.add_argument("--batch-pairs", type=POS_INT, default=8,
                   help="pairs per packed forward (default 8)")
    t.add_argument("--grad-accum", type=POS_INT, default=1,
                   help="micro-batches per optimizer step (default 1)")
    t.add_argument("--max-grad-norm", type=NONNEG, default=1.0,
                   help="gradient clipping (0 disables; default 1.0)")
    t.add_argument("--lora-rank", type=NONNEG_INT, default=0,
                   help="0: full fine-tuning of the LLM + score head; >0: LoRA of this rank on wqkv/wo/w1/w2/w3, "
                   "merged into the weights in every saved checkpoint (default 0)")
    t.add_argument("--lora-alpha", type=_number(float, lo=0, lo_open=True), default=None,
                   help="LoRA scale = alpha / rank (default: alpha = rank)")
    t.add_argument("--margin", type=NONNEG, default=0.0,
                   help="BT margin: the chosen reward should win by this (default 0)")
    t.add_argument("--center-coef", type=NONNEG, default=0.0,
                   help="reward-centering coefficient: adds coef * mean((r_c + r_r)^2) (default 0)")
    t.add_argument("--pooling", choices=["last", "mean"], default=None,
                   help="override the model's pooling (saved into the output config.json; default: the model's)")
    t.add_argument("--train-vision", action="store_true",
                   help="also train the ViT, projector and separators (deviation from upstream; for models trained "
                   "from scratch; default: off)")
    t.add_argument("--train-projector", action="store_true",
                   help="train the projector and separators with the ViT frozen (its features cached per picture); "
                   "a cheap deviation from upstream for models trained from scratch (default: off)")
    t.add_argument("--no-share-prefix", action="store_true",
                   help="run each pair's common image + prompt prefix through the LLM twice (once per reply) instead "
                   "of once; same loss and gradients, more work (default: shared)")
    t.add_argument("--seed", type=NONNEG_INT, default=0,
                   help="seed of the pair order, held-out split and LoRA init (default 0)")
    r = p.add_argument_group("run")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--no-bf16", action="store_true", help="train in fp32 on GPU too (default: bf16 autocast)")
    r.add_argument("--eval-every", type=NONNEG_INT, default=0,
                   help="evaluate every N optimizer steps (default 0: per epoch)")
    r.add_argument("--save-every", type=NONNEG_INT, default=0,
                   help="checkpoint every N optimizer steps (default 0: at the end)")
    r.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the saved weights (float32 keeps --resume exact; default float32)")
    r.add_argument("--max-steps", type=POS_INT, default=None,
                   help="stop after this many optimizer steps in total (default: the whole schedule)")
    r.add_argument("--resume", nargs="?", const="auto", default=None, metavar="DIR",
                   help="continue from a checkpoint directory; --resume alone: the latest one in --output. Give the "
                   "same pairs, options and --model as the first run (with LoRA, --model must be the original base, "
                   "not a checkpoint of this run: its adapters would be applied twice) (default: start afresh)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar (default: show one)")
    return p


def _latest_checkpoint(out: Path) -> Path | None:
    from .trainer import STATE_FILE

    candidates = []
    if out.is_dir():
        for d in out.iterdir():
            if d.is_dir() and d.name.startswith("checkpoint-") and (d / STATE_FILE).is_file():
                try:
                    candidates.append((int(d.name.removeprefix("checkpoint-")), d))
                except ValueError:
                    continue
        if (out / STATE_FILE).is_file():
            import torch

            step = torch.load(out / STATE_FILE, map_location="cpu", weights_only=True)["step"]
            candidates.append((int(step), out))
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


def _load(path: Path, what: str, skip_bad: bool):
    from .pairs import load_pairs

    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} not found")
    pairs, errors = load_pairs(path, on_error="collect")
    for e in errors[:20]:
        print(f"error: {e}", file=sys.stderr)
    if len(errors) > 20:
        print(f"error: ... and {len(errors) - 20} more bad lines in {path}", file=sys.stderr)
    if errors and not skip_bad:
        raise ValueError(f"{path}: {len(errors)} bad line(s) (listed above); fix them or pass --skip-bad-lines")
    if errors:
        print(f"{path}: skipping {len(errors)} bad line(s), {len(pairs)} pairs left", file=sys.stderr)
    if not pairs:
        raise ValueError(f"{path}: no valid pairs")
    return pairs


def run(args: argparse.Namespace) -> int:
    from ..tokenizer import Tokenizer
    from .pairs import length_filter
    from .trainer import RewardTrainer, TrainConfig

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: not a checkpoint directory (no config.json)")
    if not (model_dir / "tokenizer.model").is_file():
        raise FileNotFoundError(f"--model {model_dir}: tokenizer.model not found")
    train = _load(args.pairs, "pairs", args.skip_bad_lines)
    eval_pairs = _load(args.eval, "--eval", args.skip_bad_lines) if args.eval is not None else []
    if args.eval is None and args.eval_fraction:
        order = list(range(len(train)))
        random.Random(args.seed).shuffle(order)
        k = max(1, round(args.eval_fraction * len(train)))
        held = set(order[:k])
        eval_pairs = [p for i, p in enumerate(train) if i in held]
        train = [p for i, p in enumerate(train) if i not in held]
        print(f"held out {len(eval_pairs)} of {len(train) + len(eval_pairs)} pairs for evaluation", file=sys.stderr)

    tok = Tokenizer.from_file(model_dir / "tokenizer.model")
    train, report = length_filter(train, lambda text: len(tok.encode(text)), args.length_ratio)
    print(report, file=sys.stderr)
    if not train:
        raise ValueError("the length filter removed every training pair; raise --length-ratio")

    cfg = TrainConfig(
        lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, min_lr_ratio=args.min_lr_ratio,
        epochs=args.epochs, batch_pairs=args.batch_pairs, grad_accum=args.grad_accum,
        max_grad_norm=args.max_grad_norm or None, max_length=args.max_length, hd_num=args.hd_num,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, margin=args.margin, center_coef=args.center_coef,
        eval_every=args.eval_every, save_every=args.save_every, seed=args.seed, bf16=not args.no_bf16,
        train_vision=args.train_vision, train_projector=args.train_projector, save_dtype=args.save_dtype,
        share_prefix=not args.no_share_prefix,
    )
    resume = None
    if args.resume is not None:
        resume = _latest_checkpoint(args.output) if args.resume == "auto" else Path(args.resume)
        if resume is None:
            raise FileNotFoundError(f"--resume: no checkpoint with trainer_state.pt in {args.output}")
        print(f"resuming from {resume}", file=sys.stderr)
    trainer = RewardTrainer.from_pretrained(model_dir, train, cfg, eval_pairs=eval_pairs, device=args.device,
                                            output_dir=args.output, pooling=args.pooling)
    print(f"training {sum(p.numel() for p in trainer.trainable_parameters()):,} parameters on {trainer.device}: "
          f"{len(train)} pairs, {trainer.total_steps} optimizer steps", file=sys.stderr)
    result = trainer.train(resume_from=resume, progress=not args.no_progress, max_steps=args.max_steps)
    for pid in result.skipped[:20]:
        print(f"skipped pair {pid}: {trainer.skipped[pid]}", file=sys.stderr)
    summary = {
        "steps": result.steps, "seconds": round(result.seconds, 2), "avg_loss": result.avg_loss,
        "avg_acc": result.avg_acc, "last_step_loss": result.final_loss, "train_accuracy": result.train_accuracy,
        "skipped_pairs": len(result.skipped),
        "length_filter_removed": report.removed, "output": str(args.output),
    }
    if result.eval is not None:
        summary.update(eval_accuracy=result.eval.accuracy, eval_loss=result.eval.loss, eval_pairs=result.eval.pairs)
    print(json.dumps(summary), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] if os.environ.get("IXC_TRAIN_RM_ARGV") is None else None))
