"""The one training loop (Accelerate), checkpoints and distributed set-up."""
