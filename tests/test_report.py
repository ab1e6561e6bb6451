"""`ixc-engine report`: a self-contained HTML page; the demo corpus's report rendered in a real headless Chromium."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from ixc_engine.cli import main

pytest.importorskip("matplotlib")
pytest.importorskip("jinja2")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def _labels(corpus: Path) -> dict[int, str | None]:
    out = {}
    for ln, raw in enumerate(corpus.read_text().splitlines(), 1):
        try:
            out[ln] = json.loads(raw).get("label")
        except json.JSONDecodeError:
            out[ln] = None
    return out


def _self_contained(html: str) -> None:
    """Nothing the page would fetch: every src is a data: URI, no stylesheet links, no url(...) or @import."""
    srcs = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", html)
    assert srcs and all(s.startswith("data:") for s in srcs), [s[:60] for s in srcs if not s.startswith("data:")]
    assert "<link" not in html and "@import" not in html and "url(" not in html
    assert not re.search(r"<script[^>]*\bsrc=", html)


@pytest.fixture(scope="module")
def demo_report():
    """examples/corpus.jsonl scored by examples/demo-model, and its report (grouped by label, threshold 0), written
    under out/demo-report/ (kept by CI as an artefact; ignored by git). Run from the checkout with relative paths, as
    the README's commands, so that the page (and its screenshot) shows them."""
    d = Path("out") / "demo-report"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        d.mkdir(parents=True, exist_ok=True)
        scores, html = d / "scores.jsonl", d / "report.html"
        assert main(["score", "examples/corpus.jsonl", "--model", "examples/demo-model", "-o", str(scores),
                     "--no-progress", "--restart"]) == 0
        assert main(["report", str(scores), "--corpus", "examples/corpus.jsonl", "-o", str(html), "--group-by",
                     "label", "--threshold", "0"]) == 0
        from ixc_engine.report.build import build_report

        summary = build_report(scores, "examples/corpus.jsonl", d / "report-again.html", group_by="label",
                               threshold=0.0, k=18)
        assert (d / "report-again.html").read_bytes() == html.read_bytes()  # deterministic page
    return REPO / d, REPO / scores, REPO / html, summary


def test_demo_report_content(demo_report):
    _, scores, html_path, summary = demo_report
    html = html_path.read_text()
    _self_contained(html)
    assert summary["records"] == 99 and summary["scored"] == 96 and summary["errors"] == 3
    for key in ('id="histogram"', 'id="kept-curve"', 'id="length"', 'id="group-boxes"', 'id="error-table"',
                'id="quantiles"', 'id="low-cards"', 'id="high-cards"'):
        assert key in html, key
    assert html.count('class="card low"') == 18 and html.count('class="card high"') == 18
    # the three bad lines, each under its reason
    assert "no such file" in html and "invalid JSON" in html and "narrator" in html
    # the by-label table: 60 correct, 36 wrong scored
    assert re.search(r"<td class=\"l\">correct</td><td>60</td>", html)
    assert re.search(r"<td class=\"l\">wrong</td><td>36</td>", html)
    labels = _labels(EXAMPLES / "corpus.jsonl")
    wrong_low = sum(labels[ln] == "wrong" for ln in summary["lowest"])
    wrong_high = sum(labels[ln] == "wrong" for ln in summary["highest"])
    print(f"\ndemo corpus: {wrong_low} of the lowest 18 cards are wrong descriptions, {wrong_high} of the highest 18")
    assert wrong_low >= 16 and wrong_high <= 2  # measured 18 and 0 (README); the model is what it is
    rows = sorted((json.loads(x) for x in scores.read_text().splitlines()), key=lambda r: (r["score"], r["line"]))
    assert summary["lowest"] == [r["line"] for r in rows[:18]]
    assert f'data-line="{rows[0]["line"]}"' in html


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


def _run_chromium(binary: str, *args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-extensions", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (Debian: apt-get install chromium)")
def test_demo_report_renders_in_headless_chromium(demo_report, tmp_path):
    _, _, html_path, _ = demo_report
    binary = _chromium()
    url = html_path.resolve().as_uri()
    res = _run_chromium(binary, "--dump-dom", url)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    m = re.search(r'id="selfcheck"[^>]*', dom)
    assert m, "the page's load handler did not run"
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', m.group(0)))
    assert attrs.get("done") == "1"
    n_images = int(attrs["images"])
    # 4 plots (histogram, kept fraction, length, groups) + one thumbnail per card (36 single-image samples)
    assert n_images == 4 + 36, n_images
    assert attrs["broken"] == "0", "some images did not decode (naturalWidth 0)"
    console = [ln for ln in res.stderr.splitlines() if ":CONSOLE" in ln]
    assert not console, console
    assert 'id="histogram"' in dom and dom.count('class="card low"') == 18
    shot = tmp_path / "report.png"
    res = _run_chromium(binary, f"--screenshot={shot}", "--window-size=1280,2200", url)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 2200)
        colours = im.convert("RGB").resize((64, 110)).getcolors(64 * 110)
        assert colours is not None and len(colours) > 20  # not a blank page
    artefact = html_path.with_name("report-screenshot.png")  # out/demo-report/: CI keeps out/ (ignored by git)
    shutil.copyfile(shot, artefact)
    print(f"\nscreenshot of the demo corpus's report: {artefact}")


