"""URI → pyarrow filesystem, and redaction of every URI, exception and log line that could carry a secret.

Keys are read by pyarrow/boto from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, …) and
never pass through raysl's config, logs or MLflow params. S3 requests retry with back-off, so a store that
is unreachable for tens of seconds delays reads and checkpoint writes instead of failing them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

MASK = "***"
# A URI with a scheme, up to the first character that cannot be part of it in free text.
_SCHEMED = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)([^\s'\"<>`]+)")
# `user:secret@host…` without a scheme (pyarrow's errors echo paths with the scheme cut off): within a run of
# non-space characters that holds an "@", the userinfo starts at the run's start or after one of `([{,=<`.
_AT_TOKEN = re.compile(r"[^\s'\"]*@[^\s'\"]*")
_HOST_AT = re.compile(r"@(?=[\w\[])")
_USERINFO_START = re.compile(r"[^/@:([{,=<]+:(?!/)")  # a user name, then a colon that starts no path
_STARTS = "([{,=<"
_MAX_STARTS = 32  # candidate starts tried per token: keeps a long line of delimiters linear
_SECRET_PARAMS = ("x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
                  "x-goog-credential", "token", "access_token", "refresh_token", "id_token", "sig", "signature",
                  "password", "passwd", "pwd", "secret", "client_secret", "apikey", "api_key", "key", "auth")
_QUERY_SECRET = re.compile(r"(?i)(?<=[?&;])(" + "|".join(map(re.escape, _SECRET_PARAMS)) + r")=[^&\s'\"#;<>]*")
_SECRET_ENV = frozenset({"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD",
                         "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN"})
_SECRET_SUFFIXES = ("_SECRET", "_TOKEN", "_PASSWORD", "_KEY")
_MIN_SECRET_LEN = 8  # shorter values ("true", "1") would mask ordinary words


def _mask_userinfo(match: re.Match[str]) -> str:
    # urllib.parse.urlsplit ends the authority at the first "/", so `s3://AKIA:ab/cd@bucket` would keep the
    # secret: the userinfo runs to the LAST "@" before the query or fragment (a password may hold "/", "@", ":"
    # — a raw "?" or "#" is not valid there). An "@" inside a path masks the path before it: never a leak.
    scheme, rest = match.group(1), match.group(2)
    end = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, end)
    return f"{scheme}{MASK}{rest[at:]}" if at >= 0 else match.group(0)


def _mask_bare_userinfo(match: re.Match[str]) -> str:
    token = match.group(0)
    hosts = [m.start() for m in _HOST_AT.finditer(token)]
    if not hosts:
        return token
    at = hosts[-1]  # the last "@" before a host: the secret may hold "@" itself
    head = token[:at]
    starts = [0, *(i + 1 for i, c in enumerate(head) if c in _STARTS)][:_MAX_STARTS]
    for start in starts:
        if _USERINFO_START.match(head, start):
            return f"{token[:start]}{MASK}{token[at:]}"
    return token


def env_secrets() -> list[str]:
    """Values of the process's secret environment variables (known names and *_SECRET/_TOKEN/_PASSWORD/_KEY),
    longest first so a secret that contains another is masked whole."""
    # Names first: decoding only the few matching values keeps this cheap enough for every log line.
    names = [k for k in os.environ if k in _SECRET_ENV or k.endswith(_SECRET_SUFFIXES)]
    found = {v for v in (os.environ.get(k, "") for k in names) if len(v) >= _MIN_SECRET_LEN}
    return sorted(found, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` safe to log: userinfo of every URI (with or without a scheme) → `***`, the values of secret query
    parameters (presigned URLs) → `***`, and every value of a secret environment variable → `***`.

    A token-only userinfo without a scheme (`tok@bucket`) reads like an e-mail address and is left alone: that is
    why `resolve` never hands userinfo to pyarrow, and why the environment's secrets are masked wherever they are.
    """
    text = str(text)
    if "@" in text:
        text = _SCHEMED.sub(_mask_userinfo, text)
        text = _AT_TOKEN.sub(_mask_bare_userinfo, text)
    if "=" in text:
        text = _QUERY_SECRET.sub(lambda m: f"{m.group(1)}={MASK}", text)
    for secret in env_secrets():
        if secret in text:
            text = text.replace(secret, MASK)
        encoded = quote(secret, safe="")
        if encoded != secret and encoded in text:  # the same key percent-encoded inside a URI
            text = text.replace(encoded, MASK)
    return text


def redact_exc(exc: BaseException) -> str:
    """`TypeName: message` of an exception, redacted: the way to put an exception into a log line or an error."""
    message = str(exc)
    return f"{type(exc).__name__}: {redact(message)}" if message else type(exc).__name__


class RedactingFilter(logging.Filter):
    """Redacts every record that reaches a handler it is attached to, tracebacks included: on the console's
    handlers it covers third-party log lines (Ray's, MLflow's, pyarrow's) that raysl does not format itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


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
    A `*.snapshot.json` URI lists the files its manifest froze."""
    if uri.endswith(SNAPSHOT_SUFFIX):
        files = snapshot_files(uri, s3)
        if suffixes is not None:
            files = [f for f in files if f.lower().endswith(suffixes)]
        if not files:
            raise StorageError(f"snapshot {redact(uri)!r} holds no files")
        return files
    fs, path = resolve(uri, s3)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            files = [path]
        elif info.type == pafs.FileType.Directory:
            sel = pafs.FileSelector(path, recursive=True)
            files = sorted(i.path for i in fs.get_file_info(sel) if i.type == pafs.FileType.File)
        else:
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
