"""URI → pyarrow filesystem (S3 with retries that survive pickling), listing, atomic writes. Redaction lives in
raysl/redact.py and is re-exported here: every message this module builds from a URI or an error goes through it.

Keys are read by pyarrow/boto from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, …) and
never pass through raysl's config, logs or MLflow params. S3 requests retry with back-off, so a store that
is unreachable for tens of seconds delays reads and checkpoint writes instead of failing them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from raysl.redact import MASK, RedactingFilter, env_secrets, redact, redact_exc  # noqa: F401 - storage's API

log = logging.getLogger(__name__)


def _env_number(name: str, default: float, cast: type[int] | type[float]) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return cast(default)
    try:
        value = cast(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be positive")
    return value


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def resolve(cls, endpoint_url: str | None = None, region: str | None = None) -> S3Settings:
        return cls(
            endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            region=region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
        )


class StorageError(RuntimeError):
    """A URI that matches nothing or cannot be reached; the message carries the URI."""


def _rebuild_s3(options: dict[str, Any]) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(**options)


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with AWS's default retry strategy (exponential back-off) that survives pickling:
    pyarrow's own `__reduce__` drops `retry_strategy`, so without this every Ray worker and Ray Data task that
    receives the filesystem would fall back to 3 attempts. The options hold no keys (those come from the
    environment on each node)."""

    def __init__(self, *, max_attempts: int, **options: Any) -> None:
        super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=max_attempts), **options)
        self._options = {"max_attempts": max_attempts, **options}

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        return _rebuild_s3, (dict(self._options),)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


_warned_userinfo: set[str] = set()


def s3_path(uri: str) -> str:
    """`bucket/key` of an s3:// URI, without any userinfo: credentials in a URI are not supported (keys come from
    the environment), and what pyarrow is given comes back in its error text."""
    body = uri[len("s3://") :]
    head = body.split("/", 1)[0]
    # A bucket name never holds ":" or "@"; a first segment that does is userinfo (whose secret may hold "/").
    if ":" in head or "@" in head:
        at = body.rfind("@")
        body = body[at + 1 :]
        shown = redact(uri)
        if shown not in _warned_userinfo:
            _warned_userinfo.add(shown)
            log.warning("ignoring credentials in %s: raysl reads S3 keys from the environment "
                        "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), never from a URI", shown)
    return body.rstrip("/")


def s3_filesystem(s3: S3Settings | None = None) -> RetryingS3FileSystem:
    """An S3 filesystem for the configured endpoint, retrying with back-off: RAYSL_S3_MAX_ATTEMPTS (default 10,
    about 25 s of back-off when the endpoint refuses at once), RAYSL_S3_CONNECT_TIMEOUT (5 s) and
    RAYSL_S3_REQUEST_TIMEOUT (30 s; pyarrow applies it on Windows and macOS only)."""
    s3 = s3 or S3Settings.resolve()
    kwargs: dict[str, Any] = {
        "max_attempts": _env_number("RAYSL_S3_MAX_ATTEMPTS", 10, int),
        "connect_timeout": _env_number("RAYSL_S3_CONNECT_TIMEOUT", 5.0, float),
        "request_timeout": _env_number("RAYSL_S3_REQUEST_TIMEOUT", 30.0, float),
    }
    if s3.endpoint_url:
        scheme, _, host = s3.endpoint_url.partition("://")
        host = host.rpartition("@")[2]  # userinfo is not how pyarrow takes keys, and its errors would echo it
        kwargs["endpoint_override"] = host or scheme
        kwargs["scheme"] = scheme if host else "https"
    if s3.region:
        kwargs["region"] = s3.region
    return RetryingS3FileSystem(**kwargs)


