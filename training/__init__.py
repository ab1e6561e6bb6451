"""Reward-model training and PPO critic updates on the engine's kernels (installed as ixc_engine.training)."""
