"""Build the cleaning report: statistics, plots (matplotlib, SVG embedded as data: URIs) and the HTML (Jinja2)."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from ixc_engine.corpus import JobManifest, LineError, errors_path_for, job_path_for, read_records
from ixc_engine.tokenizer import IMAGE_PLACEHOLDER

THUMB_PX = 160
VIDEO_FRAMES = 4
MAX_TEXT = 1200  # characters of one message shown on a card
MAX_GROUPS = 24  # box plots for the largest groups
SCATTER_MAX = 20000  # above this, score vs length is a hexbin
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeError(f"the report needs {module.split('.')[0]}: pip install 'ixc-engine[report]'") from exc


# ---------------------------------------------------------------------------------------------------- statistics

def error_class(reason: str) -> str:
    """A reason with its particulars (paths, quoted values, numbers) blanked, so that alike errors count together."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", reason)
    text = re.sub(r"(?:[A-Za-z]:)?[\w.\-~]*/[\w.\-/~ ]*[\w.\-]", "PATH", text)
    text = re.sub(r"\d+(?:\.\d+)?", "N", text)
    return text[:140]


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their mean rank (as scipy.stats.rankdata's default)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    sx = x[order]
    starts = np.r_[0, np.flatnonzero(sx[1:] != sx[:-1]) + 1]
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends):
        if e - s > 1:
            ranks[order[s:e]] = (s + 1 + e) / 2
    return ranks


def correlations(a: np.ndarray, b: np.ndarray) -> tuple[float | None, float | None]:
    """Pearson and Spearman correlation; None where undefined (fewer than 3 points or a constant)."""
    if len(a) < 3:
        return None, None
    a, b = (x / m if (m := float(np.abs(x).max())) > 0 else x for x in (a, b))  # scale-free: no overflow near 1e308
    if np.std(a) == 0 or np.std(b) == 0:
        return None, None
    pearson = float(np.corrcoef(a, b)[0, 1])
    spearman = float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])
    return pearson, spearman


def field_value(obj, field: str) -> str:
    """A record's value of `field` (a.b for nested objects) as a group label."""
    cur = obj
    for part in field.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return "(missing)"
        cur = cur[part]
    if cur is None:
        return "(null)"
    if isinstance(cur, str):
        return cur
    return json.dumps(cur, ensure_ascii=False)[:80]


# ---------------------------------------------------------------------------------------------------------- plots

def _svg_uri(fig) -> str:
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "ixc-engine-report", "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(w=7.0, h=3.4):
    Figure = _need("matplotlib.figure").Figure  # no pyplot: no global figure state, no GUI backend
    fig = Figure(figsize=(w, h), dpi=96)
    return fig, fig.add_subplot()


def _scaled(stat, x: np.ndarray) -> float:
    """stat(x) computed on x / max|x| and scaled back: no overflow for finite scores near the float64 limit."""
    m = float(np.abs(x).max()) if len(x) else 0.0
    return float(stat(x)) if m == 0.0 or m < 1e300 else m * float(stat(x / m))


def plot_histogram(scores: np.ndarray, threshold: float | None) -> str:
    fig, ax = _figure()
    bins = max(10, min(80, int(math.sqrt(len(scores)) * 2)))
    _, edges, patches = ax.hist(scores, bins=bins, color="#4878b0", edgecolor="white", linewidth=0.4)
    if threshold is not None:
        for patch, left in zip(patches, edges[:-1]):
            if left < threshold:
                patch.set_facecolor("#c44e52")
        frac = float(np.mean(scores < threshold))
        ax.axvline(threshold, color="#c44e52", linestyle="--", linewidth=1.5)
        ax.text(threshold, ax.get_ylim()[1] * 0.95, f"  threshold {threshold:g}: drops {frac:.1%}",
                color="#c44e52", va="top", ha="left", fontsize=9)
    ax.set_xlabel("score")
    ax.set_ylabel("samples")
    ax.set_title(f"Score histogram ({len(scores)} scored samples)", fontsize=10)
    return _svg_uri(fig)