def resolve(uri: str, s3: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path without scheme) for a local path or an s3:// URI."""
    if is_s3(uri):
        return s3_filesystem(s3), s3_path(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


@contextmanager
def redacted_errors(types: tuple[type[BaseException], ...] = (OSError,)) -> Iterator[None]:
    """Re-raise an error of `types` whose text holds a secret as the same type with the text redacted (callers
    catch FileNotFoundError / OSError); the original is dropped from the chain, since a traceback would print it.
    An error with nothing to redact passes through untouched."""
    try:
        yield
    except types as exc:
        message = str(exc)
        clean = redact(message)
        if clean == message:
            raise
        try:
            replacement: BaseException = type(exc)(clean)
        except Exception:  # noqa: BLE001 - an exception type with another constructor: the nearest builtin will do
            replacement = OSError(clean) if isinstance(exc, OSError) else RuntimeError(clean)
        raise replacement from None


SNAPSHOT_SUFFIX = ".snapshot.json"


def snapshot_files(uri: str, s3: S3Settings | None = None) -> list[str]:
    """The files a snapshot manifest (written by `raysl pipeline`) froze, as filesystem paths: a run on a
    snapshot reads exactly these, whatever lands under the prefix later."""
    try:
        manifest = json.loads(read_bytes(uri, s3))
        return [str(f["path"]) for f in manifest["files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"snapshot manifest {redact(uri)!r} cannot be read: {redact_exc(exc)}") from None


def list_files(uri: str, s3: S3Settings | None = None, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """List files under a URI (or the URI itself if it is a file), sorted; fails with the URI named.
    A `*.snapshot.json` URI lists the files its manifest froze.

    One listing pass: a prefix of n objects on S3 costs ceil(n/1000) LIST requests and nothing else (the prefix is
    listed first; only a URI with no files under it is looked up on its own, to tell one object from nothing)."""
    if uri.endswith(SNAPSHOT_SUFFIX):
        files = snapshot_files(uri, s3)
        if suffixes is not None:
            files = [f for f in files if f.lower().endswith(suffixes)]
        if not files:
            raise StorageError(f"snapshot {redact(uri)!r} holds no files")
        return files
    fs, path = resolve(uri, s3)
    try:
        try:
            found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        except NotADirectoryError:  # a local file (on S3 a file's prefix lists nothing)
            found = []
        files = sorted(i.path for i in found if i.type == pafs.FileType.File)
        if not files:  # one object, an empty folder or nothing
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                files = [path]
            elif info.type != pafs.FileType.Directory:
                raise StorageError(f"data URI {redact(uri)!r} matches nothing")
    except StorageError:
        raise
    except Exception as exc:  # pyarrow raises OSError subclasses with the endpoint's reply
        raise StorageError(f"cannot reach data URI {redact(uri)!r}: {redact_exc(exc)}") from None
    base = os.path.basename
    files = [f for f in files if not base(f).startswith((".", "_"))]
    if suffixes is not None:
        files = [f for f in files if f.lower().endswith(suffixes)]
    if not files:
        raise StorageError(f"data URI {redact(uri)!r} holds no files" + (f" ending in {suffixes}" if suffixes else ""))
    return files


def ensure_dir(uri: str, s3: S3Settings | None = None) -> None:
    fs, path = resolve(uri, s3)
    with redacted_errors():
        fs.create_dir(path, recursive=True)


def write_bytes(uri: str, data: bytes, s3: S3Settings | None = None) -> None:
    """Write a whole object. Atomic on both kinds: an S3 PUT replaces the object at once, and a local file is
    written beside its target and renamed over it, so a reader (or a crash) never sees half a file."""
    fs, path = resolve(uri, s3)
    with redacted_errors():
        if is_s3(uri):
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as out:
            out.write(data)
        os.replace(tmp, path)


def read_bytes(uri: str, s3: S3Settings | None = None) -> bytes:
    fs, path = resolve(uri, s3)
    with redacted_errors(), fs.open_input_stream(path) as f:
        return bytes(f.read())


def exists(uri: str, s3: S3Settings | None = None) -> bool:
    fs, path = resolve(uri, s3)
    with redacted_errors():
        return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)
