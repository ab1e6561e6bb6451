"""Fixtures shared by tests/ and bench/ (pytest loads this for both test paths)."""

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on a busy 2-core machine two OpenMP threads stall each other and swamp timings
    (bench/README.md). Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
