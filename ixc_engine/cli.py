"""`ixc-engine` command line: score, filter, merge, init-tiny (and train-rm when the training extra is present)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
import time
from pathlib import Path

from ixc_engine.formats.jobs import check_outputs_apart as _check_outputs_apart  # the job helpers ray.py shares
from ixc_engine.formats.jobs import job_for, records_to_do, shard_output

# Only the standard library at import time: a Ctrl-C while torch loads is then caught by main() (exit 130, no
# traceback), and --help is instant. Each command imports what it needs.

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


class _Formatter(argparse.HelpFormatter):
    """Wraps description paragraphs to the terminal; keeps example blocks (indented lines) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for para in text.split("\n\n"):
            lines = para.splitlines()
            if len(lines) > 1 and all(line.startswith("  ") for line in lines[1:]):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(textwrap.fill(" ".join(para.split()), width, initial_indent=indent,
                                                subsequent_indent=indent))
        return "\n\n".join(paragraphs)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ixc-engine")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _add_format_args(parser: argparse.ArgumentParser, media: bool = True) -> None:
    from ixc_engine.formats import FORMATS

    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="corpus format (default: by extension and content; llava = a LLaVA / ShareGPT JSON "
                        "array or JSONL)")
    if media:
        parser.add_argument("--media-root", type=Path, default=None, metavar="DIR",
                            help="folder that relative media paths start from (default: the corpus file's folder)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ixc-engine", description="Fast, exact scoring with the IXC-2.5-Reward multi-modal reward model.",
        epilog=EXAMPLES, formatter_class=_Formatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = _Formatter

    s = sub.add_parser(
        "score", help="score every sample of a corpus JSONL file", formatter_class=fmt,
        description="Score a corpus: one JSON object per line, {\"id\", \"messages\": [{\"role\", \"content\"}...], "
        "\"images\": [paths relative to the corpus file; videos by extension]}.\n\nWrites one line per scored sample "
        "({\"id\", \"score\", \"n_tokens\", \"line\"}) in input order to -o, and every line that cannot be scored to "
        "<output>.errors.jsonl with its line number, id and the reason; every input line lands in exactly one of the "
        "two (each line strict JSON; a sample scored despite likely wrong input carries \"warnings\"). A summary "
        "(JSON) goes to stdout, progress and logs to stderr. A job holds <output>.lock while it runs: a second job on "
        "the same output fails at once. <output>.job.json records the job's settings and whether it finished. "
        "Re-running the same command "
        "after an interruption (Ctrl-C, kill, crash) resumes where it stopped; re-running it with another corpus, "
        "model, --hd-num, --max-length, --shard, dtype, --strict or --escape-special-tokens is refused unless "
        "--restart is given.\n\n"
        "Other formats: a LLaVA / ShareGPT JSON array, JSONL with OpenAI content parts, Parquet (with image bytes); "
        "see --format and --media-root. For a JSON array or a Parquet file the record index (from 1) stands for the "
        "line number.",
        epilog="examples:\n"
        "  ixc-engine score examples/corpus.jsonl --model examples/demo-model -o out/scores.jsonl\n"
        "  ixc-engine score corpus.jsonl --model /models/ixc-2.5-reward --dtype bfloat16 -o scores.jsonl\n"
        "  ixc-engine score corpus.jsonl --model /models/ixc-2.5-reward --shard 1/4 -o scores.jsonl"
        "   # writes scores.shard1-of-4.jsonl",
    )
    s.add_argument("corpus", type=Path, help="input corpus: JSONL, a JSON array (LLaVA / ShareGPT) or Parquet")
    _add_format_args(s)
    s.add_argument("--model", required=True, help="checkpoint directory (or a hub id with huggingface_hub)")
    s.add_argument("-o", "--output", type=Path, required=True, help="scores JSONL file to write")
    s.add_argument("--hd-num", type=_int_at_least(1), default=9,
                   help="HD crop budget per image (default 9, upstream's README setting; get_score used 24; "
                   "samples with several images use 6, as upstream)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    s.add_argument("--dtype", default="auto",
                   help="auto / float32 / bfloat16 / float16 (default auto: bf16 on a GPU; on a CPU bf16 only where "
                   "it has AMX-BF16 or AVX512-BF16 units and a < 1 s probe shows it faster, else fp32; a resumed job "
                   "keeps the dtype it was started in)")
    s.add_argument("--max-batch-tokens", type=_int_at_least(1), default=16384,
                   help="token budget of one packed batch (default 16384); a longer sample runs alone")
    s.add_argument("--max-length", type=_int_at_least(1), default=None,
                   help="longest sample in tokens (default: the model's max_length, 16384 for the release); longer "
                   "samples go to the errors file, never truncated")
    s.add_argument("--max-media", type=_int_at_least(1), default=64,
                   help="most images and videos in one sample (default 64); a sample with more goes to the errors "
                   "file (so does an image or video frame over 89,478,485 pixels, Pillow's decompression-bomb limit)")
    s.add_argument("--window", type=_int_at_least(1), default=64,
                   help="samples prepared and scheduled together (default 64); each record is written as soon as it "
                   "is in order, and synced to disk every window")
    s.add_argument("--workers", type=_int_at_least(0), default=None,
                   help="processes for preprocessing (decode, resize, tokenize) that overlap the model (default 0: "
                   "inline). Raise it on a GPU machine with spare cores (e.g. --workers 8 on a 16-core host), so "
                   "that images are prepared while the GPU runs. On a CPU device raise it when preparation is a large "
                   "share of the time (the summary's cpu_seconds; small models): the README main job ran 3x faster "
                   "with --workers 2 and OMP_NUM_THREADS=1 on 2 cores")
    s.add_argument("--no-prefix-cache", action="store_true", help="disable shared-prefix reuse (scores are equal)")
    s.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="score only lines with (line-1) %% N == I; output goes to <output>.shardI-of-N.jsonl "
                   "(under torchrun: RANK/WORLD_SIZE, device cuda:LOCAL_RANK); join with `ixc-engine merge`")
    s.add_argument("--restart", action="store_true",
                   help="delete this job's earlier output (scores, errors, job files) and start over")
    s.add_argument("--no-progress", action="store_true",
                   help="no progress bar on stderr (the summary is still printed, on stdout)")
    s.add_argument("--strict", action="store_true",
                   help="a sample with warnings (roles out of order, last message not the assistant's, an empty reply, "
                   "special-token strings in the text, a media-like key that is not read, a clipped 16-bit image) "
                   "goes to the errors file instead of being scored with a \"warnings\" list")
    s.add_argument("--escape-special-tokens", action="store_true",
                   help="read special-token strings in message content (</s>, [UNUSED_TOKEN_145], ...) as plain text; "
                   "by default they become control tokens, as upstream reads them")
    from ixc_engine.integrations.ray import add_ray_arguments  # --ray*: the Ray Data driver's own options

    add_ray_arguments(s)

    f = sub.add_parser(
        "filter", help="write the corpus lines whose score passes a threshold", formatter_class=fmt,
        description="Write the lines of CORPUS whose score passes a threshold to -o, byte for byte, in input order. "
        "Lines in the errors file (unreadable samples) are dropped too. The scores must come from a finished job "
        "on this very corpus: every line needs a score or an error record with the line's id, else nothing is "
        "written.",
        epilog="examples:\n"
        "  ixc-engine filter corpus.jsonl --scores scores.jsonl --drop-fraction 0.1 -o clean.jsonl\n"
        "  ixc-engine filter corpus.jsonl --scores scores.jsonl --min-score -1.5 -o clean.jsonl",
    )
    f.add_argument("corpus", type=Path, help="the corpus that was scored (the output is written in its format)")
    _add_format_args(f, media=False)
    f.add_argument("--scores", type=Path, required=True,
                   help="scores JSONL written by `score` (its .errors.jsonl and .job.json beside it are read too)")
    g = f.add_mutually_exclusive_group(required=True)
    g.add_argument("--min-score", type=float, help="keep samples scoring at least this")
    g.add_argument("--drop-fraction", type=float,
                   help="drop this fraction (in [0, 1)) of the scored samples, lowest scores first")
    f.add_argument("-o", "--output", type=Path, required=True, help="cleaned corpus JSONL to write")

    m = sub.add_parser(
        "merge", help="join per-shard score files in input order", formatter_class=fmt,
        description="Join the outputs of `score --shard I/N` runs into one scores file (and one errors file) in "
        "input order. Refuses an incomplete set: a missing shard (by the NAME.shardI-of-N.jsonl names), an "
        "unfinished shard (by its .job.json), shards of different jobs, or overlapping shards.",
        epilog="example:\n  ixc-engine merge -o scores.jsonl scores.shard0-of-2.jsonl scores.shard1-of-2.jsonl",
    )
    m.add_argument("shards", type=Path, nargs="+", help="the shard score files (their .errors.jsonl are joined too)")
    m.add_argument("-o", "--output", type=Path, required=True, help="merged scores JSONL to write")

    from ixc_engine.report.cli import add_report_parser

    add_report_parser(sub, fmt, _add_format_args)

    t = sub.add_parser(
        "init-tiny", help="write a random tiny model in the exact release layout", formatter_class=fmt,
        description="Write a small randomly initialised IXC-2.5-Reward model in the release's layout (config.json, "
        "sharded weights with an index, tokenizer.model): for tests and trying the tools without the 16 GB model.",
    )
    t.add_argument("directory", type=Path, help="where to write it (created)")
    t.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default float32)")
    t.add_argument("--format", default="safetensors", choices=["safetensors", "bin"],
                   help="weight files: safetensors, or .bin pickles like the hub's main branch (default safetensors)")

    from ixc_engine.serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub, fmt, _int_at_least)
    tr = sub.add_parser("train-rm", help="train a reward model on preference pairs (ixc-engine train-rm --help)",
                        add_help=False)  # every argument, --help included, goes to ixc_engine.training.cli
    tr.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _load_engine(args, cfg, job, previous, out_path: Path):
    """Load the model (a broken checkpoint is a one-line error here) and check the dtype against a resumed job."""
    from ixc_engine.api import RewardEngine

    if args.dtype == "auto" and previous is not None and previous.dtype is not None:
        args.dtype = previous.dtype  # resuming: the dtype the job was started in, not a new probe's choice
    t_load = time.perf_counter()
    engine = RewardEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype, config=cfg)
    job.dtype = str(engine.engine.runner.dtype).removeprefix("torch.")
    if previous is not None and previous.dtype not in (None, job.dtype):
        engine.close()
        raise ValueError(f"{out_path} was scored in {previous.dtype}, this run would use {job.dtype}: pass --dtype "
                         f"{previous.dtype} to resume it, or --restart")
    choice = getattr(engine, "dtype_choice", None)
    print(f"model loaded in {time.perf_counter() - t_load:.1f}s on {engine.engine.runner.device} "
          f"({engine.engine.runner.dtype}{f', auto: {choice.reason}' if choice is not None else ''})",
          file=sys.stderr)
    return engine


