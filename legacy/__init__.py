"""Drop-in replacements for flax.training.checkpoints (filled in by a later issue)."""
