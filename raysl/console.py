"""What a person sees on the console: raysl's own log lines; Ray's output only with --verbose."""

from __future__ import annotations

import logging


def setup(level: str = "INFO", *, verbose: bool = False) -> None:
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
