"""Readers: wrong-typed image cells are bad samples, not crashes; every Parquet file's schema is checked up
front; odd WebDataset labels do not stop a read; a caller can give the exact files to read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data

from raysl.data import sources
from raysl.data.sources import _image_bytes, _norm_parquet, _norm_wds, read_images
from raysl.data.views import EvalView
from tests.unit.test_views import _rgb


class _Lazy:
    """Stands in for a ray.data.Dataset: records what the reader asked for, starts nothing."""

    def __init__(self, files: Any, **kwargs: Any) -> None:
        self.files, self.kwargs = list(files), kwargs

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self


@pytest.fixture()
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    for reader in ("read_parquet", "read_webdataset", "read_binary_files"):
        monkeypatch.setattr(ray.data, reader, _Lazy)


@pytest.mark.parametrize(("value", "expected"), [
    (b"\x89PNG", b"\x89PNG"), (bytearray(b"ab"), b"ab"), (memoryview(b"cd"), b"cd"), (np.bytes_(b"ef"), b"ef"),
    ({"bytes": b"gh", "path": "x.png"}, b"gh"), ({"bytes": None, "path": "x.png"}, b""),
    ({"bytes": "not bytes"}, b""), ("a/path.jpg", b""), (5, b""), (None, b""), (3.5, b""),
])
def test_only_bytes_like_cells_are_image_bytes(value: Any, expected: bytes) -> None:
    assert _image_bytes(value) == expected


def test_an_int_image_cell_is_a_counted_bad_sample_not_zero_bytes() -> None:
    batch = {"image": np.array([_rgb(), 5, "x.jpg"], dtype=object)}
    rows = _norm_parquet(batch, "image", None, None)
    assert [len(b) > 0 for b in rows["image"]] == [True, False, False]
    assert EvalView(16, 10**7)(rows)["valid"].tolist() == [True, False, False]


def _write(path: Path, **columns: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def test_a_string_image_column_fails_up_front_naming_column_type_and_what_is_accepted(tmp_path: Path,
                                                                                       no_ray: None) -> None:
    _write(tmp_path / "a.parquet", image=pa.array(["x.jpg"]), key=pa.array(["k"]))
    with pytest.raises(ValueError, match=r"'image' of .*a\.parquet has type string.*binary or large_binary.*struct"):
        read_images(str(tmp_path), fmt="parquet")
    _write(tmp_path / "a.parquet", image=pa.array([5]))
    with pytest.raises(ValueError, match="has type int64"):
        read_images(str(tmp_path), fmt="parquet")


def test_binary_large_binary_and_hf_struct_image_columns_are_accepted(tmp_path: Path, no_ray: None) -> None:
    hf_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    hf = pa.array([{"bytes": b"\xff", "path": "a.jpg"}], type=hf_type)
    _write(tmp_path / "hf" / "a.parquet", image=hf)
    _write(tmp_path / "large" / "a.parquet", image=pa.array([b"\xff"], type=pa.large_binary()))
    for sub in ("hf", "large"):
        assert isinstance(read_images(str(tmp_path / sub), fmt="parquet"), _Lazy)
    bad = pa.array([{"bytes": "s", "path": "a.jpg"}], type=pa.struct([("bytes", pa.string()), ("path", pa.string())]))
    _write(tmp_path / "bad" / "a.parquet", image=bad)
    with pytest.raises(ValueError, match="has type struct"):
        read_images(str(tmp_path / "bad"), fmt="parquet")


def test_every_parquet_file_is_checked_and_the_one_lacking_a_column_is_named(tmp_path: Path, no_ray: None) -> None:
    for i in range(5):
        cols: dict[str, Any] = {"image": pa.array([b"\xff"]), "label": pa.array(["cat"])}
        _write(tmp_path / "a" / f"part-{i}.parquet", **({"img": cols["image"]} if i == 3 else cols))
        _write(tmp_path / "b" / f"part-{i}.parquet", **({"image": cols["image"]} if i == 2 else cols))
    with pytest.raises(ValueError, match=r"'image' is not a column of .*a/part-3\.parquet \(1 of 5 file"):
        read_images(str(tmp_path / "a"), fmt="parquet")
    with pytest.raises(ValueError, match=r"label_column: 'label' is not a column of .*b/part-2\.parquet"):
        read_images(str(tmp_path / "b"), fmt="parquet", label_column="label", with_labels=True)


def test_a_label_column_some_files_lack_is_not_picked_automatically(tmp_path: Path, no_ray: None) -> None:
    _write(tmp_path / "a.parquet", image=pa.array([b"\xff"]), label=pa.array(["cat"]))
    _write(tmp_path / "b.parquet", image=pa.array([b"\xff"]))
    with pytest.raises(ValueError, match="no label column"):
        read_images(str(tmp_path), fmt="parquet", with_labels=True)


def test_a_label_that_is_not_utf8_does_not_stop_the_read() -> None:
    batch = {"__key__": np.array(["a", "b", "c"]), "png": np.array([b"1", b"2", b"3"], dtype=object),
             "cls": np.array([b"cat\n", b"\xff\xfedog", None], dtype=object)}
    labels = _norm_wds(batch, with_labels=True)["label"].tolist()
    assert labels[0] == "cat" and labels[2] == ""
    assert labels[1] == "\ufffd\ufffddog"  # a name no class has: counted downstream like an unknown label


def test_a_sample_missing_a_member_is_a_bad_sample_not_a_crash() -> None:
    """Ray's WebDataset reader fills a member a sample lacks with NaN (pandas), not None."""
    nan = float("nan")
    batch = {"__key__": np.array(["a", "b"]), "png": np.array([b"1", nan], dtype=object),
             "cls": np.array([nan, b"dog"], dtype=object)}
    out = _norm_wds(batch, with_labels=True)
    assert out["image"].tolist() == [b"1", b""] and out["label"].tolist() == ["", "dog"]


def test_given_files_are_read_instead_of_listing_the_uri(tmp_path: Path, no_ray: None) -> None:
    paths = [_write(tmp_path / f"p{i}.parquet", image=pa.array([b"\xff"])) for i in range(3)]
    ds = read_images(str(tmp_path), fmt="parquet", files=[str(paths[2]), f"file://{paths[0]}"], rows_per_block=None)
    assert isinstance(ds, _Lazy) and ds.files == [str(paths[2]), str(paths[0])]
    auto = read_images(str(tmp_path / "elsewhere"), files=[str(paths[1])], rows_per_block=None)  # uri not listed
    assert isinstance(auto, _Lazy) and auto.files == [str(paths[1])]
    with pytest.raises(sources.StorageError, match="no files given"):
        read_images(str(tmp_path), files=[])
    assert sources.given_paths(["s3://bucket/a/b.tar", "bucket/a/c.tar"], "s3://bucket/a") == ["bucket/a/b.tar",
                                                                                           "bucket/a/c.tar"]
