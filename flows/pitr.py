"""Runbook "Data Loss / Corruption", to the minute: point-in-time recovery from the WAL archive.

- ``backup-base``: a base backup (pg_basebackup -> zstd + sha256 -> storage) with its WAL range,
  checked restorable once the archive holds its stop segment; then base-backup and WAL retention
  (dry run unless ``confirm_prune``). Weekly.
- ``restore-to-point``: restore a database as it was at ``target_time`` (or ``target_lsn``, or just
  before ``target_xid``): the target is checked against the restorable window and the archive segment
  by segment first, the WAL replayed into a scratch PostgreSQL, the database copied into a new one on
  the app's server, compared, and swapped in by rename; the current database is kept. With
  ``tables``, only those come back, into a side schema. Dry run by default. restore-database and
  recover-data take the same path when given a target.
- ``check-wal-archive``: the archive's RPO, slot lag, gaps and restorable window; an event when the
  RPO passes ``wal.rpo_warn_seconds``.
- ``pitr-drill``: nightly proof that the archive reproduces the newest logical backup: recover to its
  snapshot's WAL position in a scratch instance and compare every table with its manifest.

The archiver itself is a service (``python -m tasks.wal.archiver``, see deploy/), not a flow.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from prefect import flow
from prefect.events import emit_event

from tasks import approvals, reports
from tasks.errors import ParameterError
from tasks.reports import FailureReport
from tasks.runlog import run_logger
from tasks.settings import OpsSettings, load_settings
from tasks.storage import open_storage
from tasks.wal import base, point, steps
from tasks.wal.drill import DrillFailed, DrillPlan, DrillResult, DrillUnavailable, NoDrill, drill_failure
from tasks.wal.recover import PointPlan
from tasks.wal.status import ArchiveStatus


@flow(name="backup-base", log_prints=True)
def backup_base(
    wait_for_wal_seconds: float = 120.0, prune: bool = True, confirm_prune: bool = False
) -> dict[str, Any]:
    """Runbook "Backup" for point-in-time recovery: a base backup of the cluster, then retention.

    Args:
        wait_for_wal_seconds: how long to wait for the archiver to store the backup's stop segment
            (the backup is restorable from then on); 0 skips the wait.
        prune: compute base-backup and WAL retention afterwards (``wal.keep_base_backups``).
        confirm_prune: delete what retention selects; without it the plan is only reported.

    Returns:
        The base backup's manifest and whether its WAL is archived.

    Raises:
        CommandError: pg_basebackup failed (nothing is kept).
    """
    settings = load_settings()
    key = f"backup-base-{settings.stack}"
    with reports.publishing(FailureReport(key, "Base backup"), FailureReport.publish, settings):
        manifest = steps.create_base_backup_task(settings)
        storage = open_storage(settings.storage, attempts=settings.backup.upload_attempts)
        deadline = time.monotonic() + wait_for_wal_seconds
        ready = base.wal_ready(storage, manifest)
        while not ready and time.monotonic() < deadline:
            time.sleep(2)
            ready = base.wal_ready(storage, manifest)
        pruned = steps.prune_base_backups_task(settings, confirm=confirm_prune) if prune else None
        lines = [
            f"# Base backup `{manifest.id}`: **{'restorable' if ready else 'waiting for WAL'}**",
            "",
            f"- taken {manifest.started_at:%Y-%m-%d %H:%M:%S} - {manifest.finished_at:%H:%M:%S} UTC from"
            f" {manifest.source} (server {manifest.server_version})",
            f"- size {manifest.size_bytes} bytes stored (zstd), {manifest.raw_size_bytes} bytes of files;"
            f" sha256 `{manifest.sha256}`",
            f"- WAL {manifest.start_lsn} .. {manifest.stop_lsn} on timeline {manifest.timeline}"
            f" (segments {manifest.start_wal} .. {manifest.stop_wal})",
        ]
        if not ready:
            lines.append(
                f"- the archive does not hold {manifest.stop_wal} yet: check that the WAL archiver runs"
                " (python -m tasks.wal.archiver --status)"
            )
        if pruned is not None:
            verb = "would delete" if pruned.dry_run else "deleted"
            lines += [
                "",
                "## Retention" + (" (dry run: confirm_prune=true deletes)" if pruned.dry_run else ""),
                "",
                f"- kept: {', '.join(pruned.kept)}",
                f"- {verb} base backups: {', '.join(pruned.deleted_backups) or 'none'}",
                f"- {verb} {len(pruned.deleted_wal)} WAL segments older than {pruned.first_kept_wal}",
            ]
        reports.publish_markdown(key, "\n".join(lines), f"Base backup {manifest.id}")
        return {
            "manifest": manifest.model_dump(mode="json"),
            "wal_ready": ready,
            "pruned": None
            if pruned is None
            else {"dry_run": pruned.dry_run, "deleted": pruned.deleted_backups},
        }


def run_point_restore(
    settings: OpsSettings,
    key: str,
    title: str,
    plan: PointPlan,
    *,
    dry_run: bool,
    approved: bool,
    approval_timeout_seconds: int | None,
) -> dict[str, Any]:
    """Plan report, approval, replay, copy, compare, swap (or side schema), final report.

    The one sequence of restore-to-point and of restore-database's point-in-time path: the plan was
    checked (archive, window, target) before this is called.
    """
    described = point.render_point_plan(plan)
    if dry_run:
        reports.publish_markdown(
            key, f"# {title} (dry run)\n\n{described}\n\nRun with dry_run=false.", f"{title}: plan"
        )
        return {
            "dry_run": True,
            "target": plan.target,
            "base_backup": plan.base.id,
            "target_database": plan.database,
            "steps": plan.steps(),
        }
    reports.publish_markdown(key, f"# {title}: waiting for approval\n\n{described}", f"{title}: plan")
    what = ", ".join(f"{s}.{t}" for s, t in plan.tables) + " of " if plan.tables else ""
    approval, _ = approvals.request_approval(
        settings,
        approved=approved,
        action=f"restore {what}{plan.database} as it was at {plan.target}",
        plan_markdown=described,
        timeout_seconds=approval_timeout_seconds or int(settings.backup.approval_timeout_seconds),
    )
    result = steps.restore_to_point_task(settings, plan=plan)
    reports.publish_markdown(
        key,
        "\n".join(
            [
                f"# {title} of {result.target_database} to {plan.target}: **done**",
                "",
                f"- {approval.describe()}",
                *point.render_point_done(result),
            ]
        ),
        f"{title} of {result.target_database}: done",
    )
    run_logger(__name__).info("restored %s to %s", result.target_database, plan.target)
    return {"dry_run": False, **point.point_result(result), "approval": approval.describe()}


@flow(name="restore-to-point", log_prints=True)
def restore_to_point(
    target_time: datetime | None = None,
    target_lsn: str | None = None,
    target_xid: int | None = None,
    database: str | None = None,
    tables: list[str] | None = None,
    dry_run: bool = True,
    approved: bool = False,
    approval_timeout_seconds: int | None = None,
) -> dict[str, Any]:
    """Runbook "Data Loss / Corruption": bring a database back as it was at a moment.

    The plan checks the target against the restorable window and every WAL segment from the chosen
    base backup to the target before anything is touched; then the WAL is replayed into a scratch
    PostgreSQL, the database copied into a new one on the app's server, compared table by table, and
    swapped in by rename. The current database is kept as ``<db>__old_<time>``. With ``tables``, only
    those tables come back, into a side schema ``restored_<time>`` of the live database; the report
    gives the SQL to compare and copy back.

    Args:
        target_time: the moment to go back to, with its time zone (e.g. one second before the damage).
        target_lsn: or a WAL position (``0/3000148``), e.g. from the logs of a bad transaction.
        target_xid: or just before transaction X (its commit is not replayed), e.g. the xid of a bad
            DELETE from the logs or ``pg_stat_activity``.
        database: the database to restore; defaults to the one in ``OPS_POSTGRES__DSN``.
        tables: bring back only these tables (``table`` or ``schema.table``) into a side schema;
            every other table keeps today's data. Each must have existed at the target.
        dry_run: only plan and check the archive; nothing is touched.
        approved: pre-approve instead of the approval form (drills, staging); refused where
            pre-approval is not allowed (``approvals.allow_preapproved``; by default in production).
        approval_timeout_seconds: how long the form waits; defaults to ``backup.approval_timeout_seconds``.

    Returns:
        The plan (dry run), or what was restored with the comparison's numbers (and the side schema).

    Raises:
        ParameterError: not exactly one target, a time without a zone, a bad table name, or
            ``approved`` where pre-approval is not allowed; nothing touched.
        TargetOutsideWindow: the target is in the future or outside the restorable window (the
            message gives the window); nothing touched.
        WalArchiveError: segments missing or corrupt (named); nothing touched.
        TablesNotFound: a named table did not exist at the target; the live database untouched.
        PointRestoreError: no base backup before the target, recovery stopped early, or the copy differs.
        ApprovalRejected: rejected or timed out; nothing touched (the report says "not applied: ...").
    """
    settings = load_settings()
    key = f"restore-to-point-{settings.stack}"
    if approval_timeout_seconds is not None and approval_timeout_seconds <= 0:
        raise ParameterError("approval_timeout_seconds must be positive")
    with reports.publishing(FailureReport(key, "Restore to a point"), FailureReport.publish, settings):
        # Refused here, before the archive is read, where pre-approval is not allowed.
        approvals.check_preapproval(settings, approved)
        plan = steps.plan_point_restore_task(
            settings,
            target_time=target_time,
            target_lsn=target_lsn,
            target_xid=target_xid,
            database=database,
            tables=tables,
        )
        return run_point_restore(
            settings,
            key,
            "Restore to a point",
            plan,
            dry_run=dry_run,
            approved=approved,
            approval_timeout_seconds=approval_timeout_seconds,
        )


def render_status(status: ArchiveStatus) -> str:
    """The archive's state as markdown."""
    slot = status.slot
    lines = [
        f"# WAL archive: **{'ok' if status.ok else 'attention'}**",
        "",
        f"- storage: {status.storage}; {status.segments} segments, {status.base_backups} base backups",
        f"- newest WAL: {status.last_wal or '-'} at {status.last_wal_at or '-'} (RPO {status.rpo_seconds} s)",
        f"- slot: {slot.name if slot else '-'} exists={slot.exists if slot else '-'}"
        f" active={slot.active if slot else '-'} lag={slot.lag_bytes if slot else '-'} bytes",
        f"- restorable window: {status.window_start or '-'} ({status.window_start_backup or '-'}) .."
        f" {status.window_end or '-'} ({status.window_end_wal or '-'})",
        f"- timelines: {', '.join(str(t) for t in status.timelines) or '-'}"
        + (f" (replay reads {status.timeline_path})" if status.timeline_path else ""),
    ]
    if status.problems:
        lines += ["", "## Problems", "", *[f"- {p}" for p in status.problems]]
    return "\n".join(lines)


