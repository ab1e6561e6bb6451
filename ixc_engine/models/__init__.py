"""Model modules (no device or scheduling logic here)."""