def cmd_score(args) -> int:
    from ixc_engine.joblock import JobLock, lock_path_for

    if not args.corpus.is_file():
        print(f"error: corpus {args.corpus} not found", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.shard == (0, 1):  # under torchrun: one shard per rank, one GPU per local rank
        args.shard = (int(os.environ.get("RANK", "0")), world)
        if args.device is None:
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    out_path = shard_output(args.output, args.shard)
    if os.path.exists(lock_path_for(out_path)) and os.path.samefile(lock_path_for(out_path), args.corpus):
        raise ValueError(f"output {out_path}'s lock file {lock_path_for(out_path)} is the corpus: choose another -o")
    # Taken before anything is read, trimmed or deleted (and before torch is imported: a second job on this output
    # fails at once); held until the job ends.
    lock = JobLock(out_path)
    try:
        from ixc_engine.integrations.ray import cmd_score_ray, ray_requested

        if ray_requested(args):  # the same job on a Ray cluster (ixc_engine/integrations/ray.py)
            return cmd_score_ray(args)
        return _score_locked(args, out_path)
    finally:
        lock.release()


def _score_locked(args, out_path: Path) -> int:
    from ixc_engine.corpus import (
        ResultWriter,
        check_not_foreign,
        count_lines,
        errors_path_for,
        job_path_for,
    )
    from ixc_engine.engine.engine import EngineConfig
    from ixc_engine.formats.source import open_corpus

    job_path = job_path_for(out_path)
    _check_outputs_apart({"corpus": args.corpus}, [out_path, errors_path_for(out_path), job_path])
    if args.workers is None:
        from ixc_engine.engine.cpu import default_workers

        args.workers = default_workers(args.device or ("cuda" if _cuda_available() else "cpu"))
    cfg = EngineConfig(
        hd_num=args.hd_num, max_batch_tokens=args.max_batch_tokens, window=args.window, workers=args.workers,
        prefix_cache=not args.no_prefix_cache, max_length=args.max_length, max_media=args.max_media,
        strict=args.strict, escape_special_tokens=args.escape_special_tokens, ramp_up=True,
    )
    source = open_corpus(args.corpus, args.format, args.media_root)  # JSONL, JSON array or Parquet
    total_lines = source.count()
    job, previous, mine = job_for(args, total_lines, out_path, job_path)
    check_not_foreign(out_path, "score")  # cheap refusals first, before the model loads
    check_not_foreign(errors_path_for(out_path), "error")
    engine = None
    if mine and (previous is None or not previous.complete):  # a bad model fails here, before any output file
        engine = _load_engine(args, cfg, job, previous, out_path)
    writer, done = ResultWriter.open(out_path, resume=not args.restart)
    if args.restart:
        job_path.unlink(missing_ok=True)
    if total_lines == 0:
        print(f"warning: corpus {args.corpus} is empty", file=sys.stderr)
    if done:
        print(f"resuming: {len(done)} of {mine} lines already in {out_path} and its errors file", file=sys.stderr)
    if len(done) >= mine:  # nothing left to score
        if engine is not None:
            engine.close()
        writer.close()
        job.dtype, job.complete = previous.dtype if previous else None, True
        job.errors = count_lines(writer.errors_path)
        job.scored = len(done) - job.errors
        job.save(job_path)
        print(json.dumps({"scored": 0, "errors": 0, "warnings": 0, "skipped_already_done": len(done),
                          "scores": str(out_path), "errors_file": str(writer.errors_path)}))
        return 0

    if engine is None:
        try:
            engine = _load_engine(args, cfg, job, previous, out_path)
        except BaseException:
            writer.close()
            raise
    job.save(job_path)

    todo = records_to_do(source.records(shard=args.shard), done, args.corpus, out_path)

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=mine, initial=len(done), unit="sample", file=sys.stderr, dynamic_ncols=True)
    n_ok = n_err = n_warn = tokens = 0
    t0 = time.perf_counter()
    try:
        for r in engine.score_stream(todo, hd_num=args.hd_num):
            if r.error is None:
                writer.write_score(r.index, r.id, r.score, r.n_tokens, r.warnings)
                n_ok += 1
                n_warn += bool(r.warnings)
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
        engine.close()
    writer.close()
    job.complete = True
    job.errors = count_lines(writer.errors_path)
    job.scored = len(done) + n_ok + n_err - job.errors
    job.save(job_path)
    el = time.perf_counter() - t0
    st = engine.stats()
    print(json.dumps({  # the summary goes to stdout, progress and logs to stderr
        "scored": n_ok, "errors": n_err, "warnings": n_warn, "skipped_already_done": len(done),
        "seconds": round(el, 3), "samples_per_s": round((n_ok + n_err) / el, 3) if el else None,
        "tokens_per_s": round(tokens / el, 1) if el else None, "tokens_computed": st["tokens_computed"],
        "prefix_tokens_reused": st["prefix_tokens_reused"], "scores": str(out_path),
        "errors_file": str(writer.errors_path),
    }))
    return 0


