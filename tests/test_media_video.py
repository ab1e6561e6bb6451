"""Video preprocessing (MODEL.md section 5): frame indices, frame canvas geometry, strip, decoding backends."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ixc_engine.media.errors import MediaError
from ixc_engine.media.image import CROP, image_token_count, to_tensor_normalized
from ixc_engine.media.loader import load_media, media_digest
from ixc_engine.media.video import (
    VIDEO_EXTENSIONS,
    default_font,
    frame_resize_size,
    frames_to_canvas,
    is_video_path,
    process_video,
    read_video,
    read_video_frames,
    sample_frame_indices,
    video_canvas_size,
    video_canvas_transform,
)

av = pytest.importorskip("av")


def ref_indices(n_frames: int, fps: float) -> list[int]:
    """Independent form: stride s, P = ceil(n / s) positions k * s; over 32, position s * int(i * (P / 33))."""
    stride = max(1, int(np.round(fps)))  # numpy rounds half to even like Python
    count = -(-n_frames // stride)
    if count <= 32:
        return [k * stride for k in range(count)]
    return [stride * int(i * (count / 33)) for i in range(32)]


def ref_frame_size(width: int, height: int) -> tuple[int, int]:
    """Upstream's float truncation: the short side is int(1120 / (w / h)) or int(1120 * (w / h))."""
    aspect = width / height
    return (1120, int(1120 / aspect)) if width > height else (int(1120 * aspect), 1120)


