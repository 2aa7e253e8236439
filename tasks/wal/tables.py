"""Bring back only some tables, as they were at the target, into a side schema of the live database.

The recovered scratch instance is ours to change: the named tables are checked to exist there (before
the live database is touched) and moved into a new schema ``restored_<yyyymmddhhmmss>``, their
foreign keys to tables left behind and their triggers dropped (the side copies are for comparing and
copying back, they must not fire the app's logic or tie to live rows). That schema alone is copied
with ``pg_dump | pg_restore --single-transaction`` into the live database, so it is there whole or not
at all, and compared table by table (counts and content hashes) with the recovered instance. Every
other table of the live database keeps today's data; nothing is swapped.

The result carries the SQL an operator runs to compare each table with its live one and to copy rows
(or a dropped table) back, and to drop the side schema when done.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg
from psycopg import sql

from tasks import backup, postgres
from tasks.backup import CONTENT_HASH_ALGORITHM, TableComparison, compare_stats, table_stats
from tasks.backup.database import _maintenance, _tool_connection
from tasks.commands import stream_command
from tasks.errors import CommandError, OpsError, ParameterError
from tasks.runlog import run_logger
from tasks.settings import OpsSettings

_PIPE = 1 << 20


class TablesNotFound(ParameterError):
    """Some named tables did not exist at the target point; the live database was not touched."""


class TableCopyError(OpsError):
    """The side schema could not be loaded or differs from the recovered tables (it was removed)."""


def _part(text: str, whole: str) -> str:
    if len(text) >= 2 and text.startswith('"') and text.endswith('"'):
        return text[1:-1].replace('""', '"')
    if not text or '"' in text:
        raise ParameterError(f"{whole!r} is not a table name (schema.table or table); nothing was touched")
    return text.lower()  # as PostgreSQL folds an unquoted name


def parse_table(text: str) -> tuple[str, str]:
    """``table``, ``schema.table`` or their double-quoted forms, as (schema, table); ``public`` by default.

    Raises:
        ParameterError: empty or malformed.
    """
    raw = text.strip()
    if raw.startswith('"'):
        end = raw.find('"', 1)
        while end != -1 and raw[end : end + 2] == '""':
            end = raw.find('"', end + 2)
        first, rest = (raw[: end + 1], raw[end + 1 :]) if end != -1 else (raw, "")
    else:
        first, _, rest = raw.partition(".")
        rest = "." + rest if _ else ""
    if not rest:
        return "public", _part(first, text)
    if not rest.startswith(".") or len(rest) < 2:
        raise ParameterError(f"{text!r} is not a table name (schema.table or table); nothing was touched")
    return _part(first, text), _part(rest[1:], text)


def parse_tables(names: list[str]) -> tuple[tuple[str, str], ...]:
    """Every name parsed, duplicates removed, order kept.

    Raises:
        ParameterError: an empty list or a malformed name.
    """
    if not names:
        raise ParameterError("tables is empty: name at least one table, or leave it out; nothing was touched")
    parsed = tuple(dict.fromkeys(parse_table(n) for n in names))
    names_only = [t for _, t in parsed]
    twice = sorted({t for t in names_only if names_only.count(t) > 1})
    if twice:
        # They would meet in the one side schema.
        raise ParameterError(
            f"tables names {', '.join(twice)} in more than one schema: restore them in separate runs;"
            " nothing was touched"
        )
    return parsed


def side_schema_name(at: datetime | None = None) -> str:
    """``restored_<yyyymmddhhmmss>`` (UTC)."""
    return f"restored_{(at or datetime.now(UTC)):%Y%m%d%H%M%S}"


@dataclass(frozen=True)
class TableCopy:
    """One table brought back: where it lives now, its rows, whether the live one still exists."""

    schema: str
    table: str
    rows: int
    live_exists: bool
    primary_key: list[str]

    @property
    def name(self) -> str:
        return f"{self.schema}.{self.table}"


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


def _ident(*parts: str) -> str:
    """A quoted (schema-qualified) name: always quoted, so keywords and mixed case are safe."""
    return ".".join('"' + p.replace('"', '""') + '"' for p in parts)


def operator_sql(side: str, tables: list[TableCopy]) -> list[str]:
    """The SQL an operator runs against the live database for each table, then to drop the side schema."""
    out: list[str] = []
    for t in tables:
        live, copy = _ident(t.schema, t.table), _ident(side, t.table)
        if not t.live_exists:
            out.append(
                f"-- {t.name} does not exist now: put the copy back whole\n"
                f"ALTER TABLE {copy} SET SCHEMA {_ident(t.schema)};"
            )
            continue
        out.append(
            f"-- rows of {t.name} at the target that are missing or different now\n"
            f"SELECT * FROM {copy} EXCEPT SELECT * FROM {live};"
        )
        out.append(
            f"-- rows of {t.name} now that were not there at the target\n"
            f"SELECT * FROM {live} EXCEPT SELECT * FROM {copy};"
        )
        if t.primary_key:
            cols = ", ".join(_ident(c) for c in t.primary_key)
            match = " AND ".join(f"l.{_ident(c)} = r.{_ident(c)}" for c in t.primary_key)
            out.append(
                f"-- copy back the rows whose key ({cols}) is gone from {t.name}\n"
                f"INSERT INTO {live} SELECT r.* FROM {copy} AS r WHERE NOT EXISTS"
                f" (SELECT 1 FROM {live} AS l WHERE {match});"
            )
        else:
            out.append(
                f"-- copy back the rows missing from {t.name} (no primary key: whole rows compared)\n"
                f"INSERT INTO {live} SELECT * FROM {copy} EXCEPT SELECT * FROM {live};"
            )
    out.append(f"-- when done\nDROP SCHEMA {_ident(side)} CASCADE;")
    return out


def _oids(
    conn: psycopg.Connection, tables: tuple[tuple[str, str], ...]
) -> tuple[dict[tuple[str, str], int], list[str]]:
    found: dict[tuple[str, str], int] = {}
    missing: list[str] = []
    for schema, table in tables:
        row = conn.execute(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s AND c.relkind = 'r'",
            (schema, table),
        ).fetchone()
        if row is None:
            missing.append(f"{schema}.{table}")
        else:
            found[(schema, table)] = int(row[0])
    return found, missing


def _primary_key(conn: psycopg.Connection, oid: int) -> list[str]:
    rows = conn.execute(
        "SELECT a.attname FROM pg_index i JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, n) ON true"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
        " WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.n",
        (oid,),
    ).fetchall()
    return [str(r[0]) for r in rows]


def prepare_side_schema(
    recovered: str, tables: tuple[tuple[str, str], ...], schema: str, target: str
) -> tuple[dict[tuple[str, str], list[str]], list[str]]:
    """In the recovered instance (``recovered`` conninfo): check each table exists at the target point,
    then move them into ``schema`` and drop their outside foreign keys and triggers.

    Returns:
        Each table's primary key columns, and what was dropped.

    Raises:
        TablesNotFound: some tables did not exist at the target (the tables that did are listed).
    """
    with psycopg.connect(recovered, autocommit=True) as conn:
        oids, missing = _oids(conn, tables)
        if missing:
            present = [
                f"{r[0]}.{r[1]}"
                for r in conn.execute(
                    "SELECT schemaname, tablename FROM pg_tables WHERE schemaname NOT IN"
                    " ('pg_catalog', 'information_schema') ORDER BY 1, 2 LIMIT 30"
                ).fetchall()
            ]
            raise TablesNotFound(
                f"no table {', '.join(missing)} in {target} at the target point (tables there:"
                f" {', '.join(present) or 'none'}); the live database was not touched"
            )
        keys = {name: _primary_key(conn, oid) for name, oid in oids.items()}
        dropped: list[str] = []
        moved = list(oids.values())
        with conn.transaction():
            for con, rel in conn.execute(
                "SELECT conname, conrelid::regclass::text FROM pg_constraint WHERE contype = 'f'"
                " AND conrelid = ANY(%s) AND NOT confrelid = ANY(%s)",
                (moved, moved),
            ).fetchall():
                conn.execute(
                    sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.SQL(rel), sql.Identifier(con))
                )
                dropped.append(f"foreign key {con} of {rel}")
            for trigger, rel in conn.execute(
                "SELECT tgname, tgrelid::regclass::text FROM pg_trigger"
                " WHERE NOT tgisinternal AND tgrelid = ANY(%s)",
                (moved,),
            ).fetchall():
                conn.execute(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(trigger), sql.SQL(rel)))
                dropped.append(f"trigger {trigger} of {rel}")
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            for s, t in oids:
                conn.execute(
                    sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                        sql.Identifier(s, t), sql.Identifier(schema)
                    )
                )
    return keys, dropped


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
    keys, dropped = prepare_side_schema(recovered, tables, schema, database)
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
        if not comparison.matches or comparison.tables_compared != len(tables):
            _drop_schema(settings, database, schema)
            raise TableCopyError(
                f"the side copy differs from the recovered tables; it was removed: {comparison.summary()}"
            )
    copies = [
        TableCopy(s, t, copied[f"{schema}.{t}"].rows, (s, t) in live_tables, keys[(s, t)]) for s, t in tables
    ]
    logger.info("tables %s restored into %s.%s", ", ".join(f"{s}.{t}" for s, t in tables), database, schema)
    return TablesRestored(schema, copies, comparison, [" ".join(source.argv), " ".join(sink.argv)], dropped)