def cmd_filter(args) -> int:
    import math

    from ixc_engine.corpus import (
        JobManifest,
        LineError,
        by_line,
        errors_path_for,
        iter_lines,
        job_path_for,
        read_records,
    )
    from ixc_engine.formats.source import open_corpus

    if args.min_score is not None and not math.isfinite(args.min_score):
        raise ValueError(f"--min-score must be a finite number, got {args.min_score}")
    if args.drop_fraction is not None and not 0.0 <= args.drop_fraction < 1.0:
        raise ValueError(f"--drop-fraction must be in [0, 1), got {args.drop_fraction}")
    if not args.corpus.is_file():
        raise ValueError(f"corpus {args.corpus} not found")
    if not args.scores.is_file():
        raise ValueError(f"scores file {args.scores} not found")
    errors_file = errors_path_for(args.scores)
    _check_outputs_apart({"corpus": args.corpus, "scores file": args.scores, "errors file": errors_file},
                         [args.output])
    job = JobManifest.load(job_path_for(args.scores))
    if job is not None and not job.complete:
        raise ValueError(f"{args.scores} is from an unfinished scoring job: run the same `ixc-engine score` command "
                         "again to finish it (it resumes), then filter")
    if job is not None and job.shard[1] > 1:
        raise ValueError(f"{args.scores} is shard {job.shard[0]}/{job.shard[1]} of a job: `ixc-engine merge` the "
                         "shards first, then filter the merged scores")
    score_recs, error_recs = read_records(args.scores, "score"), read_records(errors_file, "error")
    by_line((args.scores, score_recs), (errors_file, error_recs))  # refuses a line recorded twice
    scored = {r["line"]: r for r in score_recs}
    failed = {r["line"]: r for r in error_recs}
    source = open_corpus(args.corpus, args.format)
    total = source.count()
    # Every corpus line must have exactly one record, with the corpus line's id: scores of another corpus, or of an
    # unfinished job, must not silently decide what is kept.
    stray = sorted(ln for ln in (*scored, *failed) if not 1 <= ln <= total)
    if stray:
        raise ValueError(f"{args.scores} has records for lines the corpus ({total} lines) does not have, e.g. line "
                         f"{stray[0]}: these scores belong to another corpus")
    missing = []
    for ln, item in source.records():  # ids exactly as `score` read them
        cid = item.sample_id if isinstance(item, LineError) else item.id
        rec = scored.get(ln)
        if rec is None:
            if ln not in failed:
                missing.append(ln)
        elif cid != rec.get("id"):
            raise ValueError(f"line {ln} of {args.corpus} has id {cid!r} but {args.scores} scored id "
                             f"{rec.get('id')!r} there: these scores belong to another corpus (or it changed)")
    if missing:
        raise ValueError(f"{len(missing)} lines of {args.corpus} (first: line {missing[0]}) have neither a score in "
                         f"{args.scores} nor an error in {errors_file}: finish the scoring job first (re-running it "
                         "resumes), or merge all shards")
    scores = {ln: float(r["score"]) for ln, r in scored.items()}
    if args.min_score is not None:
        keep = {ln for ln, s in scores.items() if s >= args.min_score}
    else:
        ranked = sorted(scores, key=lambda ln: (scores[ln], ln))
        keep = set(ranked[round(args.drop_fraction * len(ranked)):])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if source.format != "jsonl":  # a JSON array stays one, Parquet stays Parquet (ixc_engine/formats/writers.py)
        from ixc_engine.formats.writers import write_kept

        kept = write_kept(source, keep, args.output)
        print(json.dumps({"records": total, "scored": len(scores), "kept": kept, "dropped_low_score":
                          len(scores) - kept, "dropped_errors": len(failed), "output": str(args.output)}))
        return 0
    # Bytes, split on b"\n" only as `score` split them: a kept line is copied exactly (CR, CRLF, NUL, invalid UTF-8
    # and a missing final newline included), so the output is the corpus with the other lines cut out.
    with open(args.output, "wb") as dst:
        for ln, raw in iter_lines(args.corpus):
            if ln in keep:
                dst.write(raw)
    print(json.dumps({"lines": total, "scored": len(scores), "kept": len(keep), "dropped_low_score":
                      len(scores) - len(keep), "dropped_errors": len(failed), "output": str(args.output)}))
    return 0


