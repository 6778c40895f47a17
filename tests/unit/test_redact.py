"""`storage.redact`: no secret in a URI (with or without a scheme), a presigned URL or the environment survives it,
and text without secrets comes back unchanged."""

import logging
import pickle
import time

import pytest

from raysl import storage
from raysl.storage import redact, redact_exc

MASKED = [
    # a secret key holding "/" and "+" (AWS secret keys often do)
    ("s3://AKIA:abc/def+ghi@bucket/x", "s3://***@bucket/x"),
    ("s3://tok@bucket", "s3://***@bucket"),  # token-only userinfo
    ("http://user:p@ss@host", "http://***@host"),  # "@" inside the password: up to the LAST "@"
    ("http://user:s3cr3t@host:9000/x", "http://***@host:9000/x"),
    ("http://user:pw@[::1]:8080/x", "http://***@[::1]:8080/x"),  # IPv6 host
    ("postgresql://u:a:b/c@db.internal:5432/mlflow", "postgresql://***@db.internal:5432/mlflow"),
    ("s3://AKIA:abc%2Fdef@bucket/x", "s3://***@bucket/x"),  # percent-encoded secret
    # pyarrow echoes paths with the scheme cut off
    ("AKIA:abc/def+ghi@bucket/x", "***@bucket/x"),
    ("When reading information for key 'x' in 'AKIA:abc/def@bucket/x': AWS Error",
     "When reading information for key 'x' in '***@bucket/x': AWS Error"),
    ("uri=user:pw@host/x", "uri=***@host/x"),
]

UNCHANGED = [
    "http://host:9000/x",
    "http://[::1]:8080/x",
    "s3://bucket/prefix/part-0.parquet",
    "https://example.com/a?b=1&c=2#frag",
    "step 100 loss 0.25 lr 3e-4 at 12:30:01",
    "models:/raysl-byol-encoder@champion",  # MLflow model URIs hold an "@" but no userinfo
    "runs:/0123abcd/encoder",
    "mail ops@example.com",
    "",
]


@pytest.mark.parametrize(("text", "expected"), MASKED)
def test_userinfo_is_masked(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("text", UNCHANGED)
def test_text_without_secrets_is_unchanged(text: str) -> None:
    assert redact(text) == text


def test_several_uris_in_one_message() -> None:
    text = "copy s3://k1:s1/x@src/a to 's3://k2:s2@dst/b' via http://u:p@proxy:3128 (http://ok.example/x)"
    out = redact(text)
    for secret in ("k1", "s1/x", "k2", "s2", "u:p"):
        assert secret not in out
    assert out == "copy s3://***@src/a to 's3://***@dst/b' via http://***@proxy:3128 (http://ok.example/x)"


def test_presigned_url_keeps_only_public_parameters() -> None:
    url = ("https://b.s3.amazonaws.com/k.bin?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F2024"
           "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-Security-Token=FwoGZX%2Ftoken"
           "&X-Amz-SignedHeaders=host&X-Amz-Signature=f00dcafe")
    out = redact(f"GET {url} failed")
    assert "AKIAEXAMPLE" not in out and "FwoGZX" not in out and "f00dcafe" not in out
    assert "X-Amz-Credential=***" in out and "X-Amz-Signature=***" in out and "X-Amz-Security-Token=***" in out
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in out and "X-Amz-Expires=3600" in out


@pytest.mark.parametrize("param", ["token", "access_token", "sig", "signature", "password", "apikey", "api_key"])
def test_secret_query_parameters(param: str) -> None:
    out = redact(f"https://h/x?page=2&{param}=s3cr3tvalue&amp;{param.upper()}=other#top")
    assert "s3cr3tvalue" not in out and "other" not in out
    assert "page=2" in out and out.endswith("#top")


def test_environment_secrets_are_masked_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-token-0123456789")
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "hunter2hunter2")
    monkeypatch.setenv("SHORT_KEY", "abc")  # too short to mask safely
    monkeypatch.setenv("RAYSL_NOTE", "not-a-secret-value")  # not a secret's name
    text = ("key AKIAIOSFODNN7EXAMPLE secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY encoded "
            "wJalrXUtnFEMI%2FK7MDENG%2FbPxRfiCYEXAMPLEKEY header Bearer ray-token-0123456789 pw=hunter2hunter2 "
            "abc not-a-secret-value")
    out = redact(text)
    for secret in ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI", "ray-token-0123456789", "hunter2hunter2"):
        assert secret not in out
    assert out.endswith(" abc not-a-secret-value")
    assert out.count("***") == 5


