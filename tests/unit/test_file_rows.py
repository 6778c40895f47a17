"""Row counts of data files without decoding them (raysl.data.file_rows); that they equal what Ray's reader yields is
tests/integration/test_file_rows.py."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import raysl.data.file_rows as file_rows


def test_parquet_rows_come_from_the_footer(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"image": pa.array([b"x", None, b"y"], pa.binary())}), path, row_group_size=2)
    assert file_rows.count_rows(str(path), pafs.LocalFileSystem()) == 3
    assert file_rows.count_rows(str(tmp_path / "b.jpg"), pafs.LocalFileSystem()) == 1  # an image folder's file


def test_a_big_tar_is_not_read_again_to_count_its_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("a.jpg", "a.cls", "b.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"xyz"))
    fs = pafs.LocalFileSystem()
    assert file_rows.count_rows(str(path), fs) == 2  # samples, not members
    monkeypatch.setattr(file_rows, "MAX_TAR_BYTES", path.stat().st_size - 1)
    assert file_rows.count_rows(str(path), fs) is None
