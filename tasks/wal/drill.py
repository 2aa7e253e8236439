"""The point-in-time recovery drill: prove that the WAL archive brings the cluster back to the state a
logical backup recorded.

A logical backup's manifest holds the WAL position of its snapshot (``snapshot_lsn``) and the
per-table counts and content hashes taken in that snapshot. The drill

1. picks the newest manifest whose snapshot lies inside the archive's restorable window (after the
   oldest base backup's end, within the WAL archived so far), saying for each newer one why not;
2. replays the archive into a scratch PostgreSQL up to just before that position (the same recovery
   as ``restore-to-point``, :mod:`tasks.wal.recover`), or to the archive's end when nothing was
   written after it;
3. counts and hashes every table of the recovered database with the manifest's own code and
   algorithm (:mod:`tasks.backup.stats`) and compares them table by table.

Nothing is kept: the scratch instance is stopped and its directory removed, also on failure; the
app's server and the storage are only read.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from tasks import postgres
from tasks.backup import (
    BackupManifest,
    TableComparison,
    TableStats,
    compare_stats,
    hash_algorithm,
    list_backups,
    table_stats,
)
from tasks.errors import CheckFailed, OpsError
from tasks.runlog import run_logger
from tasks.settings import OpsSettings
from tasks.storage import Storage, open_storage
from tasks.wal import archive
from tasks.wal.base import BaseBackupManifest, list_base_backups
from tasks.wal.names import format_lsn, parse_lsn, parse_segment, segment_of
from tasks.wal.recover import PointPlan, PointRestoreError, plan_point_restore, scratch_server

# Transactions looked up past the snapshot's xmax; more would only mean a very busy instant.
_IN_FLIGHT_LIMIT = 10_000


class DrillUnavailable(OpsError):
    """No logical backup and archive pair can be drilled (the reason says why)."""


@dataclass(frozen=True)
class NoDrill:
    """Why no drill can run; ``configured`` is False when there is no point-in-time archive at all."""

    reason: str
    configured: bool = True


class DrillFailed(CheckFailed):
    """The recovered database differs from the logical backup's manifest (tables named)."""


@dataclass(frozen=True)
class DrillPlan:
    """The backup to reproduce, the recovery that reproduces it, and the newer backups passed over."""

    manifest: BackupManifest
    point: PointPlan
    passed_over: list[str] = field(default_factory=list)

    @property
    def lsn(self) -> str:
        assert self.manifest.snapshot_lsn is not None  # chosen for having one
        return self.manifest.snapshot_lsn


@dataclass(frozen=True)
class DrillResult:
    """What the recovered database showed, compared with the manifest."""

    plan: DrillPlan
    reached: str
    ended_before_target: bool
    comparison: TableComparison
    rows: list[dict[str, Any]]
    in_flight: list[str]
    duration_seconds: float

    @property
    def matches(self) -> bool:
        return self.comparison.matches


def _storage(settings: OpsSettings) -> Storage:
    return open_storage(settings.storage, attempts=settings.backup.upload_attempts)


def _archive_reaches(listing: archive.ArchiveListing, lsn: int, timeline: int, size: int) -> bool:
    """Whether the archive holds WAL of ``lsn``'s segment: finished (or a later one), or as the growing
    segment. The archiver re-ships the growing segment only when it grew, so on an idle server it may
    end exactly at ``lsn``: the recovery then replays to its end, and the comparison is the proof."""
    holding = segment_of(lsn, timeline, size)
    for name in listing.segments:
        seg = parse_segment(name, size)
        if seg.timeline >= timeline and seg.number >= holding.number:
            return True
    return holding.name in listing.partials


