"""Turn a media item (file path or PIL image) into ViT crops, and a content digest to encode it once."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from PIL import Image

from .errors import MediaError
from .image import MediaCrops, _check_hd_num, process_image
from .video import VIDEO_EXTENSIONS, process_video

# Upstream's accepted image extensions; other extensions are an error (upstream prints and drops the image).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")

MediaItem = str | os.PathLike | Image.Image

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
    if isinstance(item, Image.Image):
        return None
    if isinstance(item, (str, os.PathLike)):
        return Path(item)
    raise TypeError(f"media item must be a file path or a PIL.Image.Image, got {type(item).__name__}")


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file fully and convert it to RGB (as upstream: ``Image.open(p).convert('RGB')``).

    EXIF orientation is not applied (upstream does not either).
    """
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now: truncated or corrupt data fails here, not later
            return im.convert("RGB")
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise MediaError(f"cannot decode image ({type(e).__name__}: {e})", path=path) from e


# Modes that convert("RGB") clips (16-bit and 32-bit integers saturate at 255: white) or truncates (floats: 0..1
# becomes black); upstream converts them so too, so they are scored, with a warning.
_CLIPPED_MODES = {"I": "32-bit integer", "F": "32-bit float", "I;16": "16-bit", "I;16L": "16-bit", "I;16B": "16-bit",
                  "I;16N": "16-bit"}


def mode_warning(item: MediaItem) -> str | None:
    """A warning for an image whose pixels convert("RGB") clips (read from the header only), else None."""
    try:
        if isinstance(item, Image.Image):
            mode, name = item.mode, "a PIL image"
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


def load_media(item: MediaItem, hd_num: int, *, video_backend: str | None = None) -> MediaCrops:
    """Crops of one media item: a video by extension, an image file, or a PIL image.

    hd_num is the image crop budget (24 single image, 6 when a sample has several); videos ignore it.
    """
    hd_num = _check_hd_num(hd_num)
    path = _as_path(item)
    if path is None:
        return process_image(item, hd_num)
    if _media_kind(path) == "video":
        _check_file(path)
        return process_video(path, backend=video_backend)
    return process_image(open_image(path), hd_num)


def media_digest(item: MediaItem, hd_num: int) -> str:
    """Hex sha256 identifying what ``load_media(item, hd_num)`` produces.

    Files: the kind, the file bytes (not the name) and, for images, hd_num (videos ignore it). PIL images:
    the RGB pixels and size (what preprocessing sees, so images differing only in alpha share a digest)
    plus hd_num.
    """
    hd_num = _check_hd_num(hd_num)
    path = _as_path(item)
    h = hashlib.sha256()
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