@flow(name="check-wal-archive", log_prints=True)
def check_wal_archive(fail_on_problem: bool = False) -> dict[str, Any]:
    """Runbook "Service Health Checks" for the WAL archive: RPO, slot lag, gaps, restorable window.

    Emits ``swagger2mcp-ops.wal.rpo-exceeded`` when the newest archived WAL gets older than
    ``wal.rpo_warn_seconds`` (once, then daily while it lasts; health-check shares the record), and
    ``swagger2mcp-ops.wal.unhealthy`` for any other problem.

    Args:
        fail_on_problem: end the run Failed when a problem is found (for alerting on run state).

    Returns:
        The archive's status.

    Raises:
        CheckFailed: ``fail_on_problem`` and the archive has problems.
    """
    from tasks.errors import CheckFailed

    settings = load_settings()
    key = f"wal-archive-{settings.stack}"
    status = steps.archive_status_task(settings)
    reports.publish_markdown(key, render_status(status), "WAL archive status")
    # Records whether the RPO is past its threshold, and emits when an episode starts; nothing where
    # point-in-time recovery was never set up.
    if status.in_use:
        steps.emit_rpo_exceeded(settings, status.rpo_facts())
    if status.in_use and status.problems and not status.rpo_exceeded(settings.wal.rpo_warn_seconds):
        emit_event(
            "swagger2mcp-ops.wal.unhealthy",
            resource=steps.wal_resource(settings.stack),
            payload={"problems": status.problems},
        )
    if status.problems and fail_on_problem:
        raise CheckFailed("; ".join(status.problems))
    return status.model_dump(mode="json")