def plan_drill(
    settings: OpsSettings, *, database: str | None = None, storage: Storage | None = None
) -> DrillPlan | NoDrill:
    """Choose the newest logical backup whose snapshot the archive can reproduce; reads only.

    Returns:
        The plan, or why there is none: no WAL archive at all (``configured`` False), no base backup,
        no logical backup, or none inside the restorable window (why, for each candidate).
    """
    storage = storage or _storage(settings)
    database = database or postgres.database_name(settings.postgres.dsn.get_secret_value())
    bases = list_base_backups(settings, storage=storage)
    listing = archive.list_archive(storage)
    if not bases and not listing.segments and not listing.partials:
        return NoDrill(
            f"no point-in-time archive in {storage.location} (no base backup, no WAL): run the WAL"
            " archiver and backup-base to have one",
            configured=False,
        )
    if not bases:
        return NoDrill("the WAL archive has no base backup yet: run backup-base")
    oldest: BaseBackupManifest = min(bases, key=lambda b: parse_lsn(b.stop_lsn))
    start = parse_lsn(oldest.stop_lsn)
    size = oldest.wal_segment_size
    manifests = list_backups(settings, database)
    if not manifests:
        return NoDrill(f"no logical backup of {database} yet: run backup-database")
    passed: list[str] = []
    for manifest in manifests:
        if manifest.snapshot_lsn is None:
            passed.append(
                f"{manifest.id}: records no snapshot LSN (taken by an older version, or from a standby)"
            )
            continue
        lsn = parse_lsn(manifest.snapshot_lsn)
        if lsn < start:
            passed.append(
                f"{manifest.id}: its snapshot (LSN {manifest.snapshot_lsn},"
                f" {manifest.started_at:%Y-%m-%d %H:%M} UTC) is older than the oldest base backup's end"
                f" ({oldest.id}, LSN {oldest.stop_lsn}); so is every older backup"
            )
            break
        timeline = manifest.snapshot_timeline or max(b.timeline for b in bases)
        if not _archive_reaches(listing, lsn, timeline, size):
            newest = listing.newest()
            passed.append(
                f"{manifest.id}: the archive does not reach its snapshot (LSN {manifest.snapshot_lsn}) yet;"
                f" newest WAL: {newest[0] if newest else '-'}"
            )
            continue
        try:
            point = plan_point_restore(
                settings, target_lsn=manifest.snapshot_lsn, database=manifest.database, storage=storage
            )
        except (archive.WalArchiveError, PointRestoreError) as exc:
            passed.append(f"{manifest.id}: {exc}")
            continue
        return DrillPlan(manifest, dataclasses.replace(point, inclusive=False), passed)
    return NoDrill(
        f"no logical backup of {database} lies inside the restorable window (base backups from"
        f" {oldest.id}, LSN {oldest.stop_lsn}): " + "; ".join(passed)
    )


def _in_flight_commits(conn: psycopg.Connection, snapshot: str | None) -> list[str]:
    """Transactions the backup's snapshot did not see but the recovered instance has committed.

    Recovery stops just before the snapshot's position, where every commit the snapshot saw lies;
    a transaction whose commit record was written but which had not yet left the server's list of
    running transactions when the snapshot was taken is replayed too. Those are named, so that a
    difference they explain is told apart from a broken archive.
    """
    if not snapshot:
        return []
    _, xmax_text, xip_text = [*snapshot.split(":"), "", ""][:3]
    xmax = int(xmax_text)
    candidates = {int(x) for x in xip_text.split(",") if x}
    row = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()
    recovered_xmax = int(str(row[0])) if row is not None else xmax
    candidates.update(range(xmax, min(recovered_xmax, xmax + _IN_FLIGHT_LIMIT)))
    if not candidates:
        return []
    rows = conn.execute(
        "SELECT x::text FROM unnest(%s::text[]) AS t(x) WHERE pg_xact_status(x::xid8) = 'committed'",
        ([str(x) for x in sorted(candidates)],),
    ).fetchall()
    return [str(r[0]) for r in rows]


def table_rows(
    manifest: BackupManifest, comparison: TableComparison, actual: dict[str, TableStats]
) -> list[dict[str, Any]]:
    """One row per table: the manifest's and the recovered instance's count and hash, and the verdict."""
    differing = {d.table: d.reason for d in comparison.differences}
    rows = []
    for name in sorted(set(manifest.tables) | set(actual)):
        want, got = manifest.tables.get(name), actual.get(name)
        rows.append(
            {
                "table": name,
                "backup_rows": None if want is None else want.rows,
                "recovered_rows": None if got is None else got.rows,
                "backup_hash": None if want is None else want.content_hash,
                "recovered_hash": None if got is None else got.content_hash,
                "result": differing.get(name, "equal"),
            }
        )
    return rows


