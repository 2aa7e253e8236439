"""Choosing what the PITR drill proves, from the storage alone (no server): no archive at all, and
backups passed over with their reasons; older manifests without a snapshot LSN still read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from tasks.backup import BackupManifest, TableStats, parse_manifest, write_manifest
from tasks.settings import load_settings
from tasks.storage import open_storage
from tasks.wal import archive
from tasks.wal.base import BaseBackupManifest
from tasks.wal.base import write_manifest as write_base_manifest
from tasks.wal.drill import NoDrill, plan_drill

NOW = datetime(2026, 12, 1, 4, 45, tzinfo=UTC)


def _backup(backup_id: str, hours_ago: float, snapshot_lsn: str | None) -> BackupManifest:
    started = NOW - timedelta(hours=hours_ago)
    return BackupManifest(
        id=backup_id,
        database="app",
        started_at=started,
        finished_at=started + timedelta(seconds=5),
        size_bytes=10,
        sha256="0" * 64,
        pg_dump_version="pg_dump 15",
        server_version="15",
        snapshot_lsn=snapshot_lsn,
        snapshot_timeline=None if snapshot_lsn is None else 1,
        tables={"public.t": TableStats(rows=1)},
    )


def test_drill_says_why_no_backup_can_be_drilled(tmp_path: Path) -> None:
    settings = load_settings(storage={"url": f"file://{tmp_path}"})
    storage = open_storage(settings.storage)
    none = plan_drill(settings, database="app", storage=storage)
    assert isinstance(none, NoDrill)
    assert none.configured is False
    assert "no point-in-time archive" in none.reason

    write_base_manifest(
        storage,
        BaseBackupManifest(
            id="20261130T014500Z-cluster-aaaaaa",
            started_at=NOW - timedelta(hours=27),
            finished_at=NOW - timedelta(hours=27),
            size_bytes=1,
            raw_size_bytes=1,
            sha256="0" * 64,
            data_key="base/data/x.tar.zst",
            tool_version="pg_basebackup 15",
            server_version="15",
            timeline=1,
            start_lsn="0/4000028",
            stop_lsn="0/4000100",
            wal_segment_size=16 * 1024 * 1024,
        ),
    )
    segment = tmp_path / "000000010000000000000004"
    segment.write_bytes(b"\0" * 1024)
    archive.ship_file(storage, segment)
    write_manifest(storage, _backup("20261201T021500Z-app-000001", 2.5, None))
    write_manifest(storage, _backup("20261130T021500Z-app-000002", 26.5, "0/3000000"))
    plan = plan_drill(settings, database="app", storage=storage)
    assert isinstance(plan, NoDrill)
    assert plan.configured is True
    assert "20261201T021500Z-app-000001: records no snapshot LSN" in plan.reason
    assert "20261130T021500Z-app-000002: its snapshot (LSN 0/3000000" in plan.reason
    assert "older than the oldest base backup's end (20261130T014500Z-cluster-aaaaaa, LSN 0/4000100)" in (
        plan.reason
    )

    # A manifest written before the snapshot LSN was recorded still reads.
    old = b'{"id": "b", "database": "app", "started_at": "2026-01-01T00:00:00Z", "finished_at":'
    old += b' "2026-01-01T00:00:01Z", "size_bytes": 1, "sha256": "x", "pg_dump_version": "15",'
    old += b' "server_version": "15", "snapshot": "00000003-0000001B-1"}'
    assert parse_manifest(old, "manifests/b.json").snapshot_lsn is None
