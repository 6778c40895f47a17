"""The torch DataLoader sides `raysl bench ingest` measures raysl's Ray Data reader against (baselines, not
library code).

- `ShardRows`: hand-tuned. The same shards' bytes and the same batch transform training runs
  (`BYOL.view_transform(cfg)`), called once per batch through `__getitems__` (the DataLoader's batched fetch).
  WebDataset members are read with `os.pread` at their tar offsets; a Parquet file's image column is read
  whole the first time a worker needs one of its rows, then kept.
- `UserViews`: what a user writes without raysl: per sample, open the JPEG file, full PIL decode, two views
  of torchvision.transforms.v2 with BYOL's recipe (paper, Table 6), `PILToTensor`, the default collate.

Both run in `workers` forkserver processes (fork hung here: forked copies of the Ray driver's gRPC state),
persistent across passes. Tensors are made from writable arrays only (no "non-writable" warning).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

WDS_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_PRELOAD = ["torch", "torchvision", "raysl.data.views"]


def shard_index(folder: Path, fmt: str) -> list[tuple[str, int, int]]:
    """One (file, offset, size) per WebDataset image member, or (file, row, 0) per Parquet row."""
    rows: list[tuple[str, int, int]] = []
    if fmt == "parquet":
        for f in sorted(folder.glob("*.parquet")):
            rows += [(str(f), i, 0) for i in range(pq.ParquetFile(f).metadata.num_rows)]
        return rows
    for f in sorted(folder.glob("*.tar")):
        with tarfile.open(f) as tar:
            rows += [(str(f), m.offset_data, m.size) for m in tar.getmembers()
                     if m.isfile() and m.name.lower().endswith(WDS_SUFFIXES)]
    return rows


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing `a` when torch may (writable), else of a copy: never the non-writable warning."""
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _whole_batch(batch: Any) -> Any:
    """collate_fn for a dataset whose `__getitems__` already returns the batch."""
    return batch


class ShardRows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Rows of local shards through a batch transform, a whole batch per `__getitems__` call."""

    def __init__(self, index: list[tuple[str, int, int]], fmt: str, transform: Any) -> None:
        self.index, self.fmt, self.transform = index, fmt, transform
        self._fds: dict[str, int] = {}
        self._columns: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # each worker opens its own files
        return {**self.__dict__, "_fds": {}, "_columns": {}}

    def __len__(self) -> int:
        return len(self.index)

    def _read(self, i: int) -> bytes:
        path, pos, size = self.index[i]
        if self.fmt == "webdataset":
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return os.pread(self._fds[path], size, pos)
        if path not in self._columns:
            self._columns[path] = pq.read_table(path, columns=["image"]).column("image").combine_chunks()
        return bytes(self._columns[path][pos].as_py())

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        images = np.empty(len(indices), dtype=object)
        images[:] = [self._read(i) for i in indices]
        out = self.transform({"image": images, "key": np.array([str(i) for i in indices])})
        return {k: _tensor(out[k]) for k in ("view1", "view2", "valid")}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])


def user_pipeline(size: int, blur_p: float, solarize_p: float) -> Any:
    """One BYOL view as a user writes it with torchvision.transforms.v2 on a PIL image."""
    import torchvision.transforms.v2 as T

    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # ~10% of the side, odd (BYOL: 23 at 224)
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
        T.RandomHorizontalFlip(0.5),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(0.2),
        T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
        T.RandomSolarize(128, p=solarize_p),
        T.PILToTensor(),
    ])


class UserViews(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Per sample: the JPEG file, fully decoded by PIL, two BYOL views (blur p 1.0 / 0.1, solarize 0 / 0.2)."""

    def __init__(self, paths: list[str], size: int) -> None:
        self.paths = paths
        self.views = (user_pipeline(size, 1.0, 0.0), user_pipeline(size, 0.1, 0.2))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        with Image.open(self.paths[i]) as f:
            img = f.convert("RGB")
        return {"view1": self.views[0](img), "view2": self.views[1](img)}


def _mp_context() -> Any:
    ctx = torch.multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _noop() -> None:
    pass


def start_forkserver() -> None:
    """Start the forkserver (it imports torch, torchvision and raysl.data.views once) before any timing."""
    p = _mp_context().Process(target=_noop)
    p.start()
    p.join()


def loader(dataset: torch.utils.data.Dataset[Any], batch_size: int, workers: int, seed: int = 0
           ) -> torch.utils.data.DataLoader[Any]:
    """A shuffled DataLoader over `dataset`: `workers` persistent forkserver workers, batches of
    `batch_size` (the last one partial); a `ShardRows` fetches each batch in one call."""
    batched = isinstance(dataset, ShardRows)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=True,
        multiprocessing_context=_mp_context(), generator=torch.Generator().manual_seed(seed),
        collate_fn=_whole_batch if batched else None)