_SHARD_NAME = re.compile(r"^(?P<stem>.*)\.shard(?P<i>\d+)-of-(?P<n>\d+)\.jsonl$")


def _check_shard_set(shards: list[Path]) -> list:
    """All shards of one job, each finished: by their names (NAME.shardI-of-N.jsonl) and job descriptions."""
    from ixc_engine.corpus import JobManifest, job_path_for

    named = [_SHARD_NAME.match(p.name) for p in shards]
    if all(named):
        counts = {int(m["n"]) for m in named}
        if len(counts) != 1:
            raise ValueError(f"the shards come from splits into different numbers of parts: {sorted(counts)}")
        n = counts.pop()
        got = sorted(int(m["i"]) for m in named)
        if len(set(got)) != len(got):
            raise ValueError("a shard is given twice")
        if absent := sorted(set(range(n)) - set(got)):
            raise ValueError(f"shard(s) {', '.join(f'{i}/{n}' for i in absent)} missing: merge needs all {n}")
    jobs = []
    for p in shards:
        if not p.exists():
            raise ValueError(f"shard file {p} not found")
        job = JobManifest.load(job_path_for(p))
        if job is None:
            print(f"warning: {p} has no job description ({job_path_for(p).name}); cannot check it is finished",
                  file=sys.stderr)
            continue
        if not job.complete:
            raise ValueError(f"{p} is an unfinished shard (job not complete): run its `ixc-engine score ... --shard "
                             f"{job.shard[0]}/{job.shard[1]}` again to finish it, then merge")
        jobs.append(job)
    if jobs and len({(j.corpus, j.model, j.hd_num, j.max_length, j.dtype, j.shard[1], j.strict,
                      j.escape_special_tokens) for j in jobs}) != 1:
        raise ValueError("the shards come from different jobs (corpus, model, hd_num, max_length, dtype or split)")
    return jobs


