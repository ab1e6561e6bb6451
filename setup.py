"""Build script: the pybind11 host core `ixc_engine._core` (see csrc/). Metadata lives in pyproject.toml."""

from setuptools import setup

setup()
