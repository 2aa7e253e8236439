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

The parts:

- :mod:`~tasks.wal.tables.names`: the requested tables parsed, and the side schema's name;
- :mod:`~tasks.wal.tables.scratch`: the work on the scratch instance (tables and partitions moved into
  the side schema, a named partition detached, foreign keys and triggers dropped);
- :mod:`~tasks.wal.tables.live`: the copy into the live database and the comparison;
- :mod:`~tasks.wal.tables.hints`: the operator's SQL to compare, copy back and clean up;
- :mod:`~tasks.wal.tables.model`: the tables, partitions and columns brought back.

Import from ``tasks.wal.tables``: every public name is here.
"""

from __future__ import annotations

from tasks.wal.tables.hints import operator_sql
from tasks.wal.tables.live import TableCopyError, TablesRestored, copy_tables
from tasks.wal.tables.model import Column, PartitionCopy, TableCopy
from tasks.wal.tables.names import parse_table, parse_tables, side_schema_name
from tasks.wal.tables.scratch import MovedRelation, MovedTable, TablesNotFound, prepare_side_schema

__all__ = [
    "Column",
    "MovedRelation",
    "MovedTable",
    "PartitionCopy",
    "TableCopy",
    "TableCopyError",
    "TablesNotFound",
    "TablesRestored",
    "copy_tables",
    "operator_sql",
    "parse_table",
    "parse_tables",
    "prepare_side_schema",
    "side_schema_name",
]
