"""`ixc-engine report`: parser and handler (registered by ixc_engine/cli.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _finite(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def add_report_parser(sub, formatter_class, add_format_args) -> None:
    r = sub.add_parser(
        "report", help="write an HTML report of a scoring job (distributions, groups, worst and best samples)",
        formatter_class=formatter_class,
        description="One self-contained HTML file that opens offline (no scripts, fonts or images from elsewhere): "
        "counts, errors by reason, score quantiles, the score histogram with the threshold and the fraction it drops, "
        "score against token length with their correlation, a per-group table and box plots, the kept fraction "
        "against the threshold, and the lowest and highest scored samples as cards with their conversation and "
        "thumbnails of their images (videos: a few frames).",
        epilog="examples:\n"
        "  ixc-engine report out/scores.jsonl --corpus examples/corpus.jsonl -o out/report.html --group-by label\n"
        "  ixc-engine report scores.jsonl --corpus llava.json --media-root data/ -o report.html --threshold -1.2",
    )
    r.add_argument("scores", type=Path, help="scores JSONL written by `score` (its .errors.jsonl is read too)")
    r.add_argument("--corpus", type=Path, required=True, help="the corpus that was scored")
    add_format_args(r)
    r.add_argument("-o", "--output", type=Path, required=True, help="HTML file to write")
    r.add_argument("--group-by", default=None, metavar="FIELD",
                   help="record field to group by (e.g. source; a.b for nested objects)")
    r.add_argument("--threshold", type=_finite, default=None,
                   help="score threshold to show (samples below it are dropped, as `filter --min-score`)")
    r.add_argument("-k", "--cards", type=_positive_int, default=18,
                   help="how many of the lowest and of the highest scored samples to show as cards (default 18)")
    r.add_argument("--title", default=None, help="title of the page (default: the corpus file's name)")


def cmd_report(args) -> int:
    from ixc_engine.report.build import build_report

    summary = build_report(args.scores, args.corpus, args.output, fmt=args.format, media_root=args.media_root,
                           group_by=args.group_by, threshold=args.threshold, k=args.cards, title=args.title)
    print(json.dumps(summary), file=sys.stderr)
    return 0