def render_drill(plan: DrillPlan, result: DrillResult | None = None) -> str:
    """The drill's plan, and once run, its verdict and evidence (one row per table)."""
    manifest, point = plan.manifest, plan.point
    verdict = "running" if result is None else "passed" if result.matches else "FAILED"
    lines = [
        f"# PITR drill of backup `{manifest.id}`: **{verdict}**",
        "",
        f"- backup: {manifest.database}, snapshot at LSN {plan.lsn} (timeline"
        f" {manifest.snapshot_timeline or '-'}), taken {manifest.started_at:%Y-%m-%d %H:%M:%S} UTC",
        f"- base backup: `{point.base.id}` (WAL {point.base.start_lsn} .. {point.base.stop_lsn})",
        f"- archive: {point.check.summary()}",
    ]
    lines += [f"- passed over: {why}" for why in plan.passed_over]
    if result is not None:
        lines += [
            f"- replay: {result.reached}",
            f"- evidence: {result.comparison.summary()}",
            f"- took {result.duration_seconds:.1f} s; the scratch instance was stopped and removed",
        ]
        if result.in_flight:
            lines.append(
                f"- transactions committing at the snapshot's instant, replayed but not in the backup:"
                f" {', '.join(result.in_flight)}"
            )
        lines += [
            "",
            reports.markdown_table(
                ["table", "backup rows", "recovered rows", "backup hash", "recovered hash", "result"],
                [list(row.values()) for row in result.rows],
            ),
        ]
    return "\n".join(lines)