def plot_kept_curve(scores: np.ndarray, threshold: float | None) -> str:
    fig, ax = _figure()
    xs = np.sort(scores)
    kept = 1.0 - np.arange(len(xs)) / len(xs)  # fraction with score >= xs[i]
    ax.step(xs, kept, where="post", color="#4878b0")
    if threshold is not None:
        k = float(np.mean(scores >= threshold))
        ax.axvline(threshold, color="#c44e52", linestyle="--", linewidth=1.2)
        ax.plot([threshold], [k], "o", color="#c44e52")
        ax.annotate(f" keeps {k:.1%}", (threshold, k), color="#c44e52", fontsize=9, va="bottom")
    ax.set_xlabel("threshold (keep score >= threshold)")
    ax.set_ylabel("fraction kept")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("Kept fraction against threshold", fontsize=10)
    return _svg_uri(fig)


def plot_length(scores: np.ndarray, lengths: np.ndarray, pearson, spearman) -> str:
    fig, ax = _figure()
    if len(scores) > SCATTER_MAX:
        ax.hexbin(lengths, scores, gridsize=60, bins="log", cmap="Blues")
    else:
        ax.scatter(lengths, scores, s=10, alpha=0.6, color="#4878b0", linewidths=0)
    if pearson is not None:
        slope, icpt = np.polyfit(lengths, scores, 1)
        xs = np.array([lengths.min(), lengths.max()])
        ax.plot(xs, slope * xs + icpt, color="#c44e52", linewidth=1)
    r = "n/a" if pearson is None else f"Pearson r = {pearson:.3f}, Spearman ρ = {spearman:.3f}"
    ax.set_title(f"Score against length in tokens ({r})", fontsize=10)
    ax.set_xlabel("tokens (text + media)")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    return _svg_uri(fig)


def plot_groups(groups: list[tuple[str, np.ndarray]], threshold: float | None) -> str:
    fig, ax = _figure(7.0, max(2.2, 0.32 * len(groups) + 1.0))
    labels = [(g if len(g) <= 28 else g[:27] + "…") for g, _ in groups]
    ax.boxplot([v for _, v in groups], orientation="horizontal", tick_labels=labels, widths=0.6, showfliers=True,
               flierprops={"markersize": 3})
    ax.invert_yaxis()
    if threshold is not None:
        ax.axvline(threshold, color="#c44e52", linestyle="--", linewidth=1.2)
    ax.set_xlabel("score")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Scores by group", fontsize=10)
    return _svg_uri(fig)


# ----------------------------------------------------------------------------------------------------- thumbnails

def _encode_thumb(img) -> str:
    img = img.convert("RGB")
    img.thumbnail((THUMB_PX, THUMB_PX))
    best = None
    for fmt, kw in (("PNG", {"optimize": True}), ("JPEG", {"quality": 85})):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        if best is None or buf.tell() < len(best[1]):
            best = (fmt.lower(), buf.getvalue())
    return f"data:image/{best[0]};base64," + base64.b64encode(best[1]).decode("ascii")


def _video_frames(item) -> list:
    import tempfile

    from ixc_engine.media.loader import MediaBytes
    from ixc_engine.media.video import read_video_frames

    if isinstance(item, MediaBytes):
        with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:
            tmp.write(item.data)
            tmp.flush()
            frames = read_video_frames(tmp.name)
    else:
        frames = read_video_frames(item)
    if len(frames) > VIDEO_FRAMES:
        frames = [frames[round(i * (len(frames) - 1) / (VIDEO_FRAMES - 1))] for i in range(VIDEO_FRAMES)]
    return frames


def thumbnails(item) -> dict:
    """{"kind", "name", "images": [data URIs], "error"} for one media item of a sample."""
    from PIL import Image

    from ixc_engine.media.loader import MediaBytes, _decode_image, open_image
    from ixc_engine.media.video import is_video_path

    name = item.name if isinstance(item, MediaBytes) else str(getattr(item, "filename", "") or item)
    video = item.kind == "video" if isinstance(item, MediaBytes) else \
        (not isinstance(item, Image.Image) and is_video_path(item))
    out = {"kind": "video" if video else "image", "name": name, "images": [], "error": None}
    try:
        if video:
            out["images"] = [_encode_thumb(f) for f in _video_frames(item)]
        elif isinstance(item, MediaBytes):
            out["images"] = [_encode_thumb(_decode_image(io.BytesIO(item.data), item.name))]
        elif isinstance(item, Image.Image):
            out["images"] = [_encode_thumb(item)]
        else:
            out["images"] = [_encode_thumb(open_image(item))]
    except Exception as exc:  # noqa: BLE001 (a card says what went wrong instead of showing a broken image)
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


