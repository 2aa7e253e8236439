"""Per-table restore to a point (tasks/wal/tables) of partitioned tables and of tables whose columns
changed since the target, against one private PostgreSQL 15 cluster (wal_level replica) whose history
is made once for the module:

- ``events`` is partitioned by day (one partition in another schema, one sub-partitioned by kind),
  has a foreign key to a table left behind, an audit trigger and a table whose foreign key references
  it; after the target rows are deleted and a partition is dropped;
- ``accounts`` gains, loses and retypes columns after the target (its id becomes an identity column;
  it has a generated column); ``profiles`` is rebuilt with two text columns swapped.

Each test restores from that archive into a side schema, checks what came back partition by partition,
that the live database kept today's data, and runs the SQL the result carries against the live
database (in a transaction it rolls back, so the tests do not depend on each other).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from tasks.storage import open_storage
from tasks.wal import base, recover
from tasks.wal.tables import TablesRestored
from tests.fixtures.pitr import WalCluster, open_wal_cluster, pitr_settings, running_archiver
from tests.integration.test_pitr_restore import _archived_up_to_now

pytestmark = pytest.mark.integration

_SCHEMA = """
CREATE TABLE users (id int PRIMARY KEY);
INSERT INTO users SELECT generate_series(1, 50);
CREATE TABLE audit (what text);
CREATE FUNCTION audit_event() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN INSERT INTO public.audit VALUES ('event ' || NEW.id); RETURN NEW; END$$;
CREATE SCHEMA old;
CREATE TABLE events (id int, day date, kind text, uid int REFERENCES users, body text,
  PRIMARY KEY (id, day, kind)) PARTITION BY RANGE (day);
CREATE TABLE old.events_2023 PARTITION OF events FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')
  PARTITION BY LIST (kind);
CREATE TABLE events_2024_a PARTITION OF events_2024 FOR VALUES IN ('a');
CREATE TABLE events_2024_rest PARTITION OF events_2024 DEFAULT;
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TRIGGER audit AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION audit_event();
CREATE TABLE refs (id int, day date, kind text, FOREIGN KEY (id, day, kind) REFERENCES events);
CREATE TABLE accounts (id int PRIMARY KEY, name text NOT NULL, balance int, legacy text,
  label text GENERATED ALWAYS AS (name || '!') STORED);
