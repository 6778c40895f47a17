"""The pieces `raysl bench gpu` times: the three models' configs (the shipped recipes, or tiny ones for --smoke),
the device's peak, synthetic batches shaped by the method's own view transform, and one training step exactly as
raysl.train.loop takes it (StepGuard, bf16 autocast on CUDA, optimizer step, on_step_end)."""

from __future__ import annotations

import io
import math
import platform
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import yaml

from raysl.config import PretrainConfig, builtin_config_path, parse_config, set_dotted
from raysl.methods import get_method
from raysl.methods.base import Method
from raysl.train.optim import build_optimizer
from raysl.train.step_guard import StepGuard

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched in this order against the CUDA device name.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.5), ("H200", 989.5), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.5), ("H800", 989.5),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.05), ("L40", 181.05), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0),
)


@dataclass(frozen=True)
class ModelSpec:
    label: str
    builtin: str  # the shipped recipe in raysl/configs
    full: dict[str, Any] = field(default_factory=dict)
    smoke: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {
    "ijepa": ModelSpec("I-JEPA ViT-B/16", "ijepa", smoke={
        "model.backbone": "vit_tiny_patch16_224", "model.image_size": 32, "model.patch_size": 4,
        "method.predictor_depth": 1, "method.predictor_width": 32, "method.predictor_heads": 2}),
    # the recipe's 8 micro-batches are for 2,048 pairs a worker; one device's batch here needs no feature caching
    "clip": ModelSpec("CLIP ViT-B/32 + text tower", "clip", full={"method.micro_batches": 1}, smoke={
        "method.micro_batches": 1, "model.backbone": "vit_tiny_patch16_224", "model.image_size": 32,
        "model.patch_size": 8, "method.embed_dim": 32, "method.context_length": 16, "method.text_width": 32,
        "method.text_heads": 2, "method.text_layers": 2}),
    "byol": ModelSpec("BYOL ResNet-50", "byol", smoke={
        "model.backbone": "resnet18", "model.image_size": 32, "method.projector_hidden": 64,
        "method.projector_dim": 32, "method.predictor_hidden": 64}),
}
TARGETS = (("ijepa_mfu", "ijepa", "synthetic MFU", 0.45),
           ("clip_e2e_samples_per_s", "clip", "end-to-end samples/s per device", 6000.0))
# AdamW for all three (BYOL's recipe is LARS at a linearly scaled LR far too large for AdamW, which would make steps
# non-finite and skipped); the LR does not change the cost of a step.
COMMON = {"optim.name": "adamw", "optim.lr": 1.0e-4, "optim.scale_lr": False, "train.num_workers": 1}


def build_config(name: str, *, smoke: bool, batch_size: int, uri: str, fmt: str = "auto", augment_on: str = "cpu",
                 sets: list[str] | None = None) -> PretrainConfig:
    """The shipped recipe `name` (or its tiny --smoke form) for one device's batch, plus `--set` overrides."""
    spec = MODELS[name]
    path = builtin_config_path(spec.builtin)
    assert path is not None, spec.builtin
    tree: dict[str, Any] = yaml.safe_load(path.read_text())
    values = {**COMMON, **(spec.smoke if smoke else spec.full), "train.batch_size": batch_size, "data.uri": uri,
              "data.format": fmt, "data.augment_on": augment_on}
    for dotted, value in values.items():
        node = tree
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    for s in sets or []:
        set_dotted(tree, s)
    return parse_config(tree)


def peak_tflops(device: torch.device, flag: float | None) -> tuple[float | None, str | None]:
    """(peak TFLOP/s, where it came from): the flag, else the table for a known CUDA device, else unknown."""
    if flag:
        return flag, "flag"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16_TFLOPS:
            if key in name:
                return value, f"table ({key} bf16 dense)"
    return None, None


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")
    else:
        info.update(name=platform.processor() or platform.machine() or "cpu", memory_gib=None, capability=None,
                    threads=torch.get_num_threads())
    return info


