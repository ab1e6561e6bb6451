"""Image preprocessing of IXC-2.5: HD canvas, CLIP normalisation and 560x560 crops (MODEL.md section 4).

Every rounding step follows the upstream float arithmetic on purpose (``int(new_w / ratio)`` with
``ratio = W / H``, not ``new_w * H // W``): canvas sizes, and so token counts, must match upstream exactly.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import MediaError

CROP = 560
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MEDIA_KINDS = ("image", "video")
# Pixels allowed in one image or video frame: Pillow's default decompression-bomb limit (Image.MAX_IMAGE_PIXELS,
# 1024**3 // 4 // 3), held here so that the engine's limit does not depend on (or change) Pillow's global setting.
MAX_IMAGE_PIXELS = 89_478_485

_WHITE = (255, 255, 255)


def image_token_count(h: int, w: int) -> int:
    """LLM tokens of one image or video with an h x w grid of crops.

    Global view: 20 rows of (20 merged tokens + 1 separator) = 420, one global/sub separator, then the
    (h*20) x (w*20) stitched sub-crop grid with one separator per row: (h*w + 1) * 400 + 1 + (h + 1) * 20.
    """
    if h < 1 or w < 1:
        raise ValueError(f"crop grid must be at least 1x1, got h={h}, w={w}")
    return (h * w + 1) * 400 + 1 + (h + 1) * 20


class MediaCrops:
    """The ViT input of one image or video.

    pixel_values: [1 + h*w, 3, 560, 560] float32, order [global, sub_0, ..., sub_{h*w-1}] (raster order).

    Compact form (what preprocessing makes): the global view in float32 ([1, 3, 560, 560], a bicubic resize of the
    normalised canvas, so it has no exact uint8 form) and the sub-crops as the canvas's own uint8 pixels
    (``sub_uint8`` [h*w, 3, 560, 560]); ``normalize_uint8`` turns them into exactly the float32 values
    ``to_tensor_normalized`` gives (the same three IEEE operations), on whichever device they are. A quarter of the
    bytes to pickle from workers and to copy to the GPU. ``pixel_values`` builds the dense float32 tensor on demand.
    """

    __slots__ = ("_dense", "global_view", "h", "kind", "sub_uint8", "w")

    def __init__(self, pixel_values: torch.Tensor | None = None, h: int = 1, w: int = 1, kind: str = "image", *,
                 global_view: torch.Tensor | None = None, sub_uint8: torch.Tensor | None = None) -> None:
        if kind not in MEDIA_KINDS:
            raise ValueError(f"kind must be one of {MEDIA_KINDS}, got {kind!r}")
        if h < 1 or w < 1:
            raise ValueError(f"crop grid must be at least 1x1, got h={h}, w={w}")
        self.h, self.w, self.kind = h, w, kind
        expected = (1 + h * w, 3, CROP, CROP)
        if (pixel_values is None) == (sub_uint8 is None) or (sub_uint8 is None) != (global_view is None):
            raise ValueError("give either pixel_values, or global_view and sub_uint8")
        if pixel_values is not None:
            if tuple(pixel_values.shape) != expected:
                raise ValueError(f"pixel_values must have shape {expected} for h={h}, w={w}, "
                                 f"got {tuple(pixel_values.shape)}")
            self._dense, self.global_view, self.sub_uint8 = pixel_values, None, None
            return
        if tuple(global_view.shape) != (1, 3, CROP, CROP) or global_view.dtype != torch.float32:
            raise ValueError(f"global_view must be float32 [1, 3, {CROP}, {CROP}], got {global_view.dtype} "
                             f"{tuple(global_view.shape)}")
        if tuple(sub_uint8.shape) != (h * w, 3, CROP, CROP):
            raise ValueError(f"sub_uint8 must have shape {(h * w, 3, CROP, CROP)}, got {tuple(sub_uint8.shape)}")
        if sub_uint8.dtype != torch.uint8:
            raise ValueError(f"sub_uint8 must be uint8, got {sub_uint8.dtype}")
        self._dense, self.global_view, self.sub_uint8 = None, global_view, sub_uint8

    @property
    def compact(self) -> bool:
        return self.sub_uint8 is not None

    @property
    def pixel_values(self) -> torch.Tensor:
        if self._dense is not None:
            return self._dense
        return torch.cat([self.global_view, normalize_uint8(self.sub_uint8)])

    @property
    def n_crops(self) -> int:
        return 1 + self.h * self.w

    @property
    def n_tokens(self) -> int:
        return image_token_count(self.h, self.w)

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def __repr__(self) -> str:
        form = "uint8 sub-crops" if self.compact else "float32"
        return f"MediaCrops(h={self.h}, w={self.w}, kind={self.kind!r}, {form})"


def normalize_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 CLIP-normalised, bit-identical to ``to_tensor_normalized`` on any device:
    x / 255, then - mean, then / std, each one correctly rounded fp32 operation in the same order.

    The constants are tensors on x's device, not Python scalars: CUDA divides by a host scalar as a multiplication by
    its rounded reciprocal, which is not the CPU's division. They reach the GPU by a pinned, asynchronous copy (a
    plain `.to(cuda)` would synchronise the stream)."""
    consts = torch.tensor((255.0, *CLIP_MEAN, *CLIP_STD), dtype=torch.float32)
    if x.device.type == "cuda":
        consts = consts.pin_memory().to(x.device, non_blocking=True)
    k255, mean, std = consts[0], consts[1:4].view(3, 1, 1), consts[4:7].view(3, 1, 1)
    return x.to(torch.float32).div_(k255).sub_(mean).div_(std)