@flow(name="pitr-drill", log_prints=True)
def pitr_drill(database: str | None = None, fail_when_unusable: bool = True) -> dict[str, Any]:
    """Runbook "Backup" verification for point-in-time recovery: prove that the WAL archive brings
    the database back to exactly what the newest logical backup recorded.

    Takes the newest logical backup whose snapshot WAL position lies inside the archive's
    restorable window, replays the archive to just before that position in a scratch PostgreSQL,
    counts and hashes every table there with the manifest's own code and compares them. Read-only
    for the app's server and the storage; the scratch instance is stopped and removed, also on
    failure.

    Args:
        database: whose backups to drill; defaults to the one in ``OPS_POSTGRES__DSN``.
        fail_when_unusable: end Failed when an archive exists but no backup can be drilled (none
            inside the window, none with a snapshot LSN); with no archive at all the run completes
            and says so.

    Returns:
        The backup drilled, the LSN, and per-table counts and hashes with their verdicts.

    Raises:
        DrillFailed: a table's count or content hash differs (every differing table is named).
        DrillUnavailable: an archive exists but no backup lies inside its window (why, per backup).
        PointRestoreError / WalArchiveError / BackupCorrupt: the recovery itself failed.
    """
    settings = load_settings()
    key = f"pitr-drill-{settings.stack}"
    failure = FailureReport(key, "PITR drill")
    with reports.publishing(failure, FailureReport.publish, settings, reported=(DrillFailed,)):
        plan = steps.plan_drill_task(settings, database=database)
        if isinstance(plan, NoDrill):
            title = "not configured" if not plan.configured else "no backup to drill"
            reports.publish_markdown(
                key, f"# PITR drill: **{title}**\n\n{plan.reason}", f"PITR drill: {title}"
            )
            if plan.configured and fail_when_unusable:
                failure.outcome = title
                raise DrillUnavailable(plan.reason)
            return {"ran": False, "configured": plan.configured, "reason": plan.reason}
        reports.publish_markdown(key, render_drill(plan), f"PITR drill of {plan.manifest.id}: running")
        result = steps.run_drill_task(settings, plan)
        verdict = "passed" if result.matches else "failed"
        reports.publish_markdown(
            key, render_drill(plan, result), f"PITR drill of {plan.manifest.id}: {verdict}"
        )
        reports.publish_table(f"{key}-tables", result.rows, "PITR drill: each table, backup vs recovered")
        if not result.matches:
            raise drill_failure(result)
        return {
            "ran": True,
            "backup_id": plan.manifest.id,
            "snapshot_lsn": plan.lsn,
            "base_backup": plan.point.base.id,
            "reached": result.reached,
            "matches": True,
            "tables": result.rows,
            "in_flight": result.in_flight,
        }