# ---------------------------------------------------------------------------------- report pieces on synthetic data

def _png(color, size=(90, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_report_from_parquet_with_image_bytes_video_frames_and_nested_groups(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    av = pytest.importorskip("av")
    import numpy as np

    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=1)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(6):
            frame = np.full((48, 64, 3), 40 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    n = 12
    table = pa.table({
        "id": [f"r{i}" for i in range(n)],
        "messages": [[{"role": "user", "content": "<ImageHere>What is it? <b>&amp;</b>"},
                      {"role": "assistant", "content": f"Answer {i} " + "long " * (i * 40)}] for i in range(n)],
        "images": [[{"bytes": None, "path": "clip.mp4"}] if i == 0 else
                   [{"bytes": None, "path": "missing.png"}] if i == 1 else
                   [{"bytes": _png((20 * i, 100, 200 - 10 * i)), "path": f"p{i}.png"}] for i in range(n)],
        "meta": [{"source": "web" if i % 3 else "books"} for i in range(n)],
    })
    corpus = tmp_path / "c.parquet"
    pq.write_table(table, corpus, row_group_size=5)
    scores = tmp_path / "scores.jsonl"
    rows = [{"id": f"r{i}", "score": float(i % 7) - 2.5, "n_tokens": 900 + 40 * i, "line": i + 1}
            for i in range(n) if i != 5]
    scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "scores.errors.jsonl").write_text(json.dumps({"id": "r5", "line": 6, "error": "media /x/y.png: no "
                                                             "such file"}) + "\n")
    out = tmp_path / "r.html"
    assert main(["report", str(scores), "--corpus", str(corpus), "-o", str(out), "--group-by", "meta.source",
                 "--threshold", "0", "-k", "4"]) == 0
    html = out.read_text()
    _self_contained(html)
    assert "&lt;b&gt;&amp;amp;&lt;/b&gt;" in html  # conversation text is escaped, never markup
    assert html.count('class="card low"') == 4 and html.count('class="card high"') == 4
    low = html[html.index('id="low-cards"'):html.index('id="high-cards"')]
    # r0 (score -2.5, the video) and r1 (missing picture) are among the lowest: video frames, a readable error
    card0 = low[low.index('data-line="1"'):]
    card0 = card0[:card0.index('class="card')] if 'class="card' in card0 else card0
    assert card0.count('alt="video clip.mp4"') == 4  # a few frames of the video
    assert "missing.png" in low and "no such file" in low
    assert ">books<" in html and ">web<" in html
    assert "more characters)" in html  # long replies are cut on the cards
    assert main(["report", str(scores), "--corpus", str(corpus), "-o", str(out), "--group-by", "nope"]) == 0
    assert "(missing)" in out.read_text()


def test_report_refuses_scores_of_another_corpus(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"x{i}", "messages": [{"role": "user", "content": "q"}]}) + "\n"
                              for i in range(3)))
    scores = tmp_path / "s.jsonl"
    scores.write_text(json.dumps({"id": "zz", "score": 1.0, "n_tokens": 9, "line": 2}) + "\n")
    assert main(["report", str(scores), "--corpus", str(corpus), "-o", str(tmp_path / "r.html")]) == 2
    assert "belong to another corpus" in capsys.readouterr().err
    scores.write_text(json.dumps({"id": "x0", "score": 1.0, "n_tokens": 9, "line": 7}) + "\n")
    assert main(["report", str(scores), "--corpus", str(corpus), "-o", str(tmp_path / "r.html")]) == 2


def test_error_classes_and_rank_correlation():
    import numpy as np

    from ixc_engine.report.build import correlations, error_class, rankdata

    a = error_class("media /data/a/b.png: no such file")
    assert a == error_class("media /other/c.jpg: no such file") == "media PATH: no such file"
    assert error_class("invalid JSON: Expecting ',' delimiter at column 83") == \
        error_class("invalid JSON: Expecting ':' delimiter at column 7")
    assert list(rankdata(np.array([3.0, 1.0, 3.0, 2.0]))) == [3.5, 1.0, 3.5, 2.0]
    x = np.arange(10.0)
    p, s = correlations(x, x ** 3)
    assert s == pytest.approx(1.0) and 0.9 < p < 1.0
    assert correlations(x, np.ones(10)) == (None, None)


def test_scores_near_the_float64_limit_give_statistics_and_no_plots(tmp_path):
    """Finite scores whose span overflows float64 (an edited file): mean, std and correlations are still computed,
    and the page says why it has no plots instead of failing."""
    import warnings

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": "q"}]}) + "\n"
                              for i in range(4)))
    scores = tmp_path / "s.jsonl"
    scores.write_text("".join(json.dumps({"id": i, "score": x, "n_tokens": 9 + i, "line": i + 1}) + "\n"
                              for i, x in enumerate([1e308, -1e308, 0.5, 0.1])))
    out = tmp_path / "r.html"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow on the way
        assert main(["report", str(scores), "--corpus", str(corpus), "-o", str(out), "--group-by", "id"]) == 0
    html = out.read_text()
    assert "No plots: the scores span more than the largest" in html and "<img" not in html
    assert "0.15 ± 7.071e+307" in html  # mean (1e308 - 1e308 + 0.6) / 4; std sqrt(2 / 4) * 1e308
