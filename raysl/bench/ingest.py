"""`raysl bench ingest`: BYOL two-view images/s of raysl's Ray Data training reader vs torch DataLoaders,
measured side by side in one run and reported as ratios (> 1: Ray Data faster).

The Ray side is what a training worker runs: `epoch_reader(cfg, batch_size, rank=0, world=1)` over
`data_files(uri)` in `WorkerStream`'s seeded per-epoch file order, Ray Data limited to `--workers` CPUs; it reads
several small epochs per execution (raysl.train.span). Against it, on the same cores:
1. a hand-tuned DataLoader running the same transform (`BYOL.view_transform(cfg)`) on the same shards'
   bytes, a whole batch per `__getitems__` call (raysl.bench.baselines.ShardRows);
2. the DataLoader a user writes without raysl: per-sample PIL decode of the JPEG files and torchvision v2
   BYOL views, default collate (raysl.bench.baselines.UserViews);
and with `--s3`, the Ray side reading the same shards from a local moto S3 server vs from local disk.

Two image kinds: `cifar` (32×32 JPEGs, 32 px views) and `imagenet` (generated ~500×375 JPEGs of ~110 KB,
224 px views), each at every `--images` size, from Parquet and WebDataset shards made by `raysl data shard`.
A pass is as many epochs as the training reader reads in one execution (`epochs_per_pass`; the user's DataLoader:
one), so no execution runs on while another side is timed. Start-up: from building a side's pipeline to the end of
its first epoch (Ray initialised, its workers and the DataLoaders' forkserver warm). Steady: `--rounds` passes after
that first one, the sides in turn (order rotated each round); `ratio` divides the best pass of each side,
`median_paired_ratio` the per-round ratios. img/s counts every image of each epoch (the training reader transforms
the last partial batch, then drops it).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raysl.bench.common import CPU_GROUPS, compare, start_moto, stop, write_cifar_images, write_imagenet_images
from raysl.bench.ingest_sides import LoaderSide, RaySide, Side

log = logging.getLogger(__name__)
KINDS = {"cifar": 32, "imagenet": 224}  # kind → output side (model.image_size)
FORMATS = ("parquet", "webdataset")
DATA_VERSION = 2  # bump when the generators or the shard writers change: cached data is rebuilt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, nargs="+", action="extend", metavar="N",
                        help="corpus sizes, each measured (repeatable: --images 1000 10000); default 2000")
    parser.add_argument("--kind", nargs="+", action="extend", choices=list(KINDS),
                        help="image kinds: cifar (32×32 JPEGs → 32 px), imagenet (~500×375, ~110 KB → 224 px); "
                             "default both")
    parser.add_argument("--format", dest="formats", nargs="+", action="extend", choices=FORMATS,
                        help="shard formats read (default both)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size on every side (capped at the "
                                                                    "corpus size)")
    parser.add_argument("--workers", type=int, default=2, help="CPUs on each side: DataLoader workers, and Ray "
                                                               "Data's CPU limit")
    parser.add_argument("--rounds", type=int, default=3, help="timed steady-state passes of each side")
    parser.add_argument("--s3", action="store_true", help="also read the shards from a local moto S3 server")
    parser.add_argument("--cache-dir", help="keep the generated images and shards here, reused by later runs")
    parser.add_argument("--seed", type=int, default=0, help="image generator seed")


def _warm(batch: dict[str, Any]) -> dict[str, Any]:
    import raysl.data.views  # noqa: F401  (torch, torchvision: what the view transform imports)

    return batch


def _prepare(root: Path, kind: str, n: int, seed: int, procs: int) -> tuple[Path, dict[str, Any]]:
    """Generated JPEGs in <folder>/src/all and their Parquet and WebDataset shards, made once per folder."""
    from raysl.data.shard import shard

    folder = root / f"{kind}-{n}-seed{seed}-v{DATA_VERSION}"
    marker = folder / "ready.json"
    if marker.is_file():
        return folder, json.loads(marker.read_text())
    if folder.exists():  # an interrupted earlier run's
        shutil.rmtree(folder)
    log.info("generating %d %s images in %s (not timed)", n, kind, folder)
    if kind == "cifar":
        write_cifar_images(folder / "src", n, seed)
    else:
        write_imagenet_images(folder / "src", n, seed, procs)
    jpegs = sorted((folder / "src" / "all").iterdir())
    rows_per_shard = max(64, -(-n // 8))
    shards = {fmt: len(shard(str(folder / "src"), str(folder / fmt), fmt, rows_per_shard=rows_per_shard)["shards"])
              for fmt in FORMATS}
    info = {"images": n, "jpeg_kb_mean": round(sum(p.stat().st_size for p in jpegs) / n / 1000, 1),
            "rows_per_shard": rows_per_shard, "shards": shards}
    marker.write_text(json.dumps(info))
    return folder, info


def _upload(folder: Path, prefix: str, formats: list[str]) -> dict[str, str]:
    import boto3

    client = boto3.client("s3")
    if "raysl-bench" not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket="raysl-bench")
    for fmt in formats:
        for f in sorted(p for p in (folder / fmt).iterdir() if p.is_file()):
            client.upload_file(str(f), "raysl-bench", f"{prefix}/{fmt}/{f.name}")
    return {fmt: f"s3://raysl-bench/{prefix}/{fmt}" for fmt in formats}


def _measure(folder: Path, kind: str, n: int, args: argparse.Namespace, formats: list[str],
             s3_uris: dict[str, str]) -> dict[str, Side]:
    """Every side of one corpus: start-up passes, then `rounds` rounds of steady passes."""
    from raysl.bench import baselines
    from raysl.config import parse_config
    from raysl.methods.byol import BYOL

    px, bs = KINDS[kind], min(args.batch_size, n)

    def hand_tuned(fmt: str) -> Callable[[], Any]:
        def make() -> Any:
            transform = BYOL.view_transform(parse_config({"data": {"uri": str(folder / fmt)},
                                                          "model": {"image_size": px}}))
            dataset = baselines.ShardRows(baselines.shard_index(folder / fmt, fmt), fmt, transform)
            return baselines.loader(dataset, bs, args.workers, args.seed)
        return make

    def user() -> Any:
        paths = [str(p) for p in sorted((folder / "src" / "all").iterdir())]
        return baselines.loader(baselines.UserViews(paths, px), bs, args.workers, args.seed)

    k = pass_epochs(folder, formats)
    sides: dict[str, Side] = {}
    for fmt in formats:
        sides[f"{fmt}/local/ray"] = RaySide(str(folder / fmt), px, bs, n, k)
        sides[f"{fmt}/dataloader"] = LoaderSide(hand_tuned(fmt), n, k)
        if fmt in s3_uris:
            sides[f"{fmt}/s3/ray"] = RaySide(s3_uris[fmt], px, bs, n, k)
    sides["user_dataloader"] = LoaderSide(user, n, 1)  # 3× slower: a pass of one epoch is long enough
    try:
        for name, side in sides.items():
            side.first()
            log.info("%s/%d %s: start-up pass %.1f s", kind, n, name, side.startup_s)
        order = list(sides)
        for r in range(args.rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:
                sides[name].again()
            log.info("%s/%d round %d/%d img/s: %s", kind, n, r + 1, args.rounds,
                     {k: round(s.rates[-1], 1) for k, s in sides.items()})
    finally:
        for side in sides.values():
            side.close()
    return sides


def pass_epochs(folder: Path, formats: list[str]) -> int:
    """Epochs per timed pass: as many as the training reader reads in one execution (raysl.train.span) for this
    corpus's shard count (the most over the formats)."""
    from raysl.train.span import span_epochs

    def distinct(count: int) -> Callable[[int], list[str]]:
        return lambda epoch: [f"{epoch}/{i}" for i in range(count)]

    counts = {sum(p.suffix in (".parquet", ".tar") for p in (folder / fmt).iterdir()) for fmt in formats}
    return max(span_epochs(distinct(c), 0, c) for c in counts)