def check_pixels(width: int, height: int, max_pixels: int | None, what: str = "image") -> None:
    """MediaError when width * height exceeds max_pixels (None: no limit); checked on the header, before decoding."""
    if max_pixels is not None and width * height > max_pixels:
        raise MediaError(
            f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} pixels per "
            "image (a decompression bomb?); it is not decoded"
        )


def image_tokens(width: int, height: int, hd_num: int) -> int:
    """LLM tokens of an image of this size (from its header: no pixels needed); raises MediaError as hd_transform."""
    canvas_w, canvas_h = hd_canvas_size(width, height, hd_num)
    return image_token_count(canvas_h // CROP, canvas_w // CROP)


def _check_hd_num(hd_num: int) -> int:
    try:
        hd_num = operator.index(hd_num)
    except TypeError:
        raise TypeError(f"hd_num must be an integer, got {type(hd_num).__name__}") from None
    if hd_num < 1:
        raise MediaError(f"hd_num must be >= 1, got {hd_num}")
    return hd_num


def _hd_resize(width: int, height: int, hd_num: int) -> tuple[int, int]:
    """(new_w, new_h) of the resize for a landscape-or-square image (width >= height), before padding."""
    ratio = width / height
    # Largest s with s * ceil(s / ratio) <= hd_num (the product grows with s, so scan upwards).
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    scale = min(math.ceil(width / CROP), scale)
    new_w = int(scale * CROP)
    new_h = int(new_w / ratio)
    return new_w, new_h


def hd_canvas_size(width: int, height: int, hd_num: int) -> tuple[int, int]:
    """(width, height) of the padded canvas that ``hd_transform`` makes for an image of this size.

    Cheap (no pixels): lets callers budget tokens before decoding. Raises MediaError where hd_transform would.
    """
    hd_num = _check_hd_num(hd_num)
    if width < 1 or height < 1:
        raise MediaError(f"image has an empty size {width}x{height}")
    transposed = width < height
    if transposed:
        width, height = height, width
    new_w, new_h = _hd_resize(width, height, hd_num)
    if new_h < 1:
        raise MediaError(
            f"image {width}x{height} is too elongated: it would be resized to {new_w}x{new_h} (hd_num={hd_num})"
        )
    padded_h = math.ceil(new_h / CROP) * CROP
    return (padded_h, new_w) if transposed else (new_w, padded_h)


def hd_transform(img: Image.Image, hd_num: int) -> Image.Image:
    """Steps 1-4 of MODEL.md section 4: RGB, resize to a multiple of 560 wide (long side), pad with white.

    Portrait images are handled by transposing (swapping axes, not rotating), processing as landscape and
    transposing back, exactly like upstream: the bilinear resize runs in the transposed orientation, which
    matters for bit-exact pixels.
    """
    hd_num = _check_hd_num(hd_num)
    img = img.convert("RGB")
    width, height = img.size
    if width < 1 or height < 1:
        raise MediaError(f"image has an empty size {width}x{height}")
    transposed = width < height
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        width, height = img.size
    new_w, new_h = _hd_resize(width, height, hd_num)
    if new_h < 1:
        raise MediaError(
            f"image {width}x{height} is too elongated: it would be resized to {new_w}x{new_h} (hd_num={hd_num})"
        )
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    padded_h = math.ceil(new_h / CROP) * CROP
    if padded_h != new_h:
        canvas = Image.new("RGB", (new_w, padded_h), _WHITE)
        canvas.paste(img, (0, 0))
        img = canvas
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    return img


def _uint8_chw(img: Image.Image) -> torch.Tensor:
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.array(img, dtype=np.uint8)  # [H, W, 3], a fresh writable copy
    return torch.from_numpy(arr).permute(2, 0, 1)


def to_tensor_normalized(img: Image.Image) -> torch.Tensor:
    """[3, H, W] float32: uint8 / 255 in fp32, then (x - mean) / std per channel with fp32 mean and std."""
    t = _uint8_chw(img).to(torch.float32, memory_format=torch.contiguous_format)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return t.div_(255).sub_(mean).div_(std)


def _split_crops(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    # [3, h*560, w*560] -> [h, w, 3, 560, 560]: crop (i, j) lands at index i * w + j.
    return t.reshape(3, h, CROP, w, CROP).permute(1, 3, 0, 2, 4).reshape(h * w, 3, CROP, CROP)


def crops_from_canvas(t: torch.Tensor, kind: str = "image", canvas_uint8: torch.Tensor | None = None) -> MediaCrops:
    """Global view (bicubic resize of the whole canvas to 560x560, fp32) plus the h x w sub-crops.

    canvas_uint8: the uint8 [3, H, W] canvas that `t` is the normalisation of; when given, the sub-crops are kept in
    it (compact form, see MediaCrops)."""
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"canvas must be a [3, H, W] tensor, got shape {tuple(t.shape)}")
    _, height, width = t.shape
    if height == 0 or width == 0 or height % CROP or width % CROP:
        raise ValueError(f"canvas height and width must be positive multiples of {CROP}, got {height}x{width}")
    h, w = height // CROP, width // CROP
    t = t.float()
    glb = F.interpolate(t[None], size=(CROP, CROP), mode="bicubic", align_corners=False)
    if canvas_uint8 is not None:
        if canvas_uint8.shape != t.shape or canvas_uint8.dtype != torch.uint8:
            raise ValueError(f"canvas_uint8 must be uint8 {tuple(t.shape)}, got {canvas_uint8.dtype} "
                             f"{tuple(canvas_uint8.shape)}")
        return MediaCrops(h=h, w=w, kind=kind, global_view=glb, sub_uint8=_split_crops(canvas_uint8, h, w))
    return MediaCrops(pixel_values=torch.cat([glb, _split_crops(t, h, w)], dim=0), h=h, w=w, kind=kind)


def canvas_crops(img: Image.Image, kind: str = "image", compact: bool = True) -> MediaCrops:
    """Crops of a finished canvas: normalised for the global view; the sub-crops as uint8 (compact: a quarter of the
    bytes to copy to a GPU or through a pipe, normalised where they are used) or normalised float32 (dense: for a
    CPU model in this process, which would otherwise normalise the same pixels a second time)."""
    u8 = _uint8_chw(img)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    t = u8.to(torch.float32, memory_format=torch.contiguous_format).div_(255).sub_(mean).div_(std)
    return crops_from_canvas(t, kind, canvas_uint8=u8 if compact else None)


def process_image(img: Image.Image, hd_num: int, max_pixels: int | None = MAX_IMAGE_PIXELS,
                  compact: bool = True) -> MediaCrops:
    """Full image path: HD canvas, CLIP normalisation, crops (compact: see canvas_crops). Images over max_pixels are
    a MediaError."""
    check_pixels(*img.size, max_pixels)
    return canvas_crops(hd_transform(img, hd_num), kind="image", compact=compact)
