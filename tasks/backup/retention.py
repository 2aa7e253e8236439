"""Retention: which backups to keep (keep-last, daily, weekly, monthly tiers, the newest verified) and
the one function that deletes backups."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from tasks.backup.manifest import (
    DATA_DIR,
    VERIFY_LEVELS_STRONGEST_FIRST,
    BackupManifest,
    UnreadableManifest,
    _storage,
    data_key,
    manifest_key,
    scan_backups,
)
from tasks.runlog import run_logger
from tasks.settings import OpsSettings
from tasks.storage import UnfinishedObject


@dataclass(frozen=True)
class RetentionDecision:
    """Keep or delete one backup, and why."""

    backup_id: str
    database: str
    finished_at: datetime
    keep: bool
    reasons: list[str]


@dataclass(frozen=True)
class RetentionPlan:
    """What a prune would delete: backups outside every tier, and unfinished objects past the grace.

    ``unknown`` lists backups whose manifest could not be read: kept, and reported for a person to look.
    """

    decisions: list[RetentionDecision]
    unfinished: list[UnfinishedObject] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    unknown: list[UnreadableManifest] = field(default_factory=list)

    @property
    def to_delete(self) -> list[RetentionDecision]:
        return [d for d in self.decisions if not d.keep]

    @property
    def to_keep(self) -> list[RetentionDecision]:
        return [d for d in self.decisions if d.keep]


@dataclass(frozen=True)
class PruneResult:
    """The change record of a prune: what was (or, on a dry run, would be) deleted."""

    dry_run: bool
    plan: RetentionPlan
    deleted_backups: list[str]
    deleted_objects: list[str]
    discarded_unfinished: list[str]

    @property
    def changed(self) -> bool:
        return bool(self.deleted_backups or self.deleted_objects or self.discarded_unfinished)


def plan_retention(
    manifests: list[BackupManifest],
    *,
    keep_last: int,
    keep_daily: int,
    keep_weekly: int,
    keep_monthly: int,
    timezone: str = "UTC",
    protected: Iterable[str] = (),
) -> list[RetentionDecision]:
    """Decide which backups to keep: the newest ``keep_last``, the newest of each of the last
    ``keep_daily`` days / ``keep_weekly`` ISO weeks / ``keep_monthly`` months (that have backups), and
    every ``protected`` id (the newest verified backups). Pure: the same input gives the same plan."""
    zone = ZoneInfo(timezone)
    ordered = sorted(manifests, key=lambda m: (m.finished_at, m.id), reverse=True)
    reasons: dict[str, list[str]] = {m.id: [] for m in ordered}
    for m in ordered[:keep_last]:
        reasons[m.id].append("keep-last")
    tiers: list[tuple[str, int, Callable[[datetime], object]]] = [
        ("daily", keep_daily, lambda t: t.date()),
        ("weekly", keep_weekly, lambda t: t.isocalendar()[:2]),
        ("monthly", keep_monthly, lambda t: (t.year, t.month)),
    ]
    for label, count, bucket_of in tiers:
        seen: list[object] = []
        for m in ordered:
            bucket = bucket_of(m.finished_at.astimezone(zone))
            if bucket in seen:
                continue
            if len(seen) >= count:
                break
            seen.append(bucket)
            reasons[m.id].append(label)
    for backup_id in protected:
        if backup_id in reasons:
            reasons[backup_id].append("newest verified")
    return [
        RetentionDecision(m.id, m.database, m.finished_at, bool(reasons[m.id]), reasons[m.id])
        for m in ordered
    ]


def retention_plan(
    settings: OpsSettings, database: str | None = None, *, now: datetime | None = None
) -> RetentionPlan:
    """The retention plan for every database's backups (or one's), plus stale unfinished objects.

    A backup whose manifest does not parse is ``unknown``: listed with the parse error, never a
    candidate for deletion and never an orphan. Orphans are data objects with no manifest at all, older
    than ``backup.orphan_grace_hours`` (looked for only when planning every database).
    """
    cfg = settings.backup
    storage = _storage(settings)
    manifests, unknown = scan_backups(storage, database)
    for entry in unknown:
        run_logger(__name__).error("backup %s is kept as unknown: %s", entry.backup_id, entry.error)
    decisions: list[RetentionDecision] = []
    for db in sorted({m.database for m in manifests}):
        mine = [m for m in manifests if m.database == db]
        protected = {
            m.id
            for level in VERIFY_LEVELS_STRONGEST_FIRST
            if (m := next((x for x in mine if x.verified(level)), None)) is not None
        }
        decisions += plan_retention(
            mine,
            keep_last=cfg.keep_last,
            keep_daily=cfg.keep_daily,
            keep_weekly=cfg.keep_weekly,
            keep_monthly=cfg.keep_monthly,
            timezone=cfg.timezone,
            protected=protected,
        )
    cutoff = (now or datetime.now(UTC)) - timedelta(hours=cfg.orphan_grace_hours)
    unfinished = [u for u in storage.list_unfinished(DATA_DIR) if u.started < cutoff]
    orphans: list[str] = []
    if database is None:
        known = {m.id for m in manifests} | {u.backup_id for u in unknown}
        for item in storage.list(DATA_DIR):
            backup_id = item.key.removeprefix(f"{DATA_DIR}/").removesuffix(".dump.zst")
            if backup_id not in known and item.modified < cutoff:
                orphans.append(item.key)
    return RetentionPlan(decisions=decisions, unfinished=unfinished, orphans=orphans, unknown=unknown)


def delete_backups(settings: OpsSettings, plan: RetentionPlan, *, confirm: bool = False) -> PruneResult:
    """The one function that deletes backups: without ``confirm`` it only reports what it would delete.

    The manifest goes first (the backup leaves every listing at once), then the data object. A backup
    the plan keeps, or whose manifest it could not read, is never touched, whatever else is passed; an
    orphan whose manifest has appeared since the plan (a backup that finished) is left alone.
    """
    logger = run_logger(__name__)
    doomed = [d for d in plan.to_delete if "newest verified" not in d.reasons]
    if not confirm:
        for d in doomed:
            logger.info("would delete backup %s (%s, %s)", d.backup_id, d.database, d.finished_at.isoformat())
        return PruneResult(True, plan, [], [], [])
    storage = _storage(settings)
    deleted, objects, discarded = [], [], []
    for d in doomed:
        storage.delete(manifest_key(d.backup_id))
        storage.delete(data_key(d.backup_id))
        deleted.append(d.backup_id)
        logger.info("deleted backup %s (%s)", d.backup_id, d.database)
    unknown = {u.backup_id for u in plan.unknown}
    for key in plan.orphans:
        backup_id = key.removeprefix(f"{DATA_DIR}/").removesuffix(".dump.zst")
        if backup_id in unknown or storage.exists(manifest_key(backup_id)):
            logger.info("kept %s: its backup has a manifest now", key)
            continue
        if storage.delete(key):
            objects.append(key)
    for item in plan.unfinished:
        storage.discard_unfinished(item)
        discarded.append(item.key)
    return PruneResult(False, plan, deleted, objects, discarded)


def prune_backups(
    settings: OpsSettings, database: str | None = None, *, confirm: bool = False
) -> PruneResult:
    """Plan retention and delete what it selects (only with ``confirm``)."""
    return delete_backups(settings, retention_plan(settings, database), confirm=confirm)
