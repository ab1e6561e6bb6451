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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .errors import MediaError
from .image import CROP, MAX_IMAGE_PIXELS, MediaCrops, canvas_crops, check_pixels, image_token_count

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".wmv")
MAX_FRAMES = 32
FRAME_LONG_SIDE = 2 * CROP  # 1120
HEADER_PX = 40  # text band per frame (landscape) or once on top (portrait)
GAP_PX = 10  # space after each frame; the 2 px separator line sits at offsets +5, +6 inside it
FONT_SIZE = 40
BACKENDS = ("decord", "av")

_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)

_Keep = Callable[[Image.Image], Image.Image]


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
    positions = range(0, n_frames, stride)  # a range, not a list: a header may claim billions of frames
    if len(positions) > max_frames:
        step = len(positions) / (max_frames + 1)
        positions = [positions[int(i * step)] for i in range(max_frames)]
    return list(positions)


@dataclass(slots=True)
class DecodedVideo:
    """Frames kept from one video, with what decided them."""

    frames: list[Image.Image]
    indices: list[int]
    n_frames: int
    fps: float
    backend: str
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of each frame as decoded


class _DecordShapeError(MediaError):
    """decord decoded frames with a wrong layout; the automatic backend choice retries with PyAV."""


def _default_backend() -> str:
    try:
        import decord  # noqa: F401
    except ImportError:
        return "av"
    return "decord"


def _read_decord(path: str, max_pixels: int | None = MAX_IMAGE_PIXELS, keep: _Keep | None = None) -> DecodedVideo:
    import decord

    try:
        reader = decord.VideoReader(path, num_threads=1)
        n_frames = len(reader)
        fps = reader.get_avg_fps()
    except Exception as e:  # decord raises its own DECORDError (an Exception) for every failure
        raise MediaError(f"cannot open video with decord: {e}", path=path) from e
    indices = sample_frame_indices(n_frames, fps)
    frames, sizes = [], []
    for i in indices:
        try:
            arr = reader[i].asnumpy()
        except Exception as e:
            raise MediaError(f"cannot decode video frames with decord: {e}", path=path) from e
        if arr.ndim != 3 or arr.shape[2] != 3:
            # eva-decord 0.6 mis-sizes frames of some narrow widths (48 px wide -> [H, 48, 4] of shifted bytes).
            raise _DecordShapeError(f"decord returned a frame of shape {arr.shape}, not [H, W, 3]", path=path)
        check_pixels(arr.shape[1], arr.shape[0], max_pixels, "video frame")
        frame = Image.fromarray(arr)
        sizes.append(frame.size)
        frames.append(frame if keep is None else keep(frame))
    return DecodedVideo(frames=frames, indices=indices, n_frames=n_frames, fps=float(fps), backend="decord",
                        sizes=sizes)


def _read_av(path: str, max_pixels: int | None = MAX_IMAGE_PIXELS, keep: _Keep | None = None) -> DecodedVideo:
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
            check_pixels(stream.codec_context.width, stream.codec_context.height, max_pixels, "video frame")
            n_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
        indices = sample_frame_indices(n_frames, fps)
        wanted = set(indices)
        found: dict[int, Image.Image] = {}
        sizes: dict[int, tuple[int, int]] = {}
        with av.open(path) as container:
            stream = container.streams.best("video")
            stream.thread_type = "AUTO"
            # Sequential decode in presentation order; decoding stops after the last wanted frame.
            for pos, frame in enumerate(container.decode(stream)):
                if pos in wanted:
                    check_pixels(frame.width, frame.height, max_pixels, "video frame")
                    image = Image.fromarray(frame.to_ndarray(format="rgb24"))
                    sizes[pos] = image.size
                    found[pos] = image if keep is None else keep(image)
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
    return DecodedVideo(frames=frames, indices=indices, n_frames=n_frames, fps=fps, backend="av",
                        sizes=[sizes[i] for i in indices])


def read_video(
    path: str | os.PathLike[str], backend: str | None = None, max_pixels: int | None = MAX_IMAGE_PIXELS,
    keep: _Keep | None = None,
) -> DecodedVideo:
    """Decode only the frames upstream keeps (see ``sample_frame_indices``) as RGB PIL images.

    backend: "decord", "av", or None for decord when importable (falling back to PyAV where decord returns
    mis-shaped frames), else PyAV. Frames over max_pixels are a MediaError. keep, when given, maps each decoded
    frame to what is kept of it (process_video keeps only the resized frame, so that 32 full-size frames are never
    held at once); ``sizes`` still gives the decoded sizes.
    """
    path = os.fspath(path)
    if backend is None:
        backend = _default_backend()
        if backend == "decord":
            try:
                return read_video(path, "decord", max_pixels, keep)
            except _DecordShapeError:
                return read_video(path, "av", max_pixels, keep)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    p = Path(path)
    if not p.exists():
        raise MediaError("no such file", path=path)
    if not p.is_file():
        raise MediaError("not a regular file", path=path)
    try:
        return _read_decord(path, max_pixels, keep) if backend == "decord" else _read_av(path, max_pixels, keep)
    except MediaError as e:
        if e.path is None:
            raise MediaError(str(e), path=path) from e
        raise


