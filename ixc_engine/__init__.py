"""ixc-engine: fast, exact scoring for the IXC-2.5-Reward multi-modal reward model."""

__version__ = "0.1.0"

__all__ = ["EngineConfig", "RewardEngine", "Sample", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import ixc_engine.kernels...` or the CLI's --help do not import torch-heavy modules first.
    if name == "RewardEngine":
        from ixc_engine.api import RewardEngine

        return RewardEngine
    if name == "EngineConfig":
        from ixc_engine.engine.engine import EngineConfig

        return EngineConfig
    if name == "Sample":
        from ixc_engine.engine.sequence import Sample

        return Sample
    raise AttributeError(f"module 'ixc_engine' has no attribute {name!r}")
