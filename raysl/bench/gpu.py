"""`raysl bench gpu`: one prepared command that measures the three pretraining models on one accelerator and
prints one JSON (under 8 minutes on an H200).

1. Synthetic: I-JEPA ViT-B/16, CLIP ViT-B/32 + text tower and BYOL ResNet-50 at 224 px, built from the shipped
   recipes (raysl/configs) with AdamW, bf16 autocast on CUDA; training steps as raysl.train.loop takes them on
   batches already on the device. samples/s after warm-up (synchronised); MFU = FLOPs a step (torch's
   FlopCounterMode over a forward + backward of each batch shape timed) × steps/s ÷ the device's dense bf16
   peak; peak memory.
2. End to end: generated photo-sized JPEGs → `raysl.data.shard` → local shards → the training stream
   (raysl.train.stream: epoch_reader in a WorkerStream) → collate → device → `device_augment` → the same step;
   with data.augment_on=cpu and =gpu. samples/s and its ratio to the synthetic number.
3. Targets: I-JEPA MFU ≥ 45%, CLIP ≥ 6,000 samples/s end to end per device (met / not met).

A part that fails is recorded with its error and the rest still run; once --time-budget seconds are spent no
new part starts (the JSON names the skipped ones). --smoke runs the same code on tiny models, on CPU by default.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from raysl.bench import gpu_models as gm
from raysl.bench.gpu_models import MODELS, Stepper, build_config, finite, to_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Defaults:
    steps: int
    warmup: int
    e2e_steps: int
    e2e_warmup: int
    images: int
    batch: dict[str, int]


FULL = Defaults(30, 5, 40, 8, 8192, {"ijepa": 128, "clip": 256, "byol": 128})  # H200: well under its 139 GiB
SMOKE = Defaults(2, 3, 2, 1, 48, {"ijepa": 8, "clip": 8, "byol": 8})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny models, few steps, a few dozen images (CPU "
                        "unless --device says otherwise): the same code path in well under two minutes")
    parser.add_argument("--device", help="default: cuda if available, else cpu (with --smoke: cpu)")
    parser.add_argument("--models", default="ijepa,clip,byol", help="comma-separated subset of ijepa,clip,byol")
    parser.add_argument("--augment", default="cpu,gpu", help="end-to-end data.augment_on modes (cpu,gpu)")
    for name, default in FULL.batch.items():
        parser.add_argument(f"--{name}-batch", type=int, help=f"{name}: batch per device (default {default})")
    parser.add_argument("--steps", type=int, help="synthetic: timed steps per model (default 30)")
    parser.add_argument("--warmup", type=int, help="synthetic: untimed steps first (default 5)")
    parser.add_argument("--e2e-steps", type=int, help="end to end: timed steps per run (default 40)")
    parser.add_argument("--e2e-warmup", type=int, help="end to end: untimed steps first (default 8)")
    parser.add_argument("--images", type=int, help="end to end: generated JPEGs in the shards (default 8192)")
    parser.add_argument("--image-width", type=int, default=500, help="generated JPEG width (height = 3/4)")
    parser.add_argument("--format", default="webdataset", choices=["webdataset", "parquet"], help="shard format")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default: from its name; "
                        "CPU: none, so MFU is null)")
    parser.add_argument("--time-budget", type=float, default=420.0, help="seconds after which no new part starts")
    parser.add_argument("--workdir", help="where the generated images and shards go (default: a temporary folder)")
    parser.add_argument("--out", help="also write the JSON here, rewritten after every part (kept if the run is cut "
                        "short)")
    parser.add_argument("--set", action="append", default=[], metavar="MODEL:KEY=VALUE", dest="sets",
                        help="a dotted config override for one model, e.g. clip:method.micro_batches=2")


def _opt(args: argparse.Namespace, key: str, smoke: bool) -> int:
    value = getattr(args, key, None)
    return int(value if value is not None else getattr(SMOKE if smoke else FULL, key))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.smoke = bool(args.smoke)
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not self.smoke
                                                   else "cpu"))
        self.models = [m.strip() for m in args.models.split(",") if m.strip()]
        self.modes = [m.strip() for m in args.augment.split(",") if m.strip()]
        unknown = sorted(set(self.models) - set(MODELS)) + sorted(set(self.modes) - {"cpu", "gpu"})
        if unknown:
            raise ValueError(f"--models/--augment: unknown {unknown}")
        defaults = (SMOKE if self.smoke else FULL).batch
        self.batch = {m: getattr(args, f"{m}_batch", None) or defaults[m] for m in MODELS}
        self.steps, self.warmup = _opt(args, "steps", self.smoke), _opt(args, "warmup", self.smoke)
        self.e2e_steps, self.e2e_warmup = _opt(args, "e2e_steps", self.smoke), _opt(args, "e2e_warmup", self.smoke)
        self.images, self.width, self.fmt = _opt(args, "images", self.smoke), args.image_width, args.format
        self.sets: dict[str, list[str]] = {m: [] for m in MODELS}
        for s in args.sets:
            model, _, dotted = s.partition(":")
            if model not in MODELS or "=" not in dotted:
                raise ValueError(f"--set {s!r}: expected MODEL:KEY=VALUE with MODEL one of {list(MODELS)}")
            self.sets[model].append(dotted)
        self.peak, self.peak_source = gm.peak_tflops(self.device, args.peak_tflops)
        self.budget, self.address = args.time_budget, getattr(args, "address", None)
        self.workdir: str | None = args.workdir
        self.corpus = ""
        self.corpus_info: dict[str, Any] = {"status": "not run", "error": None, "seconds": None}
        self.device_info: dict[str, Any] = {}
        self.start = time.monotonic()
        self.parts: list[dict[str, Any]] = []
        self.out: str | None = getattr(args, "out", None)
        # parsed now, so a bad --set fails before any device time is spent
        self.cfgs = {m: build_config(m, smoke=self.smoke, batch_size=self.batch[m], uri="synthetic", sets=self.sets[m])
                     for m in self.models}
        self.result: dict[str, Any] = {m: self._empty(m) for m in self.models}

    def _empty(self, name: str) -> dict[str, Any]:
        e2e = {"samples_per_s": None, "ratio_to_synthetic": None, "data_wait_fraction": None, "peak_memory_gib": None,
               "skipped_steps": None, "seconds": None, "status": "not run", "error": None}
        synthetic = dict.fromkeys(("samples_per_s", "step_ms", "flops_per_step", "flops_batch_shapes",
                                   "achieved_tflops", "mfu", "peak_memory_gib", "skipped_steps", "seconds", "error"))
        model = self.cfgs[name].model
        return {"label": MODELS[name].label, "backbone": model.backbone, "image_size": model.image_size,
                "batch_size": self.batch[name],
                "synthetic": {**synthetic, "status": "not run"}, "e2e": {mode: dict(e2e) for mode in self.modes}}

    def _part(self, name: str, slot: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
        """Run one part unless the time budget is spent; its numbers, or its error, go into `slot`."""
        t0 = time.monotonic()
        if t0 - self.start >= self.budget:
            slot["status"] = "skipped"
            self.parts.append({"part": name, "status": "skipped", "seconds": 0.0})
            return
        log.info("bench gpu: %s", name)
        try:
            slot.update(fn())
            slot["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - one failed part must not lose the others' numbers
            log.exception("bench gpu: %s failed", name)
            slot.update(status="error", error=f"{type(exc).__name__}: {exc}"[:600])
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        slot["seconds"] = round(time.monotonic() - t0, 2)
        self.parts.append({"part": name, "status": slot["status"], "seconds": slot["seconds"]})
        shown = {k: slot.get(k) for k in ("samples_per_s", "mfu", "ratio_to_synthetic", "error") if slot.get(k)}
        log.info("bench gpu: %s %s in %.1f s %s", name, slot["status"], slot["seconds"], shown)
        if self.out:
            Path(self.out).write_text(json.dumps(self.report(), indent=2, allow_nan=False))

    def _memory(self) -> float | None:
        return finite(torch.cuda.max_memory_allocated(self.device) / 2**30) if self.device.type == "cuda" else None

    def _reset_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def synthetic(self, name: str) -> dict[str, Any]:
        self._reset_memory()
        cfg = self.cfgs[name]
        st = Stepper(cfg, self.device)
        base = gm.synthetic_batch(cfg, self.batch[name], self.device)
        total = self.warmup + self.steps
        # collate (I-JEPA's masks) for every step beforehand: the timed loop is the device's work alone
        batches = [to_device(st.method.collate(dict(base), s, 0), self.device) for s in range(1, total + 1)]
        flops, shapes = st.mean_flops(batches[self.warmup:])  # I-JEPA's context size varies from step to step
        for s in range(1, self.warmup + 1):
            st.step(st.method.device_augment(batches[s - 1]), s, total)
        st.sync()
        t0 = time.perf_counter()
        for s in range(self.warmup + 1, total + 1):
            st.step(st.method.device_augment(batches[s - 1]), s, total)
        st.sync()
        seconds = time.perf_counter() - t0
        achieved = flops * self.steps / seconds / 1e12
        return {"samples_per_s": finite(self.steps * self.batch[name] / seconds, 5),
                "step_ms": finite(1000 * seconds / self.steps), "flops_per_step": round(flops),
                "flops_batch_shapes": shapes,
                "achieved_tflops": finite(achieved), "mfu": finite(achieved / self.peak) if self.peak else None,
                "peak_memory_gib": self._memory(), "skipped_steps": st.skipped}

    def write_corpus(self, root: Path) -> dict[str, Any]:
        """Generated JPEGs (a pool of distinct ones, repeated) with captions → local shards via raysl.data.shard
        (on Ray, which this part starts when it is not running)."""
        import numpy as np

        from raysl.data.shard import shard
        from raysl.train.launch import init_ray

        init_ray(self.address)  # joins a running cluster (or $RAY_ADDRESS), or starts a local one
        images, rng = root / "images", np.random.default_rng(0)
        images.mkdir(parents=True, exist_ok=True)
        pool = [gm.noise_jpeg(rng, self.width, self.width * 3 // 4) for _ in range(min(self.images, 64))]
        lines = ["file,caption"]
        for i in range(self.images):
            (images / f"img-{i:07d}.jpg").write_bytes(pool[i % len(pool)])
            lines.append(f"img-{i:07d}.jpg,{gm.caption(i)}")
        (root / "captions.csv").write_text("\n".join(lines) + "\n")
        manifest = shard(str(images), str(root / "shards"), self.fmt, rows_per_shard=max(4, self.images // 64),
                         captions=str(root / "captions.csv"))
        self.corpus = str(root / "shards")
        return {"images": manifest["count"], "bad": manifest["bad"], "shards": len(manifest["shards"]),
                "mean_jpeg_kib": finite(sum(map(len, pool)) / len(pool) / 1024, 3),
                "size": f"{self.width}x{self.width * 3 // 4}", "format": self.fmt}

    def e2e(self, name: str, mode: str) -> dict[str, Any]:
        from raysl.data.sources import data_files
        from raysl.train.stream import WorkerStream, epoch_reader, valid_rows

        self._reset_memory()
        batch_size = self.batch[name]
        cfg = build_config(name, smoke=self.smoke, batch_size=batch_size, uri=self.corpus, fmt=self.fmt,
                           augment_on=mode, sets=self.sets[name])
        st = Stepper(cfg, self.device)
        method, total = st.method, self.e2e_warmup + self.e2e_steps
        stream = WorkerStream(epoch_reader(cfg, batch_size, 0, 1), data_files(cfg.data.uri, cfg.data.format),
                              seed=cfg.train.seed, rank=0, world=1)
        samples, wait, t0 = 0, 0.0, time.perf_counter()
        try:
            for s in range(1, total + 1):
                if s == self.e2e_warmup + 1:
                    st.sync()
                    samples, wait, t0 = 0, 0.0, time.perf_counter()
                tw = time.perf_counter()
                raw = next(stream)
                wait += time.perf_counter() - tw
                valid = raw["valid"].bool()
                batch = method.collate(valid_rows(raw, valid), s, 0)  # the rows the loop would train on
                batch = method.device_augment(to_device(batch, self.device))
                st.step(batch, s, total)
                samples += int(valid.sum())
            st.sync()
            seconds = time.perf_counter() - t0
        finally:
            del stream
            gc.collect()  # drops the open Ray Data execution
        synth = self.result[name]["synthetic"]["samples_per_s"]
        rate = samples / seconds
        return {"samples_per_s": finite(rate, 5), "ratio_to_synthetic": finite(rate / synth, 3) if synth else None,
                "data_wait_fraction": finite(wait / seconds, 3), "peak_memory_gib": self._memory(),
                "skipped_steps": st.skipped}

    def run(self) -> dict[str, Any]:
        threads = torch.get_num_threads()
        if self.smoke and self.device.type == "cpu":  # a shared small machine: more threads than free cores crawl
            torch.set_num_threads(1)
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> dict[str, Any]:
        self.device_info = {**gm.device_info(self.device), "peak_tflops": self.peak, "peak_source": self.peak_source}
        for name in self.models:
            self._part(f"synthetic/{name}", self.result[name]["synthetic"], partial(self.synthetic, name))
        corpus = self.corpus_info
        with tempfile.TemporaryDirectory(prefix="raysl-bench-gpu-") as tmp:
            if self.modes:
                self._part("e2e/corpus", corpus, partial(self.write_corpus, Path(self.workdir or tmp)))
            for name in self.models:
                for mode in self.modes:
                    slot, part = self.result[name]["e2e"][mode], f"e2e/{name}/{mode}"
                    if corpus["status"] != "ok":
                        slot.update(status="skipped", error="no corpus")
                        self.parts.append({"part": part, "status": "skipped", "seconds": 0.0})
                        continue
                    self._part(part, slot, partial(self.e2e, name, mode))
        return self.report()

    def report(self) -> dict[str, Any]:
        settings = {"steps": self.steps, "warmup": self.warmup, "e2e_steps": self.e2e_steps,
                    "e2e_warmup": self.e2e_warmup, "augment_on": self.modes, "time_budget_s": self.budget,
                    "step": "StepGuard + forward_backward + AdamW step + on_step_end, as raysl.train.loop"}
        return {"benchmark": "gpu", "smoke": self.smoke, "device": self.device_info,
                "precision": "bf16 autocast" if self.device.type == "cuda" else "fp32", "settings": settings,
                "corpus": self.corpus_info, "models": self.result, "targets": gm.targets(self.result, self.smoke),
                "parts": self.parts,
                "skipped": [p["part"] for p in self.parts if p["status"] == "skipped"],
                "errors": [p["part"] for p in self.parts if p["status"] == "error"],
                "seconds_total": round(time.monotonic() - self.start, 1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; a JSON-serialisable dict (the CLI prints it)."""
    return Bench(args).run()
