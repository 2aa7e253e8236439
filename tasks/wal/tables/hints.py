"""The SQL an operator runs against the live database after a per-table restore: compare each table with
its live one, copy rows (or a dropped table) back, drop the side schema when done.

The statements name the columns both tables have (the copy's value cast to today's type where it
changed; generated columns left to the live table; ``OVERRIDING SYSTEM VALUE`` for an identity column
``GENERATED ALWAYS``) and a comment says which columns differ. A partitioned table is compared and
filled through its parent; a table that is gone is put back whole (a detached partition re-attached
with the bound it had). Nothing here connects anywhere.
"""

from __future__ import annotations

from tasks.wal.tables.model import Column, TableCopy


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
