"""`raysl submit` and `raysl jobs`: run any raysl command as a Ray job on a cluster (Ray Jobs API).

    raysl submit --address http://HEAD:8265 --working-dir . --env MLFLOW_TRACKING_URI --wait -- pretrain --config x.yaml
    raysl jobs list | status ID | logs ID [--follow] | stop ID

Exit codes: 0 success (with --wait/--follow: the job SUCCEEDED), 1 the job FAILED, 3 it was STOPPED, 2 raysl
could not do what was asked (no cluster at the address, a missing variable, a bad command), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from raysl.jobs import EXIT_CODES, Jobs, JobsError, SecretEnv, load_token, local_path_warnings, resolve_address
from raysl.storage import redact

LOG_TAIL_LINES = 40


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _connect(args: argparse.Namespace, secrets: SecretEnv | None = None) -> Jobs:
    address = resolve_address(args.jobs_address or getattr(args, "address", None))
    return Jobs(address, token=load_token(args.token_file), timeout_s=args.timeout, secrets=secrets)


def _write(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


def _follow(jobs: Jobs, job_id: str) -> int:
    """Stream the log until the job ends; on failure also print the log's tail and Ray's message."""
    try:
        status = jobs.follow(job_id, _write)
    except KeyboardInterrupt:
        _err(f"\nstopped following; job {job_id} keeps running (raysl jobs stop {job_id} stops it)")
        return 130
    if status != "SUCCEEDED":
        info = jobs.info(job_id)
        tail = jobs.logs(job_id).rstrip("\n").splitlines()[-LOG_TAIL_LINES:]
        _err(f"\njob {job_id} {status}: {info.get('message') or ''}".rstrip())
        if tail:
            _err(f"--- last {len(tail)} lines of the job's log ---\n" + "\n".join(tail))
    else:
        _err(f"job {job_id} SUCCEEDED")
    return EXIT_CODES.get(status, 1)


def _check_command(command: list[str]) -> None:
    """Parse the forwarded command with raysl's own parser here: a typo fails now, not on the cluster."""
    from raysl.cli import build_parser

    if not command:
        raise JobsError("nothing to run: raysl submit [options] -- pretrain --config …")
    if command[0] in ("submit", "jobs"):
        raise JobsError(f"`raysl {command[0]}` runs where you are, not as a job")
    try:
        build_parser().parse_args(command)
    except SystemExit as exc:
        raise JobsError("the command after -- is not a valid raysl command (see above); nothing submitted") from exc


def cmd_submit(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    _check_command(command)
    secrets = SecretEnv.from_environ(args.env)
    for note in local_path_warnings(command, args.working_dir):
        _err(f"warning: {note}")
    jobs = _connect(args, secrets)
    t0 = time.monotonic()
    result = jobs.submit(command, working_dir=args.working_dir, submission_id=args.submission_id,
                         excludes=args.exclude)
    print(result.job_id, flush=True)  # stdout's first line is the id alone: JOB=$(raysl submit … | head -1)
    if result.already_existed:
        _err(f"submission id {result.job_id} was already used for this same command (now {result.status}); "
             "not submitted again")
    else:
        _err(f"submitted in {time.monotonic() - t0:.1f}s to {redact(jobs.address)}"
             + (f" with {', '.join(secrets.names)} from this environment" if secrets.names else ""))
    if not args.wait:
        _err(f"follow it: raysl jobs logs {result.job_id} --follow --address {redact(jobs.address)}")
        return 0
    return _follow(jobs, result.job_id)


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _row(job: dict[str, Any]) -> str:
    ident = job.get("submission_id") or job.get("job_id") or "-"
    took = f"{(job['end_time'] - job['start_time']) / 1000:.0f}s" if job.get("end_time") and job.get(
        "start_time") else "-"
    entry = job.get("entrypoint") or ""
    return f"{ident:<28} {job['status']:<10} {_when(job.get('start_time')):<20} {took:>7}  {entry[:70]}"


def cmd_jobs(args: argparse.Namespace) -> int:
    jobs = _connect(args)
    if args.jobs_cmd == "list":
        found = sorted(jobs.list(), key=lambda j: j.get("start_time") or 0)
        if args.json:
            print(json.dumps(found, indent=2, default=str))
        else:
            print(f"{'ID':<28} {'STATUS':<10} {'STARTED':<20} {'TOOK':>7}  ENTRYPOINT")
            for job in found:
                print(_row(job))
        return 0
    if args.jobs_cmd == "status":
        keep = ("submission_id", "job_id", "status", "message", "entrypoint", "start_time", "end_time",
                "driver_exit_code", "runtime_env", "metadata")
        print(json.dumps({k: v for k, v in jobs.info(args.id).items() if k in keep}, indent=2, default=str))
        return 0
    if args.jobs_cmd == "logs":
        if args.follow:
            return _follow(jobs, args.id)
        _write(jobs.logs(args.id))
        return 0
    was_running = jobs.stop(args.id)
    print(f"stop requested for job {args.id}" if was_running else f"job {args.id} was not running")
    return 0


def _guard(fn: Any) -> Any:
    """JobsError is the user's problem stated plainly: one line on stderr and exit code 2, no traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except JobsError as exc:
            _err(f"raysl {args.cmd}: {redact(str(exc))}")
            return 2

    return run


def _connection_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--address", dest="jobs_address", metavar="URL",
                   help="the Ray dashboard, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, else an "
                        "http $RAY_ADDRESS)")
    p.add_argument("--token-file", metavar="PATH",
                   help="file holding the cluster's auth token (default: $RAY_AUTH_TOKEN, the file at "
                        "$RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait for the cluster to answer (default 10)")
    return p


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = _connection_options()
    s = sub.add_parser("submit", parents=[common], usage="raysl submit [options] -- COMMAND [ARGS …]",
                       help="run a raysl command as a Ray job: raysl submit [options] -- pretrain --config …")
    s.add_argument("--working-dir", metavar="DIR",
                   help="folder uploaded as the job's working directory (caches, .venv, .git, local runs and "
                        "MLflow stores left out)")
    s.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="another gitignore-style pattern to leave out of the working directory")
    s.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="pass this variable from your environment to the job (repeatable); its value is "
                        "never printed")
    s.add_argument("--submission-id", metavar="ID",
                   help="a job id of your choosing; resubmitting the same command under it does not run it twice")
    s.add_argument("--wait", action="store_true", help="follow the log; exit with the job's status")
    s.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND …",
                   help="the raysl command to run and its arguments, e.g. -- pretrain --config x.yaml")
    s.set_defaults(fn=_guard(cmd_submit))

    j = sub.add_parser("jobs", help="Ray jobs on a cluster: list, status, logs, stop")
    jsub = j.add_subparsers(dest="jobs_cmd", required=True)
    s = jsub.add_parser("list", parents=[common], help="all jobs, oldest first")
    s.add_argument("--json", action="store_true", help="full details (variable names only, never values)")
    for name, text in (("status", "a job's status and details"), ("logs", "a job's log"), ("stop", "stop a job")):
        s = jsub.add_parser(name, parents=[common], help=text)
        s.add_argument("id", help="submission id (or job id)")
        if name == "logs":
            s.add_argument("--follow", action="store_true", help="stream until the job ends; exit with its status")
    j.set_defaults(fn=_guard(cmd_jobs))
