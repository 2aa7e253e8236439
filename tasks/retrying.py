"""Which failures another attempt can fix.

A task retries only transient failures: a connection reset or dropped, a timeout, a 5xx or throttling
answer, a serialization conflict. Everything else — authentication, permissions, missing
credentials, a refused connection (nothing listens: a setting to fix), "does not exist", a bad
parameter — fails at once with its cause, instead of repeating the same error after a long wait.
The cause chain is followed, so a project error raised ``from`` a transient one is transient too.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import psycopg

from tasks.errors import CommandError, CommandTimeout, OpsError

# psycopg OperationalError texts that mean the connection broke or timed out (libpq has no codes here).
_PG_TRANSIENT_TEXT = (
    "server closed the connection unexpectedly",
    "terminating connection",
    "connection reset",
    "connection timed out",
    "timeout expired",
    "could not receive data",
    "could not send data",
    "ssl syscall error",
    "the database system is starting up",
    "the database system is shutting down",
    "too many connections",
)
# SQLSTATE classes and codes another attempt may pass: serialization/deadlock, connection exceptions,
# insufficient resources, operator intervention (admin shutdown, crash), query cancelled by timeout.
_PG_TRANSIENT_SQLSTATE = ("40001", "40P01", "08", "53", "57P01", "57P02", "57P03", "57014")
# Texts in a failed command's output (pg_dump, pg_restore, npm) that mean the connection broke.
_COMMAND_TRANSIENT_TEXT = (
    *_PG_TRANSIENT_TEXT,
    "econnreset",
    "etimedout",
    "socket hang up",
    "eai_again",
    "503 service unavailable",
    "502 bad gateway",
    "504 gateway",
)
_S3_TRANSIENT_CODES = {
    "Throttling",
    "ThrottlingException",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _one_is_transient(exc: BaseException) -> bool | None:
    """True or False when ``exc`` itself decides; None when its cause should decide."""
    if isinstance(exc, ConnectionRefusedError):
        return False  # nothing listens there: the address or the service is down, not a blip
    if isinstance(exc, TimeoutError | socket.timeout | ConnectionResetError | ConnectionAbortedError):
        return True
    if isinstance(exc, BrokenPipeError):
        return True
    if isinstance(exc, CommandTimeout):
        return True
    if isinstance(exc, psycopg.Error):
        if exc.sqlstate:
            return exc.sqlstate.startswith(_PG_TRANSIENT_SQLSTATE)
        text = str(exc).lower()
        if "connection refused" in text or "authentication failed" in text:
            return False
        return any(t in text for t in _PG_TRANSIENT_TEXT)
    if isinstance(exc, CommandError):
        text = str(exc).lower()
        return any(t in text for t in _COMMAND_TRANSIENT_TEXT)
    if isinstance(exc, OpsError) and exc.__cause__ is None:
        # The project's errors are often raised "from None" (secret-free); their text carries the cause.
        text = str(exc).lower()
        if "connection refused" in text or "authentication failed" in text:
            return False
        if any(t in text for t in _COMMAND_TRANSIENT_TEXT):
            return True
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if module.startswith("httpx"):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status is not None:
            return status >= 500 or status == 429
        return name in {"ReadTimeout", "WriteTimeout", "ConnectTimeout", "PoolTimeout", "RemoteProtocolError"}
    if module.startswith("botocore"):
        if name in {"ReadTimeoutError", "ConnectTimeoutError", "ConnectionClosedError"}:
            return True
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in _S3_TRANSIENT_CODES or (isinstance(status, int) and status >= 500)
        return False
    if module.startswith("redis"):
        return name in {"TimeoutError", "BusyLoadingError"} or (
            name == "ConnectionError" and "refused" not in str(exc).lower()
        )
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed where ``exc`` failed (see the module's rules)."""
    for link in _chain(exc):
        verdict = _one_is_transient(link)
        if verdict is not None:
            return verdict
    return False
