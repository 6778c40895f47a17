"""`raysl submit` / `raysl jobs` without a cluster: what is forwarded, how it is quoted, where the address and
token come from, and that a passed variable's value never shows in a repr, an error or the console."""

from __future__ import annotations

import shlex
import socket
import time
from pathlib import Path

import pytest

from raysl.cli import build_parser, main
from raysl.jobs import (
    DEFAULT_EXCLUDES,
    Jobs,
    JobsError,
    SecretEnv,
    describe,
    entrypoint,
    load_token,
    local_path_warnings,
    resolve_address,
    runtime_env,
)

SECRET = "s3cr3t-value-never-printed"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_everything_after_the_separator_is_forwarded() -> None:
    args = build_parser().parse_args(["submit", "--address", "http://h:8265", "--env", "A", "--env", "B", "--",
                                      "pretrain", "--config", "x y.yaml", "--wait", "--env", "C"])
    assert args.command == ["--", "pretrain", "--config", "x y.yaml", "--wait", "--env", "C"]
    assert args.wait is False and args.env == ["A", "B"] and args.jobs_address == "http://h:8265"


def test_jobs_subcommands_parse() -> None:
    p = build_parser()
    assert p.parse_args(["jobs", "logs", "abc", "--follow"]).follow is True
    assert p.parse_args(["jobs", "stop", "abc", "--address", "h:1"]).jobs_address == "h:1"
    assert p.parse_args(["jobs", "list", "--json"]).json is True


def test_entrypoint_quotes_each_argument() -> None:
    command = ["pretrain", "--config", "my config.yaml", "optim.lr=3e-4", "tracking.tags.note=it's; rm -rf /"]
    ep = entrypoint(command)
    assert ep.startswith("raysl pretrain --config 'my config.yaml' optim.lr=3e-4 ")
    assert shlex.split(ep) == ["raysl", *command]


def test_secret_env_keeps_values_out_of_repr_and_errors() -> None:
    env = SecretEnv.from_environ(["AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI", "AWS_SECRET_ACCESS_KEY"],
                                 {"AWS_SECRET_ACCESS_KEY": SECRET, "MLFLOW_TRACKING_URI": "http://m:5000"})
    assert env.names == ["AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"]
    assert env.values["AWS_SECRET_ACCESS_KEY"] == SECRET
    for text in (repr(env), str(env), f"{env}", repr([env])):
        assert SECRET not in text and "AWS_SECRET_ACCESS_KEY" in text
    assert env.scrub(f"bad request: {{'AWS_SECRET_ACCESS_KEY': '{SECRET}'}}") == \
        "bad request: {'AWS_SECRET_ACCESS_KEY': '<AWS_SECRET_ACCESS_KEY>'}"


def test_missing_or_inline_env_is_a_clear_error() -> None:
    with pytest.raises(JobsError, match="not set in this environment: MISSING_ONE, MISSING_TWO") as exc:
        SecretEnv.from_environ(["SET", "MISSING_ONE", "MISSING_TWO"], {"SET": SECRET})
    assert SECRET not in str(exc.value)
    with pytest.raises(JobsError, match="not NAME=VALUE") as exc:
        SecretEnv.from_environ([f"AWS_SECRET_ACCESS_KEY={SECRET}"], {})
    assert SECRET not in str(exc.value)
    with pytest.raises(JobsError, match="RAY_ADDRESS is not passed"):
        SecretEnv.from_environ(["RAY_ADDRESS"], {"RAY_ADDRESS": "x"})


def test_runtime_env_packages_the_working_dir_with_excludes(tmp_path: Path) -> None:
    env = SecretEnv({"AWS_SECRET_ACCESS_KEY": SECRET})
    rt = runtime_env(str(tmp_path), env, excludes=["data/"])
    assert rt["working_dir"] == str(tmp_path.resolve()) and rt["env_vars"] == {"AWS_SECRET_ACCESS_KEY": SECRET}
    assert {".venv", ".git", "raysl-runs", "demo-output", "mlflow.db", "mlartifacts"} <= set(DEFAULT_EXCLUDES)
    assert rt["excludes"][-1] == "data/"
    assert runtime_env(None, SecretEnv({})) == {}
    with pytest.raises(JobsError, match="is not a folder"):
        runtime_env(str(tmp_path / "nope"), env)