def cmd_merge(args) -> int:
    from ixc_engine.corpus import JobManifest, by_line, errors_path_for, job_path_for, read_records

    _check_outputs_apart({f"shard file {k}": p for k, p in enumerate(args.shards)} |
                         {f"errors file of shard {k}": errors_path_for(p) for k, p in enumerate(args.shards)},
                         [args.output, errors_path_for(args.output)])
    jobs = _check_shard_set(args.shards)
    counts = {}
    read = {(kind, shard): read_records(path_of(shard), kind, with_lines=True)
            for kind, path_of in (("score", lambda p: p), ("error", errors_path_for)) for shard in args.shards}
    try:  # a line recorded twice, in one file or across shards and kinds, is refused
        by_line(*((shard if kind == "score" else errors_path_for(shard), recs) for (kind, shard), recs in read.items()))
    except ValueError as exc:
        raise ValueError(f"the shards overlap: {exc}") from None
    for kind in ("score", "error"):
        records = [(rec["line"], raw) for shard in args.shards for rec, raw in read[kind, shard]]
        dst = args.output if kind == "score" else errors_path_for(args.output)
        with open(dst, "wb") as out:  # the records' bytes as the shards hold them
            out.writelines(raw for _, raw in sorted(records))
        counts[kind] = len(records)
        print(f"{kind}s: {len(records)} lines -> {dst}", file=sys.stderr)
    if jobs and len(jobs) == len(args.shards):
        j = jobs[0]
        merged = JobManifest(corpus=j.corpus, model=j.model, hd_num=j.hd_num, max_length=j.max_length, shard=(0, 1),
                             lines=sum(x.lines for x in jobs), dtype=j.dtype, complete=True, scored=counts["score"],
                             errors=counts["error"], strict=j.strict, escape_special_tokens=j.escape_special_tokens)
        if merged.lines != counts["score"] + counts["error"]:
            raise ValueError(f"the shards hold {counts['score'] + counts['error']} records for {merged.lines} lines")
        merged.save(job_path_for(args.output))
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


