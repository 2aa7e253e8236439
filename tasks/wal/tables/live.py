"""The copy into the live database and the comparison: the side schema of the recovered instance goes
through ``pg_dump | pg_restore --single-transaction`` (there whole or not at all, under the database's
lock), is compared table by table (counts and content hashes) with the recovered instance and removed
again when it differs; then the columns of each copy and of its live table are read for the SQL hints.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from tasks import backup, postgres
from tasks.backup import CONTENT_HASH_ALGORITHM, TableComparison, compare_stats, table_stats
from tasks.backup.database import _maintenance, _tool_connection
from tasks.commands import stream_command
from tasks.errors import CommandError, OpsError
from tasks.runlog import run_logger
from tasks.settings import OpsSettings
from tasks.wal.tables.hints import operator_sql
from tasks.wal.tables.model import Column, PartitionCopy, TableCopy
from tasks.wal.tables.names import side_schema_name
from tasks.wal.tables.scratch import MovedTable, prepare_side_schema

_PIPE = 1 << 20


class TableCopyError(OpsError):
    """The side schema could not be loaded or differs from the recovered tables (it was removed)."""


@dataclass(frozen=True)
class TablesRestored:
    """What a per-table restore did, with the comparison proving the side copies equal the replay."""

    schema: str
    tables: list[TableCopy]
    comparison: TableComparison
    commands: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def operator_sql(self) -> list[str]:
        """The statements to compare, copy back and clean up, one string per step (comments included)."""
        return operator_sql(self.schema, self.tables)


def _columns(conn: psycopg.Connection, schema: str, table: str) -> list[Column]:
    """The live columns of ``schema.table`` in their order (none when it does not exist)."""
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attgenerated <> '', a.attidentity = 'a',"
        " a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''"
        " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p') AND a.attnum > 0"
        " AND NOT a.attisdropped ORDER BY a.attnum",
        (schema, table),
    ).fetchall()
    return [Column(str(r[0]), str(r[1]), bool(r[2]), bool(r[3]), bool(r[4])) for r in rows]


def _table_copy(
    conn: psycopg.Connection,
    side: str,
    t: MovedTable,
    rows: dict[str, int],
    live_tables: set[tuple[str, str]],
) -> TableCopy:
    """What the operator needs of one table brought back: rows per partition, both tables' columns."""
    by_oid = {m.oid: m for m in t.members}
    own = {m.oid: rows.get(f"{side}.{m.table}", 0) if m.kind == "r" else 0 for m in t.members}
    # Parents come before their partitions: add each one's rows to its parents, deepest first.
    total = dict(own)
    for m in reversed(t.members):
        if m.parent_oid in total:
            total[m.parent_oid] += total[m.oid]
    partitions = [
        PartitionCopy(
            m.schema,
            m.table,
            (by_oid[m.parent_oid].schema, by_oid[m.parent_oid].table),
            m.bound or "",
            m.kind == "r",
            total[m.oid],
            (m.schema, m.table) in live_tables,
        )
        for m in t.members[1:]
        if m.parent_oid is not None
    ]
    return TableCopy(
        t.schema,
        t.table,
        total[t.members[0].oid],
        (t.schema, t.table) in live_tables,
        t.primary_key,
        partitions=partitions,
        detached_from=t.detached_from,
        bound=t.bound,
        parent_exists=t.detached_from in live_tables,
        columns=_columns(conn, side, t.table),
        live_columns=_columns(conn, t.schema, t.table),
    )


def _schema_stats(conninfo: str, schema: str) -> dict[str, backup.TableStats]:
    with psycopg.connect(conninfo, autocommit=True) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        return table_stats(conn, algorithm=CONTENT_HASH_ALGORITHM, schemas=[schema])


