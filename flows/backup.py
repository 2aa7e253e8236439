"""Runbook: "Backup database first" and "Restore from backup" (BACKUP_RECOVERY_TEMPLATE.md).

- ``backup-database``: dump (streamed, compressed, checksummed, same-snapshot row counts), verify,
  prune; nightly with a restore drill.
- ``restore-database``: preflight, approval, checksum, restore into a scratch database, verify against
  the manifest, atomic swap; dry-run by default. Given a point in time instead of a backup, it takes
  restore-to-point's path (WAL replay, copy, compare, swap; or only some tables into a side schema).
- ``verify-backup``: verify one backup (checksum / catalog / restore drill) and list every backup with
  its verification state.
- ``prune-backups``: the retention plan (keep-last, daily, weekly, monthly; the newest verified backup
  is never pruned); dry-run by default.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any, Literal

from prefect import flow

from flows.pitr import run_point_restore
from tasks import approvals, backup, locks, reports
from tasks.approvals import Approval
from tasks.backup import (
    BackupCorrupt,
    BackupManifest,
    PruneResult,
    RestorePreflight,
    RestoreResult,
    SwapBackPreflight,
    Verification,
)
from tasks.errors import ParameterError
from tasks.reports import FailureReport
from tasks.runlog import run_logger
from tasks.settings import OpsSettings, load_settings
from tasks.wal import point
from tasks.wal import steps as wal_steps


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def render_manifest(manifest: BackupManifest) -> str:
    """A backup as markdown: what, where, how big, verified how."""
    lines = [
        f"- **id**: `{manifest.id}`",
        f"- **database**: {manifest.database} on {manifest.source}",
        f"- **taken**: {manifest.started_at:%Y-%m-%d %H:%M:%S} - {manifest.finished_at:%H:%M:%S} UTC"
        f" ({(manifest.finished_at - manifest.started_at).total_seconds():.1f} s)",
        f"- **size**: {_size(manifest.size_bytes)} stored ({manifest.compression}),"
        f" {_size(manifest.raw_size_bytes)} dump",
        f"- **sha256**: `{manifest.sha256}`",
        f"- **tables**: {len(manifest.tables)}, {manifest.total_rows} rows"
        + (", content hashes recorded" if manifest.content_hash_algorithm else ""),
        f"- **tools**: {manifest.pg_dump_version}; server {manifest.server_version}",
    ]
    if manifest.verifications:
        lines += ["", "### Verifications", ""]
        lines.append(
            reports.markdown_table(
                ["level", "result", "at", "detail"],
                [
                    [v.level, "ok" if v.ok else "FAILED", f"{v.at:%Y-%m-%d %H:%M:%S}", v.detail]
                    for v in manifest.verifications
                ],
            )
        )
    return "\n".join(lines)


def table_rows(manifest: BackupManifest) -> list[dict[str, Any]]:
    """One row per table of the manifest."""
    return [
        {"table": name, "rows": stats.rows, "content_hash": stats.content_hash}
        for name, stats in sorted(manifest.tables.items())
    ]


def render_prune(result: PruneResult) -> str:
    """The retention plan and what was (or would be) deleted."""
    verb = "would delete" if result.dry_run else "deleted"
    rows = [
        [
            d.backup_id,
            d.database,
            f"{d.finished_at:%Y-%m-%d %H:%M}",
            "keep" if d.keep else verb,
            ", ".join(d.reasons),
        ]
        for d in result.plan.decisions
    ]
    lines = [
        f"Retention: keep {len(result.plan.to_keep)}, {verb} {len(result.plan.to_delete)}"
        + (" (dry run: pass confirm=true to delete)" if result.dry_run else ""),
        "",
        reports.markdown_table(["backup", "database", "finished", "decision", "kept by"], rows),
    ]
    unfinished = [u.key for u in result.plan.unfinished] + result.plan.orphans
    if unfinished:
        lines += ["", f"Unfinished or orphaned objects ({verb}):", *[f"- `{k}`" for k in unfinished]]
    if result.plan.unknown:
        lines += [
            "",
            f"**Unknown: {len(result.plan.unknown)} backup(s) with an unreadable manifest, kept untouched;"
            " repair or remove them by hand:**",
            "",
            reports.markdown_table(
                ["backup", "database", "manifest", "error"],
                [[u.backup_id, u.database or "?", u.key, u.error] for u in result.plan.unknown],
            ),
        ]
    return "\n".join(lines)


def render_preflight(plan: RestorePreflight) -> str:
    """What a restore will do, for the approval form and the dry-run report."""
    lines = [
        f"Restore backup `{plan.backup_id}` (taken {plan.backup_finished_at:%Y-%m-%d %H:%M} UTC,"
        f" {_size(plan.backup_size_bytes)}, {plan.backup_rows} rows, verified:"
        f" {plan.backup_verified or 'never'}) into **{plan.target_database}**.",
        "",
        f"- target exists: {plan.target_exists}, size {_size(plan.target_size_bytes)}",
        f"- sessions that will be cut: {len(plan.connections)}",
        "",
        "Steps:",
        *[f"{i}. {step}" for i, step in enumerate(plan.steps(), 1)],
    ]
    if plan.connections:
        lines += [
            "",
            reports.markdown_table(
                ["pid", "user", "application", "client", "state"],
                [[c.pid, c.user, c.application, c.client, c.state] for c in plan.connections],
            ),
        ]
    return "\n".join(lines)


def render_swap_back(plan: SwapBackPreflight) -> str:
    """What an undo (swap back) will do, for the approval form and the dry-run report."""
    lines = [
        f"Put the kept database **{plan.kept_database}** ({_size(plan.kept_size_bytes)}) back in place of"
        f" **{plan.target_database}** ({_size(plan.target_size_bytes)}); the current"
        f" {plan.target_database} is kept as {plan.replaced_database}. Writes made to the current"
        f" {plan.target_database} since the restore stay there only.",
        "",
        f"- sessions that will be cut: {len(plan.connections)}",
        "",
        "Steps:",
        *[f"{i}. {step}" for i, step in enumerate(plan.steps(), 1)],
    ]
    return "\n".join(lines)


def _restore_done_markdown(result: RestoreResult, title: str, approval: Approval) -> str:
    return "\n".join(
        [
            f"# {title} of {result.target_database}: **done**",
            "",
            f"- {approval.describe()}",
            f"- source: `{result.backup_id}`",
            f"- evidence: {result.comparison.summary()}",
            f"- old database: {result.old_database or '-'} ({'kept' if result.old_kept else 'dropped'})",
            f"- sessions ended: {result.terminated_connections}",
            f"- took {result.duration_seconds:.1f} s",
            "",
            *result.kept_lines(),
            "",
            "Commands:",
            *[f"- `{c}`" for c in result.commands],
        ]
    )


def _approve_restore(
    settings: OpsSettings, approved: bool, action: str, plan_markdown: str, timeout_override: int | None
) -> Approval:
    """The restore approval (form or ``approved``); a rejection or a timeout raises ApprovalRejected."""
    record, _ = approvals.request_approval(
        settings,
        approved=approved,
        action=action,
        plan_markdown=plan_markdown,
        timeout_seconds=timeout_override or int(settings.backup.approval_timeout_seconds),
    )
    return record


def _swap_back(
    settings: OpsSettings,
    key: str,
    kept: str,
    target_database: str | None,
    *,
    dry_run: bool,
    approved: bool,
    approval_timeout_seconds: int | None,
) -> dict[str, Any]:
    """The undo of an earlier restore: the kept database swapped back in, behind the same approval."""
    if not target_database:
        raise ParameterError(
            "swap_back needs target_database: the database whose restore is undone; nothing was done"
        )
    plan = backup.swap_back_preflight_task(settings, kept, target_database=target_database)
    description = render_swap_back(plan)
    if dry_run:
        reports.publish_markdown(
            key, f"# Undo plan (dry run)\n\n{description}\n\nRun with dry_run=false to swap.", "Undo plan"
        )
        return {
            "dry_run": True,
            "swap_back": kept,
            "target_database": target_database,
            "steps": plan.steps(),
            "connections": len(plan.connections),
        }
    reports.publish_markdown(key, f"# Undo: waiting for approval\n\n{description}", "Undo plan")
    approval = _approve_restore(
        settings,
        approved,
        f"swap {kept} back in place of {target_database}",
        description,
        approval_timeout_seconds,
    )
    result = backup.swap_back_task(settings, kept, target_database=target_database)
    reports.publish_markdown(
        key, _restore_done_markdown(result, "Undo (swap back)", approval), f"Undo of {target_database}: done"
    )
    return {
        "dry_run": False,
        "swap_back": kept,
        "target_database": result.target_database,
        "old_database": result.old_database,
        "old_kept": True,
        "matches": result.comparison.matches,
        "evidence": result.comparison.summary(),
        "tables": result.comparison.tables_compared,
        "rows": result.comparison.rows_compared,
        "terminated_connections": result.terminated_connections,
        "approval": approval.describe(),
    }


def _restore_point(
    settings: OpsSettings,
    key: str,
    target_database: str | None,
    *,
    target_time: datetime | None,
    target_lsn: str | None,
    target_xid: int | None,
    tables: list[str] | None,
    dry_run: bool,
    approved: bool,
    keep_old: bool,
    create_missing: bool,
    approval_timeout_seconds: int | None,
) -> dict[str, Any]:
    """restore-database to a point in time: restore-to-point's plan and sequence, under this report."""
    if not keep_old:
        raise ParameterError(
            "a restore to a point always keeps the replaced database: keep_old=false is refused; nothing done"
        )
    plan = wal_steps.plan_point_restore_task(
        settings,
        target_time=target_time,
        target_lsn=target_lsn,
        target_xid=target_xid,
        database=target_database,
        tables=tables,
    )
    if not backup.database_exists(settings, plan.database) and (plan.tables or not create_missing):
        raise backup.DatabaseNotFound(
            f"target database {plan.database!r} does not exist; nothing was done."
            + ("" if plan.tables else " Pass create_missing=true to restore it as a new database")
        )
    return run_point_restore(
        settings,
        key,
        "Restore",
        plan,
        dry_run=dry_run,
        approved=approved,
        approval_timeout_seconds=approval_timeout_seconds,
    )


