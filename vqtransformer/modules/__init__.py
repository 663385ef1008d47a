"""Building blocks with the papers' names (taming-transformers layout where checkpoints must load)."""
