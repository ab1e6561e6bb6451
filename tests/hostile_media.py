"""Hostile media samples and a measurement of what one costs to prepare (tests/test_media_limits.py, issue 9 item 5).

``python -m tests.hostile_media DIR --make CASE...`` writes the files of each case under DIR;
``python -m tests.hostile_media DIR CASE[:MAX_MEDIA]...`` prepares each sample in turn in this process and prints one
JSON line per case: wall and CPU seconds, peak RSS growth in MB over the RSS just before preparing it (VmHWM, the
peak of the whole process), and the outcome (the error message, or the token count).
"""

from __future__ import annotations

import inspect
import json
import resource
import signal
import struct
import sys
import time
import zlib
from pathlib import Path

CASES = ("pngs200", "pngs19_2000", "bomb_20000", "bomb_12000", "many_media", "video_huge_header", "videos14")


def png_bytes(width: int, height: int, rows: int | None = None) -> bytes:
    """An 8-bit grayscale PNG of zeros; only the first ``rows`` rows of data are written (None: all, a valid file)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte 0, then the row
    body = b"".join(comp.compress(row) for _ in range(height if rows is None else rows)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    end = chunk(b"IEND", b"") if rows is None else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + end


def tiny_video(path: Path, shade: int, n: int = 3, w: int = 64, h: int = 48) -> None:
    import av
    import numpy as np

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), (shade + 40 * i) % 256, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def huge_header_video(path: Path) -> None:
    """A valid 3-frame mp4 whose stts/stsz/stsc boxes claim 100 million samples (a lying header)."""
    tiny_video(path, 0)
    data = bytearray(path.read_bytes())
    for box, offset in ((b"stts", 16), (b"stsz", 16), (b"stsc", 20)):
        at = data.index(box) - 4
        struct.pack_into(">I", data, at + offset, 100_000_000)
    path.write_bytes(bytes(data))


def make_case(root: Path, case: str) -> dict:
    """Write the files of CASE under root; returns the sample as JSON-able {"content", "media"}."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    if case == "pngs19_2000":  # 19 x 841 fits in 16384: the length is only known from the headers (19 x 2061)
        media = []
        for i in range(19):
            p = root / f"big{i}.png"
            p.write_bytes(png_bytes(2000, 2000 + i))
            media.append(str(p))
        return {"content": "<ImageHere>" * 19 + "Compare.", "media": media}
    if case == "pngs200":
        media = []
        for i in range(200):
            p = root / f"tiny{i}.png"
            Image.new("RGB", (8, 8), (i, 255 - i, (7 * i) % 256)).save(p)
            media.append(str(p))
        return {"content": "<ImageHere>" * 200 + "Describe.", "media": media}
    if case in ("bomb_20000", "bomb_12000"):
        side = int(case.split("_")[1])
        p = root / f"bomb{side}.png"
        p.write_bytes(png_bytes(side, side, rows=1 if side == 20000 else None))
        return {"content": "What is this?", "media": [str(p)]}
    if case == "many_media":
        p = root / "one.png"
        Image.new("RGB", (8, 8), (1, 2, 3)).save(p)
        return {"content": "<ImageHere>" * 5000, "media": [str(p)] * 5000}
    if case == "video_huge_header":
        p = root / "huge.mp4"
        huge_header_video(p)
        return {"content": "What happens?", "media": [str(p)]}
    if case == "videos14":  # 14 x 841 fits in 16384, 14 x 1241 (one kept 64x48 frame each) does not
        media = []
        for i in range(14):
            p = root / f"clip{i}.mp4"
            tiny_video(p, 10 * i)
            media.append(str(p))
        return {"content": "<ImageHere>" * 14 + "Compare.", "media": media}
    raise ValueError(f"unknown case {case!r}")


def _timeout(*_args) -> None:
    raise TimeoutError("preparing the sample took over 60 s")


def _status_mb(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in MB. Not ru_maxrss: Linux carries that over exec
    from the parent (a pytest process of 600 MB would show as this process's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure(root: Path, case: str, max_media: int | None = None) -> dict:
    from ixc_engine.engine.sequence import Sample, SampleError, prepare_sample
    from ixc_engine.tiny import PACKAGED_TOKENIZER
    from ixc_engine.tokenizer import Tokenizer

    spec = json.loads((root / f"{case}.json").read_text())
    tok = Tokenizer.from_file(PACKAGED_TOKENIZER)
    sample = Sample([{"role": "user", "content": spec["content"]}, {"role": "assistant", "content": "A picture."}],
                    spec["media"], id=case)
    kw = {}
    if max_media is not None and "max_media" in inspect.signature(prepare_sample).parameters:
        kw["max_media"] = max_media
    import av  # noqa: F401  (imported before the baseline, as in a scoring job)

    base = _status_mb("VmRSS")
    # Guards, so that a regression fails the test instead of taking the (shared) machine down: 2 GB more address
    # space than now (MemoryError past it) and 60 s (TimeoutError).
    limits = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (int((_status_mb("VmSize") + 2048) * 2**20), limits[1]))
    signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(60)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        out = f"ok: {prepare_sample(tok, sample, hd_num=9, max_length=16384, **kw).n_tokens} tokens"
    except SampleError as exc:
        out = f"SampleError: {exc}"
    except Exception as exc:  # noqa: BLE001 (what the code before the fix let through)
        out = f"{type(exc).__name__}: {exc}"
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_AS, limits)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _status_mb("VmHWM")
    return {"case": case, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
            "peak_growth_mb": round(max(peak - base, 0.0), 1), "outcome": out[:300]}


if __name__ == "__main__":
    root = Path(sys.argv[1])
    if sys.argv[2] == "--make":
        for case in sys.argv[3:]:
            (root / f"{case}.json").write_text(json.dumps(make_case(root, case)))
    else:
        # Cases run in order in this one process; the peak (VmHWM) only grows: a case can only look costlier.
        for arg in sys.argv[2:]:
            case, _, cap = arg.partition(":")
            print(json.dumps(measure(root, case, int(cap) if cap else None)), flush=True)
