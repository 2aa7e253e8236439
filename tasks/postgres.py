"""PostgreSQL: connections, probes and the queries the flows share.

Plain functions over psycopg 3 (and SQLAlchemy where an engine is wanted); Prefect task wrappers sit
at the bottom of the module.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from tasks.errors import LockBusy
from tasks.ops_task import ops_task
from tasks.reports import elapsed_ms
from tasks.secrets import safe_error as safe_error  # re-exported; callers pass settings.postgres
from tasks.settings import PostgresSettings


def libpq_dsn(dsn: str, *, database: str | None = None) -> str:
    """Return ``dsn`` as a plain libpq URL (no SQLAlchemy driver suffix), optionally for another database."""
    parts = urlsplit(dsn)
    scheme = "postgresql"
    path = f"/{database}" if database is not None else parts.path
    return urlunsplit((scheme, parts.netloc, path, parts.query, parts.fragment))


def sqlalchemy_url(dsn: str, *, database: str | None = None) -> str:
    """Return ``dsn`` as a SQLAlchemy URL using psycopg 3."""
    return libpq_dsn(dsn, database=database).replace("postgresql://", "postgresql+psycopg://", 1)


def database_name(dsn: str) -> str:
    """The database a DSN names."""
    return urlsplit(dsn).path.lstrip("/")


def tool_connection(
    dsn: str, connect_timeout_seconds: float, *, database: str | None = None
) -> tuple[str, dict[str, str], list[str]]:
    """How a command-line tool (pg_dump, pg_restore, pg_basebackup, pg_receivewal) reaches a server.

    The password is never on the command line (where ``ps`` shows it): it goes in the environment.

    Args:
        dsn: the server's URL, with or without a driver suffix.
        connect_timeout_seconds: ``PGCONNECT_TIMEOUT`` (rounded, at least 1).
        database: another database than the one ``dsn`` names.

    Returns:
        The ``--dbname`` URL without the password, the environment carrying it, and the secret
        values to mask in the tool's output.
    """
    parts = urlsplit(libpq_dsn(dsn, database=database))
    env = {"PGCONNECT_TIMEOUT": str(max(1, round(connect_timeout_seconds)))}
    secret_values: list[str] = []
    netloc = parts.netloc
    if parts.password is not None:
        env["PGPASSWORD"] = unquote(parts.password)
        secret_values += [parts.password, env["PGPASSWORD"]]
        netloc = netloc.replace(f":{parts.password}@", "@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), env, secret_values


def connect(
    settings: PostgresSettings,
    *,
    database: str | None = None,
    autocommit: bool = True,
    application_name: str = "swagger2mcp-ops",
) -> psycopg.Connection:
    """Open a connection with the connect and statement timeouts from settings.

    Raises:
        psycopg.OperationalError: the server is down, refuses, or the credentials are wrong (the
            message may contain the host but never the password).
    """
    return psycopg.connect(
        libpq_dsn(settings.dsn.get_secret_value(), database=database),
        connect_timeout=max(1, round(settings.connect_timeout_seconds)),
        autocommit=autocommit,
        application_name=application_name,
        options=f"-c statement_timeout={int(settings.statement_timeout_seconds * 1000)}",
    )


@dataclass(frozen=True)
class PostgresProbe:
    """One round trip to PostgreSQL: latency, version, connections in use vs the limit."""

    latency_ms: float
    server_version: str
    connections: int
    max_connections: int

    @property
    def connections_ratio(self) -> float:
        return self.connections / self.max_connections if self.max_connections else 0.0


def probe_postgres(settings: PostgresSettings) -> PostgresProbe:
    """``SELECT 1`` round trip (timed on an open connection), server version, connections vs max.

    Raises:
        psycopg.Error: the server cannot be reached or a query failed.
    """
    with connect(settings, application_name="swagger2mcp-ops-health") as conn:
        started = time.perf_counter()
        conn.execute("SELECT 1").fetchone()
        latency_ms = (time.perf_counter() - started) * 1000
        row = conn.execute(
            "SELECT current_setting('server_version'),"
            " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),"
            " current_setting('max_connections')::int"
        ).fetchone()
    assert row is not None
    return PostgresProbe(
        latency_ms=round(latency_ms, 2),
        server_version=str(row[0]),
        connections=int(row[1]),
        max_connections=int(row[2]),
    )


def advisory_lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for a name such as ``database:swagger2mcp``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


# A lock holder's session ends with a statement that names it (flow run name and id, host, pid):
# pg_stat_activity.query keeps a session's last statement, so a waiter on another host can read it,
# and it vanishes with the session. application_name alone is cut at 63 bytes.
HOLDER_NOTE = "swagger2mcp-ops lock holder: "
_NOTE_QUERY = re.compile(r"SELECT '" + re.escape(HOLDER_NOTE) + r"((?:[^']|'')*)'")


def note_holder(conn: psycopg.Connection, holder: str) -> None:
    """Leave ``holder`` as the session's last statement, for :func:`advisory_lock_holders` to show."""
    conn.execute(sql.SQL("SELECT {}").format(sql.Literal(HOLDER_NOTE + holder[:800])))