@flow(name="backup-database", log_prints=True)
def backup_database(
    database: str | None = None,
    verify: Literal["none", "checksum", "catalog", "restore"] = "restore",
    content_hashes: bool | None = None,
    prune: bool = True,
    confirm_prune: bool = False,
) -> dict[str, Any]:
    """Runbook "Backup database first": dump, checksum, store, verify, prune.

    Args:
        database: database to back up; defaults to the one in ``OPS_POSTGRES__DSN``.
        verify: verification right after the dump; ``restore`` (the nightly drill) restores it into a
            scratch database and compares every table with the manifest.
        content_hashes: record per-table content hashes; defaults to ``backup.content_hashes``.
        prune: apply the retention plan afterwards.
        confirm_prune: actually delete what the plan selects (otherwise it is only listed).

    Returns:
        The manifest (JSON) with the verification recorded.

    Raises:
        BackupCorrupt: the new backup failed its verification (recorded in its manifest).
    """
    settings = load_settings()
    logger = run_logger(__name__)
    key = f"backup-{settings.stack}"
    # A backup that fails its verification has its own report (status FAILED) already.
    with reports.publishing(
        FailureReport(key, "Backup"), FailureReport.publish, settings, reported=(BackupCorrupt,)
    ):
        manifest = backup.create_backup_task(
            settings,
            database=database,
            verify="none",
            content_hashes=settings.backup.content_hashes if content_hashes is None else content_hashes,
        )
        verification: Verification | None = None
        if verify != "none":
            verification = backup.verify_backup_task(settings, manifest.id, verify)
            manifest = backup.resolve_backup_task(settings, manifest.id)
        pruned: PruneResult | None = None
        # A backup that failed its verification must not push a good one out of keep-last.
        if prune and (verification is None or verification.ok):
            with _prune_lock(settings) if confirm_prune else contextlib.nullcontext():
                pruned = backup.delete_backups_task(
                    settings, backup.retention_plan_task(settings, manifest.database), confirm=confirm_prune
                )
        status = "ok" if verification is None or verification.ok else "FAILED verification"
        markdown = f"# Backup of {manifest.database}: **{status}**\n\n{render_manifest(manifest)}"
        if pruned is not None:
            markdown += "\n\n## Retention\n\n" + render_prune(pruned)
        reports.publish_markdown(key, markdown, f"Backup {manifest.id}: {status}")
        reports.publish_table(f"{key}-tables", table_rows(manifest), f"Tables in backup {manifest.id}")
        if verification is not None and not verification.ok:
            raise BackupCorrupt(
                f"backup {manifest.id} failed its {verify} verification: {verification.detail}."
                " Do not rely on it; look at the dump log and run backup-database again"
            )
        logger.info("backup %s done (%s)", manifest.id, status)
        return manifest.model_dump(mode="json")


