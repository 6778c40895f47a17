"""CLIP on real parts: captioned scenes → WebDataset tar (with bad samples) and `raysl data shard --captions`
→ S3 (moto over HTTP) → 2-worker CLIP with feature caching on Ray → MLflow server → `raysl-clip`-style
registered model with both towers → zero-shot and retrieval beat chance on held-out scenes."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pytest

from raysl.cli import main as cli
from raysl.config import parse_config
from raysl.data.synthetic import scenes
from raysl.eval.probe import zero_shot_probe
from raysl.methods.export import load_full_model
from raysl.tracking import load_encoder
from raysl.train.launch import pretrain

from .conftest import S3

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def _tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _write_wds(s3: S3, prefix: str, n: int, shards: int = 3) -> int:
    """Scenes as WebDataset shards, captions as `txt` or as a `json` field; returns the bad-sample count."""
    data = scenes(n, seed=10)
    samples: list[tuple[str, dict[str, bytes]]] = []
    for i, (img, cap) in enumerate(zip(data["image"], data["caption"], strict=True)):
        text = {"txt": str(cap).encode()} if i % 2 else {"json": json.dumps({"caption": cap}).encode()}
        samples.append((f"s{i:05d}", {"png": bytes(img), **text}))  # type: ignore[arg-type]
    bad = [("bad-image", {"png": b"not a png", "txt": b"a red circle"}),
           ("empty-caption", {"png": bytes(data["image"][0]), "txt": b"   "}),  # type: ignore[arg-type]
           ("no-caption", {"png": bytes(data["image"][1])})]  # type: ignore[arg-type]
    samples[10:10] = bad
    for j in range(shards):
        s3.client().put_object(Bucket=s3.bucket, Key=f"{prefix}/shard-{j:03d}.tar", Body=_tar(samples[j::shards]))
    return len(bad)


def _write_folder_with_captions(root: Path, n: int) -> Path:
    data = scenes(n, seed=11)
    rows = []
    for i, (img, cap, label) in enumerate(zip(data["image"], data["caption"], data["label"], strict=True)):
        cls = root / str(label).replace(" ", "_")
        cls.mkdir(parents=True, exist_ok=True)
        (cls / f"{i:04d}.png").write_bytes(bytes(img))  # type: ignore[arg-type]
        rows.append({"file": f"{cls.name}/{i:04d}.png", "caption": cap})
    rows[0]["caption"] = ""  # counted as bad and left out of the shards
    with open(root.parent / "captions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "caption"])
        w.writeheader()
        w.writerows(rows)
    return root


def test_clip_pretrain_register_zero_shot_over_s3(s3: S3, mlflow_server: str, ray_cluster: None,
                                                  workspace: Path) -> None:
    train_uri, test_uri = f"s3://{s3.bucket}/scenes/train-wds", f"s3://{s3.bucket}/scenes/test-parquet"
    n_bad = _write_wds(s3, "scenes/train-wds", 1200)
    folder = _write_folder_with_captions(workspace / "scenes-test" / "images", 360)
    assert cli(["data", "shard", str(folder), test_uri, "--format", "parquet",
                "--captions", str(folder.parent / "captions.csv")]) == 0
    manifest = json.loads(s3.client().get_object(Bucket=s3.bucket, Key="scenes/test-parquet/manifest.json")["Body"]
                          .read())
    assert manifest["captions"] and manifest["count"] == 359 and manifest["bad"] == 1

    cfg = parse_config({
        "data": {"uri": train_uri, "max_bad_fraction": 0.05},
        "model": {"backbone": "resnet18", "cifar_stem": True, "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        "method": {"name": "clip", "embed_dim": 64, "context_length": 24, "text_width": 64, "text_heads": 2,
                   "text_layers": 2, "micro_batches": 2},
        "optim": {"name": "adamw", "lr": 1e-3, "scale_lr": False, "weight_decay": 0.1, "warmup_steps": 10},
        "train": {"steps": 40, "batch_size": 64, "num_workers": 2, "log_every": 10, "checkpoint_every": 20,
                  "storage_path": f"s3://{s3.bucket}/runs", "torch_threads": 1},
        "eval": {"uri": test_uri, "every": 20},
        "tracking": {"tracking_uri": mlflow_server, "experiment": "it-clip", "register_as": "it-clip"},
    })
    result = pretrain(cfg)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    # 2,560 samples drawn from 1,203 (over two epochs), so the bad ones are met, counted and skipped
    assert m["bad_images"] >= n_bad and m["bad_fraction"] < 0.05
    for key in ("logit_scale", "zero_shot_top1", "i2t_recall_at_1", "t2i_recall_at_5", "knn_top1"):
        assert key in m, key
    assert 1.0 < m["logit_scale"] <= 100.0
    losses = [x.value for x in client.get_metric_history(result.run_id, "loss")]
    assert losses[-1] < losses[0]

    # both towers are registered; the image tower alone loads for image-only jobs
    encoder, spec, _ = load_encoder("models:/it-clip@candidate", mlflow_server)
    assert spec["method"] == "clip" and spec["backbone"] == "resnet18"
    full, tree = load_full_model("models:/it-clip@candidate", mlflow_server)
    assert tree["method"]["name"] == "clip" and hasattr(full, "embed_texts")

    report = zero_shot_probe("models:/it-clip@candidate", test_uri, tracking_uri=mlflow_server)
    s = report.scores
    assert report.n_test == 359 and s["zero_shot_chance"] == pytest.approx(1 / 12)
    assert s["zero_shot_top1"] > 2 * s["zero_shot_chance"], s
    assert s["i2t_recall_at_10"] > 3 * 10 / 359, s  # well above chance for 10 of 359 candidates
    tags = client.get_model_version("it-clip", "1").tags
    assert float(tags["probe.zero_shot_top1"]) == pytest.approx(s["zero_shot_top1"], abs=1e-4)
