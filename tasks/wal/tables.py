"""Bring back only some tables, as they were at the target, into a side schema of the live database.

The recovered scratch instance is ours to change: the named tables are checked to exist there (before
the live database is touched) and moved into a new schema ``restored_<yyyymmddhhmmss>``, their
foreign keys to tables left behind and their triggers dropped (the side copies are for comparing and
copying back, they must not fire the app's logic or tie to live rows). That schema alone is copied
with ``pg_dump | pg_restore --single-transaction`` into the live database, so it is there whole or not
at all, and compared table by table (counts and content hashes) with the recovered instance. Every
other table of the live database keeps today's data; nothing is swapped.

Partitioned tables (declarative partitioning):

- A partitioned table comes back with every partition it had at the target, at every level, each
  moved into the side schema on its own (``ALTER TABLE ... SET SCHEMA`` moves only the relation it
  names) and still attached to its parent there; each partition holding rows is compared on its own.
  Foreign keys and triggers are dropped where they are defined (on the parent); their clones on the
  partitions go with them (PostgreSQL refuses to drop a clone alone). A partition in the tree of a
  named table that is named as well comes back once, inside its parent.
- A named partition comes back **detached**: a table of its own (a partitioned one with its own
  partitions, when it was partitioned again), part of no table of the live database. An operator
  compares it with the live partition of that name and copies rows into it, or, when that partition
  is gone, moves it back and ``ATTACH``-es it to the parent with the bound it had (the SQL hints say
  which and carry the bound). It cannot stay a partition in the side schema: its dump would attach it
  to the parent by name, which in the live database is today's table. Foreign keys of other tables
  that reference its parent are dropped in the scratch instance first (referenced rows would make
  the detach fail; nothing of them is copied).

The result carries the SQL an operator runs to compare each table with its live one and to copy rows
(or a dropped table) back, and to drop the side schema when done. The live table may have changed
since the target (a migration added, dropped, reordered or retyped columns): the statements name the
columns both tables have (the copy's value cast to today's type where it changed; generated columns
left to the live table; ``OVERRIDING SYSTEM VALUE`` for an identity column ``GENERATED ALWAYS``) and a
comment says which columns differ. A partitioned table is compared and filled through its parent.
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
class Column:
    """One column of a table, as the operator's SQL needs to know it."""

    name: str
    type: str  # format_type(), schema-qualified where needed
    generated: bool = False  # GENERATED ALWAYS AS (...) STORED: the table computes it, nobody inserts it
    identity_always: bool = False  # GENERATED ALWAYS AS IDENTITY: an INSERT naming it must override
    required: bool = False  # NOT NULL without a default: an INSERT must give it a value


@dataclass(frozen=True)
class PartitionCopy:
    """One partition (at any depth) of a partitioned table brought back, as it was at the target."""

    schema: str  # its schema at the target (the copy is in the side schema)
    table: str
    parent: tuple[str, str]  # (schema, table) of the table it is a partition of, at the target
    bound: str  # "FOR VALUES ..." or "DEFAULT"
    leaf: bool  # holds rows itself (not partitioned again)
    rows: int
    live_exists: bool  # a table of this name is in the live database now

    @property
    def name(self) -> str:
        return f"{self.schema}.{self.table}"


@dataclass(frozen=True)
class TableCopy:
    """One table brought back: where it lives now, its rows, whether the live one still exists.

    A partitioned table comes back with all its partitions (``partitions``, every level; ``rows`` is
    their sum). A named partition comes back detached (``detached_from`` and ``bound`` say what it was
    a partition of). ``columns`` are the copy's (as at the target), ``live_columns`` the live table's
    now: the operator's SQL names the columns both have.
    """

    schema: str
    table: str
    rows: int
    live_exists: bool
    primary_key: list[str]
    partitions: list[PartitionCopy] = field(default_factory=list)
    detached_from: tuple[str, str] | None = None
    bound: str | None = None
    parent_exists: bool = False  # the table it was detached from is in the live database now
    columns: list[Column] = field(default_factory=list)
    live_columns: list[Column] = field(default_factory=list)

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