def test_describe_shows_variable_names_only() -> None:
    job = {"submission_id": "j1", "status": "RUNNING", "type": "SUBMISSION", "entrypoint": "raysl pretrain",
           "runtime_env": {"env_vars": {"AWS_SECRET_ACCESS_KEY": SECRET, "A": "1"}, "working_dir": "gcs://x.zip"}}
    out = describe(job)
    assert out["runtime_env"] == {"env_vars": ["A", "AWS_SECRET_ACCESS_KEY"], "working_dir": "gcs://x.zip"}
    assert SECRET not in repr(out)


def test_address_comes_from_the_flag_or_rays_variables() -> None:
    assert resolve_address("http://h:8265/", {}) == "http://h:8265"
    assert resolve_address("h:8265", {}) == "http://h:8265"
    assert resolve_address(None, {"RAY_API_SERVER_ADDRESS": "http://a:8265", "RAY_ADDRESS": "http://b:1"}) == \
        "http://a:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "https://b:1"}) == "https://b:1"
    with pytest.raises(JobsError, match="no cluster address"):
        resolve_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"})  # a GCS address is not the Jobs API
    with pytest.raises(JobsError, match="not a Jobs API address"):
        resolve_address("ray://h:10001", {})


def test_token_sources_in_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-default\n")
    path_file, flag_file = tmp_path / "t1", tmp_path / "t2"
    path_file.write_text("from-path")
    flag_file.write_text("from-flag")
    env = {"HOME": str(home), "RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path_file)}
    assert load_token(str(flag_file), env) == "from-flag"
    assert load_token(None, env) == "from-env"
    assert load_token(None, {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}) == "from-path"
    assert load_token(None, {"HOME": str(home)}) == "from-default"
    assert load_token(None, {"HOME": str(home), "RAY_AUTH_MODE": "disabled"}) is None
    assert load_token(None, {"HOME": str(tmp_path)}) is None
    (tmp_path / "empty").write_text("")
    with pytest.raises(JobsError, match="is empty"):
        load_token(str(tmp_path / "empty"), {})
    with pytest.raises(JobsError, match="cannot read"):
        load_token(None, {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "absent")})


def test_local_files_outside_the_working_dir_are_flagged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "in.yaml").write_text("")
    (tmp_path / "out.yaml").write_text("")
    notes = local_path_warnings(["pretrain", "--config", "out.yaml", "--config=wd/in.yaml", "s3://b/k"], "wd")
    assert len(notes) == 2 and "out.yaml" in notes[0] and "wd/in.yaml" in notes[1]
    assert local_path_warnings(["pretrain", "--config", "in.yaml"], "wd") == []


def test_a_dead_address_fails_within_seconds() -> None:
    t0 = time.monotonic()
    with pytest.raises(JobsError, match="cannot reach a Ray cluster .*connection refused"):
        Jobs(f"http://127.0.0.1:{_closed_port()}")
    assert time.monotonic() - t0 < 5


def test_a_silent_address_times_out() -> None:
    with socket.socket() as server:  # accepts connections (the kernel does), never answers
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        t0 = time.monotonic()
        with pytest.raises(JobsError, match="no answer from .* within 1s"):
            Jobs(f"http://127.0.0.1:{server.getsockname()[1]}", timeout_s=1)
        assert time.monotonic() - t0 < 5


def test_cli_errors_name_the_problem_and_never_the_value(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("RAYSL_UNSET_FOR_TEST", raising=False)
    address = f"http://127.0.0.1:{_closed_port()}"
    base = ["submit", "--address", address, "--env", "AWS_SECRET_ACCESS_KEY"]
    assert main([*base, "--env", "RAYSL_UNSET_FOR_TEST", "--", "pretrain", "--config", "byol"]) == 2
    assert "RAYSL_UNSET_FOR_TEST" in capsys.readouterr().err
    assert main([*base, "--", "pretrain", "--config", "byol"]) == 2
    out = capsys.readouterr()
    assert "cannot reach a Ray cluster" in out.err and SECRET not in out.out + out.err
    assert main([*base, "--", "pretrian", "--config", "byol"]) == 2
    assert "not a valid raysl command" in capsys.readouterr().err
    assert main(["submit", "--address", address]) == 2
    assert "nothing to run" in capsys.readouterr().err
