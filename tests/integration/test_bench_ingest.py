"""`raysl bench ingest` end to end on the session's Ray cluster: a small CIFAR-like corpus, one round, and a
well-formed JSON report with every comparison's ratios positive and finite."""

from __future__ import annotations

import json
import math
import time

import pytest

from raysl.cli import main as cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
SIDE_KEYS = {"vs_same_transform_dataloader": ("ray", "dataloader"), "vs_user_dataloader": ("ray", "user_dataloader")}


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_bench_ingest_reports_every_ratio(ray_cluster: None, capfd: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    assert cli(["bench", "ingest", "--images", "200", "--kind", "cifar", "--rounds", "1"]) == 0
    elapsed = time.monotonic() - t0
    out, err = capfd.readouterr()
    report = json.loads(out)
    assert report["benchmark"] == "ingest"
    cfg = report["config"]
    assert cfg["images"] == [200] and list(cfg["kinds"]) == ["cifar"] and cfg["rounds"] == 1
    assert cfg["formats"] == ["parquet", "webdataset"] and cfg["s3"] is False
    assert cfg["data"]["cifar/200"]["images"] == 200 and cfg["data"]["cifar/200"]["batch_size"] == 200
    assert cfg["data"]["cifar/200"]["epochs_per_pass"] == 1  # one shard: too few files to read epochs together
    assert set(report["results"]) == {"cifar/200/parquet/local", "cifar/200/webdataset/local"}
    for key, entry in report["results"].items():
        assert set(entry) == set(SIDE_KEYS), key
        for comparison, (a, b) in SIDE_KEYS.items():
            steady, startup = entry[comparison]["steady"], entry[comparison]["startup"]
            for k in ("ratio", "median_paired_ratio", f"{a}_img_s", f"{b}_img_s"):
                assert _positive(steady[k]), (key, comparison, k, steady)
            assert len(steady["paired_ratios"]) == 1 and all(map(_positive, steady["paired_ratios"]))
            for k in ("ratio", f"{a}_s", f"{b}_s", f"{a}_img_s", f"{b}_img_s"):
                assert _positive(startup[k]), (key, comparison, k, startup)
            assert report["summary"][key][comparison] == {"steady": steady["ratio"], "startup": startup["ratio"]}
    sides = report["sides"]["cifar/200"]
    for side in sides.values():
        assert side["images_delivered"] == 200 and len(side["rounds_img_s"]) == 1
        cpu = side["cpu_s_per_1000_images"]
        assert set(cpu) == {"driver", "ray_workers", "ray_control", "loader_workers"}, cpu
        assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in cpu.values()), cpu
    # the work is charged where it ran: Ray's task workers for the Ray side, the DataLoader's for the loader
    assert sides["parquet/local/ray"]["cpu_s_per_1000_images"]["ray_workers"] > 0
    assert sides["parquet/dataloader"]["cpu_s_per_1000_images"]["loader_workers"] > 0
    assert "not writable" not in err  # the DataLoader sides hand torch writable arrays only
    print(f"bench ingest took {elapsed:.0f} s")
