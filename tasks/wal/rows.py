"""The rows of a recovered database, copied into the new database on the app's server.

Every table of some size (``STREAM_MIN_BYTES``) gets its own stream, ``psql -c 'COPY ... TO STDOUT'``
from the scratch instance into ``psql -c 'COPY ... FROM STDIN'`` on the app's server, several at once
(``backup.restore_jobs``), the largest first:

- in binary format where every column's type has binary input and output (no text to print and
  parse again), else in text format with the session settings pg_dump uses;
- into the table emptied in the same transaction, ``COPY ... FREEZE``: the rows land frozen and
  their pages all-visible, so the index builds and the comparison that read them next do not
  rewrite every page to set hint bits (the new database is seen by nobody until the swap);
- with explicit columns (no generated or dropped ones), ``ONLY`` the table itself (an inheritance
  parent's children are tables of their own).

Everything else of the data section (the smaller tables, sequence values, large objects) goes
through ``pg_dump --section=data --exclude-table-data=<each streamed table> | pg_restore``, as one
more job alongside.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import psycopg
from psycopg import sql

from tasks import pgtools
from tasks.backup.database import _connect
from tasks.backup.restore.streams import _PgRestore
from tasks.commands import stream_command
from tasks.settings import OpsSettings

_PIPE = 1 << 20
# Below this a table goes through pg_dump with the rest: two more processes and a transaction of its
# own cost more than they save on a few megabytes.
STREAM_MIN_BYTES = 8 << 20
# pg_dump's session: text-format values come out the same whatever the server's or role's defaults.
_TEXT_SESSION = "-c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3"
# The restore's own sessions on the app's server: a role's timeouts must not cut a long COPY.
_LOAD_SESSION = "-c statement_timeout=0 -c lock_timeout=0 -c idle_in_transaction_session_timeout=0"


@dataclass(frozen=True)
class StreamedTable:
    """A table copied in its own stream."""

    schema: str
    table: str
    columns: tuple[str, ...]
    binary: bool
    size_bytes: int

    @property
    def name(self) -> str:
        return f"{self.schema}.{self.table}"

    def ident(self) -> sql.Composable:
        return sql.Identifier(self.schema, self.table)

    def column_list(self) -> sql.Composable:
        return sql.SQL(", ").join(sql.Identifier(c) for c in self.columns)

    def exclude_pattern(self) -> str:
        """pg_dump's pattern for exactly this table: quoted, so no character in a name is special."""
        return ".".join('"' + part.replace('"', '""') + '"' for part in (self.schema, self.table))


# Types whose values cross in binary: base types and enums with send and receive functions, seen
# through domains and arrays. Composite and range columns go in text (their binary form needs every
# member type's, which is not worth the catalog walk).
_STREAMED_TABLES = """
WITH RECURSIVE resolved(root, oid) AS (
    SELECT t.oid, t.oid FROM pg_type t
    UNION
    SELECT r.root, CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.typelem END
    FROM resolved r JOIN pg_type t ON t.oid = r.oid
    WHERE t.typtype = 'd' OR (t.typcategory = 'A' AND t.typelem <> 0)
),
binary_io(oid, ok) AS (
    SELECT r.root, bool_and(t.typtype IN ('b', 'e', 'd') AND t.typsend <> 0 AND t.typreceive <> 0)
    FROM resolved r JOIN pg_type t ON t.oid = r.oid GROUP BY r.root
)
SELECT n.nspname, c.relname, pg_relation_size(c.oid),
       array_agg(a.attname ORDER BY a.attnum) FILTER (WHERE a.attgenerated = ''),
       bool_and(coalesce(b.ok, false))
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN binary_io b ON b.oid = a.atttypid
WHERE c.relkind = 'r' AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
  AND pg_relation_size(c.oid) >= %s
GROUP BY n.nspname, c.relname, c.oid
ORDER BY pg_relation_size(c.oid) DESC, 1, 2
"""


def streamed_tables(conn: psycopg.Connection, min_bytes: int = STREAM_MIN_BYTES) -> list[StreamedTable]:
    """The tables of ``conn``'s database that get a stream of their own, largest first.

    Extension members stay with pg_dump (it dumps an extension's configuration tables with the
    extension's own filter); a table with no column but generated ones too.
    """
    rows = conn.execute(_STREAMED_TABLES, (min_bytes,)).fetchall()
    return [
        StreamedTable(str(s), str(t), tuple(columns), bool(binary), int(size))
        for s, t, size, columns, binary in rows
        if columns
    ]


class _Cancelled(Exception):
    """Another job failed: this one stops."""


