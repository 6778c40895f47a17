"""`raysl pipeline run FILE`: scheduled retraining (snapshot → pretrain → evaluate → gate → promote)."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    pass
