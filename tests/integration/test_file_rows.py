"""A file's counted rows (raysl.data.file_rows) are the rows Ray's reader yields for it: a span ends an epoch on
that count, so a count above the read would hold batches back and one below would fail the run. Checked against a
real read of awkward files (a null image, WebDataset members without an extension, a directory, a sample without an
image, dotted and nested names), from a local folder and from the S3 endpoint."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysl.data.file_rows import count_rows
from raysl.data.sources import read_images
from raysl.storage import S3Settings, resolve
from tests.integration.conftest import S3, png

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _tar(path: Path) -> None:
    image = png(np.zeros((8, 8), dtype=np.uint8))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("a.png", image)
        add("a.cls", b"3")
        add("b.png", image)
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        add("README", b"no extension: not a sample member")
        add("c.cls", b"1")  # a sample without an image: a row, counted bad downstream
        add("d.x.png", image)  # key "d"
        add("sub/e.png", image)  # key "sub/e"
        add("sub/e.txt", b"caption")


def _parquet(path: Path) -> None:
    image = png(np.zeros((8, 8), dtype=np.uint8))
    column = [image] * 36 + [None]  # a null image: a row, counted bad downstream
    pq.write_table(pa.table({"image": pa.array(column, pa.binary())}), path, row_group_size=10)


def _read_rows(uri: str, files: list[str]) -> dict[str, int]:
    ds = read_images(uri, files=files, paths=True, read_tasks=len(files))
    paths = [str(p) for b in ds.iter_batches(batch_format="numpy", batch_size=None) for p in b["path"]]
    return {f: paths.count(f) for f in dict.fromkeys(paths)}


def test_counted_rows_are_the_rows_the_reader_yields(ray_cluster: None, tmp_path: Path, s3: S3) -> None:
    for fmt, write, name in (("webdataset", _tar, "x.tar"), ("parquet", _parquet, "x.parquet")):
        local = tmp_path / fmt
        local.mkdir()
        write(local / name)
        write(local / f"2-{name}")
        remote = f"s3://{s3.bucket}/file-rows/{fmt}"
        for f in sorted(local.iterdir()):
            s3.client().upload_file(str(f), s3.bucket, f"file-rows/{fmt}/{f.name}")
        for uri in (str(local), remote):
            fs, root = resolve(uri, S3Settings.resolve())
            files = [f"{root}/{name}", f"{root}/2-{name}"]
            read = _read_rows(uri, files)
            assert set(read) == set(files)
            assert {f: count_rows(f, fs) for f in files} == read, (fmt, uri)
            assert read[files[0]] == (5 if fmt == "webdataset" else 37)
