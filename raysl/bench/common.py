"""Helpers the benchmarks share: paired ratios, timed passes, a moto S3 server, generated JPEGs, peak memory.

Imports stay light (numpy, PIL): `raysl bench <name> --help` loads this module.
"""

from __future__ import annotations

import io
import logging
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)
ROUNDS = 3
CIFAR_PX = 32
IMAGENET_SIDES = (500, 375)  # ImageNet's most common size; every 4th image is portrait


def compare(runs: list[float], base_runs: list[float], key: str, base_key: str) -> dict[str, Any]:
    """Best of rounds on each side and their ratio, plus the per-round (paired, same-moment) ratios.

    The machine is assumed shared and noisy: the sides alternate in every round; `ratio` divides the best of
    each side, `median_paired_ratio` is the median of the per-round ratios."""
    paired = [r / b for r, b in zip(runs, base_runs, strict=True)]
    return {key: round(max(runs), 2), base_key: round(max(base_runs), 2),
            "ratio": round(max(runs) / max(base_runs), 3),
            "median_paired_ratio": round(float(np.median(paired)), 3),
            "paired_ratios": [round(r, 3) for r in paired]}


def drain(batches: Iterable[dict[str, Any]], column: str = "view1") -> int:
    """Rows of `column` in every batch of one pass (the pass is consumed)."""
    return sum(len(b[column]) for b in batches)


def timed(fn: Any) -> tuple[float, Any]:
    """(seconds, result) of `fn()`."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    """A moto S3 server on a free port, and AWS_* variables pointing at it (set them before Ray starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start on port {port}") from None
            time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _noise(rng: np.random.Generator, w: int, h: int, scales: tuple[tuple[int, float], ...]) -> np.ndarray:
    """Multi-scale smooth colour noise (natural-image-like spectra): low-resolution noise upsampled, summed."""
    acc = np.zeros((h, w, 3), dtype=np.float32)
    for side, weight in scales:
        sw, sh = max(2, side * w // max(w, h)), max(2, side * h // max(w, h))
        low = Image.fromarray(rng.integers(0, 256, (sh, sw, 3), dtype=np.uint8), mode="RGB")
        acc += weight * np.asarray(low.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    return acc


def write_cifar_images(folder: Path, n: int, seed: int = 0) -> None:
    """n 32×32 RGB JPEGs (about 1.5 KB each) of multi-scale colour noise in folder/all/."""
    rng = np.random.default_rng(seed)
    (folder / "all").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        acc = _noise(rng, CIFAR_PX, CIFAR_PX, ((2, 0.5), (4, 0.3), (8, 0.15), (32, 0.05)))
        img = Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8), mode="RGB")
        img.save(folder / "all" / f"img-{i:06d}.jpg", format="JPEG", quality=90)


def imagenet_jpeg(i: int, seed: int = 0) -> bytes:
    """Image i of an ImageNet-like set: 500×375 (every 4th 375×500), smooth structure at five scales plus
    luminance grain of a per-image strength and mild colour grain, quality 90: 90–130 KB, about 110 KB on
    average, as ImageNet's JPEGs (pure smooth noise compresses to a third of that)."""
    rng = np.random.default_rng([seed, i])
    w, h = IMAGENET_SIDES if i % 4 else IMAGENET_SIDES[::-1]
    acc = _noise(rng, w, h, ((3, 0.45), (8, 0.25), (24, 0.15), (80, 0.1), (200, 0.05)))
    acc += rng.uniform(15, 35) * rng.standard_normal((h, w, 1), dtype=np.float32)
    acc += 8.0 * rng.standard_normal((h, w, 3), dtype=np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8), mode="RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_imagenet_range(folder: str, start: int, stop: int, seed: int) -> None:
    for i in range(start, stop):
        Path(folder, f"img-{i:06d}.jpg").write_bytes(imagenet_jpeg(i, seed))


def write_imagenet_images(folder: Path, n: int, seed: int = 0, procs: int = 2) -> None:
    """n ImageNet-like JPEGs (see `imagenet_jpeg`) in folder/all/, in `procs` fresh processes (~40 ms each)."""
    out = folder / "all"
    out.mkdir(parents=True, exist_ok=True)
    import multiprocessing as mp

    step = max(1, -(-n // (procs * 8)))
    # spawn: this process may hold a Ray driver, which a forked child's copy would break
    with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as pool:
        for f in [pool.submit(_write_imagenet_range, str(out), s, min(n, s + step), seed) for s in range(0, n, step)]:
            f.result()


def status_mib(field: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def maxrss_mib() -> float:
    """The process's lifetime resident high-water mark (cannot be reset; Linux carries it across fork and exec)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def reset_peak() -> bool:
    """Reset the resident high-water mark VmHWM to the current RSS ("5" to clear_refs, Linux ≥ 4.0); False
    where that is not allowed (then only the lifetime peak, `maxrss_mib`, is there)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_RAY_CONTROL = ("raylet", "gcs_server", "/ray/dashboard/", "/ray/_private/", "/ray/autoscaler/")


def _proc(pid: str) -> tuple[int, float, str] | None:
    """(parent pid, CPU seconds used, command line) of a live process, from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, …, utime, stime
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), cmd


CPU_GROUPS = ("driver", "ray_workers", "ray_control", "loader_workers")


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds each live process on this machine has used so far, with its group: this process (`driver`);
    Ray's task workers (`ray_workers`: titled `ray::IDLE` or after the task they run); the rest of Ray
    (`ray_control`: raylet, GCS, dashboard and agents, and Ray Data's own actors, titled `ray::_…`); this
    process's other descendants (`loader_workers`: DataLoader and forkserver processes). On a machine with few
    cores every group competes with the workers. Linux only (/proc)."""
    procs = {int(p): info for p in os.listdir("/proc") if p.isdigit() and (info := _proc(p)) is not None}
    me = os.getpid()
    out: dict[int, tuple[str, float]] = {}
    for pid, (ppid, cpu, cmd) in procs.items():
        if pid == me:
            out[pid] = ("driver", cpu)
        elif cmd.startswith("ray::"):
            title = cmd[5:].split(" ", 1)[0]
            out[pid] = ("ray_control" if title.startswith("_") or title.endswith("Agent") else "ray_workers", cpu)
        elif any(marker in cmd for marker in _RAY_CONTROL):
            out[pid] = ("ray_control", cpu)
        else:
            while ppid > 1 and ppid != me:  # a descendant of this process?
                ppid = procs[ppid][0] if ppid in procs else 0
            if ppid == me:
                out[pid] = ("loader_workers", cpu)
    return out


def cpu_used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds used between two `cpu_seconds()` readings, by group (a process that ended in between is left
    out, one that started is counted whole)."""
    out = dict.fromkeys(CPU_GROUPS, 0.0)
    for pid, (group, cpu) in after.items():
        out[group] += max(0.0, cpu - (before[pid][1] if pid in before else 0.0))
    return out