def _put_back(side: str, t: TableCopy) -> str:
    """The copy (and its partitions) moved back to where it was, re-attached when it was a partition."""
    lines = [f"-- {t.name} does not exist now: put the copy back whole"]
    moves = [f"ALTER TABLE {_ident(side, t.table)} SET SCHEMA {_ident(t.schema)};"]
    if t.partitions:
        # SET SCHEMA moves one relation: each partition is moved on its own, and stays attached.
        lines[0] += f", with its {len(t.partitions)} partitions"
        moves += [f"ALTER TABLE {_ident(side, p.table)} SET SCHEMA {_ident(p.schema)};" for p in t.partitions]
        lines += [f"-- {p.name} exists now: rename or drop it first" for p in t.partitions if p.live_exists]
    if t.detached_from is not None and t.bound is not None:
        parent = ".".join(t.detached_from)
        if t.parent_exists:
            lines[0] += f", as a partition of {parent} again"
            lines += [
                "-- (it came back detached; ATTACH needs the columns the parent has now and none of its"
                " partitions",
                "-- covering the same values; it clones the parent's keys, indexes and triggers onto it)",
            ]
            attach = f"ATTACH PARTITION {_ident(t.schema, t.table)} {t.bound}"
            moves.append(f"ALTER TABLE {_ident(*t.detached_from)} {attach};")
        else:
            lines[0] += f" (it was a partition of {parent}, {t.bound}; {parent} does not exist now either)"
    return "\n".join(lines + moves)


def _column_notes(t: TableCopy) -> list[str]:
    """Comment lines saying how the live table's columns differ from the copy's (none when equal)."""
    live = {c.name: c for c in t.live_columns}
    copy = {c.name: c for c in t.columns}
    notes = [
        f"{_ident(c.name)} dropped since (only in the copy: not compared, not copied)"
        for c in t.columns
        if c.name not in live
    ]
    for c in t.live_columns:
        if c.name not in copy:
            what = (
                "NOT NULL without a default: the INSERT fails until you give it a value"
                if c.required
                else "copied rows get its default"
            )
            notes.append(f"{_ident(c.name)} added since ({what})")
        elif copy[c.name].type != c.type:
            notes.append(
                f"{_ident(c.name)} was {copy[c.name].type}, is {c.type} now (the copy's values cast)"
            )
    return [f"-- columns differ since the target: {'; '.join(notes)}"] if notes else []


def _from_copy(c: Column, copy: dict[str, Column], alias: str = "") -> str:
    """The copy's value of live column ``c``, cast to the live type when the type changed since."""
    expr = f"{alias}{_ident(c.name)}"
    return expr if copy[c.name].type == c.type else f"CAST({expr} AS {c.type})"


def _compare_and_copy(side: str, t: TableCopy) -> list[str]:
    live, copy = _ident(t.schema, t.table), _ident(side, t.table)
    copy_cols = {c.name: c for c in t.columns}
    # The columns both tables have, in the live table's order; never * (the order or set may differ).
    shared = [c for c in t.live_columns if c.name in copy_cols]
    notes = _column_notes(t)
    if not shared:
        return [f"-- {t.name} has no column of the copy's now: compare and copy by hand", *notes]
    if t.detached_from is not None:
        notes.insert(
            0,
            f"-- the copy came back detached from {'.'.join(t.detached_from)} ({t.bound}): a table of its"
            f" own, compared with {t.name} as it is now",
        )
    note = "".join(f"\n{n}" for n in notes)
    what = f"{t.name} ({len(t.partitions)} partitions)" if t.partitions else t.name
    live_list = ", ".join(_ident(c.name) for c in shared)
    copy_list = ", ".join(_from_copy(c, copy_cols) for c in shared)
    out = [
        f"-- rows of {what} at the target that are missing or different now{note}\n"
        f"SELECT {copy_list} FROM {copy} EXCEPT SELECT {live_list} FROM {live};",
        f"-- rows of {what} now that were not there at the target{note}\n"
        f"SELECT {live_list} FROM {live} EXCEPT SELECT {copy_list} FROM {copy};",
    ]
    insert = [c for c in shared if not c.generated]
    skipped = [c for c in shared if c.generated]
    if not insert:
        return [*out, f"-- every column {t.name} shares with the copy is generated now: nothing to copy back"]
    if skipped:
        note += f"\n-- not copied: {', '.join(_ident(c.name) for c in skipped)} (generated by {t.name})"
    # An identity column GENERATED ALWAYS refuses given values unless the INSERT overrides it.
    overriding = " OVERRIDING SYSTEM VALUE" if any(c.identity_always for c in insert) else ""
    target = f"{live} ({', '.join(_ident(c.name) for c in insert)}){overriding}"
    insert_list = ", ".join(_ident(c.name) for c in insert)
    if t.partitions:
        note += (
            f"\n-- (through the parent: each row goes to the partition of {t.name} that takes it now;"
            " a row none takes fails the INSERT until one is made)"
        )
    live_names = {c.name for c in shared}
    if t.primary_key and all(k in live_names for k in t.primary_key):
        cols = ", ".join(_ident(c) for c in t.primary_key)
        by_name = {c.name: c for c in shared}
        match = " AND ".join(
            f"l.{_ident(k)} = {_from_copy(by_name[k], copy_cols, 'r.')}" for k in t.primary_key
        )
        chosen = ", ".join(_from_copy(c, copy_cols, "r.") for c in insert)
        out.append(
            f"-- copy back the rows whose key ({cols}) is gone from {t.name}{note}\n"
            f"INSERT INTO {target} SELECT {chosen} FROM {copy} AS r WHERE NOT EXISTS"
            f" (SELECT 1 FROM {live} AS l WHERE {match});"
        )
    else:
        chosen = ", ".join(_from_copy(c, copy_cols) for c in insert)
        out.append(
            f"-- copy back the rows missing from {t.name} (no primary key: whole rows compared){note}\n"
            f"INSERT INTO {target} SELECT {chosen} FROM {copy} EXCEPT SELECT {insert_list} FROM {live};"
        )
    return out