@flow(name="verify-backup", log_prints=True)
def verify_backup(
    backup_id: str = "latest",
    level: Literal["checksum", "catalog", "restore"] = "restore",
    database: str | None = None,
) -> dict[str, Any]:
    """Runbook "Backup verification": verify one backup and list all backups with their state.

    Args:
        backup_id: an id, ``latest`` or ``latest-verified``.
        level: ``checksum`` (re-read, sha256), ``catalog`` (``pg_restore --list``) or ``restore``
            (restore drill into a scratch database compared with the manifest).
        database: limit ``latest`` and the listing to one database.

    Returns:
        The recorded verification.

    Raises:
        BackupCorrupt: the backup failed the verification (the failure is recorded in its manifest).
    """
    settings = load_settings()
    key = f"verify-backup-{settings.stack}"
    with reports.publishing(
        FailureReport(key, "Backup verification"), FailureReport.publish, settings, reported=(BackupCorrupt,)
    ):
        manifest = backup.resolve_backup_task(settings, backup_id, database=database)
        result = backup.verify_backup_task(settings, manifest.id, level)
        listing = backup.list_backups_task(settings, database)
        _publish_listing(settings, listing)
        status = "ok" if result.ok else "FAILED"
        reports.publish_markdown(
            key,
            f"# Verification of {manifest.id} ({level}): **{status}**\n\n{result.detail}",
            f"{level} verification of {manifest.id}: {status}",
        )
        if not result.ok:
            raise BackupCorrupt(f"backup {manifest.id} failed its {level} verification: {result.detail}")
        return result.model_dump(mode="json")


