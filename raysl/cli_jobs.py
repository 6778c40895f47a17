"""`raysl submit` and `raysl jobs`: run any raysl command as a Ray job on a cluster (Ray Jobs API)."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    pass
