"""Adapters to other frameworks: `trl.IXCReward` (TRL GRPO reward function). Optional libraries are imported lazily."""
