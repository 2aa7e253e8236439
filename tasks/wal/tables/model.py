"""What a per-table restore brought back, as the operator's SQL needs to know it: each table with its
partitions and the columns of the copy and of the live table.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