CREATE TABLE profiles (id int PRIMARY KEY, first text, last text);
"""


def _events(first: int, last: int) -> str:
    return (
        "INSERT INTO events SELECT g, date '2023-01-01' + g * 3,"
        " CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END, g % 50 + 1, md5(g::text)"
        f" FROM generate_series({first}, {last}) g"
    )


# After the target: what an operator wants undone, and today's data that must stay.
_DAMAGE = """
DELETE FROM events WHERE id % 5 = 0;
ALTER TABLE events DETACH PARTITION events_2025;
DROP TABLE events_2025;
INSERT INTO events VALUES (1000, '2024-06-01', 'b', 1, 'today');
DELETE FROM accounts WHERE id % 4 = 0;
UPDATE accounts SET balance = -1 WHERE id = 1;
ALTER TABLE accounts DROP COLUMN legacy;
ALTER TABLE accounts ADD COLUMN note text NOT NULL DEFAULT 'none';
ALTER TABLE accounts ALTER COLUMN balance TYPE bigint;
ALTER TABLE accounts ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY;
CREATE TABLE profiles_new (id int PRIMARY KEY, last text, first text);
INSERT INTO profiles_new SELECT id, last, first FROM profiles WHERE id % 3 <> 0;
DROP TABLE profiles;
ALTER TABLE profiles_new RENAME TO profiles;
"""


@dataclass
class History:
    cluster: WalCluster
    settings: Any
    target: datetime
    at_target: dict[str, set[tuple[Any, ...]]]  # "events" per leaf partition, "accounts", "profiles"

    def rows(self, query: str) -> set[tuple[Any, ...]]:
        return set(self.cluster.execute(query))

    def schemas(self) -> list[str]:
        return [
            str(r[0])
            for r in self.cluster.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'restored\\_%'"
            )
        ]

    def restore(self, names: list[str]) -> TablesRestored:
        result = recover.restore_to_point(self.settings, target_time=self.target, tables=names)
        assert result.side is not None
        assert result.comparison.matches, result.comparison.summary()
        return result.side


def _snapshot(cluster: WalCluster) -> dict[str, set[tuple[Any, ...]]]:
    leaves = {
        str(r[0])
        for r in cluster.execute(
            "SELECT c.relnamespace::regnamespace::text || '.' || c.relname FROM pg_partition_tree('events') t"
            " JOIN pg_class c ON c.oid = t.relid WHERE t.isleaf"
        )
    }
    out = {leaf: set(cluster.execute(f"SELECT id, day, kind, uid, body FROM ONLY {leaf}")) for leaf in leaves}
    out["accounts"] = set(cluster.execute("SELECT id, name, balance FROM accounts"))
    out["profiles"] = set(cluster.execute("SELECT id, first, last FROM profiles"))
    return out


@pytest.fixture(scope="module")
def history() -> Iterator[History]:
    with open_wal_cluster() as wal:
        shared = wal.dir / "shared"  # readable by the postgres user (restore_command)
        shared.mkdir()
        shared.chmod(0o777)
        settings = pitr_settings(wal, f"file://{shared / 'store'}", shared / "spool")
        storage = open_storage(settings.storage)  # type: ignore[attr-defined]
        with psycopg.connect(wal.dsn("app"), autocommit=True) as conn:
            conn.execute(_SCHEMA)
            conn.execute(_events(1, 200))
            conn.execute(
                "INSERT INTO accounts (id, name, balance, legacy)"
                " SELECT g, 'n' || g, g * 10, 'old' FROM generate_series(1, 100) g"
            )
        with running_archiver(settings):
            base.create_base_backup(settings, storage=storage)  # type: ignore[arg-type]
            # Rows written after the base backup: they come back only by replaying the WAL.
            with psycopg.connect(wal.dsn("app"), autocommit=True) as conn:
                conn.execute(_events(201, 360))
                # Rows referencing events of 2024 (none of them deleted later): the partition can
                # only be detached once the foreign key is gone.
                conn.execute(
                    "INSERT INTO refs SELECT id, day, kind FROM events WHERE day >= '2024-01-01'"
                    " AND day < '2025-01-01' AND id % 5 <> 0"
                )
                conn.execute(
                    "INSERT INTO profiles SELECT g, 'first' || g, 'last' || g FROM generate_series(1, 60) g"
                )
            wal.switch_wal()
            at_target = _snapshot(wal)
            time.sleep(0.5)
            target = datetime.now(UTC)
            time.sleep(0.5)
            wal.execute(_DAMAGE)
            time.sleep(0.3)
            _archived_up_to_now(wal, storage)
        yield History(wal, settings, target, at_target)


@pytest.fixture(autouse=True)
def _no_side_schema_left(history: History) -> Iterator[None]:
    """A test that fails before it drops its side schema does not leave it to the next one."""
    yield
    for schema in history.schemas():
        history.cluster.execute(f'DROP SCHEMA "{schema}" CASCADE')


def _statements(hints: list[str]) -> list[str]:
    """The statements of the hints without their comment lines, one string per hint."""
    return ["\n".join(line for line in h.splitlines() if not line.startswith("--")) for h in hints]


def _hint(hints: list[str], *needles: str) -> str:
    found = [h for h in hints if all(n in h for n in needles)]
    assert len(found) == 1, (needles, hints)
    return found[0]


def _side_relations(h: History, schema: str) -> dict[str, tuple[str, str | None]]:
    """Each relation of the side schema: its kind and the relation it is a partition of."""
    return {
        str(r[0]): (str(r[1]), r[2] if r[2] is None else str(r[2]))
        for r in h.cluster.execute(
            "SELECT c.relname, c.relkind, i.inhparent::regclass::text FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " LEFT JOIN pg_inherits i ON i.inhrelid = c.oid"
            f" WHERE n.nspname = '{schema}' AND c.relkind IN ('r', 'p')"
        )
    }


def test_a_partitioned_table_comes_back_with_all_its_partitions(history: History) -> None:
    h = history
    live_events = h.rows("SELECT id, day, kind, uid, body FROM events")
    audit = h.cluster.execute("SELECT count(*) FROM audit")
    assert h.cluster.execute("SELECT to_regclass('public.events_2025')") == [(None,)]

    # A partition of a named table is not named twice: it comes back inside its parent.
    side = h.restore(["events", "old.events_2023"])

    s = side.schema
    assert [t.name for t in side.tables] == ["public.events"]
    copy = side.tables[0]
    assert copy.live_exists
    target_leaves = {k: v for k, v in h.at_target.items() if k not in ("accounts", "profiles")}
    assert copy.rows == sum(len(v) for v in target_leaves.values()) == 360
    assert {p.name: p.rows for p in copy.partitions if p.leaf} == {
        k: len(v) for k, v in target_leaves.items()
    }
    # The whole tree, as it was at the target, in the side schema (the partition from schema old too).
    assert _side_relations(h, s) == {
        "events": ("p", None),
        "events_2023": ("r", f"{s}.events"),
        "events_2024": ("p", f"{s}.events"),
        "events_2024_a": ("r", f"{s}.events_2024"),
        "events_2024_rest": ("r", f"{s}.events_2024"),
        "events_2025": ("r", f"{s}.events"),
    }
    # Every partition compared with the replay, row by row (counts and content hashes).
    assert side.comparison.tables_compared == 4
    assert side.comparison.hashes_compared == 4
    for leaf, rows in target_leaves.items():
        name = leaf.rpartition(".")[2]
        assert h.rows(f"SELECT id, day, kind, uid, body FROM ONLY {s}.{name}") == rows, leaf
    # Neither the foreign key to users nor the audit trigger came along (on the parent or a partition).
    assert h.cluster.execute(
        f"SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND connamespace = '{s}'::regnamespace"
    ) == [(0,)]
    assert h.cluster.execute(
        f"SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal AND tgrelid::regclass::text LIKE '{s}.%'"
    ) == [(0,)]
    assert any("trigger audit of events" in d for d in side.dropped), side.dropped
    # The live database keeps today's data; loading fired no trigger there.
    assert h.rows("SELECT id, day, kind, uid, body FROM events") == live_events
    assert h.cluster.execute("SELECT count(*) FROM audit") == audit
    assert h.cluster.execute("SELECT to_regclass('public.events_2025')") == [(None,)]
    assert h.cluster.execute("SELECT to_regclass('old.events_2023')") != [(None,)]

    # The hints compare the parents and copy rows back through the live parent: once the operator has
    # made a partition for 2025 again, every row of the target is back beside today's.
    hints = side.operator_sql()
    missing = _statements([_hint(hints, "public.events", "at the target that are missing")])[0]
    with psycopg.connect(h.cluster.dsn("app")) as conn:
        at_target = set().union(*target_leaves.values())
        assert set(conn.execute(missing).fetchall()) == at_target - live_events
        conn.execute(
            "CREATE TABLE public.events_2025 PARTITION OF events"
            " FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')"
        )
        conn.execute(_statements([_hint(hints, "copy back", "public.events")])[0])
        back = set(conn.execute("SELECT id, day, kind, uid, body FROM events").fetchall())
        assert back == live_events | at_target
        assert conn.execute(missing).fetchall() == []
        conn.rollback()
    h.cluster.execute(hints[-1])
    assert h.schemas() == []


def test_single_partitions_come_back_detached(history: History) -> None:
    h = history
    live_events = h.rows("SELECT id, day, kind, uid, body FROM events")

    # A leaf partition dropped since, and a sub-partitioned partition with rows other tables reference.
    side = h.restore(["events_2025", "events_2024"])

    s = side.schema
    by_name = {t.name: t for t in side.tables}
    assert set(by_name) == {"public.events_2025", "public.events_2024"}
    assert by_name["public.events_2025"].live_exists is False
    assert by_name["public.events_2025"].detached_from == ("public", "events")
    assert by_name["public.events_2025"].bound == "FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')"
    assert by_name["public.events_2024"].live_exists is True
    # Each comes back as a table of its own (the sub-partitioned one with its partitions), part of no
    # table of the live database; the parent did not come along.
    assert _side_relations(h, s) == {
        "events_2025": ("r", None),
        "events_2024": ("p", None),
        "events_2024_a": ("r", f"{s}.events_2024"),
        "events_2024_rest": ("r", f"{s}.events_2024"),
    }
    assert side.comparison.tables_compared == 3
    assert (
        h.rows(f"SELECT id, day, kind, uid, body FROM {s}.events_2025") == h.at_target["public.events_2025"]
    )
    assert h.rows(f"SELECT id, day, kind, uid, body FROM {s}.events_2024") == (
        h.at_target["public.events_2024_a"] | h.at_target["public.events_2024_rest"]
    )
    assert h.rows("SELECT id, day, kind, uid, body FROM events") == live_events

    hints = side.operator_sql()
    put_back = _hint(hints, "events_2025 does not exist now")
    assert "ATTACH PARTITION" in put_back
    assert "FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')" in put_back
    with psycopg.connect(h.cluster.dsn("app")) as conn:
        for statement in _statements(hints[:-1]):
            if statement.lstrip().startswith(("INSERT", "ALTER")):
                conn.execute(statement)
        assert conn.execute(
            "SELECT inhparent::regclass::text FROM pg_inherits"
            " WHERE inhrelid = 'public.events_2025'::regclass"
        ).fetchall() == [("events",)]
        back = set(conn.execute("SELECT id, day, kind, uid, body FROM events").fetchall())
        assert back == (
            live_events
            | h.at_target["public.events_2025"]
            | h.at_target["public.events_2024_a"]
            | h.at_target["public.events_2024_rest"]
        )
        conn.rollback()
    h.cluster.execute(hints[-1])
    assert h.schemas() == []


def test_hints_name_the_shared_columns_when_the_live_columns_changed(history: History) -> None:
    h = history
    live_accounts = h.rows("SELECT id, name, balance, note FROM accounts")
    live_profiles = h.rows("SELECT id, first, last FROM profiles")

    side = h.restore(["accounts", "profiles"])

    hints = side.operator_sql()
    accounts = [x for x in hints if "public.accounts" in x]
    # Which columns differ is said where the operator reads the statements.
    assert len(accounts) == 3
    for hint in accounts:
        assert '"legacy" dropped since' in hint, hint
        assert '"note" added since' in hint, hint
        assert '"balance" was integer, is bigint now' in hint, hint
        assert "*" not in hint, hint
    profiles = [x for x in hints if "public.profiles" in x]
    assert len(profiles) == 3
    assert all("*" not in x and "columns differ" not in x for x in profiles), profiles

    with psycopg.connect(h.cluster.dsn("app")) as conn:
        # Rows compared by column name, not by position: only the deleted profiles differ.
        missing = _statements([_hint(hints, "public.profiles at the target that are missing")])[0]
        # (in the live table's column order: id, last, first)
        deleted = {(i, last, first) for i, first, last in h.at_target["profiles"] if i % 3 == 0}
        assert set(conn.execute(missing).fetchall()) == deleted
        extra = _statements([_hint(hints, "public.profiles now that were not there")])[0]
        assert conn.execute(extra).fetchall() == []
        missing = _statements([_hint(hints, "public.accounts at the target that are missing")])[0]
        # Rows deleted since, and the one updated since (its old values).
        assert {r[0] for r in conn.execute(missing).fetchall()} == {
            i for i in range(1, 101) if i % 4 == 0
        } | {1}

        for statement in _statements(hints[:-1]):
            if statement.lstrip().startswith("INSERT"):
                conn.execute(statement)
        assert set(conn.execute("SELECT id, first, last FROM profiles").fetchall()) == (
            live_profiles | h.at_target["profiles"]
        )
        restored = {(i, n, b, "none") for i, n, b in h.at_target["accounts"] if i % 4 == 0}
        assert set(conn.execute("SELECT id, name, balance, note FROM accounts").fetchall()) == (
            live_accounts | restored
        )
        # The generated column is computed by the live table, not copied.
        assert conn.execute("SELECT count(*) FROM accounts WHERE label <> name || '!'").fetchall() == [(0,)]
        conn.rollback()
    h.cluster.execute(hints[-1])
    assert h.schemas() == []