def copy_rows(
    settings: OpsSettings,
    source: str,
    database: str,
    restore: _PgRestore,
    pg_dump: list[str],
    *,
    stream_min_bytes: int = STREAM_MIN_BYTES,
) -> list[str]:
    """Copy the data section of the database at ``source`` (a libpq conninfo of the scratch instance)
    into ``database`` on the app's server, which holds the schema before the data and nothing else.

    Args:
        restore: pg_restore into ``database`` (its connection and environment serve the streams too).
        pg_dump: the pg_dump command reading the source, without format and section arguments.
        stream_min_bytes: the size from which a table gets its own stream.

    Both sides' client encoding is the source database's, so the app's server converts text only
    where its database's encoding differs; psql is the source server's major (or the oldest newer one
    installed, as for pg_dump and pg_restore). ``backup.restore_jobs`` streams run at once, each
    command within ``backup.restore_timeout_seconds``.

    Returns:
        The commands run (masked), the streams summed up in one line.

    Raises:
        CommandError: a stream or the pg_dump | pg_restore of the rest failed (the others are stopped).
    """
    jobs = max(1, settings.backup.restore_jobs)
    timeout = settings.backup.restore_timeout_seconds
    with psycopg.connect(source, autocommit=True) as conn:
        tables = streamed_tables(conn, stream_min_bytes)
        row = conn.execute(
            "SELECT current_setting('server_version'), current_setting('server_encoding')"
        ).fetchone()
    assert row is not None
    psql = pgtools.choose_client("psql", "psql", pgtools.server_major(str(row[0]))).path
    encoding = str(row[1])
    privileged = _truncatable(settings, database, tables)
    commands: list[str] = []
    failed = threading.Event()

    def rest() -> None:
        excluded = [f"--exclude-table-data={t.exclude_pattern()}" for t in tables]
        with (
            stream_command(
                [*pg_dump, "--format=custom", "--compress=0", "--section=data", *excluded], timeout=timeout
            ) as out,
            restore.stream("--section=data") as into,
        ):
            _relay(out.pipe.read, into.pipe.write, failed)
        commands.extend([" ".join(out.argv), " ".join(into.argv)])

    def stream(table: StreamedTable) -> None:
        fmt = sql.SQL("binary" if table.binary else "text")
        freeze = table.name in privileged
        reading = sql.SQL("COPY {} ({}) TO STDOUT (FORMAT {})").format(
            table.ident(), table.column_list(), fmt
        )
        loading = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT {}{})").format(
            table.ident(), table.column_list(), fmt, sql.SQL(", FREEZE" if freeze else "")
        )
        # FREEZE needs the table emptied in the same transaction.
        emptying = sql.SQL("TRUNCATE ONLY {}").format(table.ident()).as_string()
        steps = ["BEGIN", emptying, loading.as_string(), "COMMIT"] if freeze else [loading.as_string()]
        # row_security=off: a policy that would hide rows makes the COPY fail instead (as pg_dump).
        source_env = {"PGCLIENTENCODING": encoding, "PGOPTIONS": f"-c row_security=off {_TEXT_SESSION}"}
        into_env = {
            **restore.env,
            "PGCLIENTENCODING": encoding,
            "PGOPTIONS": f"{_LOAD_SESSION} {_TEXT_SESSION}",
            "PGAPPNAME": "swagger2mcp-ops-pitr-copy",
        }
        # The loading side is entered first so that it exits last: a reading that failed raises
        # into it, and its psql is killed before the COMMIT of a partial table.
        with (
            stream_command(
                [psql, *_PSQL_FLAGS, f"--dbname={restore.dbname}", *[f"--command={s}" for s in steps]],
                timeout=timeout,
                mode="write",
                env=into_env,
                secrets=restore.secrets,
            ) as into,
            stream_command(
                [psql, *_PSQL_FLAGS, f"--dbname={source}", f"--command={reading.as_string()}"],
                timeout=timeout,
                env=source_env,
            ) as out,
        ):
            _relay(out.pipe.read, into.pipe.write, failed)

    def run(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException:
            failed.set()  # the other jobs stop at their next chunk; those not started are cancelled
            raise

    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="pitr-copy") as pool:
        futures = [pool.submit(run, rest), *(pool.submit(run, partial(stream, t)) for t in tables)]
        wait(futures, return_when=FIRST_EXCEPTION)
        if failed.is_set():
            for future in futures:
                future.cancel()
    errors = [
        error
        for future in futures
        if not future.cancelled()
        and (error := future.exception()) is not None
        and not isinstance(error, _Cancelled)
    ]
    if errors:
        raise errors[0]
    if tables:
        shown = ", ".join(f"{t.name} ({'binary' if t.binary else 'text'})" for t in tables[:10])
        more = f" and {len(tables) - 10} more" if len(tables) > 10 else ""
        commands.append(
            f"{Path(psql).name} COPY TO STDOUT | {Path(psql).name} COPY FROM STDIN (FREEZE where allowed),"
            f" {jobs} at once: {shown}{more}"
        )
    return commands


_PSQL_FLAGS = ("--no-psqlrc", "--quiet", "--no-password", "--set=ON_ERROR_STOP=1")


def _relay(read: Callable[[int], bytes], write: Callable[[bytes], object], failed: threading.Event) -> None:
    while chunk := read(_PIPE):
        if failed.is_set():
            raise _Cancelled
        write(chunk)


def _truncatable(settings: OpsSettings, database: str, tables: list[StreamedTable]) -> set[str]:
    """The streamed tables this role may empty (TRUNCATE) in ``database``, so their COPY can FREEZE."""
    if not tables:
        return set()
    with _connect(settings, database, purpose="pitr-copy") as conn:
        rows = conn.execute(
            "SELECT n.nspname || '.' || c.relname"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN unnest(%s::text[], %s::text[]) AS w(s, t) ON n.nspname = w.s AND c.relname = w.t"
            " WHERE has_table_privilege(c.oid, 'TRUNCATE')",
            ([t.schema for t in tables], [t.table for t in tables]),
        ).fetchall()
    return {str(r[0]) for r in rows}
