"""Redaction of every URI, exception text and log line that could carry a secret: userinfo in URIs (parsed,
so passwords with '/', '@' or ':' and token-only userinfo are caught), secret query parameters of presigned
URLs, and the values of secret environment variables wherever they appear."""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import quote

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
