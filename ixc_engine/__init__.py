"""ixc-engine: fast, exact scoring for the IXC-2.5-Reward multi-modal reward model."""

__version__ = "0.1.0"
