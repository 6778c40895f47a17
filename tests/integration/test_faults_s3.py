"""Fault table: the S3 endpoint unreachable for ~20 s mid-run. Data and checkpoints live on the moto server,
reached through a TCP proxy the test cuts; reads and checkpoint writes retry and the run completes."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest

from raysl.train.launch import pretrain

from .conftest import S3
from .fault_data import byol_cfg, write_poisoned
from .faults import Proxy, outage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_s3_cut_mid_run_is_survived(s3: S3, mlflow_server: str, ray_cluster: None, workspace: Path) -> None:
    local = workspace / "faults-s3-data"
    write_poisoned(local, bad_fraction=0.0)
    client = s3.client()
    for f in sorted(local.iterdir()):
        client.upload_file(str(f), s3.bucket, f"faults-s3/data/{f.name}")
    proxy = Proxy(int(urlparse(s3.endpoint).port or 80))
    storage = f"s3://{s3.bucket}/faults-s3/runs"
    cfg = byol_cfg(f"s3://{s3.bucket}/faults-s3/data", storage, mlflow_server, steps=24,
                   train__run_name="s3-cut", s3__endpoint_url=proxy.url)

    def checkpoints() -> list[str]:
        return sorted({k.split("/")[3] for k in s3.keys("faults-s3/runs/s3-cut/") if "/checkpoint_" in k})

    t, cut = outage(proxy, 20, lambda: len(checkpoints()) >= 1, "the first checkpoint in S3")
    try:
        result = pretrain(cfg)
    finally:
        t.join(60)
        proxy.close()
    assert len(cut) == 2, "the outage did not happen during the run"
    assert result.metrics["step"] == 24 and result.model_version.isdigit()
    assert result.checkpoint_uri.startswith(f"s3://{s3.bucket}/faults-s3/runs/s3-cut/checkpoint_")
    assert len(checkpoints()) >= 2  # checkpoints were written after the cut, too
