"""Scheduled retraining: snapshot new data → pretrain (warm start from @champion) → evaluate candidate and
champion on one labeled split → gate → move @champion. Every step is recorded before the next starts, so a
pipeline killed anywhere continues where it stopped when run again; a lock keeps two runs of one pipeline
apart."""
