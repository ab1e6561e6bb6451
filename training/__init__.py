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
    "LengthFilterReport",
    "PairError",
    "PairwiseOutput",
    "PreferencePair",
    "bradley_terry_loss",
    "bt_loss_from_hidden",
    "clipped_value_loss",
    "critic_step",
    "gae",
    "gae_ref",
    "length_filter",
    "load_pairs",
    "padded_to_values",
    "pairwise_scores_from_hidden",
    "state_mask_from_action_mask",
    "value_loss_terms",
    "values_to_padded",
]
