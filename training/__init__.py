"""Reward-model training and PPO critic updates on the engine's kernels (installed as ixc_engine.training)."""

from .critic import critic_step, padded_to_values, state_mask_from_action_mask, values_to_padded
from .gae import gae, gae_ref
from .losses import (
    PairwiseOutput,
    bradley_terry_loss,
    bt_loss_from_hidden,
    clipped_value_loss,
    pairwise_scores_from_hidden,
    value_loss_terms,
)
from .pairs import LengthFilterReport, PairError, PreferencePair, length_filter, load_pairs

__all__ = [
    "PreferencePair", "PairError", "LengthFilterReport", "load_pairs", "length_filter", "gae", "gae_ref",
    "bradley_terry_loss", "pairwise_scores_from_hidden", "bt_loss_from_hidden", "PairwiseOutput",
    "clipped_value_loss", "value_loss_terms", "critic_step", "values_to_padded", "padded_to_values",
    "state_mask_from_action_mask",
]
