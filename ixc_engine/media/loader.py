"""Turn a media item (file path, in-memory encoded bytes, or PIL image) into ViT crops, and a content digest to encode
it once."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import MediaError
from .image import MediaCrops, _check_hd_num, process_image
from .video import VIDEO_EXTENSIONS, process_video

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


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file fully and convert it to RGB (as upstream: ``Image.open(p).convert('RGB')``).

    EXIF orientation is not applied (upstream does not either).
    """
    path = Path(path)
    _check_file(path)
    return _decode_image(path, path)


def _decode_image(source, name) -> Image.Image:
    try:
        with Image.open(source) as im:
            im.load()  # decode now: truncated or corrupt data fails here, not later
            return im.convert("RGB")
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise MediaError(f"cannot decode image ({type(e).__name__}: {e})", path=name) from e


def _load_bytes(item: MediaBytes, hd_num: int, video_backend: str | None) -> MediaCrops:
    if item.kind == "image":
        return process_image(_decode_image(io.BytesIO(item.data), item.name), hd_num)
    with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:  # decord and PyAV probe the container, not the suffix
        tmp.write(item.data)
        tmp.flush()
        try:
            return process_video(tmp.name, backend=video_backend)
        except MediaError as e:
            raise MediaError(str(e).replace(tmp.name, item.name, 1), path=None) from e


def load_media(item: MediaItem, hd_num: int, *, video_backend: str | None = None) -> MediaCrops:
    """Crops of one media item: a video by extension, an image file, or a PIL image.

    hd_num is the image crop budget (24 single image, 6 when a sample has several); videos ignore it.
    """
    hd_num = _check_hd_num(hd_num)
    if isinstance(item, MediaBytes):
        return _load_bytes(item, hd_num, video_backend)
    path = _as_path(item)
    if path is None:
        return process_image(item, hd_num)
    if _media_kind(path) == "video":
        _check_file(path)
        return process_video(path, backend=video_backend)
    return process_image(open_image(path), hd_num)


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