def _publish_listing(settings: OpsSettings, listing: list[BackupManifest]) -> None:
    reports.publish_table(
        f"backups-{settings.stack}",
        [
            {
                "id": m.id,
                "database": m.database,
                "finished_at": m.finished_at.isoformat(),
                "size_bytes": m.size_bytes,
                "rows": m.total_rows,
                "verified": m.strongest_verified or "never",
            }
            for m in listing
        ],
        "Finished backups, newest first",
    )


def _prune_lock(settings: OpsSettings) -> contextlib.AbstractContextManager[object]:
    """One pruning of this storage location at a time, on every worker."""
    return locks.exclusive(
        settings,
        locks.prune_lock_name(settings),
        operation="prune-backups",
        what="a pruning of these backups",
        timeout=settings.backup.lock_timeout_seconds,
    )


@flow(name="prune-backups", log_prints=True)
def prune_backups(database: str | None = None, confirm: bool = False) -> dict[str, Any]:
    """Runbook "Backup retention": keep-last plus daily/weekly/monthly tiers; dry-run unless confirmed.

    The newest verified backup of each database is never pruned. Unfinished objects (interrupted
    dumps, incomplete multipart uploads) older than ``backup.orphan_grace_hours`` are removed too.

    Args:
        database: limit pruning to one database's backup.
        confirm: delete what the plan selects; without it the plan is only reported.

    Returns:
        What was (or would be) deleted.

    Raises:
        ManifestUnreadable: some manifests do not parse; those backups were kept and are listed in the
            report (the rest of the plan was applied).
        LockBusy: another run prunes the same storage (on any worker; it is named); nothing was deleted.
    """
    settings = load_settings()
    key = f"prune-backups-{settings.stack}"
    with reports.publishing(
        FailureReport(key, "Backup retention"),
        FailureReport.publish,
        settings,
        reported=(backup.ManifestUnreadable,),
    ):
        # Plan and delete under one lock: two workers never select and delete the same backup.
        with _prune_lock(settings) if confirm else contextlib.nullcontext():
            plan = backup.retention_plan_task(settings, database)
            result = backup.delete_backups_task(settings, plan, confirm=confirm)
        reports.publish_markdown(
            key,
            "# Backup retention" + (" (dry run)" if result.dry_run else "") + "\n\n" + render_prune(result),
            "Backup retention" + (" dry run" if result.dry_run else ""),
        )
        if plan.unknown:
            # Fail the run so someone looks: these backups can be neither used nor pruned.
            raise backup.ManifestUnreadable(
                f"{len(plan.unknown)} backup(s) have an unreadable manifest and were kept:"
                f" {', '.join(u.backup_id for u in plan.unknown)}; see the prune report, repair or"
                " remove each manifest by hand"
            )
        return {
            "dry_run": result.dry_run,
            "keep": [d.backup_id for d in plan.to_keep],
            "delete": [d.backup_id for d in plan.to_delete],
            "deleted": result.deleted_backups,
            "unfinished": [u.key for u in plan.unfinished] + plan.orphans,
        }