def _pair(a: Side, b: Side, a_key: str, b_key: str, n: int) -> dict[str, Any]:
    """Steady and start-up of side `a` over side `b`; both ratios are throughput ratios (> 1: `a` faster)."""
    return {"steady": compare(a.rates, b.rates, f"{a_key}_img_s", f"{b_key}_img_s"),
            "startup": {f"{a_key}_s": round(a.startup_s, 2), f"{b_key}_s": round(b.startup_s, 2),
                        f"{a_key}_img_s": round(n / a.startup_s, 2), f"{b_key}_img_s": round(n / b.startup_s, 2),
                        "ratio": round(b.startup_s / a.startup_s, 3)}}


def _results(kind: str, n: int, sides: dict[str, Side], formats: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fmt in formats:
        ray = sides[f"{fmt}/local/ray"]
        out[f"{kind}/{n}/{fmt}/local"] = {
            "vs_same_transform_dataloader": _pair(ray, sides[f"{fmt}/dataloader"], "ray", "dataloader", n),
            "vs_user_dataloader": _pair(ray, sides["user_dataloader"], "ray", "user_dataloader", n)}
        if f"{fmt}/s3/ray" in sides:
            out[f"{kind}/{n}/{fmt}/s3"] = {"vs_local_ray": _pair(sides[f"{fmt}/s3/ray"], ray, "s3_ray", "local_ray", n)}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray.data import DataContext, ExecutionResources

    from raysl.bench import baselines
    from raysl.train.launch import init_ray

    sizes = sorted(set(args.images or [2000]))
    kinds = list(dict.fromkeys(args.kind or KINDS))
    formats = list(dict.fromkeys(args.formats or FORMATS))
    if min(sizes) < 1 or args.workers < 1 or args.rounds < 1 or args.batch_size < 1:
        raise ValueError("bench ingest: --images, --workers, --rounds and --batch-size must be positive")
    ctx = DataContext.get_current()
    saved_limits = ctx.execution_options.resource_limits
    started_ray = not ray.is_initialized()
    moto = None
    results: dict[str, Any] = {}
    data: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="raysl-bench-") as tmp:
        root = Path(args.cache_dir) if args.cache_dir else Path(tmp)
        try:
            if args.s3:
                if not started_ray:
                    log.warning("Ray is already running: its workers may not see the moto S3 endpoint")
                moto, endpoint = start_moto()
                log.info("moto S3 at %s", endpoint)
            init_ray()
            ctx.execution_options.resource_limits = ExecutionResources(cpu=args.workers)
            ray.data.range(4 * args.workers, override_num_blocks=args.workers).map_batches(_warm).materialize()
            baselines.start_forkserver()
            for kind in kinds:
                for n in sizes:
                    folder, info = _prepare(root, kind, n, args.seed, args.workers)
                    s3_uris = _upload(folder, f"{kind}-{n}", formats) if moto is not None else {}
                    sides = _measure(folder, kind, n, args, formats, s3_uris)
                    results.update(_results(kind, n, sides, formats))
                    data[f"{kind}/{n}"] = {**info, "batch_size": min(args.batch_size, n),
                                           "epochs_per_pass": pass_epochs(folder, formats)}
                    raw[f"{kind}/{n}"] = {k: {"startup_s": round(s.startup_s, 2), "images_delivered": s.delivered,
                                              "rounds_img_s": [round(x, 1) for x in s.rates],
                                              "cpu_s_per_1000_images": s.cpu_per_1000()}
                                          for k, s in sides.items()}
        finally:
            ctx.execution_options.resource_limits = saved_limits
            if moto is not None:
                stop(moto)
            if started_ray:
                ray.shutdown()
    return {
        "benchmark": "ingest",
        "config": {
            "images": sizes, "kinds": {k: {"output_px": KINDS[k]} for k in kinds}, "formats": formats,
            "s3": bool(args.s3), "batch_size": args.batch_size, "cpu_workers_each_side": args.workers,
            "rounds": args.rounds, "seed": args.seed, "data": data,
            "ray_side": "raysl.train.stream.epoch_reader(cfg, batch_size, rank=0, world=1) over "
                        "raysl.data.sources.data_files(uri) in WorkerStream's per-epoch file order, several small "
                        "epochs per execution (raysl.train.span); Ray Data CPU limit = workers",
            "same_transform_dataloader": "BYOL.view_transform(cfg) on the same shards' bytes, one call per "
                                         "batch (__getitems__), shuffled, persistent forkserver workers",
            "user_dataloader": "JPEG files, per-sample full PIL decode, torchvision v2 RandomResizedCrop(0.08-1) "
                               "+ flip + ColorJitter(0.4,0.4,0.2,0.1) p0.8 + grayscale 0.2 + blur p1.0/0.1 + "
                               "solarize p0/0.2 + PILToTensor, two views, default collate",
            "startup": "first epoch of each side, timed from building its pipeline; Ray initialised, Ray workers "
                       "and the DataLoaders' forkserver warm; ratio = baseline seconds / Ray seconds",
            "steady": "passes of epochs_per_pass epochs (user DataLoader: 1) after the start-up pass, sides in "
                      "turn (order rotated each round); img/s = corpus images × epochs / pass seconds",
            "cpu_s_per_1000_images": "median over the steady passes of CPU seconds used on this machine while "
                                     "the side ran, per 1,000 images, by process group (raysl.bench.common."
                                     f"cpu_seconds): {', '.join(CPU_GROUPS)}",
        },
        "results": results,
        "summary": {key: {cmp: {"steady": v["steady"]["ratio"], "startup": v["startup"]["ratio"]}
                          for cmp, v in entry.items()} for key, entry in results.items()},
        "sides": raw,
    }
