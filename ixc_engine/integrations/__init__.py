"""Front ends on other systems (Ray Data stages, ...). Each module imports its optional dependency lazily; nothing
here is imported by the engine."""
