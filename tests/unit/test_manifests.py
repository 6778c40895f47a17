"""The Kubernetes manifests in infra/k8s, checked without a cluster.

- every object validates against Kubernetes' own schema (kubernetes-validate, strict: unknown fields fail);
  KubeRay's RayCluster and RayJob have no schema there, so their fields we rely on are checked here and their
  pod templates are validated as core PodTemplates;
- every `raysl …` command a container or RayJob entrypoint runs parses with raysl's own parser (a subcommand
  or option that does not exist fails), every `--config` resolves with its overrides, a command submitted with
  `raysl submit … -- <args>` is checked the same way, and every repository file they name exists (a pipeline
  file is loaded, with its pretraining config);
- every repository path a manifest mentions, comments included, exists.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from raysl.cli import build_parser
from raysl.config import load_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
# The oldest Kubernetes the manifests claim (CronJob timeZone and the batch.kubernetes.io/job-name label are
# GA from 1.27) and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
# Custom resources without a schema in kubernetes-validate: checked structurally below. Any other kind is
# validated against its schema, so a new core kind cannot go unchecked (and a new CRD fails until handled).
RAY_KINDS = {"RayCluster", "RayJob"}
# Images whose ENTRYPOINT is `raysl` (infra/Dockerfile, infra/Dockerfile.submit): a container that sets only
# `args` runs raysl with them.
RAYSL_IMAGES = {"raysl", "raysl-submit"}
SHELLS = {"sh", "bash"}
SEPARATORS = {";", "&&", "||", "|", "&", "\n", "(", ")", ";;"}


@dataclass(frozen=True)
class Doc:
    file: Path
    obj: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.file.name}:{self.obj.get('kind')}/{self.obj.get('metadata', {}).get('name')}"


@dataclass(frozen=True)
class Invocation:
    file: Path
    argv: tuple[str, ...]  # the arguments after `raysl`

    @property
    def id(self) -> str:
        return f"{self.file.name}:raysl {' '.join(self.argv[:3])}"


def load_docs() -> list[Doc]:
    docs = []
    for f in MANIFESTS:
        for obj in yaml.safe_load_all(f.read_text()):
            if obj is not None:
                docs.append(Doc(f, obj))
    return docs


DOCS = load_docs()


# ---- finding raysl commands -----------------------------------------------------------------------------

def shell_commands(script: str) -> Iterator[list[str]]:
    """The simple commands of a shell script, as word lists (quotes removed, line continuations joined)."""
    lex = shlex.shlex(script.replace("\\\n", " "), posix=True, punctuation_chars=";&|()\n")
    lex.whitespace = " \t\r"  # newlines separate commands
    lex.whitespace_split = True
    cmd: list[str] = []
    for tok in lex:
        if tok in SEPARATORS:
            if cmd:
                yield cmd
            cmd = []
        else:
            cmd.append(tok)
    if cmd:
        yield cmd


def raysl_in_words(words: list[str]) -> Iterator[tuple[str, ...]]:
    """`raysl …` in one command's words: directly (after VAR=x, exec, env), or inside `sh -c "…"`."""
    i = 0
    while i < len(words) and (re.fullmatch(r"[A-Za-z_]\w*=.*", words[i]) or words[i] in {"exec", "env", "time"}):
        i += 1
    rest = words[i:]
    if not rest:
        return
    prog = rest[0].rsplit("/", 1)[-1]
    if prog == "raysl":
        yield tuple(rest[1:])
    elif prog.startswith("python") and rest[1:3] in (["-m", "raysl"], ["-m", "raysl.cli"]):
        yield tuple(rest[3:])
    else:  # e.g. bash -c "raysl … && raysl …", ray job submit -- raysl …
        cut = rest.index("--") if "--" in rest else len(rest)
        for w in rest[1:cut]:
            if "raysl" in w and re.search(r"\s", w):
                yield from raysl_in_script(w)
        if cut < len(rest):
            yield from raysl_in_words(rest[cut + 1:])


def raysl_in_script(script: str) -> Iterator[tuple[str, ...]]:
    for words in shell_commands(script):
        yield from raysl_in_words(words)


def containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container spec anywhere in an object (pod templates of any controller or custom resource)."""
    if isinstance(node, dict):
        for key in ("containers", "initContainers"):
            for c in node.get(key) or []:
                if isinstance(c, dict) and "image" in c:
                    yield c
        for v in node.values():
            yield from containers(v)
    elif isinstance(node, list):
        for v in node:
            yield from containers(v)


def image_name(image: str) -> str:
    return image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]


def raysl_in_doc(obj: dict[str, Any]) -> Iterator[tuple[str, ...]]:
    for c in containers(obj):
        command, args = list(c.get("command") or []), list(c.get("args") or [])
        if not command and image_name(c["image"]) in RAYSL_IMAGES and args:
            command = ["raysl"]
        argv = command + args
        if not argv:
            continue
        prog = argv[0].rsplit("/", 1)[-1]
        if prog == "raysl":
            yield tuple(argv[1:])  # Kubernetes passes these as argv: no shell
        elif prog in SHELLS and "-c" in argv:
            yield from raysl_in_script(" ".join(argv[argv.index("-c") + 1:2 + argv.index("-c")]))
        else:
            yield from raysl_in_words(argv)
    if obj.get("kind") == "RayJob":
        yield from raysl_in_script(obj["spec"]["entrypoint"])


INVOCATIONS = [Invocation(d.file, argv) for d in DOCS for argv in raysl_in_doc(d.obj)]


# ---- checking one raysl command -------------------------------------------------------------------------

def parse(argv: tuple[str, ...] | list[str]) -> argparse.Namespace:
    """raysl's own parser on `argv`; a parse error fails the test with argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(list(argv))
    except SystemExit:
        pytest.fail(f"`raysl {shlex.join(argv)}` does not parse:\n{err.getvalue()}")


def repo_file_tokens(argv: tuple[str, ...] | list[str]) -> list[str]:
    """Words that name a file in this repository: relative paths with a folder and a file suffix."""
    return [a for a in argv if "://" not in a and "=" not in a and not a.startswith(("-", "/", "$"))
            and re.fullmatch(r"(?:\./)?[\w.-]+(?:/[\w.-]+)+\.(?:ya?ml|json|py|csv|txt)", a)]


def check_pipeline_file(path: Path) -> None:
    """A pipeline config loads, and its pretraining config resolves (relative to it, or built in) with the
    pipeline's overrides; data.uri is set at run time to the snapshot's manifest, so a stand-in is used."""
    from raysl.pipeline.config import load_pipeline

    cfg, base = load_pipeline(path)
    src = cfg.pretrain.config
    local = base / src
    snapshot = f"data.uri={cfg.state}/{cfg.name}/snapshots/check.snapshot.json"
    load_config(str(local) if local.is_file() else src, [*cfg.pretrain.overrides, snapshot])


def check_invocation(argv: tuple[str, ...] | list[str]) -> None:
    """Everything that can be known about `raysl ARGV` without running it."""
    ns = parse(argv)
    if getattr(ns, "config", None):
        load_config(ns.config, list(getattr(ns, "overrides", None) or []))
    for token in repo_file_tokens(argv):
        path = REPO / token
        assert path.is_file(), f"`raysl {shlex.join(argv)}` names {token}, which is not in the repository"
        if path.is_relative_to(REPO / "pipelines"):
            check_pipeline_file(path)
    if ns.cmd == "submit":
        assert "--" in argv, f"`raysl {shlex.join(argv)}`: submit without `-- <raysl args>`"
        inner = list(argv[list(argv).index("--") + 1:])
        assert inner, f"`raysl {shlex.join(argv)}` submits nothing"
        check_invocation(inner)


# ---- tests ----------------------------------------------------------------------------------------------

def test_manifests_found() -> None:
    kinds = {d.obj.get("kind") for d in DOCS}
    assert {"ConfigMap", "CronJob", "Deployment", "Service", "RayCluster", "RayJob"} <= kinds, kinds
    files = {i.file.name for i in INVOCATIONS}
    assert {"cronjob-retrain.yaml", "rayjob-byol.yaml"} <= files, f"raysl commands found only in {files}"


@pytest.mark.parametrize("doc", [d for d in DOCS if d.obj.get("kind") not in RAY_KINDS], ids=lambda d: d.id)
def test_core_objects_match_kubernetes_schema(doc: Doc) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc.obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc.id} (Kubernetes {version}): {exc.message} at {'.'.join(map(str, exc.path))}")


def validate_pod_template(template: dict[str, Any], where: str) -> None:
    obj = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} (Kubernetes {version}): {exc.message} at {'.'.join(map(str, exc.path))}")


def cluster_image_ray_version() -> str:
    m = re.search(r"^ARG RAY_VERSION=(\S+)$", (REPO / "infra" / "Dockerfile").read_text(), re.M)
    assert m, "infra/Dockerfile: no ARG RAY_VERSION"
    return m.group(1)


def check_ray_cluster_spec(spec: dict[str, Any], where: str) -> None:
    assert spec.get("rayVersion") == cluster_image_ray_version(), f"{where}: rayVersion vs infra/Dockerfile"
    auth = spec.get("authOptions")
    if auth is not None:
        assert auth.get("mode") in {"token", "disabled"}, f"{where}: authOptions.mode"
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head.get("rayStartParams", {}).values()), f"{where}: rayStartParams"
    validate_pod_template(head["template"], f"{where} headGroupSpec.template")
    names = []
    for g in spec.get("workerGroupSpecs", []):
        name = g["groupName"]
        names.append(name)
        lo, n, hi = g.get("minReplicas", 0), g.get("replicas", 0), g.get("maxReplicas", 2**31 - 1)
        assert all(isinstance(x, int) for x in (lo, n, hi)) and 0 <= lo <= n <= hi, f"{where} {name}: replicas"
        assert all(isinstance(v, str) for v in g.get("rayStartParams", {}).values()), f"{where} {name}"
        validate_pod_template(g["template"], f"{where} workerGroupSpecs[{name}].template")
    assert len(names) == len(set(names)), f"{where}: duplicate worker group names {names}"