@flow(name="restore-database", log_prints=True)
def restore_database(
    backup_id: str | None = None,
    target_database: str | None = None,
    dry_run: bool = True,
    approved: bool = False,
    keep_old: bool = True,
    create_missing: bool = False,
    approval_timeout_seconds: int | None = None,
    swap_back: str | None = None,
    target_time: datetime | None = None,
    target_lsn: str | None = None,
    target_xid: int | None = None,
    tables: list[str] | None = None,
) -> dict[str, Any]:
    """Runbook "Restore from backup": preflight, approval, checksum, restore, verify, swap; or its undo.

    The backup is restored into a new database and compared with its manifest; only then are the
    target's sessions ended and the two databases swapped by rename in one transaction. A failure at any
    step leaves the target as it was.

    With a point in time (``target_time``, ``target_lsn`` or ``target_xid``) instead of a backup, the
    source is the WAL archive (restore-to-point's path): the target is checked against the restorable
    window, the WAL replayed into a scratch PostgreSQL, the database copied into a new one, compared
    with the replay and swapped in by rename, the replaced database kept. ``tables`` then brings back
    only those tables into a side schema of the live database.

    Args:
        backup_id: an id, ``latest`` or ``latest-verified`` (the newest backup that passed a restore
            drill); default ``latest-verified`` when no point in time is given.
        target_database: database to replace; defaults to the backup's database.
        dry_run: only show the preflight (what would happen); nothing is touched.
        approved: pre-approve instead of the approval form (CI, staging); refused where
            pre-approval is not allowed (``approvals.allow_preapproved``; by default in production).
        keep_old: keep the replaced database as ``<target>__old_<time>`` (read-only by default; the
            result lists its tables whose rows changed since the backup) instead of dropping it.
        create_missing: allow restoring a database that no longer exists.
        approval_timeout_seconds: how long the approval form waits; defaults to
            ``backup.approval_timeout_seconds``.
        swap_back: undo an earlier restore instead: the name of the database it kept
            (``<target>__old_<time>``) is swapped back in place of ``target_database`` (required),
            behind the same approval; the current one is kept in its place; the proof is that the
            target's per-table counts and content hashes equal what the kept database held.
            ``backup_id`` is not used then.
        target_time: restore the database as it was at this moment (with its zone), from the WAL
            archive, instead of a backup.
        target_lsn: or as it was at this WAL position.
        target_xid: or as it was just before transaction X committed.
        tables: with a point in time, bring back only these tables (``table`` or ``schema.table``) into
            a side schema ``restored_<time>``; the report gives the SQL to compare and copy back.

    Returns:
        The preflight (dry run) or the restore's change record with the comparison.

    Raises:
        ParameterError: ``approved`` where pre-approval is not allowed, a backup and a point in time
            both given, or a bad parameter; nothing done.
        TargetOutsideWindow: the point is in the future or outside the restorable window (the
            message gives the window); nothing done.
        ApprovalRejected: the approval was rejected or timed out; nothing was touched (the report's
            outcome is "not applied: ...").
        BackupCorrupt: the backup failed its checksum; nothing was touched.
        RestoreFailed: the restore or its verification failed; the target is unchanged.
    """
    settings = load_settings()
    key = f"restore-{settings.stack}"
    if approval_timeout_seconds is not None and approval_timeout_seconds <= 0:
        raise ParameterError("approval_timeout_seconds must be positive")
    with reports.publishing(FailureReport(key, "Restore"), FailureReport.publish, settings):
        # Refused here, before the backup is even read, where pre-approval is not allowed.
        approvals.check_preapproval(settings, approved)
        point_given = point.point_target_given(target_time, target_lsn, target_xid)
        point.refuse_backup_and_target(backup_id, tables, point_given)
        if swap_back and point_given:
            raise ParameterError("swap_back undoes an earlier restore: give no point in time with it")
        if point_given:
            return _restore_point(
                settings,
                key,
                target_database,
                target_time=target_time,
                target_lsn=target_lsn,
                target_xid=target_xid,
                tables=tables,
                dry_run=dry_run,
                approved=approved,
                keep_old=keep_old,
                create_missing=create_missing,
                approval_timeout_seconds=approval_timeout_seconds,
            )
        if swap_back:
            return _swap_back(
                settings,
                key,
                swap_back,
                target_database,
                dry_run=dry_run,
                approved=approved,
                approval_timeout_seconds=approval_timeout_seconds,
            )
        manifest = backup.resolve_backup_task(settings, backup_id or "latest-verified")
        plan = backup.restore_preflight_task(
            settings, manifest, target_database=target_database, keep_old=keep_old
        )
        if not plan.target_exists and not create_missing:
            raise backup.DatabaseNotFound(
                f"target database {plan.target_database!r} does not exist; nothing was done. Pass"
                " create_missing=true to restore it as a new database"
            )
        preflight_md = render_preflight(plan)
        if dry_run:
            reports.publish_markdown(
                key,
                f"# Restore plan (dry run)\n\n{preflight_md}\n\nRun with dry_run=false to restore.",
                "Restore plan",
            )
            return {
                "dry_run": True,
                "backup_id": manifest.id,
                "target_database": plan.target_database,
                "steps": plan.steps(),
                "connections": len(plan.connections),
            }
        reports.publish_markdown(key, f"# Restore: waiting for approval\n\n{preflight_md}", "Restore plan")
        approval = _approve_restore(
            settings,
            approved,
            f"restore backup {manifest.id} over {plan.target_database}",
            preflight_md,
            approval_timeout_seconds,
        )
        backup.checksum_backup_task(settings, manifest)
        result: RestoreResult = backup.restore_backup_task(
            settings,
            manifest.id,
            target_database=plan.target_database,
            keep_old=keep_old,
            create_missing=create_missing,
            checksum_first=False,
        )
        comparison = result.comparison
        reports.publish_markdown(
            key,
            _restore_done_markdown(result, "Restore", approval),
            f"Restore of {result.target_database}: done",
        )
        return {
            "dry_run": False,
            "backup_id": result.backup_id,
            "target_database": result.target_database,
            "old_database": result.old_database,
            "old_kept": result.old_kept,
            "kept_changed_tables": result.kept_changed_tables,
            "matches": comparison.matches,
            "tables": comparison.tables_compared,
            "rows": comparison.rows_compared,
            "terminated_connections": result.terminated_connections,
            "approval": approval.describe(),
        }


if __name__ == "__main__":
    import json

    print(json.dumps(backup_database(verify="catalog", prune=False), indent=2))
