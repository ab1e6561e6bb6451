"""Shared fixtures: tiny checkpoints in the release layout, and the paths of ../shared data."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Kernel tests run the Triton kernels through the interpreter on CPU-only machines. It must be set before any module
# imports triton, and conftest is imported before the test modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MEDIA = SHARED / "media"


def shared_media(name: str) -> Path:
    path = MEDIA / name
    if not path.exists():
        pytest.skip(f"{path} not found: the real photos live in ../shared/media beside the checkout")
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from ixc_engine.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=1)


@pytest.fixture(scope="session")
def tokenizer():
    from ixc_engine.tiny import PACKAGED_TOKENIZER
    from ixc_engine.tokenizer import Tokenizer

    return Tokenizer.from_file(PACKAGED_TOKENIZER)


@pytest.fixture(scope="session")
def demo_ref():
    """The demo reward model (examples/demo-model, CPU) for expected values, shared by the serving tests: call it from
    the test's own thread only (a served engine belongs to its server's scheduler thread)."""
    from ixc_engine.api import RewardEngine

    return RewardEngine.from_pretrained(REPO / "examples" / "demo-model", device="cpu")
