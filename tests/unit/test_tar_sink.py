"""WebDataset shards from raysl.data.tar_sink: the WebDataset layout, every field back byte for byte, and plain
tar headers (no PAX extended header per member, which doubled the cost of reading a shard)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
from ray.data.block import BlockAccessor

from raysl.data.tar_sink import TarShardSink


def test_members_are_key_dot_field_with_plain_headers_and_exact_bytes(tmp_path: Path) -> None:
    long_key = "class-" + "x" * 150  # past ustar's 100-character name field: GNU format keeps it whole
    table = pa.table({"__key__": ["a", "b", long_key], "jpg": [b"\xff\xd8one", None, b"\xff\xd8three"],
                      "png": [None, b"\x89PNGtwo", None], "cls": ["cat", "dog", "émeu"]})
    buf = io.BytesIO()
    TarShardSink(str(tmp_path)).write_block_to_file(BlockAccessor.for_block(table), buf)
    body = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        members = tar.getmembers()
        got = {m.name: tar.extractfile(m).read() for m in members}  # type: ignore[union-attr]
    assert got == {"a.jpg": b"\xff\xd8one", "a.cls": b"cat", "b.png": b"\x89PNGtwo", "b.cls": b"dog",
                   f"{long_key}.jpg": b"\xff\xd8three", f"{long_key}.cls": "émeu".encode()}
    assert [m.name for m in members][:2] == ["a.jpg", "a.cls"]  # a sample's fields stay together, in order
    assert all(not m.pax_headers and isinstance(m.mtime, int) for m in members)
    assert b"PaxHeader" not in body
