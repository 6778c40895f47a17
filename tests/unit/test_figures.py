"""Pictures: the augmentation grid (which columns, its shape, normalization undone), the PCA embedding plot,
and both landing in MLflow as artifacts (a pretraining run's first batch; the probe's run)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raysl.data.views import normalize
from raysl.figures import batch_grid, batch_png, embedding_plot, image_columns, pca_2d, to_uint8

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _batch(n: int = 10, size: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return {"view1": raw, "view2": normalize(raw.flip(-1), MEAN, STD), "gray": raw[:, :1],
            "text": torch.zeros(n, 77, dtype=torch.long), "mask": torch.zeros(n, 4, 8, 8, dtype=torch.bool),
            "clip": torch.zeros(n, 2, 3, size, size)}


def test_image_columns_are_found_by_shape_and_dtype() -> None:
    # not tokens (2-D), not a bool mask with 4 "channels", not a 5-D clip
    assert image_columns(_batch()) == ["view1", "view2", "gray"]


def test_normalization_is_undone() -> None:
    raw = _batch()["view1"]
    back = to_uint8(normalize(raw, MEAN, STD), MEAN, STD)
    assert back.dtype == np.uint8 and back.shape == (10, 32, 32, 3)
    assert np.abs(back.astype(int) - raw.permute(0, 2, 3, 1).numpy().astype(int)).max() <= 1
    assert to_uint8(raw[:, :1], MEAN, STD).shape == (10, 32, 32, 3)  # grey → RGB


def test_grid_shape_rows_are_columns_samples_across() -> None:
    grid, rows = batch_grid(_batch(), MEAN, STD, samples=8, min_tile=96, pad=2)
    assert rows == ["view1", "view2", "gray"]
    tile = 96  # 32 px enlarged 3×
    assert grid.shape == (3 * (tile + 2) + 2, 8 * (tile + 2) + 2, 3) and grid.dtype == np.uint8
    # sample 0's second view is its first view mirrored: the un-normalized pixels match
    v1 = grid[2 : 2 + tile, 2 : 2 + tile]
    v2 = grid[2 + tile + 2 : 2 + 2 * tile + 2, 2 : 2 + tile]
    assert np.abs(v1[:, ::-1].astype(int) - v2.astype(int)).max() <= 1


def test_grid_needs_an_image_column() -> None:
    with pytest.raises(ValueError, match="no image-like column"):
        batch_grid({"text": torch.zeros(4, 77)}, MEAN, STD)


def test_pca_finds_the_direction_of_largest_variance() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16)) * 0.1
    x[:, 3] += np.linspace(-5, 5, 200)
    xy = pca_2d(x)
    assert xy.shape == (200, 2)
    assert abs(np.corrcoef(xy[:, 0], x[:, 3])[0, 1]) > 0.99
    assert xy[:, 0].var() > 10 * xy[:, 1].var()


def test_embedding_plot_writes_a_png_of_sane_size() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    feats = rng.normal(size=(300, 32)) + labels[:, None]
    png = embedding_plot({"pretrained": feats, "random init": rng.normal(size=(300, 32))}, labels,
                         ["cat", "dog", "bird"], title="test")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(png) < 2_000_000
    w, h = Image.open(io.BytesIO(png)).size
    assert 600 <= w <= 2000 and 300 <= h <= 1000


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_pictures_land_in_mlflow(mlflow_uri: str) -> None:
    from raysl import tracking
    from raysl.eval.probe import ProbeReport, _log
    from raysl.metric_logger import MetricLogger

    run_id = tracking.start_run(mlflow_uri, "figures", "r", {}, {})
    logger = MetricLogger(mlflow_uri, run_id)

    def broken() -> bytes:
        raise RuntimeError("cannot draw")

    logger.log_image(broken, "augmentations/broken.png")  # a drawing error is not an outage: metrics still go
    logger.log_image(lambda: batch_png(_batch(), MEAN, STD), "augmentations/first_batch.png")
    logger.log({"loss": 1.0}, 1)
    logger.close()
    client = tracking.client(mlflow_uri)
    assert [f.path for f in client.list_artifacts(run_id, "augmentations")] == ["augmentations/first_batch.png"]
    assert client.get_run(run_id).data.metrics["loss"] == 1.0

    report = ProbeReport("models:/x@candidate", 10, 5, {"pretrained_knn_top1": 0.5})
    _log(mlflow_uri, "models:/x@candidate", None, {}, report, b"\x89PNG fake")
    exp = client.get_experiment_by_name("raysl-probe")
    (probe_run,) = client.search_runs([exp.experiment_id])
    assert [f.path for f in client.list_artifacts(probe_run.info.run_id, "figures")] == ["figures/embeddings_pca.png"]
    db_dir = Path(mlflow_uri[len("sqlite:///") :]).parent  # next to the database, not in the working directory
    assert (db_dir / "mlartifacts" / probe_run.info.run_id / "artifacts" / "figures").is_dir()
