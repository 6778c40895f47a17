"""`raysl pipeline run FILE`: scheduled retraining (snapshot → validate → pretrain → evaluate → gate);
`raysl pipeline status FILE`: what the last runs did."""

from __future__ import annotations

import argparse
import json
import logging

from raysl.storage import redact

log = logging.getLogger("raysl")
EXIT_LOCKED = 3


def cmd_run(args: argparse.Namespace) -> int:
    from raysl.pipeline.config import load_pipeline
    from raysl.pipeline.lock import LockHeld
    from raysl.pipeline.run import Pipeline, PipelineError

    cfg, base = load_pipeline(args.file, args.overrides)
    try:
        out = Pipeline(cfg, base, wait_lock_s=args.wait_lock).run()
    except LockHeld as exc:
        log.error("%s", redact(str(exc)))
        return EXIT_LOCKED
    except PipelineError as exc:
        log.error("pipeline %s stopped: %s", cfg.name, redact(str(exc)))
        return 1
    scores = ", ".join(f"{k} {v:.4f}" for k, v in out.scores.items() if v is not None)
    print(f"pipeline {cfg.name}: {out.status}" + (f" (snapshot {out.snapshot}" if out.snapshot else "")
          + (f", {cfg.model_name} v{out.version}" if out.version else "") + (")" if out.snapshot else "")
          + (f"; {scores}" if scores else "") + (f"; {out.reason}" if out.reason else ""))
    return 1 if out.status == "rejected-data" else 0


def cmd_status(args: argparse.Namespace) -> int:
    from raysl.pipeline.config import load_pipeline
    from raysl.pipeline.run import Pipeline

    cfg, base = load_pipeline(args.file, args.overrides)
    p = Pipeline(cfg, base)
    report = {"last_success": p.read_state("last_success.json"), "current": p.read_state("current.json"),
              "lock": p.read_state("lock.json")}
    current = (report["current"] or {}).get("snapshot")
    if current:
        report["current_run"] = p.read_state(f"runs/{current}.json")
    print(json.dumps(report, indent=2, default=str))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    pipe = sub.add_parser("pipeline", help="scheduled retraining with an evaluation gate").add_subparsers(
        dest="pipeline_cmd", required=True)
    s = pipe.add_parser("run", help="snapshot new data, pretrain (warm start from @champion), evaluate candidate "
                                    "and champion on one split, move @champion only if the candidate wins")
    s.add_argument("file", help="the pipeline's YAML (see pipelines/retrain.yaml)")
    s.add_argument("--wait-lock", type=float, default=0.0, metavar="SECONDS",
                   help="if another run of this pipeline holds the lock, wait this long before giving up "
                        f"(exit code {EXIT_LOCKED})")
    s.add_argument("overrides", nargs="*", help="dotted overrides of the pipeline config, e.g. gate.margin=0.01")
    s.set_defaults(fn=cmd_run)
    s = pipe.add_parser("status", help="the last successful run, the unfinished one and the lock, as JSON")
    s.add_argument("file")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_status)