def test_redact_exc_names_the_type_and_masks_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "tracking-pass-123")
    exc = OSError("cannot reach http://bob:tracking-pass-123@mlflow:5000/api (token tracking-pass-123)")
    assert redact_exc(exc) == "OSError: cannot reach http://***@mlflow:5000/api (token ***)"
    assert redact_exc(ValueError()) == "ValueError"


def test_redact_is_fast_and_linear() -> None:
    line = "step 1200/5000 loss 0.4312 lr 2.9e-4 42.1 img/s worker 3 s3://bucket/runs/x/checkpoint_000012"
    t0 = time.perf_counter()
    for _ in range(2000):
        redact(line)
    assert (time.perf_counter() - t0) / 2000 < 1e-3  # called on log lines: well under a millisecond
    for hostile in ("=a:" * 30000 + "@", "(u:p@h " * 10000, "a@" * 50000):
        t0 = time.perf_counter()
        redact(hostile)
        assert time.perf_counter() - t0 < 2.0  # no quadratic blow-up on a long line


def test_resolve_strips_userinfo_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="raysl.storage")
    uri = "s3://AKIAX:se/cr+et@my-bucket/data/part-0.parquet"
    for _ in range(3):
        _, path = storage.resolve(uri, storage.S3Settings(endpoint_url="http://127.0.0.1:1", region="us-east-1"))
        assert path == "my-bucket/data/part-0.parquet"
    warnings = [r.getMessage() for r in caplog.records if "ignoring credentials" in r.getMessage()]
    assert len(warnings) == 1
    assert "s3://***@my-bucket/data/part-0.parquet" in warnings[0] and "cr+et" not in warnings[0]
    # a key that merely holds an "@" is a key, not userinfo
    _, path = storage.resolve("s3://bucket/ckpt@v1/x", storage.S3Settings(endpoint_url="http://127.0.0.1:1"))
    assert path == "bucket/ckpt@v1/x"


def test_s3_filesystem_retries_survive_pickling(monkeypatch: pytest.MonkeyPatch) -> None:
    # pyarrow's own S3FileSystem pickles without its retry strategy; Ray ships filesystems to workers by pickle.
    monkeypatch.setenv("RAYSL_S3_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("RAYSL_S3_CONNECT_TIMEOUT", "2.5")
    fs, _ = storage.resolve("s3://bucket/x", storage.S3Settings(endpoint_url="http://127.0.0.1:1"))
    clone = pickle.loads(pickle.dumps(fs))
    assert isinstance(clone, storage.RetryingS3FileSystem)
    assert clone._options["max_attempts"] == 7
    assert clone.__reduce__()[1][0]["connect_timeout"] == 2.5
    assert "secret" not in repr(clone.__reduce__()).lower()  # keys never travel in the pickle


@pytest.mark.parametrize(("name", "value"), [("RAYSL_S3_MAX_ATTEMPTS", "lots"), ("RAYSL_S3_REQUEST_TIMEOUT", "-1")])
def test_bad_retry_settings_are_named(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        storage.s3_filesystem(storage.S3Settings(endpoint_url="http://127.0.0.1:1"))


def test_io_errors_keep_their_type_and_lose_their_secrets(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError):  # callers catch FileNotFoundError / OSError: the type is kept
        storage.read_bytes(str(tmp_path / "missing.json"))
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-abcdef")
    with pytest.raises(PermissionError) as info, storage.redacted_errors():
        raise PermissionError("denied for http://u:pw@host/x with session-token-abcdef")
    assert str(info.value) == "denied for http://***@host/x with ***"
    assert info.value.__suppress_context__  # the unredacted original is not printed with the traceback
    original = RuntimeError("plain failure")
    with pytest.raises(RuntimeError) as info2, storage.redacted_errors((Exception,)):
        raise original
    assert info2.value is original  # nothing to redact: the very same exception, traceback and all


def test_endpoint_userinfo_never_reaches_pyarrow() -> None:
    fs = storage.s3_filesystem(storage.S3Settings(endpoint_url="http://minio:m1n10-pw@127.0.0.1:9000"))
    options = fs.__reduce__()[1][0]
    assert options["endpoint_override"] == "127.0.0.1:9000" and options["scheme"] == "http"


def test_log_filter_redacts_messages_args_and_tracebacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-token-0123456789")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Keep()
    handler.addFilter(storage.RedactingFilter())
    logger = logging.getLogger("raysl.test_redact_filter")
    logger.addHandler(handler)
    try:
        logger.warning("reading %s failed", "s3://AKIA:se/cr@bucket/x")
        try:
            raise OSError("token ray-token-0123456789 refused")
        except OSError:
            logger.exception("third-party line with %d args", 1)
    finally:
        logger.removeHandler(handler)
    assert records[0] == "reading s3://***@bucket/x failed"
    assert "ray-token-0123456789" not in records[1] and "OSError: token *** refused" in records[1]
