"""A data URI is listed once and the listing passed on: the method contract's checks, file list and stream, the
readers, and a labeled split's column check, label pass and image pass all reuse one `Listing`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data

from raysl import storage
from raysl.config import parse_config
from raysl.data import sources
from raysl.data.sources import Listing, data_files, list_source, read_images, source_columns, with_schemas
from raysl.methods import get_method
from raysl.storage import S3Settings, StorageError
from raysl.train.launch import known_listing
from tests.unit.test_sources import _Lazy


@pytest.fixture()
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    for reader in ("read_parquet", "read_webdataset", "read_binary_files"):
        monkeypatch.setattr(ray.data, reader, _Lazy)


@pytest.fixture()
def listings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every URI listed (storage.list_files, as the readers call it)."""
    calls: list[str] = []

    def counted(uri: str, *args: Any, **kwargs: Any) -> list[str]:
        calls.append(uri)
        return storage.list_files(uri, *args, **kwargs)

    monkeypatch.setattr(sources, "list_files", counted)
    return calls


@pytest.fixture()
def schema_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = pq.read_schema

    def counted(path: str, *args: Any, **kwargs: Any) -> pa.Schema:
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pq, "read_schema", counted)
    return calls


def _images(root: Path, n: int = 6) -> Path:
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"c{i % 2}" / f"{i}.png").write_bytes(b"png")
    (root / "manifest.json").write_text("{}")
    return root


def _parquet(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        pq.write_table(pa.table({"image": pa.array([b"\xff"]), "label": ["cat"], "key": [f"k{i}"]}),
                       root / f"part-{i}.parquet")
    return root


def test_the_driver_checks_and_hands_out_files_from_one_listing(tmp_path: Path, listings: list[str]) -> None:
    cfg = parse_config({"data": {"uri": str(_images(tmp_path / "imgs"))}})
    method = get_method(cfg.method.name)
    listing = method.check_source(cfg, S3Settings())
    files = method.source_files(cfg, S3Settings(), listing)
    assert isinstance(listing, Listing) and listing.fmt == "images"
    assert files == list(listing.files) and len(files) == 6 and files == sorted(files)
    assert listings == [cfg.data.uri]


def test_a_classifier_and_its_labeled_subset_reuse_the_listing(tmp_path: Path, listings: list[str],
                                                               no_ray: None) -> None:
    tree = {"data": {"uri": str(_images(tmp_path / "imgs"))}, "method": {"name": "classify", "classes": ["c0", "c1"]}}
    cfg = parse_config(tree)
    method = get_method("classify")
    listing = method.check_source(cfg, S3Settings())
    assert method.source_files(cfg, S3Settings(), listing) == list(listing.files)
    ds, _ = method.open_source(cfg, S3Settings(), listing=listing)
    assert isinstance(ds, _Lazy) and ds.files == list(listing.files)
    assert len(listings) == 1


def test_parquet_columns_labels_and_images_read_each_footer_once(tmp_path: Path, listings: list[str],
                                                                 schema_reads: list[str], no_ray: None) -> None:
    listing = with_schemas(list_source(str(_parquet(tmp_path / "pq")), s3=S3Settings()), S3Settings())
    assert listing.schemas is not None and len(schema_reads) == 3
    assert {"image", "key", "label"} <= source_columns(listing, label_column="label")
    assert isinstance(read_images(listing, s3=S3Settings(), with_labels=True), _Lazy)
    assert len(schema_reads) == 3 and len(listings) == 1
    # without the schemas: the column check reads the first footer only, and still does not list again
    plain = list_source(str(tmp_path / "pq"), s3=S3Settings())
    assert "label" in source_columns(plain, label_column="label")
    assert len(schema_reads) == 4 and len(listings) == 2


def test_a_listing_is_read_as_listed_and_a_different_format_is_refused(tmp_path: Path, listings: list[str],
                                                                      no_ray: None) -> None:
    listing = list_source(str(_images(tmp_path / "imgs")))
    assert data_files(listing) == list(listing.files) and "manifest.json" not in "".join(listing.files)
    assert read_images(listing, rows_per_block=None).files == list(listing.files)
    with pytest.raises(ValueError, match="was listed as 'images'"):
        data_files(listing, "parquet")
    assert len(listings) == 1
    assert repr(listing).endswith("'images', 6 files)")  # a listing of millions of files prints as one line
    part = read_images(listing, files=list(listing.files[:2]), rows_per_block=None)  # a worker's part
    assert part.files == list(listing.files[:2])


def test_a_uri_with_nothing_of_its_format_fails_naming_it(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="nothing-here.* matches nothing"):
        list_source(str(tmp_path / "nothing-here"))
    with pytest.raises(StorageError, match=r"imgs.* holds no parquet files"):
        list_source(str(_images(tmp_path / "imgs")), "parquet")
    one = tmp_path / "imgs" / "c0" / "0.png"
    assert list_source(str(one)).files == (str(one),)  # a single file is its own listing


def test_pretrain_reuses_a_listing_only_of_the_same_uri_and_format(tmp_path: Path) -> None:
    listing = list_source(str(_images(tmp_path / "imgs")))
    assert known_listing([listing], listing.uri) is listing
    assert known_listing([listing], listing.uri, "images") is listing
    assert known_listing([listing], listing.uri, "parquet") is None
    assert known_listing([listing], str(tmp_path / "other")) is None
    assert known_listing([listing], None) is None


def test_finetuning_lists_each_split_once_for_its_labels_and_every_run(tmp_path: Path, listings: list[str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Labels of both splits, then the pretrained and the random-init run (check, training files, evaluation):
    two listings in all, one a split."""
    import numpy as np

    from raysl.eval import finetune
    from raysl.train import launch

    data, test = _images(tmp_path / "train"), _images(tmp_path / "test")
    spec = {"backbone": "resnet10t", "cifar_stem": True, "image_size": 32, "backbone_kwargs": {},
            "mean": [0.5] * 3, "std": [0.5] * 3}
    monkeypatch.setattr(finetune, "prepare_source", lambda *a: finetune.Source("models:/m@a", spec, {}, "w", "m"))
    monkeypatch.setattr(finetune, "_tag_version", lambda *a: None)

    def labels(source: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        assert isinstance(source, Listing), "read_labels was given a URI to list again"
        return np.array(source.files), np.array([Path(f).parent.name for f in source.files])

    seen: list[tuple[Listing | None, Listing | None]] = []

    def trained(cfg: Any, s3: Any, name: str, resume: bool, known: Any) -> launch.PretrainResult:
        seen.append((launch.known_listing(known, cfg.data.uri), launch.known_listing(known, cfg.eval.uri)))
        return launch.PretrainResult(name, "", "m", "1", "ckpt", {"test_top1": 0.5})

    monkeypatch.setattr(finetune, "read_labels", labels)
    monkeypatch.setattr(launch, "_pretrain", trained)
    report = finetune.finetune_classification("models:/m@a", str(data), str(test), steps=2,
                                              storage_path=str(tmp_path / "runs"), tracking_uri="sqlite:///x.db")
    assert [r.init for r in report.runs] == ["pretrained", "random"]
    assert sorted(listings) == sorted([str(data), str(test)])
    assert all(d is not None and d.uri == str(data) and t is not None and t.uri == str(test) for d, t in seen)
