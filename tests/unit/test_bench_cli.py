"""`raysl bench`: one sub-command per benchmark, each with its own flags; `raysl bench --help` imports none."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from raysl import bench
from raysl.cli import build_parser


def _own_flags(name: str) -> set[str]:
    try:
        module = bench.load(name)
    except ModuleNotFoundError as exc:  # raysl.bench.gpu is written elsewhere; until it lands, skip it
        if exc.name == bench.BENCHMARKS[name][0]:
            pytest.skip(f"{exc.name} does not exist yet")
        raise
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return {s for a in p._actions for s in a.option_strings if s.startswith("--")} - {"--help"}


def _help(name: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["bench", name, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", list(bench.BENCHMARKS))
def test_each_benchmark_help_shows_only_its_own_flags(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    own = _own_flags(name)
    assert own, f"{name} has no flags of its own"
    shown = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", _help(name, capsys))) - {"--help"}
    assert own <= shown
    assert shown <= own, f"`raysl bench {name} --help` shows flags of other benchmarks: {sorted(shown - own)}"


def test_bench_parses_into_the_named_benchmark() -> None:
    args = build_parser().parse_args(["bench", "ingest", "--images", "1000", "10000", "--images", "5",
                                      "--kind", "cifar"])
    assert (args.what, args.images, args.kind, args.rounds, args.batch_size) == ("ingest", [1000, 10000, 5],
                                                                                 ["cifar"], 3, 256)
    with pytest.raises(SystemExit):  # a flag of another benchmark is refused
        build_parser().parse_args(["bench", "ingest", "--max-batch", "512"])


def test_bench_help_imports_no_benchmark() -> None:
    code = ("import sys\nfrom raysl.cli import build_parser\ntry:\n    build_parser().parse_args(['bench', '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in sys.modules if m.startswith('raysl.bench.')))\n"
            "print('torch' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    lines = out.strip().splitlines()
    assert all(name in out for name in bench.BENCHMARKS)
    assert lines[-2:] == ["[]", "False False"]
