"""Flax Linen networks, one file each. Every model returns ``(logits, intermediates)``."""