@dataclass(frozen=True)
class LockHolder:
    """The session holding an advisory lock someone else waits for."""

    pid: int
    application_name: str
    client_addr: str | None
    backend_start: str
    state: str | None
    query: str

    @property
    def note(self) -> str | None:
        """What the holder said about itself (:func:`note_holder`), when that is its last statement."""
        match = _NOTE_QUERY.match(self.query)
        return match.group(1).replace("''", "'") if match else None

    def describe(self) -> str:
        session = (
            f"pid {self.pid} ({self.application_name or 'no application_name'}"
            f" from {self.client_addr or 'local socket'}, connected since {self.backend_start},"
            f" state {self.state or 'unknown'})"
        )
        note = self.note
        return f"{note} (database session {session})" if note else session


def advisory_lock_holders(conn: psycopg.Connection, key: int) -> list[LockHolder]:
    """Sessions holding the session-level advisory lock ``key`` in the connection's database."""
    classid, objid = (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF
    rows = conn.execute(
        "SELECT a.pid, coalesce(a.application_name, ''), a.client_addr::text, a.backend_start::text,"
        " a.state, left(coalesce(a.query, ''), 1000)"
        " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.database = ("
        "   SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND l.classid::bigint = %s AND l.objid::bigint = %s AND l.objsubid = 1",
        (classid, objid),
    ).fetchall()
    return [LockHolder(int(r[0]), str(r[1]), r[2], str(r[3]), r[4], str(r[5])) for r in rows]


@contextlib.contextmanager
def advisory_lock(
    conn: psycopg.Connection, key: int | str, timeout: float, *, holder: str | None = None
) -> Iterator[int]:
    """Hold a session-level advisory lock on ``conn`` for the block; one mutating run per target.

    A lock left by a run whose session is gone is released by PostgreSQL itself; a lock whose holder
    still runs (a hung run) is reported with the holder's pid, application and start time, never
    ignored or broken.

    Args:
        conn: an autocommit connection; the lock lives in its database, so every run that guards the
            same target must lock on the same database (work that renames or drops a database locks on
            the maintenance database, ``postgres``).
        key: a bigint key, or a name turned into one with :func:`advisory_lock_key`.
        timeout: seconds to wait for the lock.
        holder: who takes it (flow run name and id, host, pid); shown to a run that waits for it, as
            long as the lock's session runs no other statement after taking it.

    Yields:
        The numeric key.

    Raises:
        LockBusy: another session held the lock for the whole ``timeout``.
    """
    number = key if isinstance(key, int) else advisory_lock_key(key)
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (number,)).fetchone()
        if row is not None and row[0]:
            break
        if time.monotonic() >= deadline:
            holders = advisory_lock_holders(conn, number)
            who = "; ".join(h.describe() for h in holders) or "a session that just released it"
            label = key if isinstance(key, str) else f"key {number}"
            raise LockBusy(
                f"lock {label!s} is held by {who}; another run is working on the same target. Wait for"
                f" it to finish, or if that run is dead but its session lingers, end it with"
                f" pg_terminate_backend(pid) after checking what it does"
            )
        time.sleep(0.2)
    try:
        if holder is not None:
            note_holder(conn, holder)
        yield number
    finally:
        with contextlib.suppress(psycopg.Error):
            conn.execute("SELECT pg_advisory_unlock(%s)", (number,))


probe_postgres_task = ops_task(probe_postgres, name="probe-postgres")


@dataclass(frozen=True)
class QueryCheck:
    """One check query: passed when it ran without error and returned a row whose first value is
    true (not false, NULL or 0)."""

    query: str
    ok: bool
    value: str | None
    error: str | None
    ms: float

    @property
    def duration_ms(self) -> float:
        return self.ms


def run_check_queries(
    settings: PostgresSettings, queries: Sequence[str], *, timeout_seconds: float, application_name: str
) -> list[QueryCheck]:
    """Run each query in its own read-only transaction under its own statement timeout.

    ``SELECT count(*) > 0 FROM users`` and ``SELECT NOT EXISTS (SELECT ... orphans)`` are typical:
    smoke queries after a migration, validation queries after a data recovery.
    """
    timeout_ms = int(timeout_seconds * 1000)
    return [_check_query(settings, query, timeout_ms, application_name) for query in queries]


def _check_query(
    settings: PostgresSettings, query: str, timeout_ms: int, application_name: str
) -> QueryCheck:
    started = time.perf_counter()
    try:
        with connect(settings, autocommit=False, application_name=application_name) as conn:
            conn.execute("SET TRANSACTION READ ONLY")
            conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(timeout_ms)))
            row = conn.execute(sql.SQL(query)).fetchone()  # the operator's own query
            conn.rollback()
    except psycopg.Error as exc:
        return QueryCheck(query, False, None, safe_error(exc, settings), elapsed_ms(started))
    value = None if row is None else row[0]
    ok = row is not None and value is not False and value is not None and value != 0
    error = None if ok else f"returned {'no row' if row is None else repr(value)}; expected a truthy value"
    return QueryCheck(query, ok, None if value is None else str(value)[:200], error, elapsed_ms(started))