def ref_strip_size(width: int, height: int) -> tuple[int, int]:
    short, long = sorted((width, height))
    new_long = int(560 * (long / short))
    padded = -(-new_long // 560) * 560
    return (padded, 560) if width >= height else (560, padded)


# ---------------------------------------------------------------- extensions and indices


def test_is_video_path():
    assert VIDEO_EXTENSIONS == (".mp4", ".avi", ".mkv", ".mov", ".wmv")
    for name in ["a.mp4", "b.MP4", "c.Mov", "d.tar.mkv", Path("e.wmv"), "/x/y.avi"]:
        assert is_video_path(name)
    for name in ["a.mp4.txt", "b.jpg", "mp4", ".mp4", "c.webm", Path("d")]:
        assert not is_video_path(name)


@pytest.mark.parametrize(
    ("n_frames", "fps"),
    [
        (250, 25.0),  # 10 s at 25 fps
        (300, 30000 / 1001),  # 29.97 fps
        (60 * 120, 60.0),  # 2 min at 60 fps: 120 positions -> 32
        (60 * 60 * 45, 60.0),
        (10, 1.0),
        (40, 1.0),  # 1 fps, 40 positions -> 32
        (3, 30.0),  # very short
        (1, 24.0),
        (33 * 24, 24.0),  # exactly 33 positions
        (32 * 24, 24.0),  # exactly 32 positions: all kept
        (32 * 24 + 1, 24.0),  # 33 positions by one frame
        (1350, 30.0),  # 45 positions: the float step differs from integer division here
        (500, 12.5),  # half to even: stride 12
        (500, 13.5),  # stride 14
        (100, 0.3),  # upstream crashes (stride 0); clamped to 1
        (1000, 23.976),
    ],
)
def test_sample_frame_indices(n_frames, fps):
    got = sample_frame_indices(n_frames, fps)
    assert got == ref_indices(n_frames, fps)
    assert len(got) == min(32, len(range(0, n_frames, max(1, round(fps)))))
    assert got[0] == 0 and all(a < b for a, b in itertools.pairwise(got)) and got[-1] < n_frames


def test_float_step_is_kept():
    # 45 positions: 11 * (45 / 33) = 14.999999999999998, so position 14 (frame 420), not 15 as 11 * 45 // 33.
    idx = sample_frame_indices(1350, 30.0)
    assert idx[11] == 14 * 30
    assert sample_frame_indices(500, 12.5)[1] == 12
    assert sample_frame_indices(20, 0.3) == list(range(20))


def test_sample_frame_indices_errors():
    with pytest.raises(MediaError, match="no frames"):
        sample_frame_indices(0, 25.0)
    for fps in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(MediaError, match="frame rate"):
            sample_frame_indices(100, fps)


# ---------------------------------------------------------------- canvas geometry


def colour(i: int) -> tuple[int, int, int]:
    return (30 + 37 * i % 200, 200 - 23 * i % 150, 90 + 11 * i % 120)


def flat_frames(n: int, width: int, height: int) -> list[Image.Image]:
    return [Image.new("RGB", (width, height), colour(i)) for i in range(n)]


def test_frame_resize_size():
    assert frame_resize_size(224, 96) == (1120, 479)  # 1120 / (224 / 96) = 479.99999999999994
    assert frame_resize_size(96, 224) == (480, 1120)  # 1120 * (96 / 224) = 480.0: the two forms differ
    assert frame_resize_size(1280, 720) == (1120, 630)
    assert frame_resize_size(50, 50) == (1120, 1120)
    for width, height in [(640, 480), (1919, 1080), (720, 1280), (3, 5), (1000, 999), (333, 1000)]:
        w, h = frame_resize_size(width, height)
        assert max(w, h) == 1120
        short = 1120 / (width / height) if width > height else 1120 * (width / height)
        assert min(w, h) == int(short)
    with pytest.raises(MediaError, match="too elongated"):
        frame_resize_size(5000, 2)


def test_landscape_canvas_geometry():
    frames = flat_frames(3, 224, 96)
    canvas = frames_to_canvas(frames)
    fw, fh = 1120, 479
    assert canvas.size == (fw, 3 * (40 + fh + 10))
    a = np.asarray(canvas)
    for i in range(3):
        top = i * (40 + fh + 10)
        assert (a[top + 40 : top + 40 + fh] == colour(i)).all()  # the frame, untouched by text
        band = a[top : top + 40]
        assert (band[:, :300] < 128).any()  # some dark header text at the left
        assert (band[:, 400:] == 255).all()  # text is only at the left
        gap = a[top + 40 + fh : top + 50 + fh]
        if i < 2:
            assert (gap[[5, 6]] == 0).all()  # the 2 px line spans the whole width
            assert (gap[[0, 1, 2, 3, 4, 7, 8, 9]] == 255).all()
        else:
            assert (gap == 255).all()  # no line after the last frame


def test_portrait_canvas_geometry():
    frames = flat_frames(3, 96, 224)
    canvas = frames_to_canvas(frames)
    fw, fh = 480, 1120
    assert canvas.size == (3 * (fw + 10), fh + 40)
    a = np.asarray(canvas)
    assert (a[:40, :, :] < 128).any()  # header text in the single top band
    for i in range(3):
        left = i * (fw + 10)
        assert (a[40:, left : left + fw] == colour(i)).all()
        gap = a[:, left + fw : left + fw + 10]
        if i < 2:
            assert (gap[:, [5, 6]] == 0).all()  # full height, band included
            assert (gap[40:, [0, 1, 2, 3, 4, 7, 8, 9]] == 255).all()
        else:
            assert (gap[40:] == 255).all()


def test_square_and_mixed_orientation():
    sq = frames_to_canvas(flat_frames(2, 50, 50))
    assert sq.size == (2 * (1120 + 10), 1120 + 40)  # square frames go left to right
    # The LAST frame decides the layout; each frame keeps its own resize.
    mixed = flat_frames(1, 200, 100) + flat_frames(1, 100, 200)  # ends portrait
    assert frames_to_canvas(mixed).size == ((1120 + 10) + (560 + 10), 1120 + 40)
    mixed = flat_frames(1, 100, 200) + flat_frames(1, 200, 100)  # ends landscape
    assert frames_to_canvas(mixed).size == (1120, (40 + 1120 + 10) + (40 + 560 + 10))
    one = frames_to_canvas(flat_frames(1, 300, 200))
    assert one.size == (1120, 40 + 746 + 10)
    assert (np.asarray(one)[40 + 746 :] == 255).all()
    with pytest.raises(MediaError, match="no frames"):
        frames_to_canvas([])


def test_separator_matches_pil_wide_line():
    # Upstream draws the separator with ImageDraw.line(width=2) at offset +5; check which pixels that paints.
    for horizontal in (True, False):
        img = Image.new("RGB", (60, 60), "white")
        line = [(0, 20), (60, 20)] if horizontal else [(20, 0), (20, 60)]
        ImageDraw.Draw(img).line(line, fill="black", width=2)
        dark = np.argwhere((np.asarray(img) == 0).all(-1))
        coords = np.unique(dark[:, 0] if horizontal else dark[:, 1])
        assert coords.tolist() == [20, 21]
        assert len(dark) == 2 * 60


def test_header_text_position():
    canvas = np.asarray(frames_to_canvas(flat_frames(2, 64, 48)))
    dark = np.argwhere(canvas.min(-1) < 100)
    band1 = dark[(dark[:, 0] >= 40 + 840 + 10) & (dark[:, 0] < 40 + 840 + 10 + 40)]
    assert band1.size and band1[:, 1].max() < 300  # "<IMAGE 1>" at the band's left
    expected = Image.new("RGB", (1120, 40), "white")
    ImageDraw.Draw(expected).text((0, 0), "<IMAGE 0>", font=default_font(), fill="black")
    assert np.array_equal(canvas[:40], np.asarray(expected))


@pytest.mark.parametrize(("width", "height"), [(1500, 400), (400, 1500), (700, 700), (1120, 2750), (2751, 1120)])
def test_video_canvas_transform(width, height):
    rng = np.random.default_rng(width + height)
    canvas = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    out = video_canvas_transform(canvas)
    assert out.size == ref_strip_size(width, height) == video_canvas_size(width, height)
    # Independent recomputation: resize in landscape orientation, white after the long side.
    land = canvas.transpose(Image.Transpose.TRANSPOSE) if width < height else canvas
    new_long = int(560 * (land.width / land.height))
    body = np.asarray(land.resize((new_long, 560), Image.Resampling.BILINEAR))
    if width < height:
        body = body.transpose(1, 0, 2)
    a = np.asarray(out)
    assert np.array_equal(a[: body.shape[0], : body.shape[1]], body)
    if width >= height:
        assert (a[:, new_long:] == 255).all()
    else:
        assert (a[new_long:] == 255).all()


@pytest.mark.parametrize(("fw", "fh"), [(1280, 720), (1920, 1080)])
def test_32_landscape_16_9_frames_give_8821_tokens(fw, fh):
    frames = flat_frames(32, fw, fh)
    canvas = frames_to_canvas(frames)
    assert canvas.size == (1120, 32 * (630 + 50))
    strip = video_canvas_transform(canvas)
    assert strip.size == (560, 11200)
    h, w = strip.height // CROP, strip.width // CROP
    assert (h, w) == (20, 1) and image_token_count(h, w) == 8821


def test_token_counts_by_frame_size():
    # Arithmetic only: canvas -> strip -> grid for many frame sizes and counts.
    for n in (1, 2, 5, 17, 32):
        for width, height in [(1280, 720), (640, 480), (720, 1280), (500, 500), (224, 96), (1000, 100)]:
            fw, fh = ref_frame_size(width, height)
            cw, ch = (fw, n * (fh + 50)) if width > height else (n * (fw + 10), fh + 40)
            sw, sh = video_canvas_size(cw, ch)
            assert (sw, sh) == ref_strip_size(cw, ch)
            grid = (sh // 560, sw // 560)
            assert min(grid) == 1
            if (width, height) == (1280, 720) and n == 32:
                assert image_token_count(*grid) == 8821


# ---------------------------------------------------------------- real decoding


def signature(i: int) -> int:
    return 20 + (i * 37) % 200


def write_video(path: Path, n: int, fps, codec: str = "mpeg4", size=(64, 48), options=None) -> None:
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 4_000_000  # near-lossless on flat 64x48 frames
        for i in range(n):
            arr = np.full((height, width, 3), signature(i), dtype=np.uint8)
            arr[: height // 2, : width // 2, 0] = 255 - signature(i)  # some colour structure
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def has_encoder(codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
    except ValueError:  # UnknownCodecError
        return False
    return True


def pick_codec() -> str:
    for codec in ("mpeg4", "libx264", "h264"):
        if has_encoder(codec):
            return codec
    pytest.skip("PyAV has no mpeg4/h264 encoder")


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    codec = pick_codec()
    out = {
        "short": root / "short.mp4",
        "long": root / "long.avi",
        "ntsc": root / "ntsc.MKV",
        "narrow": root / "narrow.mov",
    }
    write_video(out["short"], 45, 10, codec)  # 5 positions
    write_video(out["long"], 400, 10, codec)  # 40 positions -> 32
    write_video(out["ntsc"], 100, Fraction(30000, 1001), codec, size=(40, 64))  # portrait, 29.97 fps
    write_video(out["narrow"], 12, 5, codec, size=(48, 32))  # a width eva-decord mis-sizes
    if has_encoder("libx264"):  # B-frames: decode order differs from presentation order
        out["bframes"] = root / "bframes.mp4"
        write_video(out["bframes"], 350, 10, "libx264", options={"bf": "3", "g": "30"})
    return out


def have_decord() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("name", ["short", "long", "ntsc", "narrow", "bframes"])
def test_av_decoding_indices_and_content(videos, name):
    if name not in videos:
        pytest.skip("PyAV has no libx264 encoder")
    got = read_video(videos[name], backend="av")
    n, fps = {
        "short": (45, 10.0),
        "long": (400, 10.0),
        "ntsc": (100, 30000 / 1001),
        "narrow": (12, 5.0),
        "bframes": (350, 10.0),
    }[name]
    assert (got.n_frames, got.backend) == (n, "av")
    assert got.fps == pytest.approx(fps, rel=1e-12)
    assert got.indices == ref_indices(n, fps) == sample_frame_indices(n, fps)
    for i, frame in zip(got.indices, got.frames):
        arr = np.asarray(frame)
        shape = {"ntsc": (64, 40, 3), "narrow": (32, 48, 3)}.get(name, (48, 64, 3))
        assert frame.mode == "RGB" and arr.shape == shape
        # The flat lower half of frame i decodes close to its signature: the right frames were kept.
        lower = arr[arr.shape[0] // 2 + 4 :, :, 1].astype(float).mean()
        assert abs(lower - signature(i)) < 6, (i, lower)


@pytest.mark.skipif(not have_decord(), reason="decord (eva-decord) is not installed")
@pytest.mark.parametrize("name", ["short", "long", "ntsc", "bframes"])
def test_backends_agree(videos, name):
    if name not in videos:
        pytest.skip("PyAV has no libx264 encoder")
    a = read_video(videos[name], backend="av")
    d = read_video(videos[name], backend="decord")
    assert (a.n_frames, a.indices) == (d.n_frames, d.indices)
    assert a.fps == d.fps
    assert len(a.frames) == len(d.frames)
    for fa, fd in zip(a.frames, d.frames):
        assert np.array_equal(np.asarray(fa), np.asarray(fd))


@pytest.mark.skipif(not have_decord(), reason="decord (eva-decord) is not installed")
def test_decord_bad_layout_falls_back_to_av(videos):
    try:
        d = read_video(videos["narrow"], backend="decord")
    except MediaError as e:
        assert "shape" in str(e) and "narrow.mov" in str(e)
    else:  # a decord build without the bug must then agree with PyAV
        assert np.array_equal(np.asarray(d.frames[0]), np.asarray(read_video_frames(videos["narrow"], "av")[0]))
    auto = read_video(videos["narrow"])
    ref = read_video(videos["narrow"], backend="av")
    assert auto.indices == ref.indices
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(auto.frames, ref.frames))


def test_process_video_end_to_end(videos):
    crops = process_video(videos["short"], backend="av")
    # 5 frames 64x48 -> 1120x840 each, stacked: 1120 x 5 * (840 + 50); strip long side int(560 * 4450 / 1120).
    ch = 5 * (840 + 50)
    new_long = int(560 * (ch / 1120))
    h = math.ceil(new_long / 560)
    assert (crops.kind, crops.h, crops.w) == ("video", h, 1)
    assert crops.n_tokens == image_token_count(h, 1) == (h + 1) * 400 + 1 + (h + 1) * 20
    frames = read_video_frames(videos["short"], backend="av")
    strip = video_canvas_transform(frames_to_canvas(frames))
    canvas = to_tensor_normalized(strip)
    assert torch.equal(crops.pixel_values[1], canvas[:, :CROP, :CROP])
    via_loader = load_media(str(videos["short"]), hd_num=24, video_backend="av")
    assert torch.equal(via_loader.pixel_values, crops.pixel_values)
    portrait = load_media(videos["ntsc"], hd_num=1, video_backend="av")  # hd_num is ignored for videos
    assert (portrait.kind, portrait.h) == ("video", 1)
    assert media_digest(videos["short"], 9) == media_digest(videos["short"], 24)
    assert media_digest(videos["short"], 9) != media_digest(videos["long"], 9)


def write_audio_only(path: Path, with_video_stream: bool) -> None:
    with av.open(str(path), "w") as container:
        if with_video_stream:
            video = container.add_stream(pick_codec(), rate=10)
            video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        for i in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)


def bad_backends() -> list[str]:
    return ["av", "decord"] if have_decord() else ["av"]


def test_bad_videos(tmp_path):
    missing = tmp_path / "missing.mp4"
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    empty = tmp_path / "empty.mkv"  # a video stream with zero frames (plus some audio)
    write_audio_only(empty, with_video_stream=True)
    audio = tmp_path / "audio.mp4"  # no video stream at all
    write_audio_only(audio, with_video_stream=False)
    for backend in bad_backends():
        with pytest.raises(MediaError, match="missing.mp4: no such file"):
            read_video(missing, backend=backend)
        with pytest.raises(MediaError, match="corrupt.mp4: cannot "):
            read_video(corrupt, backend=backend)
        with pytest.raises(MediaError, match="empty.mkv: "):
            read_video(empty, backend=backend)
        with pytest.raises(MediaError, match="audio.mp4: "):
            read_video(audio, backend=backend)
    with pytest.raises(MediaError, match=r"empty.mkv: video has no frames \(n_frames=0\)"):
        read_video(empty, backend="av")
    with pytest.raises(MediaError, match="audio.mp4: file has no video stream"):
        read_video(audio, backend="av")
    with pytest.raises(MediaError, match="corrupt.mp4"):
        load_media(corrupt, 9)
    with pytest.raises(ValueError, match="backend"):
        read_video(corrupt, backend="ffmpeg")
