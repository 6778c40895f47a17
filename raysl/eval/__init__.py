"""Downstream jobs that load a registered encoder: kNN, linear probe, embedding export."""
