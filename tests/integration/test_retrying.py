"""Retries only for what another attempt can fix: real failures from the real PostgreSQL, an HTTP
server that never answers, the S3 emulator without credentials; and a backup against a closed port
fails at once instead of after two 30 s waits."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tasks.errors import CommandError, OpsError
from tasks.retrying import is_transient
from tasks.settings import StorageSettings
from tasks.storage import StorageCredentialsError, open_storage
from tests.fixtures.core import PG_ADMIN_DSN, pg_dsn

pytestmark = pytest.mark.integration


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _error(call: Any) -> BaseException:
    try:
        call()
    except BaseException as exc:
        return exc
    raise AssertionError("expected a failure")


def _raise_from(exc: BaseException, cause: BaseException) -> None:
    raise exc from cause


def test_postgres_failures_that_retrying_cannot_fix(pg_database: tuple[str, str]) -> None:
    name, dsn = pg_database
    refused = _error(lambda: psycopg.connect(f"postgresql://postgres@127.0.0.1:{_closed_port()}/x"))
    missing = _error(lambda: psycopg.connect(pg_dsn(f"{name}_missing")))
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{name}_r" LOGIN')
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE secret_t (id int)")
        with psycopg.connect(dsn.replace("postgres@", f"{name}_r@"), autocommit=True) as conn:
            denied = _error(lambda: conn.execute("SELECT * FROM secret_t"))
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP OWNED BY "{name}_r"')
            admin.execute(f'DROP ROLE "{name}_r"')
    assert isinstance(denied, psycopg.errors.InsufficientPrivilege)
    for exc in (refused, missing, denied):
        assert not is_transient(exc), exc
    # Wrapped in the project's own error, the cause still decides.
    wrapped = _error(lambda: _raise_from(OpsError("restore failed"), denied))
    assert not is_transient(wrapped)


def test_postgres_failures_another_attempt_may_pass(pg_database: tuple[str, str]) -> None:
    _, dsn = pg_database
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET statement_timeout = '50ms'")
        timed_out = _error(lambda: conn.execute("SELECT pg_sleep(2)"))
    victim = psycopg.connect(dsn, autocommit=True)
    try:
        pid = victim.info.backend_pid
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        time.sleep(0.2)
        dropped = _error(lambda: victim.execute("SELECT 1"))
    finally:
        victim.close()
    assert is_transient(timed_out), timed_out
    assert is_transient(dropped), dropped
    wrapped = _error(lambda: _raise_from(OpsError("dump failed"), dropped))
    assert is_transient(wrapped)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        server.close()


def test_http_timeout_is_transient_and_refusal_is_not(silent_server: int) -> None:
    timeout = _error(lambda: httpx.get(f"http://127.0.0.1:{silent_server}/", timeout=0.3))
    refused = _error(lambda: httpx.get(f"http://127.0.0.1:{_closed_port()}/", timeout=2))
    assert is_transient(timeout), timeout
    assert not is_transient(refused), refused


def test_s3_without_credentials_names_them_and_is_not_retried(
    monkeypatch: pytest.MonkeyPatch, moto_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage = open_storage(StorageSettings(url=f"s3://{s3_bucket}/x", endpoint_url=moto_endpoint), attempts=1)
    exc = _error(lambda: storage.list("manifests/"))
    assert isinstance(exc, StorageCredentialsError), exc
    assert "credentials" in str(exc)
    assert "network" not in str(exc)
    assert not is_transient(exc)


def test_command_output_decides_for_failed_commands() -> None:
    assert is_transient(CommandError("pg_dump: error: server closed the connection unexpectedly"))
    assert not is_transient(CommandError('pg_dump: error: permission denied for table "users"'))
    # The project's own errors raised "from None" carry the cause in their text.
    assert is_transient(OpsError("cannot read table users: server closed the connection unexpectedly"))
    assert not is_transient(OpsError("cannot connect to 127.0.0.1:5: Connection refused"))
    assert not is_transient(OpsError("no backup 'x' in storage"))


@pytest.mark.flow
@pytest.mark.usefixtures("prefect_harness")
def test_backup_against_a_closed_port_fails_at_once(ops_env: dict[str, Any], monkeypatch: Any) -> None:
    from flows.backup import backup_database

    monkeypatch.setenv("OPS_POSTGRES__DSN", f"postgresql://postgres@127.0.0.1:{_closed_port()}/nothing")
    started = time.monotonic()
    state = backup_database(verify="none", prune=False, return_state=True)
    elapsed = time.monotonic() - started
    assert state.is_failed()
    assert "refused" in (state.message or "").lower()
    # create-backup has retries=2 with 30 s between attempts: none of them may run here.
    assert elapsed < 25, f"took {elapsed:.0f}s: a refused connection was retried"