def _drop_schema(settings: OpsSettings, database: str, schema: str) -> None:
    with psycopg.connect(
        postgres.libpq_dsn(settings.postgres.dsn.get_secret_value(), database=database), autocommit=True
    ) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def copy_tables(
    settings: OpsSettings,
    recovered: str,
    database: str,
    tables: tuple[tuple[str, str], ...],
    *,
    label: str,
    schema: str | None = None,
    database_lock_held: bool = False,
) -> TablesRestored:
    """Copy ``tables`` from the recovered instance into a new side schema of the live ``database``.

    Args:
        settings: the loaded settings.
        recovered: conninfo of the recovered database in the scratch instance.
        database: the live database on the app's server.
        tables: (schema, table) pairs, as :func:`parse_tables` gives them.
        label: what the comparison names as the source (base backup and target).
        schema: the side schema's name; default :func:`side_schema_name` of now.
        database_lock_held: the caller holds the database's lock on its own session; else it is taken
            for the load.

    Raises:
        TablesNotFound: a table did not exist at the target (the live database untouched).
        TableCopyError: the side schema exists already, the load failed, or the copy differs (then the
            side schema is removed again; nothing else was touched).
        LockBusy: another run works on the database.
    """
    logger = run_logger(__name__)
    schema = schema or side_schema_name()
    live = postgres.libpq_dsn(settings.postgres.dsn.get_secret_value(), database=database)
    with psycopg.connect(live, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone():
            raise TableCopyError(
                f"schema {schema} exists in {database} already; run again in a second. Nothing was touched"
            )
        live_tables = {
            (str(r[0]), str(r[1]))
            for r in conn.execute("SELECT schemaname, tablename FROM pg_tables").fetchall()
        }
    moved, dropped = prepare_side_schema(recovered, tables, schema, database)
    leaves = [leaf for t in moved for leaf in t.leaves]
    cfg = settings.backup
    dbname, env, secrets = _tool_connection(settings, database)
    dump = [
        cfg.pg_dump,
        "--format=custom",
        "--compress=0",
        "--no-password",
        f"--schema={schema}",
        f"--dbname={recovered}",
    ]
    load = [
        cfg.pg_restore,
        "--exit-on-error",
        "--single-transaction",
        "--no-owner",
        "--no-acl",
        "--no-password",
        f"--dbname={dbname}",
    ]
    with contextlib.ExitStack() as held:
        if not database_lock_held:
            lock_conn = held.enter_context(_maintenance(settings))
            held.enter_context(
                postgres.advisory_lock(
                    lock_conn, backup.database_lock_name(database), cfg.lock_timeout_seconds
                )
            )
        try:
            with (
                stream_command(dump, timeout=cfg.restore_timeout_seconds) as source,
                stream_command(
                    load, timeout=cfg.restore_timeout_seconds, mode="write", env=env, secrets=secrets
                ) as sink,
            ):
                while chunk := source.pipe.read(_PIPE):
                    sink.pipe.write(chunk)
        except CommandError as exc:
            # One transaction: nothing of the schema was committed; make sure of it.
            _drop_schema(settings, database, schema)
            raise TableCopyError(
                f"loading {schema} into {database} failed; nothing was kept: {exc}"
            ) from None
        copied = _schema_stats(live, schema)
        comparison = compare_stats(
            _schema_stats(recovered, schema), copied, database=f"{database}.{schema}", backup_id=label
        )
        # Every partition holding rows is compared on its own; a partitioned parent holds none.
        if not comparison.matches or comparison.tables_compared != len(leaves):
            _drop_schema(settings, database, schema)
            raise TableCopyError(
                f"the side copy differs from the recovered tables; it was removed: {comparison.summary()}"
            )
    with psycopg.connect(live, autocommit=True) as conn:
        # Types as format_type() prints them with an empty path are schema-qualified where needed.
        conn.execute("SET search_path = ''")
        copies = [
            _table_copy(conn, schema, t, {n: s.rows for n, s in copied.items()}, live_tables) for t in moved
        ]
    logger.info("tables %s restored into %s.%s", ", ".join(t.name for t in copies), database, schema)
    return TablesRestored(schema, copies, comparison, [" ".join(source.argv), " ".join(sink.argv)], dropped)
