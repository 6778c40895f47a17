"""Ray Jobs API: submit a raysl command to a cluster, list jobs, read their status and logs, stop them.

A thin layer over Ray's `JobSubmissionClient` that adds what raysl needs around it: the address and token
found the way Ray's own tools find them, a reachability check bounded in seconds (Ray's client has no
timeout, so a dead or black-holed address would otherwise hang), environment variables passed by name whose
values never reach a log line, a repr or an error, and job descriptions with those values removed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Never packaged into a job's working_dir: environments, VCS data, local runs and tracking stores, caches.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".venv", "venv", ".git", "raysl-runs", "demo-output", "mlflow.db", "mlruns", "mlartifacts",
    "__pycache__", "*.pyc", ".mypy_cache", ".ruff_cache", ".pytest_cache", "*.egg-info", ".ipynb_checkpoints",
)
# Variables that would break the job or leak the cluster's own credential into its stored runtime_env.
REFUSED_ENV = {"RAY_ADDRESS": "the job supervisor sets it to the cluster the job runs on",
               "RAY_AUTH_TOKEN": "the cluster holds its own token",
               "RAY_AUTH_TOKEN_PATH": "the cluster holds its own token"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}  # 2 stays raysl's own usage/connection error


class JobsError(RuntimeError):
    """A user-facing failure: no cluster at the address, a missing variable, a rejected token, …"""


@dataclass(frozen=True, repr=False)
class SecretEnv:
    """Environment variables passed to a job by name. The values are kept out of repr and str, and
    `scrub` removes them from any text (a server error may echo the request it rejected)."""

    values: dict[str, str]

    @classmethod
    def from_environ(cls, names: Iterable[str], environ: Mapping[str, str] | None = None) -> SecretEnv:
        environ = os.environ if environ is None else environ
        names = list(dict.fromkeys(names))  # repeated names count once, order kept
        for name in names:
            if "=" in name:  # the value must come from the environment, never the command line
                raise JobsError(f"--env takes a variable name, not NAME=VALUE (got {name.split('=', 1)[0]}=…); "
                                "export the variable and pass its name")
            if name in REFUSED_ENV:
                raise JobsError(f"--env {name} is not passed to jobs: {REFUSED_ENV[name]}")
        missing = [n for n in names if n not in environ]
        if missing:
            raise JobsError(f"--env names variables that are not set in this environment: {', '.join(missing)}")
        return cls({n: environ[n] for n in names})

    @property
    def names(self) -> list[str]:
        return list(self.values)

    def scrub(self, text: str) -> str:
        for name, value in self.values.items():
            if value:
                text = text.replace(value, f"<{name}>")
        return text

    def __repr__(self) -> str:
        return f"SecretEnv({', '.join(self.names)})"

    __str__ = __repr__


def resolve_address(explicit: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The Jobs API (dashboard) address: --address, else $RAY_API_SERVER_ADDRESS, else an http(s) $RAY_ADDRESS.

    A `ray://` or GCS (`host:6379`) address is refused with a hint instead of being tried: the Jobs API
    lives on the dashboard port.
    """
    environ = os.environ if environ is None else environ
    ray_address = environ.get("RAY_ADDRESS", "")
    address = (explicit or environ.get("RAY_API_SERVER_ADDRESS")
               or (ray_address if ray_address.startswith(("http://", "https://")) else None))
    if not address:
        raise JobsError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard) or set "
                        "$RAY_API_SERVER_ADDRESS")
    if address.startswith("ray://") or address == "auto":
        raise JobsError(f"{address!r} is not a Jobs API address: use the dashboard's http://HEAD:8265")
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def load_token(token_file: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The cluster's auth token, looked up as Ray looks it up, with an explicit file first.

    Order: `token_file`, $RAY_AUTH_TOKEN, the file at $RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token (Ray's
    default path, where `ray start`/`ray.init` keep a local cluster's token). None under RAY_AUTH_MODE=disabled
    or when none exists; a cluster without token auth ignores the header, so sending one is harmless.
    """
    environ = os.environ if environ is None else environ
    if token_file:
        return _read_token(Path(token_file).expanduser(), "--token-file")
    if environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if environ.get("RAY_AUTH_TOKEN"):
        return environ["RAY_AUTH_TOKEN"].strip()
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        return _read_token(Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser(), "$RAY_AUTH_TOKEN_PATH")
    default = Path(environ.get("HOME", str(Path.home()))) / ".ray" / "auth_token"
    return _read_token(default, str(default)) if default.is_file() else None


def _read_token(path: Path, source: str) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise JobsError(f"cannot read the token file given by {source}: {exc.strerror}") from None
    if not token:
        raise JobsError(f"the token file given by {source} is empty")
    return token


def entrypoint(command: list[str]) -> str:
    """The shell command a job runs: `raysl` with the arguments quoted, so spaces and quotes survive."""
    return shlex.join(["raysl", *command])


def runtime_env(working_dir: str | None, env: SecretEnv, excludes: Iterable[str] = ()) -> dict[str, Any]:
    rt: dict[str, Any] = {}
    if working_dir:
        wd = Path(working_dir)
        if not wd.is_dir():
            raise JobsError(f"--working-dir {working_dir} is not a folder")
        rt["working_dir"] = str(wd.resolve())
        rt["excludes"] = [*DEFAULT_EXCLUDES, *excludes]
    if env.values:
        rt["env_vars"] = dict(env.values)
    return rt


def local_path_warnings(command: list[str], working_dir: str | None) -> list[str]:
    """Arguments naming a file here that the job, which resolves paths on the cluster, will not find."""
    notes = []
    for arg in command:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg  # --config=x.yaml
        if value.startswith("-") or "://" in value or not os.path.isfile(value):
            continue
        if os.path.isabs(value):
            notes.append(f"{value} is a local absolute path; the job reads it on the cluster")
        elif not working_dir or not (Path(working_dir) / value).is_file():
            notes.append(f"{value} is not under --working-dir; the job resolves it in the working dir on the cluster")
    return notes


def describe(details: Any) -> dict[str, Any]:
    """A job as plain data with the runtime_env's variable values replaced by their names."""
    data = details.model_dump() if hasattr(details, "model_dump") else dict(details)  # Ray's JobDetails or a dict
    data["status"] = str(getattr(data.get("status"), "value", data.get("status")))
    data["type"] = str(getattr(data.get("type"), "value", data.get("type")))
    rt = dict(data.get("runtime_env") or {})
    if "env_vars" in rt:
        rt["env_vars"] = sorted(rt["env_vars"] or {})
    data["runtime_env"] = rt
    return data


@dataclass
class SubmitResult:
    """The job's id; `already_existed` when its submission id was taken by this same command before."""

    job_id: str
    already_existed: bool = False
    status: str = "PENDING"


class Jobs:
    """A connection to one cluster's Jobs API, checked on creation within `timeout_s`."""

    def __init__(self, address: str, token: str | None = None, timeout_s: float = 10.0,
                 secrets: SecretEnv | None = None) -> None:
        self.address = address
        self._secrets = secrets or SecretEnv({})
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._check(headers, timeout_s)
        from ray.job_submission import JobSubmissionClient

        # The SDK logs each request body at DEBUG, runtime_env values included: keep it at INFO at most.
        sdk_log = logging.getLogger("ray.dashboard.modules.dashboard_sdk")
        sdk_log.setLevel(max(sdk_log.getEffectiveLevel(), logging.INFO))
        # An explicit Authorization header is used as given: Ray adds its own only when RAY_AUTH_MODE=token
        # is set in this process, which a submitting laptop usually does not have.
        self._client = self._call(lambda: JobSubmissionClient(address, headers=headers))

    def _check(self, headers: dict[str, str], timeout_s: float) -> None:
        import requests

        url = f"{self.address}/api/version"
        try:
            r = requests.get(url, headers=headers, timeout=(min(timeout_s, 5.0), timeout_s))
        except requests.exceptions.Timeout:
            raise JobsError(f"no answer from {self.address} within {timeout_s:g}s: is it the Ray dashboard "
                            "address of a running cluster (http://HEAD:8265)?") from None
        except requests.exceptions.RequestException as exc:
            text = str(exc).lower()
            reason = ("connection refused" if "refused" in text else
                      "host name not found" if "resolution" in text or "name or service" in text else
                      type(exc).__name__)
            raise JobsError(f"cannot reach a Ray cluster at {self.address} ({reason}): is the head running, "
                            "and is this its dashboard port (default 8265)?") from None
        if r.status_code == 401:
            raise JobsError(f"{self.address} requires a token: set $RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH, or "
                            "pass --token-file (`ray get-auth-token` on the head prints it)")
        if r.status_code == 403:
            raise JobsError(f"{self.address} rejected the token: it is not this cluster's")
        try:
            version = r.json()["ray_version"] if r.ok else None
        except ValueError:
            version = None
        if not version:
            raise JobsError(f"{self.address} answered HTTP {r.status_code} but is not a Ray dashboard")
        log.debug("Ray %s at %s", version, self.address)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run a client call; Ray's errors become JobsError, with any passed variable's value removed."""
        try:
            return fn()
        except JobsError:
            raise
        except Exception as exc:  # noqa: BLE001 - the SDK raises RuntimeError, ConnectionError, AuthenticationError
            raise JobsError(self._secrets.scrub(str(exc)).strip()) from None

    def submit(self, command: list[str], *, working_dir: str | None = None, submission_id: str | None = None,
               excludes: Iterable[str] = ()) -> SubmitResult:
        """Submit `raysl <command>`; a submission id already used by the same command is not run twice."""
        ep = entrypoint(command)
        rt = runtime_env(working_dir, self._secrets, excludes)
        if submission_id:
            existing = self._call(lambda: self._find(submission_id))
            if existing is not None:
                if existing.entrypoint != ep:
                    raise JobsError(f"submission id {submission_id} is already used by another command "
                                    f"({existing.entrypoint!r}); pick a new id")
                return SubmitResult(submission_id, already_existed=True, status=str(existing.status.value))
        log.info("submitting %r to %s (env: %s)", ep, self.address, ", ".join(self._secrets.names) or "none")
        job_id = self._call(lambda: self._client.submit_job(entrypoint=ep, runtime_env=rt,
                                                            submission_id=submission_id))
        return SubmitResult(str(job_id))

    def _find(self, job_id: str) -> Any:
        try:
            return self._client.get_job_info(job_id)
        except RuntimeError as exc:
            if "404" in str(exc) or "does not exist" in str(exc):
                return None
            raise JobsError(self._secrets.scrub(str(exc))) from None

    def info(self, job_id: str) -> dict[str, Any]:
        found = self._call(lambda: self._find(job_id))
        if found is None:
            raise JobsError(f"no job {job_id} at {self.address}")
        return describe(found)

    def status(self, job_id: str) -> str:
        return str(self.info(job_id)["status"])

    def list(self) -> list[dict[str, Any]]:
        return [describe(d) for d in self._call(self._client.list_jobs)]

    def logs(self, job_id: str) -> str:
        self.info(job_id)  # a clear "no job" rather than the SDK's HTTP error text
        return str(self._call(lambda: self._client.get_job_logs(job_id)))

    def follow(self, job_id: str, write: Callable[[str], Any]) -> str:
        """Stream the job's log to `write` until the job ends; returns its final status."""
        self.info(job_id)

        async def tail() -> None:
            async for chunk in self._client.tail_job_logs(job_id):
                write(chunk)

        try:
            asyncio.run(tail())
        except Exception as exc:  # noqa: BLE001 - a proxy may refuse websockets: poll instead of failing
            log.warning("log stream ended early (%s); waiting for the job by polling its status", exc)
        return self.wait(job_id)

    def wait(self, job_id: str, poll_s: float = 2.0) -> str:
        while (status := self.status(job_id)) not in TERMINAL:
            time.sleep(poll_s)
        return status

    def stop(self, job_id: str) -> bool:
        self.info(job_id)
        return bool(self._call(lambda: self._client.stop_job(job_id)))
