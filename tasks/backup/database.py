"""The server side of backups: connections, libpq for the command-line tools, scratch databases."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from tasks import pgtools, postgres
from tasks.backup.errors import BackupError, DatabaseNotFound
from tasks.commands import run_command
from tasks.secrets import mask_url
from tasks.settings import OpsSettings


def database_lock_name(database: str) -> str:
    """The advisory lock a restore of ``database`` holds, and a migration of it for its whole run."""
    return f"swagger2mcp-ops:database:{database}"


def scratch_name(base: str, purpose: str) -> str:
    """A new database name ``<base>__<purpose>_<random>`` within PostgreSQL's 63-byte limit."""
    suffix = f"__{purpose}_{secrets.token_hex(4)}"
    return base[: 63 - len(suffix)] + suffix


def _settings_database(settings: OpsSettings) -> str:
    return postgres.database_name(settings.postgres.dsn.get_secret_value())


def _tool_connection(settings: OpsSettings, database: str) -> tuple[str, dict[str, str], list[str]]:
    """The ``--dbname`` URL without the password, the environment carrying it, and the secrets to mask."""
    return postgres.tool_connection(
        settings.postgres.dsn.get_secret_value(), settings.postgres.connect_timeout_seconds, database=database
    )


def _pg_error(exc: BaseException, settings: OpsSettings) -> str:
    return postgres.safe_error(exc, settings.postgres)


def _connect(settings: OpsSettings, database: str, *, purpose: str) -> psycopg.Connection:
    try:
        return postgres.connect(
            settings.postgres, database=database, application_name=f"swagger2mcp-ops-{purpose}"
        )
    except psycopg.Error as exc:
        raise BackupError(
            f"cannot connect to database {database!r} on {_server(settings)}: {_pg_error(exc, settings)};"
            " check OPS_POSTGRES__DSN (user, password, host) and that the server runs"
        ) from None


def _server(settings: OpsSettings) -> str:
    parts = urlsplit(mask_url(settings.postgres.dsn.get_secret_value()))
    return parts.netloc


def _maintenance(settings: OpsSettings) -> psycopg.Connection:
    return _connect(settings, settings.backup.maintenance_database, purpose="backup-admin")


def database_exists(settings: OpsSettings, database: str) -> bool:
    """Whether ``database`` exists on the server (asked through the maintenance database)."""
    with _maintenance(settings) as conn:
        return (
            conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is not None
        )


def _require_database(settings: OpsSettings, database: str) -> None:
    if not database_exists(settings, database):
        raise DatabaseNotFound(
            f"database {database!r} does not exist on {_server(settings)}; nothing was done. Check the name"
            " (parameter or OPS_POSTGRES__DSN)"
        )


def _tool_version(settings: OpsSettings, tool: str) -> str:
    result = run_command([tool, "--version"], timeout=30)
    return result.stdout.strip()


def _archive_major(manifest_pg_dump_version: str) -> int | None:
    """The major of the pg_dump a manifest records (None when it records none)."""
    try:
        return pgtools.server_major(manifest_pg_dump_version)
    except ValueError:
        return None


def _pg_restore_for(settings: OpsSettings, manifest_pg_dump_version: str) -> str:
    """The pg_restore for a restore into the settings' server of an archive of that pg_dump.

    Raises:
        ClientTooOld: every installed pg_restore is older than the server or the archive.
    """
    with _maintenance(settings) as conn:
        row = conn.execute("SELECT current_setting('server_version')").fetchone()
    assert row is not None
    major = pgtools.server_major(str(row[0]))
    archive = _archive_major(manifest_pg_dump_version)
    return pgtools.choose_client(
        "pg_restore", settings.backup.pg_restore, major, reads_archive_of=archive
    ).path


@contextlib.contextmanager
def _scratch_database(settings: OpsSettings, name: str, *, owner: str | None) -> Iterator[str]:
    """Create an empty database for a restore; drop it afterwards (a no-op once it was renamed away)."""
    with _maintenance(settings) as conn:
        owner_sql = sql.SQL(" OWNER {}").format(sql.Identifier(owner)) if owner else sql.SQL("")
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE template0{}").format(sql.Identifier(name), owner_sql)
        )
    try:
        yield name
    finally:
        drop_database(settings, name)


def drop_database(settings: OpsSettings, name: str) -> None:
    """End the sessions on ``name`` and drop it (idempotent)."""
    with _maintenance(settings) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
