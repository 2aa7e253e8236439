"""How the WAL tools reach the database server: the replication role's connection for pg_receivewal
and pg_basebackup (password in the environment, never on a command line), and an SQL session for
the slot's state."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import psycopg

from tasks import postgres
from tasks.errors import OpsError
from tasks.secrets import mask_text, mask_url
from tasks.settings import OpsSettings


class WalServerError(OpsError):
    """The server cannot be reached or refused what the archive needs."""


@dataclass(frozen=True)
class ToolConnection:
    """A libpq URL without its password, the environment carrying it, and what to mask in output."""

    url: str
    env: dict[str, str]
    secrets: list[str]
    shown: str


def replication_url(settings: OpsSettings) -> str:
    """The replication role's URL (``wal.replication_dsn``), else the app's server and user."""
    if settings.wal.replication_dsn is not None:
        return settings.wal.replication_dsn.get_secret_value()
    return postgres.libpq_dsn(settings.postgres.dsn.get_secret_value(), database="postgres")


def tool_connection(settings: OpsSettings) -> ToolConnection:
    """The ``--dbname`` for pg_receivewal / pg_basebackup (they ignore the database part)."""
    raw = postgres.libpq_dsn(replication_url(settings))
    url, env, secrets = postgres.tool_connection(raw, settings.postgres.connect_timeout_seconds)
    return ToolConnection(url, env, secrets, mask_url(raw))


def connect(settings: OpsSettings, *, purpose: str) -> psycopg.Connection:
    """An SQL session as the replication role (it reads ``pg_replication_slots``).

    Raises:
        WalServerError: cannot connect (the message names the server, never the password).
    """
    raw = replication_url(settings)
    try:
        return psycopg.connect(
            postgres.libpq_dsn(raw),
            connect_timeout=max(1, round(settings.postgres.connect_timeout_seconds)),
            autocommit=True,
            application_name=f"swagger2mcp-ops-{purpose}",
        )
    except psycopg.Error as exc:
        password = urlsplit(raw).password or ""
        text = mask_text(" ".join(str(exc).split()), [raw, password])
        raise WalServerError(
            f"cannot connect to {mask_url(raw)} for the WAL archive: {text}; check OPS_WAL__REPLICATION_DSN"
            " (or OPS_POSTGRES__DSN) and that the role may log in"
        ) from None
