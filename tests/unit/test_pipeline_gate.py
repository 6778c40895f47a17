"""The gate and the evaluation step against a real MLflow registry (SQLite, no server, no Ray): the margin
decides, the reason and both scores are tagged, an unscorable champion is never replaced, and a rerun of a
gate that already moved the alias moves nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from raysl.pipeline.config import PipelineConfig
from raysl.pipeline.run import Pipeline, PipelineError

NAME = "gate-encoder"


@pytest.fixture()
def pipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from raysl import tracking

    client = tracking.client(uri)
    client.create_registered_model(NAME)
    for _ in range(3):  # versions whose artifacts do not exist: scoring one of them must fail
        client.create_model_version(NAME, source=str(tmp_path / "missing"))
    client.set_registered_model_alias(NAME, "champion", "1")
    cfg = PipelineConfig.model_validate({
        "name": "gate", "data": str(tmp_path / "data"), "state": str(tmp_path / "state"), "model_name": NAME,
        "pretrain": {"config": "byol"}, "evaluation": {"train": str(tmp_path / "labeled")}, "tracking_uri": uri})
    return Pipeline(cfg, tmp_path)


def _run(version: str, cand: float, champ: float | None, champion: str | None) -> dict[str, Any]:
    return {"snapshot": "s1", "steps": {"pretrain": {"version": version}, "evaluate": {
        "metric": "knn", "candidate": cand, "champion": champ, "champion_version": champion}}}


def _tags(p: Pipeline, version: str) -> dict[str, str]:
    from raysl import tracking

    return dict(tracking.client(p.uri).get_model_version(NAME, version).tags)


def _champion(p: Pipeline) -> str:
    from raysl import tracking

    return str(tracking.client(p.uri).get_model_version_by_alias(NAME, "champion").version)


def test_gate_keeps_a_candidate_inside_the_margin_and_promotes_one_beyond_it(pipe: Pipeline) -> None:
    pipe.cfg.gate.margin = 0.05
    kept = _run("2", 0.53, 0.50, "1")
    pipe._step_gate(kept)
    assert kept["outcome"] == "kept" and _champion(pipe) == "1"
    tags = _tags(pipe, "2")
    assert tags["raysl.gate"] == "kept" and tags["raysl.eval.knn"] == "0.5300"
    assert tags["raysl.eval.champion_knn"] == "0.5000" and "does not beat" in tags["raysl.gate_reason"]

    won = _run("3", 0.56, 0.50, "1")
    pipe._step_gate(won)
    assert won["outcome"] == "promoted" and won["steps"]["gate"]["moved"] and _champion(pipe) == "3"
    again = _run("3", 0.56, 0.50, "1")  # a rerun after a crash between moving the alias and recording it
    pipe._step_gate(again)
    assert again["outcome"] == "promoted" and not again["steps"]["gate"]["moved"] and _champion(pipe) == "3"


def test_an_unscorable_champion_is_never_replaced(pipe: Pipeline) -> None:
    run = {"snapshot": "s1", "candidate_score": 0.99, "steps": {"pretrain": {"version": "2"}}}
    with pytest.raises(PipelineError, match="champion v1 could not be evaluated"):
        pipe._step_evaluate(run)
    assert "evaluate" not in run["steps"] and _champion(pipe) == "1"
    assert "not promoting" in run["reason"]
