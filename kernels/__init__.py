"""Triton kernels, each file with its pure-torch reference (installed as ixc_engine.kernels)."""