@pytest.mark.parametrize("doc", [d for d in DOCS if d.obj.get("kind") in RAY_KINDS], ids=lambda d: d.id)
def test_ray_objects_structure(doc: Doc) -> None:
    obj = doc.obj
    assert obj["apiVersion"] == "ray.io/v1", doc.id
    assert obj["metadata"]["name"], doc.id
    spec = obj["spec"]
    if obj["kind"] == "RayCluster":
        check_ray_cluster_spec(spec, doc.id)
    else:
        assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip(), doc.id
        for key in ("shutdownAfterJobFinishes",):
            assert isinstance(spec.get(key, False), bool), f"{doc.id}: {key}"
        for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds"):
            assert isinstance(spec.get(key, 0), int) and spec.get(key, 0) >= 0, f"{doc.id}: {key}"
        check_ray_cluster_spec(spec["rayClusterSpec"], doc.id)


@pytest.mark.parametrize("inv", INVOCATIONS, ids=lambda i: i.id)
def test_raysl_commands_parse_and_resolve(inv: Invocation) -> None:
    check_invocation(inv.argv)


def test_checker_rejects_what_does_not_exist() -> None:
    with pytest.raises(pytest.fail.Exception):
        check_invocation(["no-such-subcommand", "--config", "byol"])
    with pytest.raises(pytest.fail.Exception):
        check_invocation(["pretrain", "--config", "byol", "--no-such-option"])
    with pytest.raises(Exception, match="not found"):
        check_invocation(["pretrain", "--config", "no-such-config"])
    with pytest.raises(Exception, match="no_such_field"):
        check_invocation(["pretrain", "--config", "byol", "train.no_such_field=1"])
    with pytest.raises(AssertionError, match="not in the repository"):
        check_invocation(["pipeline", "run", "pipelines/no-such-pipeline.yaml"])
    found = [list(c) for c in raysl_in_doc({"kind": "Pod", "spec": {"containers": [{
        "name": "c", "image": "x", "command": ["/bin/bash", "-c"],
        "args": ["set -e\nweek=1\nexec raysl pretrain \\\n  --config byol && echo done"]}]}})]
    assert found == [["pretrain", "--config", "byol"]]


def test_submitted_files_ship_in_the_submit_image() -> None:
    """`raysl submit --working-dir …` uploads the submitter image's /app: whatever the submitted command
    reads from the repository must be copied there by infra/Dockerfile.submit and allowed by its
    .dockerignore."""
    dockerfile = (REPO / "infra" / "Dockerfile.submit").read_text()
    allowed = {line[1:].strip().rstrip("/") for line in
               (REPO / "infra" / "Dockerfile.submit.dockerignore").read_text().splitlines() if line.startswith("!")}
    submits = [i for i in INVOCATIONS if i.argv and i.argv[0] == "submit" and
               any(a.startswith("--working-dir") for a in i.argv)]
    assert submits, "no `raysl submit --working-dir` in the manifests"
    for inv in submits:
        inner = inv.argv[inv.argv.index("--") + 1:]
        for token in repo_file_tokens(inner):
            top = Path(token).parts[0]
            assert top in allowed, f"{inv.id}: {top}/ is not in infra/Dockerfile.submit.dockerignore's allow-list"
            copied = re.search(rf"^COPY {re.escape(top)}\b", dockerfile, re.M)
            assert copied, f"{inv.id}: infra/Dockerfile.submit copies no {top}/"


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_paths_mentioned_exist(manifest: Path) -> None:
    """Repository paths in a manifest's text, comments included (infra/…, pipelines/…), and the sibling
    manifests or pipeline files it names (config.yaml, retrain.yaml) exist."""
    text = manifest.read_text()
    paths = re.findall(r"(?<![\w/:.$@-])((?:infra|pipelines|raysl|docs|tests)/[\w.-]+(?:/[\w.-]+)*)", text)
    missing = [p for p in {p.rstrip(".") for p in paths} if not (REPO / p).exists()]
    names = set(re.findall(r"(?<![\w/.-])([\w-]+\.yaml)\b", text))
    missing += [n for n in names if not ((K8S / n).exists() or (REPO / "pipelines" / n).exists())]
    assert not missing, f"{manifest.name} names {sorted(missing)}, not in the repository"
