"""Image preprocessing (MODEL.md section 4): canvas sizes, pixels, normalisation, crops, loader errors."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ixc_engine.media.errors import MediaError
from ixc_engine.media.image import (
    CLIP_MEAN,
    CLIP_STD,
    CROP,
    MediaCrops,
    crops_from_canvas,
    hd_canvas_size,
    hd_transform,
    image_token_count,
    process_image,
    to_tensor_normalized,
)
from ixc_engine.media.loader import load_media, media_digest, open_image

SHARED_MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"
PHOTOS = ("cars1.jpg", "cars2.jpg", "cars2_portrait.png", "screenshot.jpg", "dubai.png")
HD_NUMS = (1, 4, 6, 9, 16, 24, 25)
SIZES = [
    (1, 1),
    (3, 500),
    (500, 3),
    (560, 560),
    (561, 560),
    (560, 561),
    (4000, 300),
    (300, 4000),
    (1121, 1),
    (1, 1121),
    (2000, 10),
    (512, 341),
    (1462, 784),
    (1200, 4679),
    (1119, 1120),
    (1680, 1120),
]


def photo(name: str) -> Path:
    path = SHARED_MEDIA / name
    if not path.is_file():
        pytest.skip(f"real test photo {path} is absent (expected in the shared/media folder next to the repo)")
    return path


def ref_canvas_size(width: int, height: int, hd_num: int) -> tuple[int, int] | None:
    """Independent canvas size (None where the resized short side would be 0)."""
    portrait = width < height
    long_side, short_side = (height, width) if portrait else (width, height)
    ratio = long_side / short_side
    fitting = [s for s in range(1, hd_num + 1) if s * np.ceil(s / ratio) <= hd_num]
    scale = min(int(np.ceil(long_side / 560)), max(fitting))
    new_long = scale * 560
    new_short = int(new_long / ratio)
    if new_short == 0:
        return None
    padded = int(np.ceil(new_short / 560)) * 560
    return (padded, new_long) if portrait else (new_long, padded)


def ref_hd_pixels(img: Image.Image, hd_num: int) -> np.ndarray:
    """Direct PIL recomputation: resize in landscape orientation, white rows below, transpose back."""
    rgb = img.convert("RGB")
    portrait = rgb.width < rgb.height
    land = rgb.transpose(Image.Transpose.TRANSPOSE) if portrait else rgb
    out_w, out_h = ref_canvas_size(land.width, land.height, hd_num)
    new_h = int(out_w / (land.width / land.height))
    resized = np.asarray(land.resize((out_w, new_h), Image.Resampling.BILINEAR))
    canvas = np.full((out_h, out_w, 3), 255, dtype=np.uint8)
    canvas[:new_h] = resized
    return canvas.transpose(1, 0, 2) if portrait else canvas


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_token_count_matches_layout():
    for h in range(1, 9):
        for w in range(1, 9):
            glb = 20 * (20 + 1) + 1  # global rows each with a separator, then the global/sub separator
            sub = (h * 20) * (w * 20 + 1)
            assert image_token_count(h, w) == glb + sub
    assert image_token_count(1, 1) == 841
    with pytest.raises(ValueError):
        image_token_count(0, 1)


@pytest.fixture(scope="module")
def grid_images() -> dict[tuple[int, int], Image.Image]:
    return {size: random_image(*size, seed=k) for k, size in enumerate(SIZES)}


@pytest.mark.parametrize("hd_num", HD_NUMS)
def test_canvas_sizes_over_grid(hd_num, grid_images):
    for width, height in SIZES:
        expected = ref_canvas_size(width, height, hd_num)
        if expected is None:
            with pytest.raises(MediaError, match="too elongated"):
                hd_canvas_size(width, height, hd_num)
            with pytest.raises(MediaError, match="too elongated"):
                hd_transform(Image.new("RGB", (width, height)), hd_num)
            continue
        assert hd_canvas_size(width, height, hd_num) == expected, (width, height)
        out = hd_transform(grid_images[width, height], hd_num)
        assert out.size == expected and out.mode == "RGB", (width, height)
        grid_h, grid_w = expected[1] // 560, expected[0] // 560
        assert grid_h * grid_w <= hd_num
        assert image_token_count(grid_h, grid_w) == (grid_h * grid_w + 1) * 400 + 1 + (grid_h + 1) * 20


def test_extreme_ratio_and_bad_hd_num():
    assert ref_canvas_size(100_000, 1, 1) is None
    with pytest.raises(MediaError, match="too elongated"):
        hd_transform(Image.new("RGB", (100_000, 1)), 1)
    with pytest.raises(MediaError, match="too elongated"):
        hd_transform(Image.new("RGB", (1, 100_000)), 1)
    with pytest.raises(MediaError, match="hd_num"):
        hd_transform(Image.new("RGB", (10, 10)), 0)
    with pytest.raises(TypeError, match="hd_num"):
        hd_transform(Image.new("RGB", (10, 10)), 2.5)


@pytest.mark.parametrize(
    ("width", "height", "hd_num"),
    [(37, 23, 9), (23, 37, 9), (700, 301, 24), (301, 700, 24), (1300, 500, 6), (500, 1300, 6), (559, 559, 4)],
)
def test_hd_transform_pixels_match_pil_recomputation(width, height, hd_num):
    img = random_image(width, height, seed=width * 7 + height)
    out = np.asarray(hd_transform(img, hd_num))
    ref = ref_hd_pixels(img, hd_num)
    assert out.shape == ref.shape
    assert np.array_equal(out, ref)
    # Padding is white and sits after the content along the padded axis.
    if width >= height:
        new_h = int(out.shape[1] / (width / height))
        assert (out[new_h:] == 255).all()
    else:
        new_w = int(out.shape[0] / (height / width))
        assert (out[:, new_w:] == 255).all()


def test_hd_transform_converts_modes():
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, (50, 90, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (50, 90), dtype=np.uint8), "L")
    for img in (rgba, gray, gray.convert("P")):
        assert np.array_equal(np.asarray(hd_transform(img, 4)), np.asarray(hd_transform(img.convert("RGB"), 4)))


def test_transpose_round_trip_on_portrait():
    img = random_image(333, 901, seed=11)  # portrait
    land = img.transpose(Image.Transpose.TRANSPOSE)
    for hd_num in (4, 9, 24):
        a = hd_transform(img, hd_num).transpose(Image.Transpose.TRANSPOSE)
        b = hd_transform(land, hd_num)
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {name: open_image(photo(name)) for name in PHOTOS}


def test_real_portrait_photo_is_rotated_landscape(photos):
    land, port = photos["cars2.jpg"], photos["cars2_portrait.png"]
    assert np.array_equal(np.rot90(np.asarray(land), 1), np.asarray(port))  # the file is a CCW quarter turn
    for hd_num in (1, 9, 24):
        a, b = np.asarray(hd_transform(land, hd_num)), np.asarray(hd_transform(port, hd_num))
        # A CCW turn sends the landscape canvas's bottom padding to the right, where the portrait path pads.
        assert np.array_equal(np.rot90(a, 1), b)


def test_real_photos_tokens(photos):
    expected_sizes = {"cars1.jpg": (512, 341), "screenshot.jpg": (1462, 784), "dubai.png": (1200, 4679)}
    for name, img in photos.items():
        if name in expected_sizes:
            assert img.size == expected_sizes[name]
        for hd_num in (9, 24):
            width, height = ref_canvas_size(*img.size, hd_num)
            assert hd_transform(img, hd_num).size == (width, height)
            assert hd_canvas_size(*img.size, hd_num) == (width, height)
    # Measured values, fixed here so that a change in any rounding step shows up.
    tokens = {
        name: [image_token_count(h // 560, w // 560) for w, h in (hd_canvas_size(*img.size, n) for n in (9, 24))]
        for name, img in photos.items()
    }
    assert tokens == {
        "cars1.jpg": [841, 841],
        "cars2.jpg": [2061, 2061],
        "cars2_portrait.png": [2061, 2061],
        "screenshot.jpg": [2861, 2861],
        "dubai.png": [3701, 10181],
    }
    crops = process_image(photos["screenshot.jpg"], 24)
    assert (crops.h, crops.w, crops.n_tokens, crops.pixel_values.shape[0]) == (2, 3, 2861, 7)
    # Transposing swaps the grid, and the token count follows the row count h.
    dubai_t = photos["dubai.png"].transpose(Image.Transpose.TRANSPOSE)
    w, h = hd_transform(dubai_t, 24).size
    assert (h // 560, w // 560, image_token_count(h // 560, w // 560)) == (3, 8, 10081)


def test_to_tensor_normalized_matches_reference():
    img = random_image(31, 17, seed=5)
    t = to_tensor_normalized(img)
    assert t.dtype == torch.float32 and t.shape == (3, 17, 31)
    arr = np.asarray(img).astype(np.float64) / 255.0
    ref64 = (arr - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(t.permute(1, 2, 0).numpy(), ref64, rtol=0, atol=2e-6)
    # Bitwise against the fp32 operation order (divide by 255, subtract fp32 mean, divide by fp32 std).
    x = torch.tensor(np.asarray(img)).permute(2, 0, 1).float() / 255
    ref32 = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert torch.equal(t, ref32)


def test_crop_order_and_global_view():
    h, w = 2, 3
    canvas = torch.empty(3, h * CROP, w * CROP)
    for i in range(h):
        for j in range(w):
            for c in range(3):
                canvas[c, i * CROP : (i + 1) * CROP, j * CROP : (j + 1) * CROP] = 10 * (i * w + j) + c
    crops = crops_from_canvas(canvas)
    assert isinstance(crops, MediaCrops) and (crops.h, crops.w, crops.kind) == (h, w, "image")
    assert crops.pixel_values.shape == (1 + h * w, 3, CROP, CROP) and crops.pixel_values.dtype == torch.float32
    for k in range(h * w):
        for c in range(3):
            assert (crops.pixel_values[1 + k, c] == 10 * k + c).all()
    glb = F.interpolate(canvas[None], size=(CROP, CROP), mode="bicubic", align_corners=False)[0]
    assert torch.equal(crops.pixel_values[0], glb)
    assert crops.n_tokens == image_token_count(h, w)


def test_global_view_random_canvas():
    gen = torch.Generator().manual_seed(0)
    canvas = torch.randn(3, CROP, 2 * CROP, generator=gen)
    crops = crops_from_canvas(canvas)
    ref = F.interpolate(canvas[None], size=(CROP, CROP), mode="bicubic", align_corners=False)[0]
    assert torch.equal(crops.pixel_values[0], ref)
    assert torch.equal(crops.pixel_values[1], canvas[:, :, :CROP])
    assert torch.equal(crops.pixel_values[2], canvas[:, :, CROP:])
    # Independent of torch: a two-level canvas halves to a two-level square (bicubic keeps constants away
    # from the edge between the levels).
    two = torch.cat([torch.zeros(3, CROP, CROP), torch.ones(3, CROP, CROP)], dim=2)
    glb = crops_from_canvas(two).pixel_values[0]
    torch.testing.assert_close(glb[:, :, :270], torch.zeros(3, CROP, 270), rtol=0, atol=1e-6)
    torch.testing.assert_close(glb[:, :, 290:], torch.ones(3, CROP, 270), rtol=0, atol=1e-6)


def test_crops_from_canvas_rejects_bad_shapes():
    for shape in [(3, 560, 561), (1, 560, 560), (3, 0, 560), (560, 560)]:
        with pytest.raises(ValueError):
            crops_from_canvas(torch.zeros(shape))
    with pytest.raises(ValueError, match="shape"):
        MediaCrops(pixel_values=torch.zeros(2, 3, CROP, CROP), h=1, w=2)
    with pytest.raises(ValueError, match="kind"):
        MediaCrops(pixel_values=torch.zeros(2, 3, CROP, CROP), h=1, w=1, kind="audio")


def test_process_image_end_to_end():
    img = random_image(900, 700, seed=9)
    crops = process_image(img, 6)
    width, height = ref_canvas_size(900, 700, 6)
    canvas = torch.tensor(ref_hd_pixels(img, 6)).permute(2, 0, 1).float() / 255
    canvas = (canvas - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert (crops.h, crops.w) == (height // 560, width // 560)
    assert torch.equal(crops.pixel_values[1], canvas[:, :CROP, :CROP])
    assert torch.equal(crops.pixel_values[-1], canvas[:, -CROP:, -CROP:])


def test_load_media_paths_and_pil(tmp_path):
    img = random_image(300, 200, seed=1)
    png = tmp_path / "pic.PNG"
    img.save(png)
    a = load_media(png, 9)
    b = load_media(str(png), 9)
    c = load_media(img, 9)
    assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.pixel_values, c.pixel_values)
    assert (a.h, a.w, a.kind) == (1, 1, "image")


def test_load_media_errors(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(MediaError, match="nope.jpg: no such file") as info:
        load_media(missing, 9)
    assert info.value.path == str(missing)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)
    with pytest.raises(MediaError, match="corrupt.jpg: cannot decode image"):
        load_media(corrupt, 9)
    truncated = tmp_path / "truncated.png"
    buf = tmp_path / "full.png"
    random_image(64, 64, seed=2).save(buf)
    truncated.write_bytes(buf.read_bytes()[: buf.stat().st_size // 2])
    with pytest.raises(MediaError, match="truncated.png: cannot decode image"):
        load_media(truncated, 9)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(MediaError, match=r"notes.txt: unsupported media extension '\.txt'"):
        load_media(text, 9)
    folder = tmp_path / "dir.png"
    folder.mkdir()
    with pytest.raises(MediaError, match="not a regular file"):
        load_media(folder, 9)
    with pytest.raises(TypeError):
        load_media(b"bytes", 9)
    with pytest.raises(MediaError, match="hd_num"):
        load_media(buf, 0)
    err = pickle.loads(pickle.dumps(MediaError("boom", path="x.png")))
    assert str(err) == "x.png: boom"


def test_media_digest(tmp_path):
    img = random_image(40, 30, seed=4)
    one, two = tmp_path / "a.png", tmp_path / "b.png"
    img.save(one)
    two.write_bytes(one.read_bytes())
    assert media_digest(one, 9) == media_digest(two, 9)
    assert media_digest(one, 9) != media_digest(one, 24)
    assert media_digest(img, 9) == media_digest(img.copy(), 9)
    assert media_digest(img, 9) != media_digest(img, 6)
    other = img.copy()
    other.putpixel((0, 0), (1, 2, 3) if img.getpixel((0, 0)) != (1, 2, 3) else (4, 5, 6))
    assert media_digest(img, 9) != media_digest(other, 9)
    assert media_digest(img.convert("RGBA"), 9) == media_digest(img, 9)  # same pixels once in RGB
    assert len(media_digest(one, 9)) == 64
    with pytest.raises(MediaError, match="no such file"):
        media_digest(tmp_path / "missing.png", 9)


def test_hd_scale_is_largest_fitting():
    # The canvas never uses more than hd_num crops unless a single row or column is forced, and one more
    # column would not fit.
    for width, height in [(1000, 500), (3000, 400), (800, 799), (5000, 5000)]:
        for hd_num in HD_NUMS:
            out_w = hd_canvas_size(width, height, hd_num)[0]
            scale = out_w // 560
            ratio = width / height
            assert scale * math.ceil(scale / ratio) <= hd_num
            if scale < math.ceil(width / 560):
                assert (scale + 1) * math.ceil((scale + 1) / ratio) > hd_num
