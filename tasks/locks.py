"""Locks that hold across workers: one mutating run per target, whichever host it runs on.

Each exclusive operation takes a session-level PostgreSQL advisory lock on the application's database
server, in its maintenance database (``backup.maintenance_database``: it survives a restore or rename
of the application's database, and restore and migrate lock there too):

| operation | lock name |
|---|---|
| deploy-release / rollback-release / scale-services | ``swagger2mcp-ops:release:<stack>:<environment>`` |
| cleanup-uploads / restore-uploads | ``swagger2mcp-ops:uploads:<absolute uploads root>`` |
| prune-backups | ``swagger2mcp-ops:prune:<storage location>`` |
| flush-redis | ``swagger2mcp-ops:redis:<host:port/db>`` |
| security-incident's rotation | ``swagger2mcp-ops:rotation:<stack>`` |
| security-incident's isolation, end-isolation | ``swagger2mcp-ops:isolation:<stack>`` |
| recover-data, restore-database, migrate-database | ``swagger2mcp-ops:database:<database>`` |

Why an advisory lock rather than a Prefect global concurrency limit: PostgreSQL releases a session's
lock when the session ends (a worker that crashed holds nothing), the lock needs nothing created
beforehand, and ``pg_stat_activity`` tells a waiter who holds it. The holder is named twice: the
lock's session carries ``swagger2mcp-ops <flow run id> <flow run name>`` as its ``application_name``
(the id first: PostgreSQL cuts the name at 63 bytes), and its last statement is a note with the flow
run's full name and id, the flow, the host and the process (:func:`tasks.postgres.note_holder`).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

import psycopg

from tasks import postgres
from tasks.errors import LockBusy, OpsError
from tasks.runlog import run_logger
from tasks.secrets import mask_url
from tasks.settings import OpsSettings

PREFIX = "swagger2mcp-ops"


class LockUnavailable(OpsError):
    """The lock could not be asked for: the database server that holds the locks cannot be reached."""


@dataclass(frozen=True)
class Holder:
    """Who takes a lock: the flow run (name and id) and the process it runs in."""

    operation: str
    flow_run_id: str | None
    flow_run_name: str | None
    flow_name: str | None
    host: str
    pid: int
    since: str

    @classmethod
    def current(cls, operation: str) -> Holder:
        """The flow run this code runs in (none outside a run), on this host and process."""
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        run = context.flow_run if context else None
        return cls(
            operation=operation,
            flow_run_id=str(run.id) if run else None,
            flow_run_name=run.name if run else None,
            flow_name=context.flow.name if context and context.flow else None,
            host=socket.gethostname(),
            pid=os.getpid(),
            since=f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}",
        )

    def application_name(self) -> str:
        """``swagger2mcp-ops <run id> <run name>`` cut to PostgreSQL's 63 bytes, the id always whole."""
        if self.flow_run_id:
            text = f"{PREFIX} {self.flow_run_id} {self.flow_run_name or ''}".strip()
        else:
            text = f"{PREFIX} {self.operation} pid {self.pid}"
        return text.encode()[:63].decode(errors="ignore")

    def describe(self) -> str:
        """``flow run 'crimson-falcon' (id ...) of deploy-release on host web-1, pid 812, since ...``."""
        if self.flow_run_id:
            flow = self.flow_name or self.operation
            who = f"flow run {self.flow_run_name!r} (id {self.flow_run_id}) of {flow}"
        else:
            who = f"{self.operation} outside a flow run"
        return f"{who} on host {self.host}, pid {self.pid}, since {self.since}"


def release_lock_name(settings: OpsSettings, environment: str) -> str:
    """The lock of deploys and rollbacks of one environment of the stack."""
    return f"{PREFIX}:release:{settings.stack}:{environment}"


def uploads_lock_name(root: Path) -> str:
    """The lock of cleanups and quarantine restores of one uploads root (by its absolute path)."""
    return f"{PREFIX}:uploads:{Path(os.path.abspath(root))}"


