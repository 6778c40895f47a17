"""Fault injection for the fault-table tests: a TCP proxy that can cut a connection, processes to kill, and
what a real run leaves behind to wait for (checkpoints on disk or in S3, trace files of the samples trained on).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path


class Proxy:
    """Forwards 127.0.0.1:<port> to a target port. `cut()` closes every open connection and refuses new ones
    (the endpoint is unreachable) until `resume()`, on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stop = False
        self.resume()

    def _listen(self) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for _ in range(100):  # the port may linger for a moment after a cut
            try:
                s.bind(("127.0.0.1", self.port))
                break
            except OSError:
                time.sleep(0.1)
        s.listen(64)
        return s

    def resume(self) -> None:
        self._listener = self._listen()
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # close() alone does not wake a thread blocked in accept() on Linux, and the socket would go on
            # accepting: shutdown() does, and the port stops listening at once
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def close(self) -> None:
        self._stop = True
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    (b if src is a else a).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for s in (a, b):
                s.close()


def outage(proxy: Proxy, seconds: float, after: Callable[[], bool], what: str) -> tuple[threading.Thread, list[float]]:
    """A thread that waits for `after()`, cuts `proxy` for `seconds`, then resumes it; the list gets the wall
    times (time.time()) of the cut and of the resume."""
    times: list[float] = []

    def run() -> None:
        wait_for(what, after, every=0.2)
        proxy.cut()
        times.append(time.time())
        time.sleep(seconds)
        proxy.resume()
        times.append(time.time())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, times


def wait_for(what: str, check: Callable[[], bool], timeout: float = 300.0, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(every)


def local_checkpoints(storage: Path, run: str) -> list[Path]:
    return sorted(p for p in (storage / run).glob("checkpoint_*") if p.is_dir())


def registered_checkpoint_dirs(storage: Path, run: str) -> list[Path]:
    """Checkpoints Ray Train's controller has taken in (its snapshot beside them), oldest first: what a restart
    resumes from. A checkpoint folder exists before that; a process killed in between leaves one behind that
    Ray never took in, and a restart resumes from the one before, as Ray means it to."""
    import json

    snap = storage / run / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snap.read_text()).get("checkpoint_results", [])
    except (OSError, ValueError):
        return []
    return [storage / run / r["checkpoint_dir_name"] for r in results]


def registered_checkpoints(storage: Path, run: str) -> int:
    return len(registered_checkpoint_dirs(storage, run))


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train worker actors, from Ray's state API (the dashboard of the test cluster)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)
    return [int(a.pid) for a in actors if "TrainWorker" in str(a.class_name) and a.pid]


def sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def read_trace(folder: Path) -> dict[int, list[list[tuple[int, int, str]]]]:
    """rank → attempts, each a list of (step, epoch, key) in the order trained; each training process that
    wrote the rank's file is an attempt (raysl.train.stream.trace starts each with an `attempt <pid>` line)."""
    out: dict[int, list[list[tuple[int, int, str]]]] = {}
    for f in sorted(folder.glob("rank*.txt")):
        attempts: list[list[tuple[int, int, str]]] = []
        for line in f.read_text().splitlines():
            if line.startswith("attempt "):
                attempts.append([])
                continue
            step, epoch, key = line.split(" ", 2)
            attempts[-1].append((int(step), int(epoch), key))
        out[int(f.stem[4:])] = attempts
    return out
