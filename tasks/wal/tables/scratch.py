"""The work on the recovered scratch instance, which is ours to change: check the named tables exist
at the target point, then move them (each partition on its own) into the side schema, detach a named
partition from its parent and drop the foreign keys and triggers that tie them to tables left behind.

Nothing of the live database is touched here.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from tasks.errors import ParameterError


class TablesNotFound(ParameterError):
    """Some named tables did not exist at the target point; the live database was not touched."""


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
