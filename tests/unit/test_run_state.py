"""The run-state file: absent means no earlier run; damaged or unreadable stops the run (never "start over")."""

from __future__ import annotations

from pathlib import Path

import pytest

from raysl.storage import S3Settings
from raysl.train.errors import RunStateError
from raysl.train.run_state import RunState, read_state, state_uri, write_state

S3 = S3Settings()


def test_absent_is_none_and_a_written_state_reads_back(tmp_path: Path) -> None:
    uri = state_uri(str(tmp_path), "run-a")
    assert read_state(uri, S3) is None
    state = RunState(mlflow_run_id="abc", trained=True, checkpoint="/x/checkpoint_1", metrics={"step": 8})
    write_state(uri, state, S3)
    assert read_state(uri, S3) == state
    assert [p.name for p in (tmp_path / "run-a").iterdir()] == ["raysl-run.json"]  # no temporary left behind


@pytest.mark.parametrize("content", [b"", b'{"mlflow_run_id": "ab', b"[1, 2]", b"\xff\xfe"])
def test_damaged_state_stops_with_its_path(tmp_path: Path, content: bytes) -> None:
    uri = state_uri(str(tmp_path), "run-b")
    Path(uri).parent.mkdir(parents=True)
    Path(uri).write_bytes(content)
    with pytest.raises(RunStateError, match="run-b/raysl-run.json"):
        read_state(uri, S3)


def test_unreadable_state_is_not_taken_for_absent(tmp_path: Path) -> None:
    uri = state_uri(str(tmp_path), "run-c")
    Path(uri).mkdir(parents=True)  # a folder where the file should be: reading fails with an OSError
    with pytest.raises(RunStateError, match="cannot be read"):
        read_state(uri, S3)


def test_unknown_keys_from_a_newer_version_are_ignored(tmp_path: Path) -> None:
    uri = state_uri(str(tmp_path), "run-d")
    Path(uri).parent.mkdir(parents=True)
    Path(uri).write_text('{"mlflow_run_id": "r1", "complete": true, "future_field": 3}')
    assert read_state(uri, S3) == RunState(mlflow_run_id="r1", complete=True)