def cmd_serve(args) -> int:
    from ixc_engine.serve.cli import cmd_serve as serve

    return serve(args)


def cmd_report(args) -> int:
    from ixc_engine.report.cli import cmd_report as report

    return report(args)


_NUMBER_OPTIONS = ("--min-score", "--drop-fraction")


def _join_negative_numbers(argv: list[str]) -> list[str]:
    """`--min-score -1e3` as `--min-score=-1e3`: argparse takes only -1 or -1.5 style values for an option, and reads
    "-1e3" or "-inf" as an unknown option."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in _NUMBER_OPTIONS and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            try:
                float(argv[i + 1])
            except ValueError:
                pass
            else:
                out.append(f"{a}={argv[i + 1]}")
                i += 2
                continue
        out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["train-rm"]:  # its own parser (ixc_engine.training.cli), --help included
            return cmd_train_rm(argparse.Namespace(rest=argv[1:]))
        args = build_parser().parse_args(_join_negative_numbers(argv))
        handlers = {"score": cmd_score, "filter": cmd_filter, "merge": cmd_merge, "init-tiny": cmd_init_tiny,
                    "train-rm": cmd_train_rm, "report": cmd_report, "serve": cmd_serve}
        try:
            return handlers[args.command](args)
        except (ValueError, RuntimeError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:  # e.g. while torch or the model loads: no traceback
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
