"""Plain functions of the backup module: retention decisions, comparisons, names, manifest state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tasks import backup
from tasks.backup import BackupManifest, TableStats, Verification
from tasks.backup.database import _tool_connection
from tasks.backup.manifest import _valid_backup_id
from tasks.errors import ParameterError
from tasks.settings import load_settings


def _manifest(
    backup_id: str, finished: datetime, verifications: list[Verification] | None = None
) -> BackupManifest:
    return BackupManifest(
        id=backup_id,
        database="app",
        started_at=finished - timedelta(minutes=1),
        finished_at=finished,
        size_bytes=10,
        sha256="0" * 64,
        pg_dump_version="pg_dump 15",
        server_version="15",
        tables={"public.t": TableStats(rows=1)},
        verifications=verifications or [],
    )


def _nightly(days: int, start: datetime) -> list[BackupManifest]:
    return [_manifest(f"b{i:03d}", start - timedelta(days=i)) for i in range(days)]


def test_retention_keeps_last_and_one_per_day_week_month() -> None:
    start = datetime(2026, 11, 28, 2, 15, tzinfo=UTC)
    manifests = _nightly(120, start)
    decisions = backup.plan_retention(
        manifests, keep_last=3, keep_daily=7, keep_weekly=4, keep_monthly=3, timezone="UTC"
    )
    kept = {d.backup_id: d.reasons for d in decisions if d.keep}
    # Days 0-6 (daily), the newest of the 4 newest ISO weeks, of the 3 newest months.
    assert all(f"b{i:03d}" in kept for i in range(7))
    assert kept["b000"] == ["keep-last", "daily", "weekly", "monthly"]
    weekly = [b for b, r in kept.items() if "weekly" in r]
    monthly = [b for b, r in kept.items() if "monthly" in r]
    assert len(weekly) == 4
    assert len(monthly) == 3
    # 2026-10-31 is the last backup of October, 2026-09-30 of September.
    by_id = {m.id: m for m in manifests}
    assert sorted(by_id[b].finished_at.date().isoformat() for b in monthly) == [
        "2026-09-30",
        "2026-10-31",
        "2026-11-28",
    ]
    assert len(kept) < len(manifests)
    assert all(not d.keep and d.reasons == [] for d in decisions if d.backup_id not in kept)


def test_retention_two_backups_a_day_keeps_newest_of_each_day() -> None:
    start = datetime(2026, 11, 28, 23, 0, tzinfo=UTC)
    manifests = [_manifest(f"b{i}", start - timedelta(hours=12 * i)) for i in range(6)]
    decisions = backup.plan_retention(manifests, keep_last=1, keep_daily=3, keep_weekly=0, keep_monthly=0)
    assert [d.backup_id for d in decisions if d.keep] == ["b0", "b2", "b4"]


def test_retention_day_boundaries_follow_the_timezone() -> None:
    # 23:30 UTC on the 27th is already the 28th in Berlin: both are "the 28th" there.
    a = _manifest("late", datetime(2026, 11, 27, 23, 30, tzinfo=UTC))
    b = _manifest("early", datetime(2026, 11, 27, 22, 30, tzinfo=UTC))
    utc = backup.plan_retention([a, b], keep_last=0, keep_daily=2, keep_weekly=0, keep_monthly=0)
    berlin = backup.plan_retention(
        [a, b], keep_last=0, keep_daily=2, keep_weekly=0, keep_monthly=0, timezone="Europe/Berlin"
    )
    assert [d.keep for d in utc] == [True, False]  # same UTC day: only the newest
    assert [d.keep for d in berlin] == [True, True]  # 22:30 UTC is 23:30 on the 27th in Berlin


def test_protected_backup_is_kept_outside_every_tier() -> None:
    start = datetime(2026, 11, 28, tzinfo=UTC)
    manifests = _nightly(10, start)
    decisions = backup.plan_retention(
        manifests, keep_last=1, keep_daily=0, keep_weekly=0, keep_monthly=0, protected=["b007"]
    )
    kept = {d.backup_id: d.reasons for d in decisions if d.keep}
    assert kept == {"b000": ["keep-last"], "b007": ["newest verified"]}


def test_manifest_verified_uses_newest_result_at_or_above_level() -> None:
    at = datetime(2026, 11, 28, tzinfo=UTC)
    ok_restore = Verification(level="restore", ok=True, at=at, detail="")
    failed_catalog_later = Verification(level="catalog", ok=False, at=at + timedelta(hours=1), detail="")
    m = _manifest("x", at, [ok_restore])
    assert m.verified("restore")
    assert m.verified("checksum")
    assert m.strongest_verified == "restore"
    m2 = _manifest("y", at, [ok_restore, failed_catalog_later])
    assert m2.verified("restore")  # the failed catalog check is weaker than restore
    assert not m2.verified("catalog")
    assert not _manifest("z", at).verified("checksum")
    assert _manifest("z", at).strongest_verified is None


def test_compare_stats_reports_each_kind_of_difference() -> None:
    expected = {
        "public.a": TableStats(rows=3, content_hash="1"),
        "public.b": TableStats(rows=2, content_hash="2"),
        "public.c": TableStats(rows=1, content_hash="3"),
        "public.gone": TableStats(rows=1),
    }
    actual = {
        "public.a": TableStats(rows=3, content_hash="1"),
        "public.b": TableStats(rows=2, content_hash="X"),
        "public.c": TableStats(rows=5, content_hash="3"),
        "public.extra": TableStats(rows=0),
    }
    result = backup.compare_stats(expected, actual, database="db", backup_id="id")
    assert not result.matches
    reasons = {d.table: d.reason for d in result.differences}
    assert reasons == {
        "public.b": "content hash differs",
        "public.c": "5 rows, backup has 1",
        "public.gone": "missing from the database",
        "public.extra": "not in the backup",
    }
    same = backup.compare_stats(expected, dict(expected), database="db", backup_id="id")
    assert same.matches
    assert same.hashes_compared == 3
    assert same.rows_compared == 7
    assert "matches backup id" in same.summary()


def test_backup_ids_sort_by_time_and_scratch_names_fit_postgres() -> None:
    first = backup.new_backup_id("my db/x", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    second = backup.new_backup_id("my db/x", datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC))
    assert first.startswith("20260102T030405Z-my-db-x-")
    assert first < second
    assert _valid_backup_id(first)
    assert not _valid_backup_id("../../etc/passwd")
    name = backup.scratch_name("d" * 80, "restore")
    assert len(name.encode()) <= 63
    assert "__restore_" in name


def test_tool_connection_keeps_the_password_out_of_argv() -> None:
    settings = load_settings(
        postgres={"dsn": "postgresql://app:s3cr%40t@db.example:5433/app?sslmode=require"}
    )
    dbname, env, secret_values = _tool_connection(settings, "other")
    assert dbname == "postgresql://app@db.example:5433/other?sslmode=require"
    assert env["PGPASSWORD"] == "s3cr@t"
    assert "s3cr@t" in secret_values


@pytest.mark.parametrize("level", ["none", "full"])
def test_verify_rejects_unknown_level_before_anything(level: str) -> None:
    settings = load_settings(storage={"url": "file:///nonexistent-ops-bk"})
    with pytest.raises(ParameterError, match="verification level"):
        backup.verify_backup(settings, "x", level)  # type: ignore[arg-type]
