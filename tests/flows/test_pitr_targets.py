"""Point-in-time targets of restore-database, recover-data and restore-to-point, against one private
PostgreSQL 15 cluster (wal_level replica) whose history is made once for the module: a writer logs
each commit, a base backup is taken while the archiver streams, then one transaction deletes rows
and drops a table, and more writes follow. Each test restores from that archive:

- per-table: two tables back into a side schema, every live table untouched, the report's SQL copies
  the rows back; an unknown table is refused before the live database is touched;
- ``target_xid``: just before the damaging transaction, exactly the rows committed before it;
- restore-database ``target_time`` one second before the damage: exactly the writer's rows up to then;
- recover-data ``target_xid``: the same through the incident flow;
- bad targets (future, outside the window, two sources, unknown xid) refused before any side effect.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from flows.backup import restore_database
from flows.incidents import recover_data
from flows.pitr import restore_to_point
from tasks.errors import ParameterError
from tasks.storage import open_storage
from tasks.wal import recover, tables, targets
from tests.fixtures.pitr import PG_BIN, WalCluster, Writer, open_wal_cluster, pitr_settings, running_archiver
from tests.integration.test_pitr_restore import _archived_up_to_now, _gap_target

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


@dataclass
class History:
    """The cluster after the damage, and what the test knows about its past."""

    cluster: WalCluster
    store: Path
    spool: Path
    writer: Writer
    before_damage: list[int]  # every row the writer committed before the damaging transaction
    damage_at: datetime
    damage_xid: int
    settings: Any

    def env(self) -> dict[str, str]:
        return {
            "OPS_STACK": "teststack",
            "OPS_POSTGRES__DSN": self.cluster.dsn("app"),
            "OPS_STORAGE__URL": f"file://{self.store}",
            "OPS_WAL__SPOOL_DIR": str(self.spool),
            "OPS_WAL__SERVER_BIN_DIR": str(PG_BIN),
            "OPS_RUNTIME__KIND": "none",
            "OPS_BACKUP__LOCK_TIMEOUT_SECONDS": "5",
        }

    def ids(self, database: str = "app", table: str = "events") -> list[int]:
        return [int(r[0]) for r in self.cluster.execute(f"SELECT id FROM {table} ORDER BY id", database)]  # type: ignore[call-overload]

    def databases(self) -> list[str]:
        return sorted(str(r[0]) for r in self.cluster.execute("SELECT datname FROM pg_database", "postgres"))

    def schemas(self) -> list[str]:
        return [
            str(r[0])
            for r in self.cluster.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'restored\\_%'"
            )
        ]


@pytest.fixture(scope="module")
def history() -> Iterator[History]:
    with open_wal_cluster() as wal:
        shared = wal.dir / "shared"  # readable by the postgres user (restore_command)
        shared.mkdir()
        shared.chmod(0o777)
        settings = pitr_settings(wal, f"file://{shared / 'store'}", shared / "spool")
        storage = open_storage(settings.storage)  # type: ignore[attr-defined]
        writer = Writer(wal.dsn("app"))
        writer.setup()
        wal.execute("CREATE TABLE keep_me (k int PRIMARY KEY, v text)")
        wal.execute("INSERT INTO keep_me SELECT g, md5(g::text) FROM generate_series(1, 300) g")
        wal.execute("CREATE TABLE other (k int PRIMARY KEY, v text)")
        wal.execute("INSERT INTO other SELECT g, 'before' FROM generate_series(1, 5) g")
        with running_archiver(settings):
            writer.write(20, pause=0.01)
            from tasks.wal import base

            base.create_base_backup(settings, storage=storage)  # type: ignore[arg-type]
            writer.start(pause=0.05)
            time.sleep(1.5)
            wal.switch_wal()
            time.sleep(1.5)
            damage_at = datetime.now(UTC)
            writer.halt()
            before = [i for i, _ in writer.committed]
            with psycopg.connect(wal.dsn("app"), autocommit=True) as conn, conn.transaction():
                conn.execute("DELETE FROM events WHERE id % 3 = 0")
                conn.execute("DROP TABLE keep_me")
                row = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
            assert row is not None
            # Writes after the damage: today's data, which per-table restores must leave alone.
            writer.stop.clear()
            writer.start(pause=0.05)
            wal.execute("UPDATE other SET v = 'today'")
            time.sleep(0.6)
            writer.halt()
            _archived_up_to_now(wal, storage)
        yield History(
            wal, shared / "store", shared / "spool", writer, before, damage_at, int(str(row[0])), settings
        )


@pytest.fixture
def flow_env(history: History, monkeypatch: pytest.MonkeyPatch) -> History:
    for key, value in history.env().items():
        monkeypatch.setenv(key, value)
    return history


def test_tables_come_back_into_a_side_schema_and_nothing_else_changes(flow_env: History) -> None:
    h = flow_env
    target = _gap_target(h.writer, h.damage_at - timedelta(seconds=1))
    expected = h.writer.ids_until(target)
    assert 20 < len(expected) < len(h.before_damage)
    live_events = h.ids()
    other_before = h.cluster.execute("SELECT k, v FROM other ORDER BY k")
    databases = h.databases()

    # A table that did not exist at the target is refused before the live database is touched.
    refused = restore_to_point(
        target_time=target, tables=["keep_me", "nope"], dry_run=False, approved=True, return_state=True
    )
    assert refused.is_failed()
    assert "nope" in str(refused.message)
    assert h.schemas() == []
    assert h.databases() == databases

    done = restore_to_point(
        target_time=target, tables=["keep_me", "public.events"], dry_run=False, approved=True
    )
    schema = done["side_schema"]
    assert schema.startswith("restored_")
    assert done["matches"] is True
    assert done["restored_tables"] == {"public.keep_me": 300, "public.events": len(expected)}
    assert h.ids(table=f"{schema}.events") == expected
    assert h.cluster.execute(f"SELECT count(*) FROM {schema}.keep_me") == [(300,)]
    # Every live table keeps today's data; no database was swapped or added.
    assert h.ids() == live_events
    assert h.cluster.execute("SELECT k, v FROM other ORDER BY k") == other_before
    assert h.cluster.execute("SELECT to_regclass('public.keep_me')") == [(None,)]
    assert h.databases() == databases

    # The report's SQL brings the rows and the dropped table back.
    for statement in done["sql"][:-1]:
        if statement.split("\n")[-1].startswith(("INSERT", "ALTER")):
            h.cluster.execute(statement)
    assert set(h.ids()) == set(live_events) | set(expected)
    assert h.cluster.execute("SELECT count(*) FROM keep_me") == [(300,)]
    h.cluster.execute(done["sql"][-1])
    assert h.schemas() == []


def test_restore_database_to_one_second_before_the_damage(flow_env: History) -> None:
    h = flow_env
    target = _gap_target(h.writer, h.damage_at - timedelta(seconds=1))
    expected = h.writer.ids_until(target)

    plan = restore_database(target_time=target)
    assert plan["dry_run"] is True
    assert plan["base_backup"]
    kept_before = [d for d in h.databases() if d.startswith("app__old_")]

    done = restore_database(target_time=target, dry_run=False, approved=True)
    assert done["matches"] is True
    assert h.ids() == expected
    assert h.cluster.execute("SELECT count(*) FROM keep_me") == [(300,)]
    kept = [d for d in h.databases() if d.startswith("app__old_")]
    assert done["old_database"] in kept
    assert len(kept) == len(kept_before) + 1


def test_recover_data_just_before_a_transaction(flow_env: History) -> None:
    h = flow_env
    done = recover_data(
        target_xid=h.damage_xid,
        dry_run=False,
        approved=True,
        stop_writes=False,
        validation_queries=["SELECT count(*) = 300 FROM keep_me"],
    )
    assert done["outcome"] == "recovered"
    assert done["validations"][0]["ok"] is True
    assert h.ids() == h.before_damage  # the delete undone; nothing written after it
    assert h.cluster.execute("SELECT count(*) FROM keep_me") == [(300,)]
    assert h.cluster.execute("SELECT DISTINCT v FROM other") == [("before",)]
    assert done["old_database"] in h.databases()
    names = [s["step"] for s in done["steps"]]
    assert names[0] == "assess: point in time, plan, replicas"
    assert names[1].startswith(f"restore to just before transaction {h.damage_xid} (its COMMIT at")


def test_bad_targets_are_refused_before_anything(flow_env: History) -> None:
    h = flow_env
    databases = h.databases()
    marker = h.ids()

    def refused(state: Any, *needles: str) -> None:
        assert state.is_failed()
        for needle in needles:
            assert needle in str(state.message), state.message

    future = datetime.now(UTC) + timedelta(hours=1)
    refused(
        restore_database(target_time=future, dry_run=False, approved=True, return_state=True),
        "in the future",
        "restorable window is",
    )
    early = datetime(2000, 1, 1, tzinfo=UTC)
    refused(
        recover_data(target_time=early, dry_run=False, approved=True, stop_writes=False, return_state=True),
        "before the oldest base backup",
        "restorable window is",
    )
    refused(restore_database(backup_id="latest", target_time=h.damage_at, return_state=True), "not both")
    with pytest.raises(targets.TargetOutsideWindow, match=r"no commit or abort record.*restorable window is"):
        recover.plan_point_restore(h.settings, target_xid=h.damage_xid + 100000)  # type: ignore[arg-type]
    with pytest.raises(targets.TargetOutsideWindow, match="past the newest archived WAL"):
        recover.plan_point_restore(h.settings, target_lsn="FF/0")  # type: ignore[arg-type]
    refused(restore_database(tables=["events"], return_state=True), "tables needs a point in time")
    assert h.databases() == databases
    assert h.ids() == marker
    assert h.schemas() == []


def test_target_checks_without_a_server() -> None:
    window = targets.RestorableWindow(
        datetime(2026, 3, 1, 10, tzinfo=UTC),
        "0/2000028",
        "b1",
        datetime(2026, 3, 1, 12, tzinfo=UTC),
        "000000010000000000000009",
    )
    now = datetime(2026, 3, 1, 12, 0, 5, tzinfo=UTC)
    targets.check_time(datetime(2026, 3, 1, 11, tzinfo=UTC), window, now=now)
    with pytest.raises(ParameterError, match="time zone"):
        targets.check_time(datetime(2026, 3, 1, 11), window, now=now)
    with pytest.raises(targets.TargetOutsideWindow, match="after the newest archived WAL"):
        targets.check_time(datetime(2026, 3, 1, 12, 0, 2, tzinfo=UTC), window, now=now)
    assert targets.parse_xid("4294967296747") == 747  # an xid8 with its epoch
    with pytest.raises(ParameterError):
        targets.parse_xid("abc")
    assert tables.parse_tables(["Events", 'app."Mixed Case"', "public.events"]) == (
        ("public", "events"),
        ("app", "Mixed Case"),
    )
    with pytest.raises(ParameterError, match="more than one schema"):
        tables.parse_tables(["a.t", "b.t"])
