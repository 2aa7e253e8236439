"""Restore to a point against a private PostgreSQL 15 cluster: a writer logs every commit, a base
backup is taken while the archiver streams, then rows are deleted and a table dropped at a known
time; recovery to one second before the damage brings back exactly the rows the writer had
committed by then, the other table whole, and keeps the damaged database. A missing or corrupt
segment stops the restore before anything is touched."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tasks.storage import open_storage
from tasks.wal import archive, base, recover
from tests.fixtures.pitr import WalCluster, Writer, pitr_settings, running_archiver
from tests.integration.test_wal_archiver import wait_for

pytestmark = pytest.mark.integration


def _archived_up_to_now(cluster: WalCluster, storage: Any) -> None:
    """Switch so the current segment is finished, then wait until the archive holds it."""
    current = str(cluster.execute("SELECT pg_walfile_name(pg_current_wal_lsn())", "postgres")[0][0])
    cluster.switch_wal()
    wait_for(lambda: current in archive.list_archive(storage).segments, what=f"{current} archived")


def _damaged_history(cluster: WalCluster, settings: Any, storage: Any) -> tuple[Writer, datetime]:
    """Writer, base backup, more writes, then a DELETE and a DROP TABLE; returns the damage time."""
    writer = Writer(cluster.dsn("app"))
    writer.setup()
    cluster.execute("CREATE TABLE keep_me (k int PRIMARY KEY, v text)")
    cluster.execute("INSERT INTO keep_me SELECT g, md5(g::text) FROM generate_series(1, 300) g")
    writer.write(40, pause=0.02)
    manifest = base.create_base_backup(settings, storage=storage)
    assert base.list_base_backups(settings, storage=storage)[0].id == manifest.id
    writer.start(pause=0.05)
    time.sleep(1.5)
    cluster.switch_wal()  # the replay crosses a few segments
    time.sleep(1.5)
    damage_at = datetime.now(UTC)
    cluster.execute("DELETE FROM events WHERE id % 3 = 0")
    cluster.execute("DROP TABLE keep_me")
    time.sleep(0.5)
    writer.halt()
    _archived_up_to_now(cluster, storage)
    return writer, damage_at


def _gap_target(writer: Writer, moment: datetime) -> datetime:
    """A time between two of the writer's commits (it pauses 50 ms between rows), at most ``moment``."""
    last = max(at for _, at in writer.committed if at <= moment)
    return last + timedelta(milliseconds=10)


def test_restore_to_one_second_before_the_damage(wal_cluster: WalCluster, shared_dir: Path) -> None:
    settings = pitr_settings(wal_cluster, f"file://{shared_dir / 'store'}", shared_dir / "spool")
    storage = open_storage(settings.storage)  # type: ignore[attr-defined]
    with running_archiver(settings):
        writer, damage_at = _damaged_history(wal_cluster, settings, storage)
        target = _gap_target(writer, damage_at - timedelta(seconds=1))
        expected = writer.ids_until(target)
        assert 40 < len(expected) < len(writer.committed)  # the target cuts into the writer's rows

        result = recover.restore_to_point(settings, target_time=target)  # type: ignore[arg-type]

    assert result.comparison.matches, result.comparison.summary()
    assert "recovery stopping before commit" in result.reached
    rows = wal_cluster.execute("SELECT id FROM events ORDER BY id")
    assert [r[0] for r in rows] == expected
    assert wal_cluster.execute("SELECT count(*) FROM keep_me")[0][0] == 300
    # The damaged database is kept under its new name, as it was.
    assert result.old_database is not None
    # The swap may leave it closed to sessions until someone opens it on purpose.
    wal_cluster.execute(f'ALTER DATABASE "{result.old_database}" WITH ALLOW_CONNECTIONS true', "postgres")
    kept = {r[0] for r in wal_cluster.execute("SELECT id FROM events", result.old_database)}
    deleted = {i for i, at in writer.committed if i % 3 == 0 and at < damage_at - timedelta(seconds=0.2)}
    assert deleted
    assert not kept & deleted
    assert len(kept) < len(writer.committed)
    assert wal_cluster.execute(
        "SELECT count(*) FROM pg_class WHERE relname = 'keep_me'", result.old_database
    ) == [(0,)]


def test_missing_or_corrupt_segment_is_named_before_anything_starts(
    wal_cluster: WalCluster, shared_dir: Path
) -> None:
    store = shared_dir / "store"
    settings = pitr_settings(wal_cluster, f"file://{store}", shared_dir / "spool")
    storage = open_storage(settings.storage)  # type: ignore[attr-defined]
    with running_archiver(settings):
        _, damage_at = _damaged_history(wal_cluster, settings, storage)
    plan = recover.plan_point_restore(settings, target_time=damage_at - timedelta(seconds=1))  # type: ignore[arg-type]
    assert len(plan.segments) >= 3
    gone, damaged = plan.segments[1], plan.segments[0]
    storage.delete(archive.record_key(gone))
    blob = bytearray((store / archive.data_key(damaged)).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (store / archive.data_key(damaged)).write_bytes(bytes(blob))
    before = wal_cluster.execute("SELECT count(*) FROM events")

    with pytest.raises(archive.WalArchiveError) as failure:
        recover.restore_to_point(settings, target_time=damage_at - timedelta(seconds=1))  # type: ignore[arg-type]
    assert gone in str(failure.value)
    assert damaged in str(failure.value)
    assert "Nothing was touched" in str(failure.value)
    assert wal_cluster.execute("SELECT count(*) FROM events") == before
    assert wal_cluster.execute(
        "SELECT count(*) FROM pg_database WHERE datname LIKE 'app\\_\\_%'", "postgres"
    ) == [(0,)]


def test_retention_keeps_the_wal_a_kept_base_backup_needs(wal_cluster: WalCluster, shared_dir: Path) -> None:
    settings = pitr_settings(
        wal_cluster, f"file://{shared_dir / 'store'}", shared_dir / "spool", wal={"keep_base_backups": 1}
    )
    storage = open_storage(settings.storage)  # type: ignore[attr-defined]
    with running_archiver(settings):
        wal_cluster.execute("CREATE TABLE t (v text)")
        old = base.create_base_backup(settings, storage=storage)
        for _ in range(3):
            wal_cluster.execute("INSERT INTO t SELECT repeat('z', 400) FROM generate_series(1, 300)")
            wal_cluster.switch_wal()
        new = base.create_base_backup(settings, storage=storage)
        _archived_up_to_now(wal_cluster, storage)
    before = sorted(archive.list_archive(storage).segments)

    dry = base.prune_base_backups(settings, storage=storage)  # type: ignore[arg-type]
    assert dry.dry_run
    assert dry.deleted_backups == [old.id]
    assert dry.first_kept_wal == new.start_wal
    assert dry.deleted_wal == [n for n in before if n < new.start_wal]
    assert sorted(archive.list_archive(storage).segments) == before  # nothing deleted yet

    done = base.prune_base_backups(settings, confirm=True, storage=storage)  # type: ignore[arg-type]
    assert done.deleted_wal == dry.deleted_wal
    after = sorted(archive.list_archive(storage).segments)
    assert after == [n for n in before if n >= new.start_wal]
    assert [m.id for m in base.list_base_backups(settings, storage=storage)] == [new.id]  # type: ignore[arg-type]
    # What the kept base backup needs is still whole and restorable.
    plan = recover.plan_point_restore(settings, target_lsn=new.stop_lsn)  # type: ignore[arg-type]
    assert plan.base.id == new.id
    assert plan.check.ok
