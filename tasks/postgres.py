"""PostgreSQL: connections, probes and the queries the flows share.

Plain functions over psycopg 3 (and SQLAlchemy where an engine is wanted); Prefect task wrappers sit
at the bottom of the module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.secrets import mask_text
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


def safe_error(exc: BaseException, settings: PostgresSettings) -> str:
    """A one-line error text for reports: the DSN's password and any secret pair masked."""
    secret = settings.dsn.get_secret_value()
    password = urlsplit(secret).password or ""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return mask_text(text, [secret, password])


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


probe_postgres_task = task(probe_postgres, name="probe-postgres", cache_policy=NO_CACHE)
