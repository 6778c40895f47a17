"""Training: the per-worker loop, optimizers and the Ray Train launcher."""
