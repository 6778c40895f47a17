"""`raysl bench gpu --smoke`: the GPU benchmark's whole code path (synthetic steps with FLOP counting, generated
JPEGs → `raysl data shard` → the training stream with data.augment_on=cpu and =gpu) on tiny models on CPU, on the
session's Ray cluster; its JSON has every field for every model, with real numbers."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from raysl.bench import gpu
from raysl.bench.gpu_models import peak_tflops

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODELS = ("ijepa", "clip", "byol")
SYNTHETIC = {"samples_per_s", "step_ms", "flops_per_step", "flops_batch_shapes", "achieved_tflops", "mfu",
             "peak_memory_gib", "skipped_steps", "seconds", "status", "error"}
E2E = {"samples_per_s", "ratio_to_synthetic", "data_wait_fraction", "peak_memory_gib", "skipped_steps", "seconds",
       "status", "error"}


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    return parser.parse_args(list(argv))


def _positive(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_smoke_reports_every_field_for_every_model(ray_cluster: None, tmp_path: Path) -> None:
    # a nominal CPU peak so MFU is computed; no time budget: this shared 2-core machine may be slow today
    result = gpu.run(_args("--smoke", "--device", "cpu", "--peak-tflops", "0.05", "--time-budget", "1e9",
                           "--workdir", str(tmp_path)))
    text = json.dumps(result, allow_nan=False)  # well-formed JSON: no NaN or infinity anywhere
    assert json.loads(text) == result
    assert result["errors"] == [] and result["skipped"] == [], result["parts"]
    assert {p["part"] for p in result["parts"]} == ({f"synthetic/{m}" for m in MODELS} | {"e2e/corpus"}
                                                   | {f"e2e/{m}/{a}" for m in MODELS for a in ("cpu", "gpu")})
    assert result["device"]["type"] == "cpu" and result["device"]["torch"] == torch.__version__
    assert result["precision"] == "fp32" and result["device"]["peak_tflops"] == 0.05
    assert result["corpus"]["status"] == "ok" and result["corpus"]["images"] == 48 and result["corpus"]["bad"] == 0
    assert set(result["models"]) == set(MODELS)
    for name, m in result["models"].items():
        assert m["backbone"] and m["image_size"] == 32 and m["batch_size"] == 8, name
        s = m["synthetic"]
        assert set(s) == SYNTHETIC and s["status"] == "ok" and s["error"] is None, (name, s)
        assert isinstance(s["flops_per_step"], int) and s["flops_per_step"] > 0, (name, s)
        assert 1 <= s["flops_batch_shapes"] <= 2  # 2 timed steps
        for key in ("samples_per_s", "step_ms", "achieved_tflops", "mfu", "seconds"):
            assert _positive(s[key]), (name, key, s)
        assert s["skipped_steps"] == 0 and s["peak_memory_gib"] is None  # no CUDA memory on CPU
        assert set(m["e2e"]) == {"cpu", "gpu"}
        for mode, e in m["e2e"].items():
            assert set(e) == E2E and e["status"] == "ok" and e["error"] is None, (name, mode, e)
            for key in ("samples_per_s", "ratio_to_synthetic", "seconds"):
                assert _positive(e[key]), (name, mode, key, e)
            assert 0 <= e["data_wait_fraction"] <= 1 and e["skipped_steps"] == 0
    targets = {t["name"]: t for t in result["targets"]}
    assert set(targets) == {"ijepa_mfu", "clip_e2e_samples_per_s"}
    assert targets["ijepa_mfu"]["value"] == result["models"]["ijepa"]["synthetic"]["mfu"]
    assert targets["clip_e2e_samples_per_s"]["value"] == max(e["samples_per_s"]
                                                             for e in result["models"]["clip"]["e2e"].values())
    assert all(t["met"] is None for t in targets.values())  # tiny models: the targets are not judged


def test_time_budget_skips_parts_but_keeps_every_field() -> None:
    result = gpu.run(_args("--smoke", "--device", "cpu", "--time-budget", "0"))
    json.dumps(result, allow_nan=False)
    assert result["errors"] == [] and len(result["skipped"]) == 3 + 1 + 6  # nothing started, not even Ray
    for m in result["models"].values():
        assert m["synthetic"]["status"] == "skipped" and m["synthetic"]["samples_per_s"] is None
        assert {e["status"] for e in m["e2e"].values()} == {"skipped"}
    assert all(t["value"] is None and t["met"] is None for t in result["targets"])


def test_peak_from_device_name_or_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    assert peak_tflops(torch.device("cpu"), None) == (None, None)
    assert peak_tflops(torch.device("cpu"), 2.5) == (2.5, "flag")
    for name, peak in (("NVIDIA H200", 989.5), ("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 PCIe", 756.0),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.05), ("NVIDIA L4", 121.0)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d=None, n=name: n)
        assert peak_tflops(torch.device("cuda"), None)[0] == peak, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d=None: "Some Future GPU")
    assert peak_tflops(torch.device("cuda"), None) == (None, None)
    assert peak_tflops(torch.device("cuda"), 700.0) == (700.0, "flag")