def operator_sql(side: str, tables: list[TableCopy]) -> list[str]:
    """The SQL an operator runs against the live database for each table, then to drop the side schema.

    Columns are named (those the copy and the live table share, the copy's cast to today's type where
    it changed), so a live table whose columns were reordered, added, dropped or retyped since the
    target is compared and filled by name; a comment says which columns differ. A partitioned table is
    compared and filled through its parent (rows go to whichever partition takes them now).
    """
    out: list[str] = []
    for t in tables:
        out += _compare_and_copy(side, t) if t.live_exists else [_put_back(side, t)]
    out.append(f"-- when done\nDROP SCHEMA {_ident(side)} CASCADE;")
    return out


@dataclass(frozen=True)
class MovedRelation:
    """A relation of a named table's partition tree (the named table itself first)."""

    oid: int
    schema: str
    table: str
    parent_oid: int | None
    bound: str | None
    kind: str  # 'r' holds rows, 'p' is partitioned


@dataclass(frozen=True)
class MovedTable:
    """A named table as moved into the side schema of the recovered instance, with its partitions."""

    schema: str
    table: str
    primary_key: list[str]
    members: list[MovedRelation]
    detached_from: tuple[str, str] | None = None
    bound: str | None = None

    @property
    def leaves(self) -> list[str]:
        """The names (in the side schema) of the relations that hold its rows."""
        return [m.table for m in self.members if m.kind == "r"]


