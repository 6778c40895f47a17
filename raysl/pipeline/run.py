"""`raysl pipeline run`: the steps, each recorded in the run's state file before the next begins.

State under `<state>/<name>/`: `lock.json`, `current.json` (the unfinished run), `last_success.json`,
`snapshots/<id>.snapshot.json` (manifests) and `runs/<id>.json` (what each step did). A rerun reads them and
continues: pretraining resumes its own checkpoints and registers a run's encoder once; evaluation scores are
kept; the alias moves once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysl import storage, tracking
from raysl.pipeline import registry, snapshot
from raysl.pipeline.config import STEPS, PipelineConfig
from raysl.pipeline.lock import PipelineLock
from raysl.storage import S3Settings, redact, redact_exc

log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """A step could not complete; the champion is unchanged and a rerun continues from this step."""


@dataclass
class Outcome:
    status: str  # "noop" | "promoted" | "kept" | "rejected-data"
    snapshot: str | None = None
    version: str | None = None
    champion_before: str | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    reason: str = ""


class Pipeline:
    def __init__(self, cfg: PipelineConfig, base_dir: Path, wait_lock_s: float = 0.0) -> None:
        self.cfg, self.base_dir, self.wait_lock_s = cfg, base_dir, wait_lock_s
        self.s3 = S3Settings.resolve()
        self.root = f"{cfg.state}/{cfg.name}"
        self.uri = tracking.tracking_uri(cfg.tracking_uri)

    # -- state files ---------------------------------------------------------------------------------
    def read_state(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads(storage.read_bytes(f"{self.root}/{name}", self.s3)))
        except (FileNotFoundError, OSError):
            return None

    def _write(self, name: str, data: dict[str, Any]) -> None:
        storage.write_bytes(f"{self.root}/{name}", json.dumps(data, indent=1).encode(), self.s3)

    def _save(self, run: dict[str, Any], step: str) -> None:
        self._write(f"runs/{run['snapshot']}.json", run)
        if self.cfg.fault_after == step:
            log.error("fault_after=%s: exiting hard after recording this step (chaos test)", step)
            logging.shutdown()
            os._exit(137)

    # -- the run -------------------------------------------------------------------------------------
    def run(self) -> Outcome:
        with PipelineLock(f"{self.root}/lock.json", self.cfg.lock_ttl_s, self.s3, self.wait_lock_s) as lock:
            run = self._resume() or self._snapshot()
            if isinstance(run, Outcome):
                return run
            for step in STEPS[1:]:
                if lock.lost:
                    raise PipelineError("the pipeline lock was taken over by another run; stopping")
                if step in run["steps"]:
                    log.info("[%s] %s: done earlier, skipped", self.cfg.name, step)
                    continue
                getattr(self, f"_step_{step}")(run)
                if run.get("outcome") == "rejected-data":
                    return self._finish(run)
            return self._finish(run)

    def _resume(self) -> dict[str, Any] | None:
        current = self.read_state("current.json")
        if not current or not current.get("snapshot"):
            return None
        run = self.read_state(f"runs/{current['snapshot']}.json")
        if run is None or run.get("finished"):
            return None
        log.info("[%s] continuing unfinished run on snapshot %s (done: %s)", self.cfg.name, run["snapshot"],
                 ", ".join(run["steps"]) or "nothing")
        return run

    def _snapshot(self) -> dict[str, Any] | Outcome:
        cfg = self.cfg
        snap = snapshot.take(cfg.data, self.s3)
        last = self.read_state("last_success.json") or {}
        if last.get("listing_hash") == snap.listing_hash:
            log.info("[%s] no new data under %s since snapshot %s (%d files): nothing to do", cfg.name,
                     redact(cfg.data), last.get("snapshot"), snap.count)
            return Outcome("noop", last.get("snapshot"), last.get("version"), reason="no new data")
        earlier = self.read_state(f"runs/{snap.id}.json")
        if earlier and earlier.get("finished"):
            raise PipelineError(f"snapshot {snap.id} was already handled ({earlier.get('outcome')}: "
                                f"{earlier.get('reason', '')}); add or fix data under {redact(cfg.data)}")
        manifest = f"{self.root}/snapshots/{snap.id}{storage.SNAPSHOT_SUFFIX}"
        snapshot.write(snap, cfg.data, manifest, self.s3)
        prun = tracking.start_run(self.uri, cfg.experiment, f"{cfg.name}-{snap.id}", {}, {
            "raysl.pipeline": cfg.name, "raysl.snapshot": snap.id, "raysl.snapshot_manifest": manifest,
            "raysl.snapshot_files": str(snap.count), "raysl.snapshot_bytes": str(snap.bytes)})
        run: dict[str, Any] = {"snapshot": snap.id, "manifest": manifest, "listing_hash": snap.listing_hash,
                               "pipeline_run_id": prun, "started": time.time(),
                               "steps": {"snapshot": {"files": snap.count, "bytes": snap.bytes,
                                                      "newest_mtime": snap.newest_mtime}}}
        log.info("[%s] snapshot %s: %d files, %.1f MB, newest %s → %s", cfg.name, snap.id, snap.count,
                 snap.bytes / 1e6, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(snap.newest_mtime)),
                 redact(manifest))
        self._write(f"runs/{snap.id}.json", run)
        self._write("current.json", {"snapshot": snap.id})
        self._save(run, "snapshot")
        return run

    def _step_validate(self, run: dict[str, Any]) -> None:
        from raysl.pipeline.steps import validate

        checked, bad, limit, examples = validate(self, run)
        run["steps"]["validate"] = {"checked": checked, "bad": bad, "max_bad_fraction": limit}
        if checked and bad / checked > limit:
            run["outcome"] = "rejected-data"
            run["reason"] = (f"{bad} of {checked} sampled images undecodable ({bad / checked:.1%} > "
                             f"max_bad_fraction {limit}); e.g. {examples}; not training, @champion unchanged")
            log.error("[%s] %s", self.cfg.name, run["reason"])
        else:
            log.info("[%s] validate: %d sampled images, %d undecodable", self.cfg.name, checked, bad)
        self._save(run, "validate")

    def _step_pretrain(self, run: dict[str, Any]) -> None:
        from raysl.pipeline.steps import pretrain_snapshot

        run.setdefault("parent_version", registry.alias_version(self.uri, self.cfg.model_name))
        self._write(f"runs/{run['snapshot']}.json", run)  # the parent is fixed before training starts
        run["steps"]["pretrain"] = pretrain_snapshot(self, run)
        self._save(run, "pretrain")

    def _step_evaluate(self, run: dict[str, Any]) -> None:
        from raysl.pipeline.steps import Evaluator

        score = Evaluator(self).score
        name, version = self.cfg.model_name, run["steps"]["pretrain"]["version"]
        champion = registry.alias_version(self.uri, name)
        metric = self.cfg.evaluation.probe
        cand = run.get("candidate_score")
        if cand is None:
            cand = score(f"models:/{name}/{version}")
            run["candidate_score"] = cand
            self._write(f"runs/{run['snapshot']}.json", run)
        champ = None
        if champion is not None and champion != version:
            try:
                champ = score(f"models:/{name}/{champion}")
            except Exception as exc:  # noqa: BLE001 - whatever broke, an unscored champion is never replaced
                run["reason"] = f"@champion v{champion} could not be evaluated ({redact_exc(exc)}); not promoting"
                self._write(f"runs/{run['snapshot']}.json", run)
                raise PipelineError(run["reason"]) from exc
        run["steps"]["evaluate"] = {"metric": metric, "candidate": cand, "champion": champ,
                                    "champion_version": champion}
        log.info("[%s] evaluate (%s): v%s %.4f, @champion %s", self.cfg.name, metric, version, cand,
                 f"v{champion} {champ:.4f}" if champ is not None else "none")
        self._save(run, "evaluate")

    def _step_gate(self, run: dict[str, Any]) -> None:
        name, version = self.cfg.model_name, run["steps"]["pretrain"]["version"]
        ev, margin = run["steps"]["evaluate"], self.cfg.gate.margin
        cand, champ, champion = ev["candidate"], ev["champion"], ev["champion_version"]
        if champion is None:
            promote, reason = True, "no @champion yet"
        elif champion == version:
            promote, reason = True, f"v{version} is already @champion"
        else:
            promote = cand > champ + margin
            reason = (f"{ev['metric']} {cand:.4f} vs @champion v{champion} {champ:.4f}: "
                      f"{'beats' if promote else 'does not beat'} it by more than the margin {margin:+.4f}")
        tags = {f"raysl.eval.{ev['metric']}": f"{cand:.4f}", "raysl.gate": "promoted" if promote else "kept",
                "raysl.gate_reason": reason, "raysl.eval.champion_version": str(champion or "none")}
        if champ is not None:
            tags[f"raysl.eval.champion_{ev['metric']}"] = f"{champ:.4f}"
        registry.tag_version(self.uri, name, version, tags)
        moved = registry.promote(self.uri, name, version) if promote else False
        run["steps"]["gate"] = {"promoted": promote, "moved": moved, "reason": reason}
        run["outcome"], run["reason"] = ("promoted" if promote else "kept"), reason
        log.info("[%s] gate: %s v%s — %s", self.cfg.name, "@champion →" if promote else "kept @candidate",
                 version, reason)
        self._save(run, "gate")

    def _finish(self, run: dict[str, Any]) -> Outcome:
        run["finished"], run["ended"] = True, time.time()
        self._write(f"runs/{run['snapshot']}.json", run)
        version = run["steps"].get("pretrain", {}).get("version")
        if run["outcome"] != "rejected-data":
            self._write("last_success.json", {"snapshot": run["snapshot"], "listing_hash": run["listing_hash"],
                                              "version": version, "outcome": run["outcome"]})
        self._write("current.json", {"snapshot": None})
        ev = run["steps"].get("evaluate", {})
        metrics = {k: float(v) for k, v in (("candidate_score", ev.get("candidate")),
                                            ("champion_score", ev.get("champion"))) if v is not None}
        metrics["promoted"] = float(run["outcome"] == "promoted")
        tracking.log_metrics(self.uri, run["pipeline_run_id"], metrics)
        tracking.set_tags(self.uri, run["pipeline_run_id"], {"raysl.outcome": run["outcome"],
                                                             "raysl.reason": run.get("reason", "")[:5000]})
        tracking.end_run(self.uri, run["pipeline_run_id"],
                         "FINISHED" if run["outcome"] != "rejected-data" else "FAILED")
        return Outcome(run["outcome"], run["snapshot"], version, run.get("parent_version"),
                       {"candidate": ev.get("candidate"), "champion": ev.get("champion")}, run.get("reason", ""))
