"""`ixc-engine` command line: score, filter, merge, init-tiny (and train-rm when the training extra is present)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXAMPLES = """\
examples:
  ixc-engine score examples/corpus.jsonl --model examples/demo-model -o out/scores.jsonl
  ixc-engine filter examples/corpus.jsonl --scores out/scores.jsonl --drop-fraction 0.2 -o out/clean.jsonl
  ixc-engine score corpus.jsonl --model /models/ixc-2.5-reward --shard 0/4 -o scores.jsonl   # one GPU of four
  ixc-engine merge -o scores.jsonl scores.shard0-of-4.jsonl ... scores.shard3-of-4.jsonl
  ixc-engine init-tiny /tmp/tiny-model
"""


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects I/N like 0/4, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= I < N")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ixc-engine", description="Fast, exact scoring with the IXC-2.5-Reward multi-modal reward model.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "score", help="score every sample of a corpus JSONL file",
        description="Score a corpus: one JSON object per line, {\"id\", \"messages\": [{\"role\", \"content\"}...], "
        "\"images\": [paths relative to the corpus file; videos by extension]}. Writes one line per scored sample "
        "({\"id\", \"score\", \"n_tokens\", \"line\"}) in input order to -o, and every line that cannot be scored to "
        "<output>.errors.jsonl with its line number and the reason. Re-running the same command resumes.",
    )
    s.add_argument("corpus", type=Path, help="input JSONL file")
    s.add_argument("--model", required=True, help="checkpoint directory (or a hub id with huggingface_hub)")
    s.add_argument("-o", "--output", type=Path, required=True, help="scores JSONL file to write")
    s.add_argument("--hd-num", type=int, default=9,
                   help="HD crop budget per image (default 9, upstream's README setting; get_score used 24)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    s.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on GPU, fp32 on CPU)")
    s.add_argument("--max-batch-tokens", type=int, default=16384, help="token budget of one packed batch")
    s.add_argument("--max-length", type=int, default=None,
                   help="longest sample in tokens (default: the model's max_length); longer ones are reported")
    s.add_argument("--window", type=int, default=64, help="samples prepared and scheduled together")
    s.add_argument("--workers", type=int, default=0, help="processes for CPU preprocessing (default 0: inline)")
    s.add_argument("--no-prefix-cache", action="store_true", help="disable shared-prefix reuse")
    s.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="score only lines with (line-1) %% N == I; output goes to <output>.shardI-of-N.jsonl "
                   "(under torchrun: RANK/WORLD_SIZE, device cuda:LOCAL_RANK)")
    s.add_argument("--restart", action="store_true", help="ignore existing output and start over")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    f = sub.add_parser("filter", help="write the corpus lines whose score passes a threshold")
    f.add_argument("corpus", type=Path)
    f.add_argument("--scores", type=Path, required=True, help="scores JSONL written by `score`")
    g = f.add_mutually_exclusive_group(required=True)
    g.add_argument("--min-score", type=float, help="keep samples scoring at least this")
    g.add_argument("--drop-fraction", type=float, help="drop this fraction of scored samples, lowest scores first")
    f.add_argument("-o", "--output", type=Path, required=True)

    m = sub.add_parser("merge", help="join per-shard score files in input order")
    m.add_argument("shards", type=Path, nargs="+", help="the shard score files (their .errors.jsonl are joined too)")
    m.add_argument("-o", "--output", type=Path, required=True)

    t = sub.add_parser("init-tiny", help="write a random tiny model in the exact release layout")
    t.add_argument("directory", type=Path)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    t.add_argument("--format", default="safetensors", choices=["safetensors", "bin"])

    tr = sub.add_parser("train-rm", help="train a reward model on preference pairs (ixc-engine train-rm --help)",
                        add_help=False)  # every argument, --help included, goes to ixc_engine.training.cli
    tr.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def shard_output(path: Path, shard: tuple[int, int]) -> Path:
    i, n = shard
    if n == 1:
        return path
    stem = path.name.removesuffix(".jsonl")
    return path.with_name(f"{stem}.shard{i}-of-{n}.jsonl")


def cmd_score(args) -> int:
    from ixc_engine.api import RewardEngine
    from ixc_engine.corpus import ResultWriter, count_lines, read_corpus
    from ixc_engine.engine.engine import EngineConfig

    if not args.corpus.is_file():
        print(f"error: corpus {args.corpus} not found", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.shard == (0, 1):  # under torchrun: one shard per rank, one GPU per local rank
        args.shard = (int(os.environ.get("RANK", "0")), world)
        if args.device is None:
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    out_path = shard_output(args.output, args.shard)
    cfg = EngineConfig(
        hd_num=args.hd_num, max_batch_tokens=args.max_batch_tokens, window=args.window, workers=args.workers,
        prefix_cache=not args.no_prefix_cache, max_length=args.max_length,
    )
    t_load = time.perf_counter()
    engine = RewardEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype, config=cfg)
    writer, done = ResultWriter.open(out_path, resume=not args.restart)
    total_lines = count_lines(args.corpus)
    i, n = args.shard
    mine = len(range(i, total_lines, n))
    if done:
        print(f"resuming: {len(done)} of {mine} lines already in {out_path} and its errors file", file=sys.stderr)
    print(f"model loaded in {time.perf_counter() - t_load:.1f}s on {engine.engine.runner.device} "
          f"({engine.engine.runner.dtype})", file=sys.stderr)

    todo = ((ln, s) for ln, s in read_corpus(args.corpus, shard=args.shard) if ln not in done)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=mine, initial=len(done), unit="sample", file=sys.stderr, dynamic_ncols=True)
    n_ok = n_err = tokens = 0
    t0 = time.perf_counter()
    try:
        for r in engine.score_stream(todo, hd_num=args.hd_num):
            if r.error is None:
                writer.write_score(r.index, r.id, r.score, r.n_tokens)
                n_ok += 1
                tokens += r.n_tokens
            else:
                writer.write_error(r.index, r.id, r.error)
                n_err += 1
            if bar is not None:
                bar.update(1)
                el = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{tokens / el:,.0f} tok/s, {n_err} errors", refresh=False)
            if (n_ok + n_err) % cfg.window == 0:
                writer.flush()
    except KeyboardInterrupt:
        writer.close()
        print(f"\ninterrupted: {n_ok + n_err} lines written; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    writer.close()
    el = time.perf_counter() - t0
    st = engine.stats()
    print(json.dumps({
        "scored": n_ok, "errors": n_err, "skipped_already_done": len(done), "seconds": round(el, 3),
        "samples_per_s": round((n_ok + n_err) / el, 3) if el else None, "tokens_per_s": round(tokens / el, 1) if el
        else None, "tokens_computed": st["tokens_computed"], "prefix_tokens_reused": st["prefix_tokens_reused"],
        "scores": str(out_path), "errors_file": str(writer.errors_path),
    }), file=sys.stderr)
    return 0


def cmd_filter(args) -> int:
    from ixc_engine.corpus import count_lines

    scores: dict[int, float] = {}
    with open(args.scores, encoding="utf-8") as fh:
        for k, raw in enumerate(fh, 1):
            try:
                rec = json.loads(raw)
                scores[int(rec["line"])] = float(rec["score"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                print(f"error: {args.scores}:{k}: not a score record ({exc})", file=sys.stderr)
                return 2
    if args.min_score is not None:
        threshold = args.min_score
        keep = {ln for ln, s in scores.items() if s >= threshold}
    else:
        if not 0.0 <= args.drop_fraction < 1.0:
            print("error: --drop-fraction must be in [0, 1)", file=sys.stderr)
            return 2
        ranked = sorted(scores, key=lambda ln: (scores[ln], ln))
        keep = set(ranked[round(args.drop_fraction * len(ranked)):])
    total = count_lines(args.corpus)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.corpus, encoding="utf-8") as src, open(args.output, "w", encoding="utf-8") as dst:
        for ln, raw in enumerate(src, 1):
            if ln in keep:
                dst.write(raw if raw.endswith("\n") else raw + "\n")
    unscored = total - len(scores)
    print(json.dumps({"lines": total, "scored": len(scores), "kept": len(keep), "dropped_low_score":
                      len(scores) - len(keep), "dropped_unscored": unscored, "output": str(args.output)}),
          file=sys.stderr)
    return 0


def cmd_merge(args) -> int:
    from ixc_engine.corpus import errors_path_for

    for kind, path_of in (("scores", lambda p: p), ("errors", errors_path_for)):
        records = []
        for shard in args.shards:
            src = path_of(shard)
            if not src.exists():
                if kind == "scores":
                    print(f"error: shard file {src} not found", file=sys.stderr)
                    return 2
                continue
            with open(src, encoding="utf-8") as fh:
                records += [(json.loads(raw)["line"], raw) for raw in fh if raw.endswith("\n")]
        lines = [ln for ln, _ in records]
        if len(set(lines)) != len(lines):
            print(f"error: the {kind} shards overlap (a line appears twice)", file=sys.stderr)
            return 2
        dst = args.output if kind == "scores" else errors_path_for(args.output)
        with open(dst, "w", encoding="utf-8") as out:
            out.writelines(raw for _, raw in sorted(records))
        print(f"{kind}: {len(records)} lines -> {dst}", file=sys.stderr)
    return 0


def cmd_init_tiny(args) -> int:
    import torch

    from ixc_engine.tiny import init_tiny

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    out = init_tiny(args.directory, seed=args.seed, dtype=dtype, fmt=args.format)
    print(f"tiny model written to {out}", file=sys.stderr)
    return 0


def cmd_train_rm(args) -> int:
    try:
        from ixc_engine.training.cli import main as train_main
    except ImportError as exc:
        print(f"error: training is not available: {exc}", file=sys.stderr)
        return 2
    return train_main(args.rest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-rm"]:  # its own parser (ixc_engine.training.cli), --help included
        return cmd_train_rm(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    handlers = {"score": cmd_score, "filter": cmd_filter, "merge": cmd_merge, "init-tiny": cmd_init_tiny,
                "train-rm": cmd_train_rm}
    try:
        return handlers[args.command](args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
