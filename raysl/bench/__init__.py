"""`raysl bench`: side-by-side benchmarks, each reported as ratios measured in one run.

One module per benchmark, each exposing `add_arguments(parser)` (its own flags) and `run(args) -> dict` (a
JSON-serializable report). `BENCHMARKS` names them; a module is imported only when its benchmark is named on
the command line, so `raysl bench --help` imports none. Shared helpers: raysl.bench.common.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any

BENCHMARKS: dict[str, tuple[str, str]] = {  # name → (module, one-line help)
    "ingest": ("raysl.bench.ingest", "BYOL views/s: raysl's Ray Data training reader vs torch DataLoaders, "
                                     "locally and from S3, CIFAR- and ImageNet-like JPEGs"),
    "step": ("raysl.bench.step", "BYOL training samples/s: a 1-worker Ray Train TorchTrainer vs a bare loop"),
    "clip-loss": ("raysl.bench.clip_loss", "CLIP loss memory and time as the global batch grows: naive vs "
                                           "local rows vs chunked"),
    "ijepa-context": ("raysl.bench.ijepa_context", "I-JEPA context encoder on the visible patches vs the full "
                                                   "image"),
    "decode": ("raysl.bench.decode", "peak memory and time of one decode task on large photos"),
    "video": ("raysl.bench.video", "video decode to clips, frames/s per core: PyAV (raysl.data.video) vs "
                                   "decord, local and S3, 320×240 and 1280×720, stride 4 and 30"),
    "gpu": ("raysl.bench.gpu", "the pretraining models on one accelerator: synthetic and end-to-end samples/s, "
                               "MFU, data.augment_on cpu vs gpu"),
}


def load(name: str) -> ModuleType:
    """The module of benchmark `name`."""
    if name not in BENCHMARKS:
        raise ValueError(f"bench: {name!r} is not one of {tuple(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name][0])


class _LazyBenchmarks(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Sub-parsers whose flags are added when their benchmark is named: only that module is imported."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        assert isinstance(values, list) and values
        name, sub = values[0], self._name_parser_map.get(values[0])
        if sub is not None and not getattr(sub, "_raysl_loaded", False):
            module = load(name)
            module.add_arguments(sub)
            sub.description = module.__doc__
            sub._raysl_loaded = True  # type: ignore[attr-defined]
        super().__call__(parser, namespace, values, option_string)


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    """One sub-parser per benchmark under `parser` (`raysl bench`); the choice lands in `args.what`."""
    sub = parser.add_subparsers(dest="what", required=True, metavar="BENCHMARK", action=_LazyBenchmarks)
    for name, (_, help_) in BENCHMARKS.items():
        sub.add_parser(name, help=help_, formatter_class=argparse.RawDescriptionHelpFormatter)