def run_drill(settings: OpsSettings, plan: DrillPlan, *, storage: Storage | None = None) -> DrillResult:
    """Recover the archive to the backup's snapshot in a scratch instance and compare every table.

    Returns:
        The comparison (a difference is a result, not an error: the caller reports, then fails).

    Raises:
        BackupCorrupt / WalArchiveError: the base backup or a segment does not match its checksums.
        PointRestoreError: the scratch instance did not recover, the database is not in it, or it is
            another cluster than the one the backup was taken from.
        BackupError: the manifest's content hash algorithm is unknown to this version.
    """
    started = time.monotonic()
    logger = run_logger(__name__)
    storage = storage or _storage(settings)
    manifest = plan.manifest
    algorithm = hash_algorithm(manifest)
    timeout_ms = int(settings.backup.restore_timeout_seconds * 1000)
    with scratch_server(settings, storage, plan.point, to_end_if_short=True) as server:
        with psycopg.connect(server.conninfo("postgres"), autocommit=True) as conn:
            row = conn.execute(
                "SELECT (SELECT 1 FROM pg_database WHERE datname = %s),"
                " (pg_control_system()).system_identifier::text",
                (manifest.database,),
            ).fetchone()
            assert row is not None
            if manifest.system_identifier is not None and row[1] != manifest.system_identifier:
                raise PointRestoreError(
                    f"the WAL archive holds cluster {row[1]}, but backup {manifest.id} was taken from"
                    f" cluster {manifest.system_identifier}: OPS_STORAGE__URL or the archiver points at"
                    " another server"
                )
            if row[0] is None:
                raise PointRestoreError(
                    f"database {manifest.database!r} is not in the cluster recovered to LSN {plan.lsn}"
                )
            in_flight = _in_flight_commits(conn, manifest.snapshot_xids)
        with psycopg.connect(server.conninfo(manifest.database), autocommit=True) as conn:
            conn.execute(f"SET statement_timeout = {timeout_ms}")
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                actual = table_stats(conn, algorithm=algorithm)
        reached, short = server.reached(), server.ended_before_target
    comparison = compare_stats(
        manifest.tables,
        actual,
        database=f"{manifest.database} recovered to LSN {format_lsn(parse_lsn(plan.lsn))}",
        backup_id=manifest.id,
    )
    logger.info("PITR drill of backup %s: %s", manifest.id, comparison.summary())
    return DrillResult(
        plan=plan,
        reached=reached,
        ended_before_target=short,
        comparison=comparison,
        rows=table_rows(manifest, comparison, actual),
        in_flight=in_flight,
        duration_seconds=round(time.monotonic() - started, 3),
    )


def drill_failure(result: DrillResult) -> DrillFailed:
    """The error a differing drill ends with: every differing table and why."""
    names = "; ".join(f"{d.table}: {d.reason}" for d in result.comparison.differences)
    if result.in_flight:
        hint = (
            f" Transactions {', '.join(result.in_flight)} were committing at the snapshot's instant and are"
            " in the recovered state but not in the backup: they can explain a difference in the tables"
            " they wrote; the next drill uses another backup."
        )
    elif result.ended_before_target:
        hint = (
            " The archive holds no WAL after the snapshot's position, so the replay went to its end: if"
            " the backup has rows the recovery lacks, the archive is behind (is the archiver running? see"
            " check-wal-archive); else verify the backup (verify-backup)."
        )
    else:
        hint = " Check the archive (check-wal-archive) and verify the backup (verify-backup)."
    return DrillFailed(
        f"the archive recovered to backup {result.plan.manifest.id}'s snapshot (LSN {result.plan.lsn})"
        f" differs from its manifest in {len(result.comparison.differences)} tables: {names}.{hint}"
    )
