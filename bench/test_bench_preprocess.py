"""pytest-benchmark entries for CPU preprocessing: one photo to HD crops, one chat to tokens, one video to a canvas.

Run: pytest bench/test_bench_preprocess.py --benchmark-enable
These bound what the worker processes must sustain to keep a GPU fed (EngineConfig.workers).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ixc_engine.media.image import process_image
from ixc_engine.media.video import frames_to_canvas, video_canvas_transform
from ixc_engine.template import build_sample
from ixc_engine.tiny import PACKAGED_TOKENIZER
from ixc_engine.tokenizer import Tokenizer

pytestmark = pytest.mark.benchmark


def _photo(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(1920, 1080), (512, 341)])
def test_image_to_crops_hd9(benchmark, size):
    img = _photo(*size)
    crops = benchmark(process_image, img, 9)
    assert crops.pixel_values.shape[1:] == (3, 560, 560)


def test_chat_to_tokens(benchmark):
    tok = Tokenizer.from_file(PACKAGED_TOKENIZER)
    msgs = [{"role": "user", "content": "<ImageHere>" + "Describe the scene in detail. " * 4},
            {"role": "assistant", "content": "A long answer about cars, streets and weather. " * 20}]
    sample = benchmark(build_sample, tok, msgs, 1, 9)
    assert sample.n_text_tokens > 100


def test_video_frames_to_strip(benchmark):
    frames = [_photo(320, 180) for _ in range(8)]
    strip = benchmark(lambda: video_canvas_transform(frames_to_canvas(frames)))
    assert min(strip.size) == 560