def noise_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A photo-sized JPEG of multi-scale colour noise: natural-image-like spectrum and file size (~60 KB)."""
    from PIL import Image

    acc = np.zeros((height, width, 3), dtype=np.float32)
    for side, weight in ((3, 0.45), (12, 0.3), (48, 0.15)):
        low = Image.fromarray(rng.integers(0, 256, (side, max(1, side * width // height), 3), dtype=np.uint8))
        acc += weight * np.asarray(low.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    acc += 0.1 * rng.integers(0, 256, (height, width, 3)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def caption(i: int) -> str:
    colours = ("red", "green", "blue", "grey", "yellow", "purple")
    return f"a photo of a {colours[i % 6]} textured surface, number {i}"


def synthetic_batch(cfg: PretrainConfig, batch_size: int, device: torch.device,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """One device batch as the training stream yields it, shaped and typed by the method's own view transform
    (data.augment_on as configured) run on a few generated JPEGs (images uint8, CLIP's tokens int), tiled to
    `batch_size` rows and put on `device`."""
    rng = np.random.default_rng(seed)
    n = min(8, batch_size)
    raw = {"image": np.array([noise_jpeg(rng, 160, 120) for _ in range(n)], dtype=object),
           "key": np.array([f"synthetic-{i}" for i in range(n)]),
           "caption": np.array([caption(i) for i in range(n)], dtype=object)}
    threads = torch.get_num_threads()
    try:
        view = get_method(cfg.method.name).view_transform(cfg)(raw)
    finally:
        torch.set_num_threads(threads)  # a view sets one thread for its Ray Data task; this process keeps its own
    rows = np.arange(batch_size) % n
    # as the training stream hands them over: every numeric column but `valid` (strings stay behind)
    return {c: torch.from_numpy(np.ascontiguousarray(v[rows])).to(device) for c, v in view.items()
            if c != "valid" and np.asarray(v).dtype.kind in "biuf"}


class Stepper:
    """A method with its AdamW optimizer and the loop's step: StepGuard, autocast, forward_backward, update."""

    def __init__(self, cfg: PretrainConfig, device: torch.device) -> None:
        torch.manual_seed(cfg.train.seed)
        self.method: Method = get_method(cfg.method.name).build(cfg)
        self.method.to(device)
        self.opt = build_optimizer(self.method, cfg.optim, cfg.train.batch_size)
        self.guard = StepGuard(self.method, cfg.optim.clip_grad_norm)
        self.device = device
        self.amp = cfg.train.amp and device.type == "cuda"
        self.skipped = 0

    def autocast(self) -> AbstractContextManager[Any]:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()

    def step(self, batch: dict[str, torch.Tensor], step: int, total: int) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.guard.before_forward()
        with self.autocast():
            self.method.forward_backward(self.method, batch)
        if self.guard.after_backward():  # reads the gradient norm: one device sync a step, as in the loop
            self.opt.step()
            self.method.on_step_end(step, total)
        else:
            self.skipped += 1

    def flops(self, batch: dict[str, torch.Tensor]) -> int:
        """FLOPs of one forward + backward on `batch` (matmuls, convolutions, attention), counted by torch."""
        from torch.utils.flop_counter import FlopCounterMode

        self.opt.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as counter, self.autocast():
            self.method.forward_backward(self.method, batch)
        self.opt.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())

    def mean_flops(self, batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
        """(mean FLOPs a step over `batches`, distinct batch shapes counted): a step's FLOPs depend only on its
        tensors' shapes, so each shape is counted once."""
        counted: dict[tuple[tuple[str, tuple[int, ...]], ...], int] = {}
        total = 0
        for b in batches:
            shape = tuple(sorted((k, tuple(v.shape)) for k, v in b.items()))
            if shape not in counted:
                counted[shape] = self.flops(b)
            total += counted[shape]
        return total / len(batches), len(counted)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def finite(x: float | None, digits: int = 4) -> float | None:
    """A JSON-safe number: `digits` significant digits (a tiny CPU rate stays above zero), None for a missing or
    non-finite one."""
    return float(f"{float(x):.{digits}g}") if x is not None and math.isfinite(x) else None


def targets(result: dict[str, Any], smoke: bool) -> list[dict[str, Any]]:
    """Each target with its measured value and met / not met (None where unmeasured, or for --smoke's tiny models).
    CLIP's end-to-end value is the better of its data.augment_on runs."""
    out = []
    for key, model, metric, target in TARGETS:
        r, value, via = result.get(model), None, None
        if r is not None and model == "ijepa":
            value = r["synthetic"]["mfu"]
        elif r is not None:
            rates = {m: e["samples_per_s"] for m, e in r["e2e"].items() if e["samples_per_s"] is not None}
            via = max(rates, key=lambda m: rates[m]) if rates else None
            value = rates[via] if via else None
        out.append({"name": key, "model": MODELS[model].label, "metric": metric, "target": target, "value": value,
                    "augment_on": via, "met": None if (smoke or value is None) else bool(value >= target),
                    "note": "smoke: tiny models; targets apply to a full run on a GPU" if smoke else None})
    return out