# ---------------------------------------------------------------------------------------------------------- build

def _card(rank: int, rec: dict, sample, group: str | None, media_root: Path) -> dict:
    messages = []
    for m in sample.messages:
        content = m.get("content") if isinstance(m, dict) else str(m)
        content = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        parts = content.split(IMAGE_PLACEHOLDER)
        text = "".join(p + (f"[media {i + 1}]" if i < len(parts) - 1 else "") for i, p in enumerate(parts))
        if len(text) > MAX_TEXT:
            text = text[:MAX_TEXT] + f"… ({len(text) - MAX_TEXT} more characters)"
        messages.append({"role": m.get("role", "?") if isinstance(m, dict) else "?", "text": text})
    media = []
    for item in sample.media:
        t = thumbnails(item)
        t["name"] = t["name"].removeprefix(str(media_root) + "/")
        media.append(t)
    return {"rank": rank, "id": rec.get("id"), "line": rec["line"], "score": rec["score"],
            "n_tokens": rec.get("n_tokens"), "group": group, "messages": messages, "media": media}


def _fmt(x, digits=4):
    if x is None:
        return "n/a"
    return f"{x:.{digits}g}"


def build_report(scores_path, corpus_path, out_path, *, fmt=None, media_root=None, group_by=None, threshold=None,
                 k=18, title=None) -> dict:
    """Write the HTML report; returns a summary (counts, the card record indices, the output path)."""
    jinja2 = _need("jinja2")
    _need("matplotlib")
    from ixc_engine.formats.source import open_corpus

    scores_path, out_path = Path(scores_path), Path(out_path)
    if not scores_path.is_file():
        raise ValueError(f"scores file {scores_path} not found")
    source = open_corpus(corpus_path, fmt, media_root)
    scored = read_records(scores_path, "score")
    failed = read_records(errors_path_for(scores_path), "error")
    job = JobManifest.load(job_path_for(scores_path))
    # a NaN / infinite score (a diverged model, a bf16 overflow) has no place on a histogram or in a quantile: it is
    # reported as its own error reason and left out of the statistics
    failed += [{"line": r["line"], "id": r.get("id"), "error": f"non-finite score {r['score']!r} in the scores file"}
               for r in scored if not math.isfinite(r["score"])]
    failed.sort(key=lambda r: r["line"])
    scored = [r for r in scored if math.isfinite(r["score"])]
    if not scored and not failed:
        raise ValueError(f"{scores_path} holds no scores and no errors: nothing to report")
    total = source.count()
    by_line = {r["line"]: r for r in scored}
    stray = sorted(ln for ln in (*by_line, *(r["line"] for r in failed)) if not 1 <= ln <= total)
    if stray:
        raise ValueError(f"{scores_path} has records for record {stray[0]}, but the corpus has {total}: these scores "
                         "belong to another corpus")

    ranked = sorted(scored, key=lambda r: (r["score"], r["line"]))
    k = min(k, len(ranked))
    low = ranked[:k]
    high = ranked[::-1][:k] if len(ranked) > k else []
    high = [r for r in high if r not in low] if len(ranked) < 2 * k else high
    card_lines = {r["line"] for r in low} | {r["line"] for r in high}

    groups: dict[int, str] = {}
    samples = {}
    for ln, item in source.records():
        rec = by_line.get(ln)
        cid = item.sample_id if isinstance(item, LineError) else item.id
        if rec is not None and rec.get("id") != cid:
            raise ValueError(f"record {ln} of {corpus_path} has id {cid!r} but {scores_path} scored id "
                             f"{rec.get('id')!r} there: these scores belong to another corpus (or it changed)")
        if ln in card_lines and not isinstance(item, LineError):
            samples[ln] = item
    if group_by:
        for ln, obj in source.objects():
            groups[ln] = "(unreadable record)" if isinstance(obj, LineError) else field_value(obj, group_by)

    s = np.array([r["score"] for r in scored] or [0.0], dtype=np.float64)  # all errors: no statistics are shown
    n_tok = np.array([r.get("n_tokens") or 0 for r in scored], dtype=np.float64)
    pearson, spearman = correlations(s, n_tok)
    quant = [{"q": f"{q:.0%}" if 0 < q < 1 else ("min" if q == 0 else "max"), "v": _fmt(float(np.quantile(s, q)))}
             for q in QUANTILES]

    # finite scores whose span overflows float64 (near +-1.8e308, only from an edited file) cannot be drawn
    plottable = bool(scored) and float(s.max()) - float(s.min()) < math.inf
    reasons = Counter(error_class(r["error"]) for r in failed)
    examples = {}
    for r in failed:
        examples.setdefault(error_class(r["error"]), r)
    error_rows = [{"reason": c, "count": n, "example": examples[c]} for c, n in reasons.most_common()]

    group_rows, group_plot = [], None
    if group_by:
        per: dict[str, list[float]] = {}
        for r in scored:
            per.setdefault(groups.get(r["line"], "(missing)"), []).append(r["score"])
        err_per = Counter(groups.get(r["line"], "(missing)") for r in failed)
        for g in sorted(set(per) | set(err_per), key=lambda g: (-len(per.get(g, [])), g)):
            v = np.array(per.get(g, []), dtype=np.float64)
            row = {"group": g, "n": len(v), "errors": err_per.get(g, 0)}
            if len(v):
                row |= {"mean": _fmt(_scaled(np.mean, v)), "median": _fmt(np.median(v)),
                        "p10": _fmt(np.quantile(v, 0.1)), "p90": _fmt(np.quantile(v, 0.9)),
                        "dropped": f"{np.mean(v < threshold):.1%}" if threshold is not None else None}
            group_rows.append(row)
        shown = [(g, np.array(per[g])) for g in sorted(per, key=lambda g: (-len(per[g]), g))[:MAX_GROUPS]]
        group_plot = plot_groups(shown, threshold) if shown and plottable else None

    root = source.media_root
    env = jinja2.Environment(loader=jinja2.PackageLoader("ixc_engine.report", "templates"),
                             autoescape=jinja2.select_autoescape(("html", "j2")), trim_blocks=True,
                             lstrip_blocks=True)
    ctx = {
        "title": title or f"Cleaning report: {Path(corpus_path).name}",
        "corpus": str(corpus_path), "format": source.format, "scores": str(scores_path),
        "job": job, "total": total, "n_scored": len(scored), "n_errors": len(failed),
        "n_missing": total - len(scored) - len(failed),
        "mean": _fmt(_scaled(np.mean, s)), "std": _fmt(_scaled(np.std, s)), "quantiles": quant,
        "threshold": threshold,
        "dropped": None if threshold is None else int(np.sum(s < threshold)),
        "dropped_frac": None if threshold is None else f"{np.mean(s < threshold):.1%}",
        "pearson": _fmt(pearson, 3), "spearman": _fmt(spearman, 3),
        "plottable": plottable,
        "hist": plot_histogram(s, threshold) if plottable else None,
        "kept_curve": plot_kept_curve(s, threshold) if plottable else None,
        "length_plot": plot_length(s, n_tok, pearson, spearman) if plottable else None,
        "group_by": group_by, "group_rows": group_rows, "group_plot": group_plot,
        "errors": error_rows, "k": k,
        "low": [_card(i + 1, r, samples[r["line"]], groups.get(r["line"]), root)
                for i, r in enumerate(low) if r["line"] in samples],
        "high": [_card(i + 1, r, samples[r["line"]], groups.get(r["line"]), root)
                 for i, r in enumerate(high) if r["line"] in samples],
    }
    html = env.get_template("report.html.j2").render(**ctx)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(html, encoding="utf-8")
    return {"report": str(out_path), "records": total, "scored": len(scored), "errors": len(failed),
            "lowest": [r["line"] for r in low], "highest": [r["line"] for r in high], "bytes": len(html.encode())}