def read_video_frames(
    path: str | os.PathLike[str], backend: str | None = None, max_pixels: int | None = MAX_IMAGE_PIXELS
) -> list[Image.Image]:
    """The kept frames of a video (see ``read_video``)."""
    return read_video(path, backend, max_pixels).frames


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
    return _stitch([resize_frame(frame) for frame in frames], frames[-1].size, font)


def resize_frame(frame: Image.Image) -> Image.Image:
    """One frame as it goes into the canvas: RGB, long side 1120 (``frame_resize_size``), bilinear."""
    frame = frame.convert("RGB")
    return frame.resize(frame_resize_size(*frame.size), Image.Resampling.BILINEAR)


def _stitch(resized: list[Image.Image], last_size: tuple[int, int], font) -> Image.Image:
    """frames_to_canvas on frames already resized; last_size is the last frame's size before resizing."""
    if not resized:
        raise MediaError("no frames to stitch")
    font = default_font() if font is None else font
    last_w, last_h = last_size
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


def process_video(
    path: str | os.PathLike[str], backend: str | None = None, font=None, max_pixels: int | None = MAX_IMAGE_PIXELS,
    compact: bool = True,
) -> MediaCrops:
    """Full video path: sampled frames -> canvas -> 560-high strip -> normalised crops (kind='video'; compact: see
    canvas_crops)."""
    video = read_video(path, backend, max_pixels, keep=resize_frame)  # each frame resized as soon as it is decoded
    strip = video_canvas_transform(_stitch(video.frames, video.sizes[-1], font))
    return canvas_crops(strip, kind="video", compact=compact)


def video_tokens(n_kept: int, width: int, height: int) -> int:
    """LLM tokens of a video whose ``n_kept`` sampled frames are all width x height (no pixels needed).

    The same geometry as ``frames_to_canvas`` then ``video_canvas_transform``: orientation from the (last) frame,
    frames resized to long side 1120, 40 px headers and 10 px gaps, then the strip's crop grid.
    """
    if n_kept < 1:
        raise MediaError(f"video has no frames to keep (n_kept={n_kept})")
    rw, rh = frame_resize_size(width, height)
    if width > height:
        canvas = (rw, n_kept * (rh + HEADER_PX + GAP_PX))
    else:
        canvas = (n_kept * (rw + GAP_PX), rh + HEADER_PX)
    strip_w, strip_h = video_canvas_size(*canvas)
    return image_token_count(strip_h // CROP, strip_w // CROP)


@dataclass(slots=True)
class VideoHeader:
    """What the container says about a video, read without decoding a frame (see ``probe_video``)."""

    n_frames: int
    fps: float
    width: int
    height: int

    @property
    def indices(self) -> list[int]:
        return sample_frame_indices(self.n_frames, self.fps)

    @property
    def n_tokens(self) -> int:
        return video_tokens(len(self.indices), self.width, self.height)


def probe_video(source, name: str, max_pixels: int | None = MAX_IMAGE_PIXELS) -> VideoHeader | None:
    """Frame count, fps and frame size of a video from its container (PyAV; None when PyAV is not installed).

    source: a path or a binary file object. The frame count is the number of demuxed packets of the video stream, as
    ``read_video`` counts them (one pass over the packets, nothing decoded); the frame size is the stream's coded
    size, decoding the first frame only when the container leaves it at 0. This gives the exact token count of every
    video whose frames share the stream's size (a stream that changes resolution mid-way is measured again once
    decoded). Raises MediaError (naming ``name``) for an unreadable video, no frames, or frames over max_pixels.
    """
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(source) as container:
            stream = container.streams.best("video")
            if stream is None:
                raise MediaError("file has no video stream", path=name)
            rate = stream.average_rate
            fps = float(rate) if rate else float("nan")
            width, height = stream.codec_context.width, stream.codec_context.height
            if width > 0 and height > 0:
                check_pixels(width, height, max_pixels, "video frame")
            n_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
        if n_frames and (width < 1 or height < 1):  # size unknown to the container: decode one frame
            if hasattr(source, "seek"):
                source.seek(0)
            with av.open(source) as container:
                stream = container.streams.best("video")
                frame = next(container.decode(stream), None)
            if frame is None:
                raise MediaError("no video frame could be decoded", path=name)
            width, height = frame.width, frame.height
            check_pixels(width, height, max_pixels, "video frame")
    except MediaError as e:
        if e.path is None:
            raise MediaError(str(e), path=name) from e
        raise
    except Exception as e:  # PyAV raises av.error.* (OSError / ValueError subclasses) and others
        raise MediaError(f"cannot read video with PyAV: {e}", path=name) from e
    header = VideoHeader(n_frames, fps, width, height)
    try:
        header.indices  # noqa: B018  (no frames or a bad frame rate: this video's error, now)
    except MediaError as e:
        raise MediaError(str(e), path=name) from e
    return header
