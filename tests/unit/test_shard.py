"""Sharding: sample keys are unique, stable and valid WebDataset keys; a destination that holds objects is
refused (a rerun would duplicate every sample) unless --overwrite, which empties it first."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raysl import cli
from raysl.data.shard import claim_destination, sample_key

# Ray Data's WebDataset reader: the key is the member name up to the first dot of its base name
_WDS_SPLIT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def test_paths_that_used_to_fold_together_get_distinct_keys() -> None:
    paths = ["a/b.jpg", "a_b.png", "a.b.jpg", "a/b.png", "a_b.jpg"]
    keys = [sample_key(p) for p in paths]
    assert len(set(keys)) == len(paths), keys
    for key in keys:
        assert "." not in key and "/" not in key
        match = _WDS_SPLIT.match(f"{key}.jpg")
        assert match is not None and match.group(1) == key  # read back as the same key
    assert all(k.startswith("a_b-") for k in keys)  # still readable


def test_keys_are_stable_across_runs_and_machines() -> None:
    assert sample_key("cats/0001.jpg") == sample_key("cats/0001.jpg") == "cats_0001-3f0aac88"


def _fill(folder: Path, n: int) -> Path:
    for i in range(n):
        (folder / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"sub{i % 2}" / f"part-{i}.tar").write_bytes(b"x")
    return folder


def test_a_missing_or_empty_destination_is_taken(tmp_path: Path) -> None:
    claim_destination(str(tmp_path / "new"), overwrite=False)
    (tmp_path / "empty").mkdir()
    claim_destination(str(tmp_path / "empty"), overwrite=False)


def test_a_destination_holding_objects_is_refused_by_name_and_count(tmp_path: Path) -> None:
    dst = _fill(tmp_path / "out", 3)
    with pytest.raises(ValueError, match=rf"{re.escape(str(dst))}.* holds 3 object\(s\).*--overwrite"):
        claim_destination(str(dst), overwrite=False)
    assert len(list(dst.rglob("*.tar"))) == 3  # untouched


def test_overwrite_empties_the_destination_but_never_the_source(tmp_path: Path) -> None:
    dst = _fill(tmp_path / "out", 3)
    claim_destination(str(dst), overwrite=True, keep=(str(tmp_path / "images"),))
    assert dst.is_dir() and not any(dst.rglob("*"))
    src = _fill(tmp_path / "out" / "images", 2)
    with pytest.raises(ValueError, match="would delete .*images.* inside the destination"):
        claim_destination(str(tmp_path / "out"), overwrite=True, keep=(str(src),))
    assert len(list(src.rglob("*.tar"))) == 2
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        claim_destination(str(tmp_path / "file"), overwrite=True)


def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import raysl.train.launch

    def refuse() -> None:
        raise AssertionError("the destination must be checked before Ray starts")

    monkeypatch.setattr(raysl.train.launch, "init_ray", refuse)


def test_shard_and_embed_commands_refuse_a_non_empty_destination_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _no_ray(monkeypatch)
    import raysl.data.shard

    def no_shard(*args: object, **kwargs: object) -> None:
        raise AssertionError("unreachable")

    dst = _fill(tmp_path / "out", 2)
    assert cli.main(["data", "shard", str(tmp_path / "images"), str(dst), "--format", "parquet"]) == 2
    assert cli.main(["embed", "--model", "models:/m@a", "--data", str(tmp_path), "--out", str(dst)]) == 2
    assert capsys.readouterr().err.count("holds 2 object(s)") == 2  # the console's error lines
    monkeypatch.setattr(raysl.data.shard, "shard", no_shard)  # with --overwrite the command goes on to shard
    with pytest.raises(AssertionError, match="before Ray starts"):
        cli.main(["data", "shard", str(tmp_path / "images"), str(dst), "--format", "parquet", "--overwrite"])
