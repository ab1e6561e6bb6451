"""Turn a media item (file path, in-memory encoded bytes, or PIL image) into ViT crops, and a content digest to encode
it once."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import MediaError
from .image import (
    MAX_IMAGE_PIXELS,
    MediaCrops,
    _check_hd_num,
    check_pixels,
    image_token_count,
    image_tokens,
    process_image,
)
from .video import VIDEO_EXTENSIONS, probe_video, process_video

# Upstream's accepted image extensions; other extensions are an error (upstream prints and drops the image).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")



@dataclass(frozen=True, slots=True)
class MediaBytes:
    """An encoded image or video file held in memory (a ``data:`` URI, a Parquet image cell).

    It is the same media as the file with these bytes: same crops, same digest (so it is encoded once whatever the
    form). Images decode from memory; videos go through a temporary file (the decoders want a path).
    ``name`` says where the bytes came from, for error messages (e.g. ``data URI`` or the cell's original path).
    """

    data: bytes
    kind: str  # "image" or "video"
    name: str = "in-memory media"

    def __post_init__(self) -> None:
        if self.kind not in ("image", "video"):
            raise ValueError(f"MediaBytes.kind must be 'image' or 'video', got {self.kind!r}")
        if not isinstance(self.data, (bytes, bytearray, memoryview)):
            raise TypeError(f"MediaBytes.data must be bytes, got {type(self.data).__name__}")


MediaItem = str | os.PathLike | Image.Image | MediaBytes

_CHUNK = 1 << 20


def _media_kind(path: Path) -> str:
    ext = path.suffix.lower()
    if ext in VIDEO_EXTENSIONS:
        return "video"
    if ext in IMAGE_EXTENSIONS:
        return "image"
    raise MediaError(
        f"unsupported media extension {ext or '(none)'!r}; images: {', '.join(IMAGE_EXTENSIONS)}; "
        f"videos: {', '.join(VIDEO_EXTENSIONS)}",
        path=path,
    )


def _check_file(path: Path) -> None:
    if not path.exists():
        raise MediaError("no such file", path=path)
    if not path.is_file():
        raise MediaError("not a regular file", path=path)


def _as_path(item: MediaItem) -> Path | None:
    if isinstance(item, (Image.Image, MediaBytes)):
        return None
    if isinstance(item, (str, os.PathLike)):
        return Path(item)
    raise TypeError(f"media item must be a file path, MediaBytes or a PIL.Image.Image, got {type(item).__name__}")


def open_image(path: str | os.PathLike[str], max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image file fully and convert it to RGB (as upstream: ``Image.open(p).convert('RGB')``).

    EXIF orientation is not applied (upstream does not either). An image over max_pixels (from its header) is a
    MediaError and is not decoded.
    """
    path = Path(path)
    _check_file(path)
    with open(path, "rb") as fp:
        return _decode_image(fp, path, max_pixels)


def _identify(fp, filename: str = "") -> Image.Image:
    """``Image.open``'s format identification (header only) without its decompression-bomb check.

    Pillow's check reads the global ``Image.MAX_IMAGE_PIXELS``, warns above it and raises above twice it; the engine
    checks the size against its own limit instead (``check_pixels``), so that nothing global is read, changed or
    left as a bare warning. fp stays open and owned by the caller.
    """
    prefix = fp.read(16)
    tried: set[str] = set()
    for loader in (Image.preinit, Image.init):  # common plugins first, then all, as Image.open does
        loader()
        for fmt in list(Image.ID):
            if fmt in tried:
                continue
            tried.add(fmt)
            factory, accept = Image.OPEN[fmt]
            try:
                result = not accept or accept(prefix)
                if result and not isinstance(result, str):
                    fp.seek(0)
                    return factory(fp, filename)
            except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open treats as "not this format"
                continue
    raise UnidentifiedImageError("cannot identify image file")


def _image_size(fp, name) -> tuple[int, int]:
    try:
        return _identify(fp).size
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise MediaError(f"cannot decode image ({type(e).__name__}: {e})", path=name) from e


def _decode_image(fp, name, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    try:
        im = _identify(fp)
    except Exception as e:
        raise MediaError(f"cannot decode image ({type(e).__name__}: {e})", path=name) from e
    with im:
        try:
            check_pixels(*im.size, max_pixels)
        except MediaError as e:
            raise MediaError(str(e), path=name) from None
        try:
            im.load()  # decode now: truncated or corrupt data fails here, not later
            return im.convert("RGB")
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ...
            raise MediaError(f"cannot decode image ({type(e).__name__}: {e})", path=name) from e


def _load_bytes(item: MediaBytes, hd_num: int, video_backend: str | None, max_pixels: int | None,
                compact: bool) -> MediaCrops:
    if item.kind == "image":
        return process_image(_decode_image(io.BytesIO(item.data), item.name, max_pixels), hd_num, max_pixels, compact)
    with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:  # decord and PyAV probe the container, not the suffix
        tmp.write(item.data)
        tmp.flush()
        try:
            return process_video(tmp.name, backend=video_backend, max_pixels=max_pixels, compact=compact)
        except MediaError as e:
            raise MediaError(str(e).replace(tmp.name, item.name, 1), path=None) from e


# Modes that convert("RGB") clips (16-bit and 32-bit integers saturate at 255: white) or truncates (floats: 0..1
# becomes black); upstream converts them so too, so they are scored, with a warning.
_CLIPPED_MODES = {"I": "32-bit integer", "F": "32-bit float", "I;16": "16-bit", "I;16L": "16-bit", "I;16B": "16-bit",
                  "I;16N": "16-bit"}


def mode_warning(item: MediaItem) -> str | None:
    """A warning for an image whose pixels convert("RGB") clips (read from the header only), else None."""
    try:
        if isinstance(item, Image.Image):
            mode, name = item.mode, "a PIL image"
        elif isinstance(item, MediaBytes):
            if item.kind != "image":
                return None
            with Image.open(io.BytesIO(item.data)) as im:
                mode, name = im.mode, item.name
        elif _media_kind(Path(item)) == "image":
            with Image.open(item) as im:
                mode, name = im.mode, os.fspath(item)
        else:
            return None
    except Exception:  # noqa: BLE001 (a file that cannot be opened is reported by load_media)
        return None
    if mode not in _CLIPPED_MODES:
        return None
    return (f"{name}: {_CLIPPED_MODES[mode]} image (mode {mode}): convert('RGB') clips it to 8 bits as upstream does "
            "(values over 255 become white, floats in 0..1 black); convert it to 8-bit RGB for a meaningful score")


def load_media(
    item: MediaItem, hd_num: int, *, video_backend: str | None = None, max_pixels: int | None = MAX_IMAGE_PIXELS,
    compact: bool = True,
) -> MediaCrops:
    """Crops of one media item: a video by extension, an image file, or a PIL image.

    hd_num is the image crop budget (24 single image, 6 when a sample has several); videos ignore it. An image or
    video frame of more than max_pixels pixels (None: no limit) is a MediaError, found from the header. compact:
    uint8 sub-crops (see `canvas_crops`), else normalised float32 ones.
    """
    hd_num = _check_hd_num(hd_num)
    if isinstance(item, MediaBytes):
        return _load_bytes(item, hd_num, video_backend, max_pixels, compact)
    path = _as_path(item)
    if path is None:
        return process_image(item, hd_num, max_pixels, compact)
    if _media_kind(path) == "video":
        _check_file(path)
        return process_video(path, backend=video_backend, max_pixels=max_pixels, compact=compact)
    return process_image(open_image(path, max_pixels), hd_num, max_pixels, compact)


MIN_MEDIA_TOKENS = image_token_count(1, 1)  # 841: a 1x1 crop grid, the fewest tokens any image or video gives


def media_tokens(item: MediaItem, hd_num: int, *, max_pixels: int | None = MAX_IMAGE_PIXELS) -> int | None:
    """LLM tokens ``load_media(item, hd_num)`` will give, from headers only (nothing is decoded).

    Images: exact, from the size in the header. Videos: from the container's frame count, fps and frame size (exact
    when every frame has the stream's size; see ``probe_video``); None when PyAV is not installed (then only the
    decoded video tells). Raises MediaError, naming the item, for what ``load_media`` would refuse before decoding:
    a missing or unreadable file, an unsupported extension, an image or frame over max_pixels, a degenerate size.
    """
    hd_num = _check_hd_num(hd_num)
    if isinstance(item, MediaBytes):
        if item.kind == "video":
            header = probe_video(io.BytesIO(item.data), item.name, max_pixels)
            return None if header is None else header.n_tokens
        width, height = _image_size(io.BytesIO(item.data), item.name)
        name = item.name
    else:
        path = _as_path(item)
        if path is None:
            width, height = item.size
            name = None
        else:
            kind = _media_kind(path)
            try:
                _check_file(path)
                if kind == "video":
                    header = probe_video(str(path), str(path), max_pixels)
                    return None if header is None else header.n_tokens
                with open(path, "rb") as fp:
                    width, height = _image_size(fp, path)
            except OSError as e:  # e.g. a name longer than the file system allows
                raise MediaError(f"cannot read file ({e})", path=path) from e
            name = path
    try:
        check_pixels(width, height, max_pixels)
        return image_tokens(width, height, hd_num)
    except MediaError as e:
        raise MediaError(str(e), path=name) from None


def media_digest(item: MediaItem, hd_num: int) -> str:
    """Hex sha256 identifying what ``load_media(item, hd_num)`` produces.

    Files and MediaBytes: the kind, the file bytes (not the name) and, for images, hd_num (videos ignore it). PIL
    images: the RGB pixels and size (what preprocessing sees, so images differing only in alpha share a digest) plus
    hd_num.
    """
    hd_num = _check_hd_num(hd_num)
    path = _as_path(item)
    h = hashlib.sha256()
    if isinstance(item, MediaBytes):
        h.update(f"{item.kind}-file\0".encode())
        h.update(item.data)
        if item.kind == "image":
            h.update(f"\0hd_num={hd_num}".encode())
        return h.hexdigest()
    if path is None:
        img = item if item.mode == "RGB" else item.convert("RGB")
        h.update(b"pil-image\0")
        h.update(f"{img.width}x{img.height}\0".encode())
        h.update(img.tobytes())
        h.update(f"\0hd_num={hd_num}".encode())
        return h.hexdigest()
    kind = _media_kind(path)
    _check_file(path)
    h.update(f"{kind}-file\0".encode())
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as e:
        raise MediaError(f"cannot read file ({e})", path=path) from e
    if kind == "image":
        h.update(f"\0hd_num={hd_num}".encode())
    return h.hexdigest()
