"""Front ends on other systems: `ray` (Ray Data stages and `score --ray`), `trl.IXCReward` (a TRL GRPO reward
function). Each module imports its optional dependency lazily; nothing here is imported by the engine."""
