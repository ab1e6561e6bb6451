"""Video preprocessing of IXC-2.5 (MODEL.md section 5): frame sampling, frame canvas, 560-high strip, crops.

Decoding uses decord when it is importable (``eva-decord`` installs as ``decord``; upstream uses decord),
else PyAV. Both give the same frame count, fps, indices and RGB frames on the videos tested
(tests/test_media_video.py).

Header text font: upstream draws ``<IMAGE i>`` with SimHei (not redistributable). This module uses Pillow's
bundled FreeType font (Aileron Regular, embedded in Pillow >= 10.1, no download) at size 40 unless a font is
passed. Only the text pixels differ from upstream; canvas sizes, separator lines, indices and token counts
do not.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .errors import MediaError
from .image import CROP, MediaCrops, canvas_crops

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".wmv")
MAX_FRAMES = 32
FRAME_LONG_SIDE = 2 * CROP  # 1120
HEADER_PX = 40  # text band per frame (landscape) or once on top (portrait)
GAP_PX = 10  # space after each frame; the 2 px separator line sits at offsets +5, +6 inside it
FONT_SIZE = 40
BACKENDS = ("decord", "av")

_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)


def is_video_path(path: str | os.PathLike[str]) -> bool:
    """True when the file extension (case-insensitive) is a video extension."""
    return os.path.splitext(os.fspath(path))[1].lower() in VIDEO_EXTENSIONS


def sample_frame_indices(n_frames: int, fps: float, max_frames: int = MAX_FRAMES) -> list[int]:
    """Frame indices upstream keeps: about one per second from frame 0, then at most ``max_frames`` of them.

    Stride s = int(round(fps)) (Python round: half to even, so 12.5 fps -> 12). Upstream has no guard:
    for fps < 0.5 the stride rounds to 0 and its ``range`` raises; here the stride is clamped to 1.
    With P > max_frames positions, position number int(i * (P / (max_frames + 1))) is kept for
    i < max_frames: the float step is kept on purpose, it differs from i * P // 33 (P=45, i=11: 14 vs 15).
    """
    if n_frames < 1:
        raise MediaError(f"video has no frames (n_frames={n_frames})")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    fps = float(fps)
    if not math.isfinite(fps) or fps <= 0:
        raise MediaError(f"video has an invalid average frame rate {fps}")
    stride = max(round(fps), 1)
    positions = list(range(0, n_frames, stride))
    if len(positions) > max_frames:
        step = len(positions) / (max_frames + 1)
        positions = [positions[int(i * step)] for i in range(max_frames)]
    return positions


@dataclass(slots=True)
class DecodedVideo:
    """Frames kept from one video, with what decided them."""

    frames: list[Image.Image]
    indices: list[int]
    n_frames: int
    fps: float
    backend: str


class _DecordShapeError(MediaError):
    """decord decoded frames with a wrong layout; the automatic backend choice retries with PyAV."""


def _default_backend() -> str:
    try:
        import decord  # noqa: F401
    except ImportError:
        return "av"
    return "decord"


def _read_decord(path: str) -> DecodedVideo:
    import decord

    try:
        reader = decord.VideoReader(path, num_threads=1)
        n_frames = len(reader)
        fps = reader.get_avg_fps()
    except Exception as e:  # decord raises its own DECORDError (an Exception) for every failure
        raise MediaError(f"cannot open video with decord: {e}", path=path) from e
    indices = sample_frame_indices(n_frames, fps)
    try:
        arrays = [reader[i].asnumpy() for i in indices]
    except Exception as e:
        raise MediaError(f"cannot decode video frames with decord: {e}", path=path) from e
    for arr in arrays:
        if arr.ndim != 3 or arr.shape[2] != 3:
            # eva-decord 0.6 mis-sizes frames of some narrow widths (48 px wide -> [H, 48, 4] of shifted bytes).
            raise _DecordShapeError(f"decord returned a frame of shape {arr.shape}, not [H, W, 3]", path=path)
    frames = [Image.fromarray(arr) for arr in arrays]
    return DecodedVideo(frames=frames, indices=indices, n_frames=n_frames, fps=float(fps), backend="decord")


def _read_av(path: str) -> DecodedVideo:
    import av

    try:
        # Frame count as decord counts it: the video stream's demuxed packets (not the header's nb_frames,
        # which many containers leave at 0). A first pass demuxes without decoding.
        with av.open(path) as container:
            stream = container.streams.best("video")
            if stream is None:
                raise MediaError("file has no video stream", path=path)
            rate = stream.average_rate
            fps = float(rate) if rate else float("nan")
            n_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
        indices = sample_frame_indices(n_frames, fps)
        wanted = set(indices)
        found: dict[int, Image.Image] = {}
        with av.open(path) as container:
            stream = container.streams.best("video")
            stream.thread_type = "AUTO"
            # Sequential decode in presentation order; decoding stops after the last wanted frame.
            for pos, frame in enumerate(container.decode(stream)):
                if pos in wanted:
                    found[pos] = Image.fromarray(frame.to_ndarray(format="rgb24"))
                    if len(found) == len(wanted):
                        break
    except MediaError:
        raise
    except Exception as e:  # PyAV raises av.error.* (OSError / ValueError subclasses) and others
        raise MediaError(f"cannot read video with PyAV: {e}", path=path) from e
    if len(found) != len(wanted):
        missing = sorted(wanted - found.keys())
        raise MediaError(f"video ended before frames {missing[:5]} (container reports {n_frames} frames)", path=path)
    frames = [found[i] for i in indices]
    return DecodedVideo(frames=frames, indices=indices, n_frames=n_frames, fps=fps, backend="av")


def read_video(path: str | os.PathLike[str], backend: str | None = None) -> DecodedVideo:
    """Decode only the frames upstream keeps (see ``sample_frame_indices``) as RGB PIL images.

    backend: "decord", "av", or None for decord when importable (falling back to PyAV where decord returns
    mis-shaped frames), else PyAV.
    """
    path = os.fspath(path)
    if backend is None:
        backend = _default_backend()
        if backend == "decord":
            try:
                return read_video(path, "decord")
            except _DecordShapeError:
                return read_video(path, "av")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    p = Path(path)
    if not p.exists():
        raise MediaError("no such file", path=path)
    if not p.is_file():
        raise MediaError("not a regular file", path=path)
    try:
        return _read_decord(path) if backend == "decord" else _read_av(path)
    except MediaError as e:
        if e.path is None:
            raise MediaError(str(e), path=path) from e
        raise


def read_video_frames(path: str | os.PathLike[str], backend: str | None = None) -> list[Image.Image]:
    """The kept frames of a video (see ``read_video``)."""
    return read_video(path, backend).frames


@functools.lru_cache(maxsize=1)
def default_font() -> ImageFont.FreeTypeFont:
    """Pillow's embedded Aileron Regular at size 40 (stands in for upstream's SimHei)."""
    # With a size, Pillow loads its embedded TrueType data (raises if Pillow lacks FreeType).
    return ImageFont.load_default(size=FONT_SIZE)


def frame_resize_size(width: int, height: int) -> tuple[int, int]:
    """Size a frame is resized to: long side 1120, other side truncated as upstream (224x96 -> 1120x479)."""
    if width < 1 or height < 1:
        raise MediaError(f"video frame has an empty size {width}x{height}")
    scale = width / height
    if width > height:
        size = (FRAME_LONG_SIDE, int(FRAME_LONG_SIDE / scale))
    else:
        size = (int(FRAME_LONG_SIDE * scale), FRAME_LONG_SIDE)
    if min(size) < 1:
        raise MediaError(f"video frame {width}x{height} is too elongated to resize to {size[0]}x{size[1]}")
    return size


def frames_to_canvas(frames: list[Image.Image], font: ImageFont.FreeTypeFont | ImageFont.ImageFont | None = None):
    """Stitch frames into one white canvas with ``<IMAGE i>`` headers and 2 px black separators.

    Orientation comes from the LAST frame's original size. Landscape (w > h): frames stacked top to bottom,
    each as [40 px header][frame][10 px gap], canvas width = widest frame. Portrait or square: frames left to
    right, each (w + 10) px wide, one 40 px header band on top, canvas height = tallest frame + 40.
    Per frame, in upstream's order: paste, header text, separator (rows/cols +5 and +6 after the frame,
    across the whole canvas, only between consecutive frames).
    """
    if not frames:
        raise MediaError("no frames to stitch")
    font = default_font() if font is None else font
    resized = []
    for frame in frames:
        frame = frame.convert("RGB")
        resized.append(frame.resize(frame_resize_size(*frame.size), Image.Resampling.BILINEAR))
    last_w, last_h = frames[-1].size
    n = len(resized)
    if last_w > last_h:
        width = max(im.width for im in resized)
        height = sum(im.height + GAP_PX + HEADER_PX for im in resized)
        canvas = Image.new("RGB", (width, height), _WHITE)
        draw = ImageDraw.Draw(canvas)
        top = 0
        for idx, im in enumerate(resized):
            canvas.paste(im, (0, top + HEADER_PX))
            draw.text((0, top), f"<IMAGE {idx}>", font=font, fill="black")
            if idx + 1 < n:
                y = top + HEADER_PX + im.height + 5
                canvas.paste(_BLACK, (0, y, width, y + 2))
            top += HEADER_PX + im.height + GAP_PX
    else:
        width = sum(im.width + GAP_PX for im in resized)
        height = max(im.height for im in resized) + HEADER_PX
        canvas = Image.new("RGB", (width, height), _WHITE)
        draw = ImageDraw.Draw(canvas)
        left = 0
        for idx, im in enumerate(resized):
            canvas.paste(im, (left, HEADER_PX))
            draw.text((left, 0), f"<IMAGE {idx}>", font=font, fill="black")
            if idx + 1 < n:
                x = left + im.width + 5
                canvas.paste(_BLACK, (x, 0, x + 2, height))
            left += im.width + GAP_PX
    return canvas


def video_canvas_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) that ``video_canvas_transform`` gives for a canvas of this size."""
    if width < 1 or height < 1:
        raise MediaError(f"video canvas has an empty size {width}x{height}")
    long_side, short_side = max(width, height), min(width, height)
    new_long = int(CROP * (long_side / short_side))
    padded = math.ceil(new_long / CROP) * CROP
    return (padded, CROP) if width >= height else (CROP, padded)


def video_canvas_transform(canvas: Image.Image) -> Image.Image:
    """Short side to 560 (long side int(560 * (long / short))), long side padded with white at its end.

    As upstream, a portrait canvas is transposed, resized as landscape and transposed back, so the bilinear
    resize runs in the same orientation. A square canvas becomes 560x560. hd_num plays no part.
    """
    canvas = canvas.convert("RGB")
    width, height = canvas.size
    out_w, out_h = video_canvas_size(width, height)
    transposed = width < height
    img = canvas.transpose(Image.Transpose.TRANSPOSE) if transposed else canvas
    long_side, short_side = img.size
    img = img.resize((int(CROP * (long_side / short_side)), CROP), Image.Resampling.BILINEAR)
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    if img.size != (out_w, out_h):
        padded = Image.new("RGB", (out_w, out_h), _WHITE)
        padded.paste(img, (0, 0))
        img = padded
    return img


def process_video(path: str | os.PathLike[str], backend: str | None = None, font=None) -> MediaCrops:
    """Full video path: sampled frames -> canvas -> 560-high strip -> normalised crops (kind='video')."""
    frames = read_video_frames(path, backend)
    strip = video_canvas_transform(frames_to_canvas(frames, font))
    return canvas_crops(strip, kind="video")