def _oids(
    conn: psycopg.Connection, tables: tuple[tuple[str, str], ...]
) -> tuple[dict[tuple[str, str], int], list[str]]:
    found: dict[tuple[str, str], int] = {}
    missing: list[str] = []
    for schema, table in tables:
        row = conn.execute(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
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


def _tree(conn: psycopg.Connection, oid: int) -> list[MovedRelation]:
    """``oid`` and every partition under it, parents before their partitions."""
    # pg_partition_tree() lists nothing for a table that is neither partitioned nor a partition.
    rows = conn.execute(
        "SELECT c.oid, n.nspname, c.relname, t.parentrelid::oid, pg_get_expr(c.relpartbound, c.oid),"
        " c.relkind::text, coalesce(t.level, 0) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " LEFT JOIN pg_partition_tree(%s) t ON t.relid = c.oid"
        " WHERE c.oid = %s OR t.relid IS NOT NULL ORDER BY 7, 2, 3",
        (oid, oid),
    ).fetchall()
    return [
        MovedRelation(
            int(r[0]),
            str(r[1]),
            str(r[2]),
            None if r[3] is None or r[6] == 0 else int(r[3]),
            None if r[4] is None else str(r[4]),
            str(r[5]),
        )
        for r in rows
    ]


def _plan_moves(conn: psycopg.Connection, oids: dict[tuple[str, str], int]) -> list[MovedTable]:
    """Each named table with its partition tree; a named partition of another named table is left out
    (it comes back inside its parent); a named partition notes its parent and bound (to detach it).

    Raises:
        ParameterError: two relations would have the same name in the side schema, or a partition is
            not an ordinary table (a foreign table).
    """
    named = set(oids.values())
    moved: list[MovedTable] = []
    for (schema, table), oid in oids.items():
        ancestors = {
            int(r[0]) for r in conn.execute("SELECT relid::oid FROM pg_partition_ancestors(%s)", (oid,))
        } - {oid}
        if ancestors & named:
            continue  # it is in the tree of a named table
        members = _tree(conn, oid)
        odd = [f"{m.schema}.{m.table}" for m in members if m.kind not in ("r", "p")]
        if odd:
            raise ParameterError(
                f"{schema}.{table} has partitions that are not ordinary tables ({', '.join(odd)}): name its"
                " other partitions instead; nothing was touched"
            )
        parent = conn.execute(
            "SELECT n.nspname, c.relname, pg_get_expr(r.relpartbound, r.oid) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhparent JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_class r ON r.oid = i.inhrelid WHERE i.inhrelid = %s AND r.relispartition",
            (oid,),
        ).fetchone()
        of = (str(parent[0]), str(parent[1])) if parent else None
        moved.append(
            MovedTable(
                schema,
                table,
                _primary_key(conn, oid),
                members,
                of,
                str(parent[2]) if parent else None,
            )
        )
    names = [m.table for t in moved for m in t.members]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ParameterError(
            f"{', '.join(twice)} would be more than one table of the side schema (partitions of the named"
            " tables in different schemas, or a named table among them): restore them in separate runs;"
            " nothing was touched"
        )
    return moved


def prepare_side_schema(
    recovered: str, tables: tuple[tuple[str, str], ...], schema: str, target: str
) -> tuple[list[MovedTable], list[str]]:
    """In the recovered instance (``recovered`` conninfo): check each table exists at the target point,
    then move them (with all their partitions) into ``schema``, detach a named partition from its
    parent, and drop their outside foreign keys and triggers.

    Returns:
        The tables as moved, and what was dropped.

    Raises:
        TablesNotFound: some tables did not exist at the target (the tables that did are listed).
        ParameterError: the tables cannot share one side schema (see :func:`_plan_moves`).
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
        plan = _plan_moves(conn, oids)
        moved = [m.oid for t in plan for m in t.members]
        dropped: list[str] = []

        def drop_foreign_keys(query: str, args: tuple[object, ...]) -> None:
            for con, rel, rel_oid in conn.execute(query, args).fetchall():
                conn.execute(
                    sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.SQL(rel), sql.Identifier(con))
                )
                if rel_oid in moved:
                    dropped.append(f"foreign key {con} of {rel}")

        with conn.transaction():
            for t in plan:
                if t.detached_from is None:
                    continue
                # Rows referenced through the parent's key would make the detach fail; the keys
                # point at a table that is not copied anyway. A clone (conparentid) goes with its own.
                oid = t.members[0].oid
                drop_foreign_keys(
                    "SELECT conname, conrelid::regclass::text, conrelid::oid FROM pg_constraint"
                    " WHERE contype = 'f' AND conparentid = 0 AND confrelid IN"
                    " (SELECT relid FROM pg_partition_ancestors(%s) WHERE relid <> %s::regclass)",
                    (oid, oid),
                )
                # Detached, it comes back as a table of its own: a partition in the side schema would
                # be dumped with an ATTACH to its parent, which in the live database is today's table.
                conn.execute(
                    sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(
                        sql.Identifier(*t.detached_from), sql.Identifier(t.schema, t.table)
                    )
                )
            # Only a constraint or trigger of its own is dropped: the clones on partitions go with it
            # (dropping a clone alone is refused).
            drop_foreign_keys(
                "SELECT conname, conrelid::regclass::text, conrelid::oid FROM pg_constraint"
                " WHERE contype = 'f' AND conparentid = 0 AND conrelid = ANY(%s) AND NOT confrelid = ANY(%s)",
                (moved, moved),
            )
            for trigger, rel in conn.execute(
                "SELECT tgname, tgrelid::regclass::text FROM pg_trigger"
                " WHERE NOT tgisinternal AND tgparentid = 0 AND tgrelid = ANY(%s)",
                (moved,),
            ).fetchall():
                conn.execute(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(trigger), sql.SQL(rel)))
                dropped.append(f"trigger {trigger} of {rel}")
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            # SET SCHEMA moves only the named relation: each partition is moved on its own.
            for t in plan:
                for m in t.members:
                    conn.execute(
                        sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                            sql.Identifier(m.schema, m.table), sql.Identifier(schema)
                        )
                    )
    return plan, dropped


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
