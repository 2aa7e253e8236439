"""Replacing a database by another in one transaction: its sessions, its properties, the rename, and
the names of the databases a restore keeps."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
from psycopg import sql

from tasks import postgres
from tasks.backup.database import _maintenance
from tasks.runlog import run_logger
from tasks.secrets import mask_url
from tasks.settings import OpsSettings


@dataclass(frozen=True)
class ConnectionInfo:
    """A session connected to a database a restore would replace."""

    pid: int
    user: str
    application: str
    client: str
    state: str


def _connections(conn: psycopg.Connection, database: str) -> list[ConnectionInfo]:
    rows = conn.execute(
        "SELECT pid, coalesce(usename, ''), coalesce(application_name, ''),"
        " coalesce(client_addr::text, 'local'), coalesce(state, '') FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()",
        (database,),
    ).fetchall()
    return [ConnectionInfo(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4])) for r in rows]


def _database_owner(conn: psycopg.Connection, database: str) -> str | None:
    row = conn.execute(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (database,)
    ).fetchone()
    return str(row[0]) if row else None


def _carry_database_properties(conn: psycopg.Connection, source: str, dest: str) -> list[str]:
    """Give ``dest`` what a dump without ``--create`` does not hold, as ``source`` has it: its
    ``ALTER DATABASE``/``ALTER ROLE ... IN DATABASE`` settings, privileges, connection limit, comment.

    Each setting is applied with ``FROM CURRENT`` after ``set_config`` of the stored text, so list
    values (``search_path``) keep their quoting. One that cannot be applied (a superuser-only setting
    for a non-superuser) is skipped with a warning. Returns what could not be carried over.
    """
    row = conn.execute(
        "SELECT d.oid, d.datacl IS NOT NULL, d.datconnlimit, shobj_description(d.oid, 'pg_database'),"
        " pg_get_userbyid(d.datdba) FROM pg_database d WHERE d.datname = %s",
        (source,),
    ).fetchone()
    if row is None:
        return []
    source_oid, has_acl, connection_limit, comment, owner = row
    target = sql.Identifier(dest)
    # Steps of one or more statements; a step is applied whole or not at all (one savepoint each).
    steps: list[list[tuple[sql.SQL | sql.Composed, tuple[object, ...]]]] = []
    for role, config in conn.execute(
        "SELECT r.rolname, s.setconfig FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole"
        " WHERE s.setdatabase = %s",
        (source_oid,),
    ).fetchall():
        scope = (
            sql.SQL("ALTER ROLE {} IN DATABASE {}").format(sql.Identifier(role), target)
            if role
            else sql.SQL("ALTER DATABASE {}").format(target)
        )
        for item in config or []:
            name, _, value = str(item).partition("=")
            steps.append(
                [
                    (sql.SQL("SELECT set_config(%s, %s, true)"), (name, value)),
                    (sql.SQL("{} SET {} FROM CURRENT").format(scope, sql.Identifier(name)), ()),
                ]
            )
    if has_acl:
        steps.append([(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(target), ())])
        for grantee, privilege, grantable in conn.execute(
            "SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END,"
            " a.privilege_type, a.is_grantable FROM pg_database d, aclexplode(d.datacl) a"
            " WHERE d.oid = %s",
            (source_oid,),
        ).fetchall():
            if grantee == owner:
                continue  # the owner's own rights come with ownership
            grant = sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                sql.SQL(str(privilege)),
                target,
                sql.Identifier(grantee) if grantee else sql.SQL("PUBLIC"),
                sql.SQL(" WITH GRANT OPTION") if grantable else sql.SQL(""),
            )
            steps.append([(grant, ())])
    if connection_limit is not None and int(connection_limit) >= 0:
        limit = sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(
            target, sql.Literal(int(connection_limit))
        )
        steps.append([(limit, ())])
    if comment is not None:
        steps.append([(sql.SQL("COMMENT ON DATABASE {} IS {}").format(target, sql.Literal(comment)), ())])
    skipped: list[str] = []
    with conn.transaction():
        for step in steps:
            try:
                with conn.transaction():
                    for statement, params in step:
                        conn.execute(statement, params or None)
            except psycopg.Error as exc:
                text = step[-1][0].as_string(conn)
                skipped.append(text)
                run_logger(__name__).warning(
                    "restore: could not carry over to %s: %s (%s)", dest, text, exc.diag.message_primary
                )
    return skipped


def _swap(settings: OpsSettings, target: str, scratch: str, old: str | None) -> int:
    """Replace ``target`` by ``scratch`` in one transaction; returns how many sessions were ended."""
    with _maintenance(settings) as conn:
        if old is not None:
            _carry_database_properties(conn, target, scratch)
        if old is None:
            conn.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(scratch), sql.Identifier(target)
                )
            )
            return 0
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(target)))
        terminated = 0
        try:
            deadline = time.monotonic() + 30
            while True:
                rows = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (target,),
                ).fetchall()
                terminated += sum(1 for r in rows if r[0])
                try:
                    # Both renames or neither: a failure here leaves the old database in place.
                    with conn.transaction():
                        conn.execute(
                            sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                                sql.Identifier(target), sql.Identifier(old)
                            )
                        )
                        conn.execute(
                            sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                                sql.Identifier(scratch), sql.Identifier(target)
                            )
                        )
                    break
                except psycopg.errors.ObjectInUse:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                conn.execute(
                    sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(target))
                )
            raise
        # The old database stays open to psql and pg_dump, read-only by default: nothing connects to it
        # by its new name unless on purpose, and an operator recovering rows must be able to read them.
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(old)))
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(sql.Identifier(old))
        )
        return terminated


def kept_open_command(settings: OpsSettings, database: str) -> str:
    """The psql command that opens a kept database (password masked), read-only by default."""
    url = mask_url(postgres.libpq_dsn(settings.postgres.dsn.get_secret_value(), database=database))
    return f"psql '{url}'  (pg_dump -Fc -d '{url}' -t <table> to take rows out)"


_STAMP = "%Y%m%d%H%M%S"


def kept_name(target: str, at: datetime | None = None) -> str:
    """The name a restore gives the database it replaces: ``<target>__old_<UTC time>``, at most 63 bytes."""
    stamp = (at or datetime.now(UTC)).strftime(_STAMP)
    return target[: 63 - len(stamp) - 6] + f"__old_{stamp}"


def _is_kept_of(kept: str, target: str) -> bool:
    prefix = target[: 63 - len(datetime.now(UTC).strftime(_STAMP)) - 6] + "__old_"
    return kept.startswith(prefix) and kept[len(prefix) :].isdigit()
