"""WebDataset shards written with plain tar headers, so that reading them costs half as much.

Ray's own WebDataset writer stamps each member with a fractional `time.time()`, which Python's tarfile can only
store in a PAX extended header: a second 512-byte header before every member, which every reader then parses.
Ray's reader (Python's tarfile) took 0.128 s for a 1,250-image shard written that way and 0.062 s for the same
shard with plain headers (issue 12 note); at 32 px that was about 15% of each ingest task. This sink is Ray's
extension point for writers (`Dataset.write_datasink`) writing each sample's fields as members `{key}.{field}`,
the WebDataset layout, with whole-second times in GNU-format headers (which also keep names of any length).
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Iterator
from typing import Any

from ray.data.block import BlockAccessor
from ray.data.datasource.file_datasink import BlockBasedFileDatasink


class TarShardSink(BlockBasedFileDatasink):
    """One tar per block; for each row, a member per column not starting with `__` and not None (bytes or
    str, written as UTF-8), named `{row['__key__']}.{column}`."""

    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__(path, file_format="tar", **kwargs)

    def write_block_to_file(self, block: BlockAccessor, file: Any) -> None:
        mtime = int(time.time())
        with tarfile.open(fileobj=file, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            rows: Iterator[Any] = block.iter_rows(public_row_format=True)
            for item in rows:
                row: dict[str, Any] = dict(item)
                key = row["__key__"]
                for field, value in row.items():
                    if value is None or field.startswith("__"):
                        continue
                    data = value if isinstance(value, bytes) else str(value).encode("utf-8")
                    info = tarfile.TarInfo(f"{key}.{field}")
                    info.size, info.mtime, info.mode = len(data), mtime, 0o644
                    info.uname = info.gname = "data"
                    tar.addfile(info, io.BytesIO(data))
