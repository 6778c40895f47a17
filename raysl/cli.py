"""The `raysl` command: pretrain, probe, finetune, embed, data shard, demo, bench; submit, jobs, pipeline.

Local by default (a Ray cluster started in-process, MLflow in ./mlflow.db); `raysl submit` runs any of these
commands on a Ray cluster through the Jobs API, and $MLFLOW_TRACKING_URI points them at a tracking server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from raysl.config import MAX_IMAGE_PIXELS, ConfigError
from raysl.storage import StorageError, redact

log = logging.getLogger("raysl")


def _setup(args: argparse.Namespace) -> None:
    from raysl import console

    console.setup(args.log_level, verbose=args.verbose)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address


def cmd_pretrain(args: argparse.Namespace) -> int:
    from raysl.config import load_config
    from raysl.train.launch import pretrain

    cfg = load_config(args.config, args.overrides)
    res = pretrain(cfg, resume=args.resume)
    print(json.dumps({"run_name": res.run_name, "mlflow_run_id": res.run_id,
                      "model": f"models:/{res.model_name}@{cfg.tracking.alias}", "version": res.model_version,
                      "checkpoint": res.checkpoint_uri, "metrics": res.metrics}, indent=2))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from raysl.eval.probe import probe, zero_shot_probe
    from raysl.train.launch import init_ray

    init_ray()
    if args.zero_shot:
        zs = zero_shot_probe(args.model, args.test_data or args.data, label_column=args.label_column)
        print(f"{args.model}: {zs.zero_shot_table()}")
        return 0
    rep = probe(args.model, args.data, test_uri=args.test_data, label_column=args.label_column,
                baseline=not args.no_baseline, raw_pixels=args.raw_pixels, k=args.k)
    print(f"{args.model}: {rep.n_train} train / {rep.n_test} test samples\n{rep.table()}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from raysl.eval import finetune
    from raysl.train.launch import init_ray

    init_ray()
    batch = args.batch_size or (64 if args.task == "classification" else 16)
    common = {"init": args.init, "steps": args.steps, "batch_size": batch, "lr": args.lr,
              "freeze_steps": args.freeze_steps, "layer_decay": args.layer_decay, "num_workers": args.workers,
              "storage_path": args.storage_path, "seed": args.seed, "overrides": args.overrides,
              "image_size": args.image_size}
    if args.task == "classification":
        rep = finetune.finetune_classification(args.model, args.data, args.test_data,
                                               label_fraction=args.label_fraction,
                                               label_column=args.label_column, **common)
        metrics: tuple[str, ...] = ("test_top1",)
    else:
        from raysl.eval.finetune_detection import finetune_detection

        rep = finetune_detection(args.model, args.data, args.test_data, arch=args.arch, **common)
        metrics = ("map", "map_50")
    print(f"\n{rep.task} fine-tuning of {args.model}: " + ", ".join(f"{v} {k}" for k, v in rep.counts.items()))
    print(rep.table(metrics))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from raysl import storage
    from raysl.data.shard import claim_destination
    from raysl.data.sources import read_images
    from raysl.data.views import EvalView
    from raysl.eval.embed import embed
    from raysl.tracking import load_encoder
    from raysl.train.launch import init_ray

    claim_destination(args.out, args.overwrite, keep=(args.data,))  # before any work: a rerun must not append
    init_ray()
    _, spec, _ = load_encoder(args.model)
    ds = read_images(args.data).map_batches(EvalView(spec["image_size"], MAX_IMAGE_PIXELS), batch_size=256)
    out = embed(ds, args.model, concurrency=args.concurrency, gpus=args.gpus).select_columns(["key", "embedding"])
    fs, path = storage.resolve(args.out)
    out.write_parquet(path, filesystem=fs)
    print(f"embeddings written to {storage.redact(args.out)}")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from raysl.data.shard import claim_destination, shard, shard_clips
    from raysl.train.launch import init_ray

    if args.clips and args.format not in (None, "parquet"):
        raise ValueError("--clips writes Parquet clip shards only: drop --format or use --format parquet")
    if not args.clips and args.format is None:
        raise ValueError("--format is required: webdataset or parquet")
    clip_flags = [f for f in ("frames_per_clip", "frame_stride", "clip_every", "frame_side")
                  if getattr(args, f) is not None]
    if clip_flags and not args.clips:
        raise ValueError(f"--{clip_flags[0].replace('_', '-')} applies to --clips only")
    # checked here too, before Ray starts, so a refusal takes a moment, not a cluster start
    claim_destination(args.dst, args.overwrite, keep=(args.src,) + ((args.captions,) if args.captions else ()))
    init_ray()
    if args.clips:
        from raysl.config import DataConfig

        fields = DataConfig.model_fields  # the training defaults, so shards cut with no flags match a default run
        manifest = shard_clips(args.src, args.dst,
                               frames_per_clip=args.frames_per_clip or fields["frames_per_clip"].default,
                               frame_stride=args.frame_stride or fields["frame_stride"].default,
                               clip_every=args.clip_every,
                               frame_side=args.frame_side or 448, rows_per_shard=args.rows_per_shard or 256,
                               overwrite=args.overwrite)
    else:
        manifest = shard(args.src, args.dst, args.format, rows_per_shard=args.rows_per_shard or 1000,
                         captions=args.captions, overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in manifest.items() if k != "shards"} | {"shards": len(manifest["shards"])},
                     indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from raysl.demo import run_demo

    return run_demo(Path(args.workdir), steps=args.steps, method=args.method, downstream=args.downstream)


def cmd_bench(args: argparse.Namespace) -> int:
    import contextlib

    from raysl import bench

    with contextlib.redirect_stdout(sys.stderr):  # Ray's own lines (a raylet warning) stay out of the JSON
        result = bench.load(args.what).run(args)
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raysl", description=__doc__)
    p.add_argument("--address", help="on a cluster node: the Ray cluster's address (HEAD:6379 or auto; default "
                                      "$RAY_ADDRESS, else a local cluster); from elsewhere use `raysl submit`")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--verbose", action="store_true", help="also show Ray's own output (progress bars, worker "
                                                          "logs, warnings); by default they go to log files")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("pretrain", help="pretrain an encoder from a YAML config")
    s.add_argument("--config", required=True, help="YAML file, or a built-in name (byol)")
    s.add_argument("--resume", action="store_true", help="require an earlier run of this config to continue")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.steps=500")
    s.set_defaults(fn=cmd_pretrain)

    s = sub.add_parser("probe", help="kNN and linear probe of a registered encoder")
    s.add_argument("--model", required=True, help="models:/<name>@<alias> or another MLflow model URI")
    s.add_argument("--data", required=True, help="labeled images: class sub-folders or a label column")
    s.add_argument("--test-data", help="held-out labeled images (default: a stratified 30%% split of --data)")
    s.add_argument("--label-column")
    s.add_argument("--k", type=int, default=20)
    s.add_argument("--no-baseline", action="store_true", help="skip the random-init encoder baseline")
    s.add_argument("--raw-pixels", action="store_true", help="also report kNN on raw pixels")
    s.add_argument("--zero-shot", action="store_true",
                   help="image-text models (raysl-clip): zero-shot top-1 from class-name prompts, and "
                        "image<->text recall@1/5/10 where the data has captions")
    s.set_defaults(fn=cmd_probe)

    s = sub.add_parser("finetune", help="fine-tune a registered encoder: classification or detection, "
                                        "pretrained vs random init")
    s.add_argument("--task", required=True, choices=["classification", "detection"])
    s.add_argument("--model", required=True, help="models:/<name>@<alias> of a registered encoder")
    s.add_argument("--data", required=True, help="labeled training data (classification: class sub-folders or a "
                                                 "label column; detection: a folder with annotations.json)")
    s.add_argument("--test-data", required=True, help="held-out data in the same format")
    s.add_argument("--init", default="both", choices=["pretrained", "random", "both"],
                   help="both: the same recipe from the registered encoder and from random init, one table")
    s.add_argument("--label-fraction", type=float, default=1.0, help="classification: a seeded, stratified "
                                                                     "fraction of the labels (0.01, 0.1, …)")
    s.add_argument("--label-column")
    s.add_argument("--arch", default="fasterrcnn", choices=["fasterrcnn", "retinanet", "fcos"])
    s.add_argument("--image-size", type=int, help="default: the encoder's (CNNs may take another size)")
    s.add_argument("--steps", type=int, default=200)
    s.add_argument("--batch-size", type=int, help="global batch (default: 64 classification, 16 detection)")
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--freeze-steps", type=int, default=0, help="train only the head for the first K steps")
    s.add_argument("--layer-decay", type=float, help="layer-wise LR decay, e.g. 0.75")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--storage-path", default="./raysl-runs")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. optim.weight_decay=0.1")
    s.set_defaults(fn=cmd_finetune)

    s = sub.add_parser("embed", help="export embeddings of a registered encoder to Parquet")
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--concurrency", type=int, default=1, help="encoder actors (each loads the model once)")
    s.add_argument("--gpus", type=float, default=0.0, help="GPUs per actor, e.g. 1 (or 0.5 to share one)")
    s.add_argument("--overwrite", action="store_true", help="delete what --out holds first (default: refuse a "
                                                            "non-empty --out)")
    s.set_defaults(fn=cmd_embed)

    d = sub.add_parser("data", help="data tools").add_subparsers(dest="data_cmd", required=True)
    s = d.add_parser("shard", help="image folder → WebDataset or Parquet shards with a manifest; with --clips, "
                                   "videos → Parquet clip shards (JPEG frames)")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--format", choices=["webdataset", "parquet"], help="required for images; --clips: parquet")
    s.add_argument("--rows-per-shard", type=int, help="default: 1000 images, 256 clips")
    s.add_argument("--clips", action="store_true", help="SRC holds videos: write one row per clip")
    s.add_argument("--frames-per-clip", type=int, help="--clips: frames in a clip (default 8)")
    s.add_argument("--frame-stride", type=int, help="--clips: frames between a clip's frames (default 60)")
    s.add_argument("--clip-every", type=int, help="--clips: frames between clip starts (default: --frame-stride)")
    s.add_argument("--frame-side", type=int, help="--clips: the frames' short side in pixels (default 448: "
                                                  "data.frame_side's default for a 224-pixel model)")
    s.add_argument("--captions", help="CSV (file,caption) or JSONL captions file: build image-text shards")
    s.add_argument("--overwrite", action="store_true", help="delete what DST holds first (default: refuse a "
                                                            "non-empty DST)")
    s.set_defaults(fn=cmd_shard)

    s = sub.add_parser("demo", help="digits → BYOL|I-JEPA|DINO, scenes → CLIP or a generated video → "
                       "DoRA; → MLflow → probe (DoRA: tracking)")
    s.add_argument("--workdir", default="demo-output")
    s.add_argument("--steps", type=int, default=None, help="default: 100 (byol, clip, dino), 250 (ijepa), 60 (dora)")
    s.add_argument("--method", default="byol", choices=["byol", "ijepa", "clip", "dino", "dora"])
    s.add_argument("--downstream", action="store_true", help="then fine-tune the encoder (10%% of the labels) "
                   "and train a detector on generated scenes, each pretrained vs random init")
    s.set_defaults(fn=cmd_demo)

    from raysl import bench

    s = sub.add_parser("bench", help="side-by-side benchmarks, each reported as ratios measured in one run",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_subcommands(s)
    s.set_defaults(fn=cmd_bench)

    from raysl import cli_jobs, cli_pipeline

    cli_jobs.add_parsers(sub)
    cli_pipeline.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup(args)
    from raysl import console
    from raysl.lock import LockHeld
    from raysl.train.errors import ClusterTooSmall, RegistrationError, RunStateError, RunStopped

    try:
        return int(args.fn(args))
    except (ConfigError, StorageError, ValueError, FileNotFoundError) as exc:
        log.error("%s", redact(str(exc)))
        return 2
    except LockHeld as exc:  # the same run is going on elsewhere: not a failure of this one
        log.error("%s", redact(str(exc)))
        return 3
    except (RunStopped, RegistrationError, ClusterTooSmall, RunStateError) as exc:
        # raysl's own stops say what happened and what to do; a traceback would bury that (--verbose keeps it)
        log.error("%s", redact(str(exc)), exc_info=console.is_verbose())
        return 1


if __name__ == "__main__":
    sys.exit(main())