def prune_lock_name(settings: OpsSettings) -> str:
    """The lock of backup pruning in one storage location (a directory, or an S3 bucket and prefix)."""
    parts = urlsplit(settings.storage.url)
    if parts.scheme == "file":
        where = f"file://{os.path.abspath(unquote(parts.netloc + parts.path))}"
    else:
        endpoint = mask_url(settings.storage.endpoint_url) if settings.storage.endpoint_url else "aws"
        where = f"{endpoint} {mask_url(settings.storage.url)}"
    return f"{PREFIX}:prune:{where}"


def flushdb_lock_name(settings: OpsSettings) -> str:
    """The lock of FLUSHDB on the configured Redis db (host, port and db number; no credentials)."""
    parts = urlsplit(settings.redis.url.get_secret_value())
    db = parts.path.strip("/") or "0"
    return f"{PREFIX}:redis:{parts.hostname or parts.path}:{parts.port or 6379}/{db}"


def rotation_lock_name(settings: OpsSettings) -> str:
    """The lock of secret rotations of the stack."""
    return f"{PREFIX}:rotation:{settings.stack}"


def isolation_lock_name(settings: OpsSettings) -> str:
    """The lock of isolating the stack and of ending its isolation."""
    return f"{PREFIX}:isolation:{settings.stack}"


@contextlib.contextmanager
def exclusive(
    settings: OpsSettings, name: str, *, operation: str, what: str, timeout: float | None = None
) -> Iterator[Holder]:
    """Hold the lock ``name`` for the block: one run of ``what`` at a time, on every worker.

    A run that finds the lock held waits up to ``timeout`` seconds, then refuses with the holder named
    (flow run name and id, host, process). The lock lives on its own connection to the maintenance
    database and ends with it: a run that dies leaves no lock behind; a run that hangs keeps it and
    is named, never broken.

    Args:
        settings: the loaded settings (PostgreSQL DSN, maintenance database).
        name: the lock's name, from one of the ``*_lock_name`` functions.
        operation: the flow taking it (``deploy-release``), named to a waiting run.
        what: the work it guards, for the error (``deploy or rollback of staging``).
        timeout: seconds to wait; default ``runtime.lock_timeout_seconds``.

    Yields:
        The holder this run was recorded as.

    Raises:
        LockBusy: another run held it for the whole wait; names that run. Nothing was done.
        LockUnavailable: PostgreSQL cannot be reached to ask for the lock. Nothing was done.
    """
    wait = settings.runtime.lock_timeout_seconds if timeout is None else timeout
    holder = Holder.current(operation)
    logger = run_logger(__name__)
    try:
        conn = postgres.connect(
            settings.postgres,
            database=settings.backup.maintenance_database,
            application_name=holder.application_name(),
        )
    except psycopg.Error as exc:
        raise LockUnavailable(
            f"cannot reach the application's database server (database"
            f" {settings.backup.maintenance_database!r}) to take the lock of {what}:"
            f" {postgres.safe_error(exc, settings.postgres)}; check OPS_POSTGRES__DSN and that the server"
            " runs. Nothing was done"
        ) from None
    with conn, contextlib.ExitStack() as held:
        try:
            held.enter_context(postgres.advisory_lock(conn, name, 0, holder=holder.describe()))
        except LockBusy as first:
            if wait <= 0:
                raise LockBusy(f"{what} is already running: {first}. Nothing was done.") from None
            logger.info("waiting up to %ss: %s", wait, first)
            try:
                held.enter_context(postgres.advisory_lock(conn, name, wait, holder=holder.describe()))
            except LockBusy as exc:
                raise LockBusy(
                    f"{what} is still running after {wait:g} s: {exc}. Nothing was done."
                ) from None
        logger.info("holding lock %s for %s", name, what)
        try:
            yield holder
        finally:
            # Logged while the lock is still held: with "holding lock", it brackets the exclusive
            # work in the run's log, so an operator can see which runs of a target followed each other.
            logger.info("releasing lock %s", name)
