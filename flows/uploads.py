"""Runbook: "File Upload Failures", resolution 2, "Clean up old uploads if disk is full".

The runbook's ``find backend/uploads/ -type f -mtime +30`` then ``-delete`` "after verification",
done so that nothing the application still uses goes: old files that are protected by a pattern or
still referenced in the application's database stay; what would go is a plan (JSON Lines) reported
first; acting moves the files into a dated quarantine on the same filesystem (or deletes them),
re-checking each file right before; a quarantine run can be restored by its id.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from tasks import locks, reports, uploads
from tasks.errors import ParameterError
from tasks.runlog import run_logger
from tasks.settings import OpsSettings, load_settings
from tasks.uploads import (
    DiskUsage,
    FileEntry,
    PlanSummary,
    PurgeRecord,
    RemovalRecord,
    RestoreRecord,
    RootCheck,
)

MAX_OLDER_THAN_DAYS = 3650


def _size(n: int | float) -> str:
    """Bytes as the runbook's ``df -h`` shows them."""
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if abs(value) < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}T"


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass
class CleanupReport:
    """Everything one cleanup run found and did; published as artifacts and returned."""

    stack: str
    run_id: str
    dry_run: bool
    mode: str
    older_than_days: int
    cutoff: float
    root: RootCheck | None = None
    quarantine: str | None = None
    disk_before: DiskUsage | None = None
    disk_after: DiskUsage | None = None
    plan: PlanSummary | None = None
    removal: RemovalRecord | None = None
    purge: PurgeRecord | None = None
    plans_pruned: int = 0
    # Set by reports.publishing when the run fails: "failed" or "not applied: ...", and the error.
    outcome: str = "started"
    failure: str | None = None

    def counts(self) -> dict[str, int]:
        """The report's numbers, flat (also what the flow's callers assert on)."""
        stats = self.plan.stats if self.plan else None
        removal = self.removal
        return {
            "scanned": stats.scanned_files if stats else 0,
            "matched": stats.matched if stats else 0,
            "kept_referenced": (stats.referenced if stats else 0)
            + (removal.kept_referenced if removal else 0),
            "kept_protected": stats.protected if stats else 0,
            "kept_changed": removal.kept_changed if removal else 0,
            "planned": stats.planned if stats else 0,
            "acted": removal.acted if removal and removal.confirmed else 0,
            "bytes_freed": removal.acted_bytes if removal and removal.confirmed else 0,
            "errors": (stats.errors.count if stats else 0) + (removal.errors.count if removal else 0),
        }


def render_markdown(report: CleanupReport) -> str:
    """The cleanup report: what was scanned, kept, planned and done, disk before/after, errors."""
    verb = "quarantined" if report.mode == "quarantine" else "deleted"
    state = report.outcome if report.failure else ("dry run" if report.dry_run else verb)
    lines = [
        f"# Uploads cleanup of {report.stack}: **{state}**",
        "",
        f"Run `{report.run_id}`: files older than {report.older_than_days} days (modified before"
        f" {_when(report.cutoff)}), mode `{report.mode}`"
        + (", nothing was changed." if report.dry_run else "."),
    ]
    if report.failure:
        lines += ["", f"**Error:** {report.failure}"]
    if report.root is not None:
        root = report.root
        lines += ["", f"Root `{root.path}`: owner {root.owner}:{root.group}, mode {root.mode}."]
        lines += [f"- **permissions:** {problem}" for problem in root.problems]
    c = report.counts()
    if report.plan is not None:
        stats = report.plan.stats
        removal = report.removal
        acted_label = removal.verb if removal else f"would be {verb}"
        acted = removal.acted if removal else 0
        acted_bytes = removal.acted_bytes if removal else 0
        rows = [
            ["files scanned", stats.scanned_files, _size(stats.scanned_bytes)],
            [f"older than {report.older_than_days} days", stats.matched, _size(stats.matched_bytes)],
            ["kept: protected by pattern", stats.protected, _size(stats.protected_bytes)],
            ["kept: referenced in the database", c["kept_referenced"], _size(stats.referenced_bytes)],
            ["kept: changed since the plan", c["kept_changed"], ""],
            ["planned", stats.planned, _size(stats.planned_bytes)],
            [acted_label, acted, _size(acted_bytes)],
            ["errors (not fatal)", c["errors"], ""],
        ]
        lines += ["", reports.markdown_table(["", "files", "size"], rows)]
        skipped = [
            f"{stats.skipped_symlinks} symlinks (never followed)" if stats.skipped_symlinks else "",
            f"{stats.skipped_special} special files" if stats.skipped_special else "",
            f"{stats.skipped_other_fs} directories on other filesystems" if stats.skipped_other_fs else "",
        ]
        if any(skipped):
            lines += ["", "Skipped: " + ", ".join(s for s in skipped if s) + "."]
        lines += ["", f"Full plan (JSON Lines, one file per line): `{report.plan.plan_path}`"]
    if report.disk_before is not None:
        disks: list[tuple[str, DiskUsage]] = [("before", report.disk_before)]
        if report.disk_after is not None:
            disks.append(("after", report.disk_after))
        lines += [
            "",
            "## Disk space",
            "",
            reports.markdown_table(
                ["", "size", "used", "avail", "use%"],
                [[n, _size(d.total), _size(d.used), _size(d.free), f"{d.used_percent}%"] for n, d in disks],
            ),
        ]
        if report.disk_after is not None:
            lines.append(
                f"\nFreed on the filesystem: {_size(report.disk_after.free - report.disk_before.free)}"
            )
    removal = report.removal
    if removal is not None and removal.confirmed and removal.quarantine_run:
        lines += [
            "",
            f"Quarantined into `{removal.quarantine_run}`. To put these files back, run the"
            f" `restore-uploads` flow with `run_id={report.run_id}`.",
        ]
    if removal is not None and removal.changed:
        lines += ["", "## Changed since the plan (kept)", ""]
        lines += [f"- `{path}`: {why}" for path, why in removal.changed[:20]]
    errors = (report.plan.stats.errors.items if report.plan else []) + (
        removal.errors.items if removal else []
    )
    if errors:
        lines += ["", "## Errors (reported, not fatal)", ""]
        lines += [f"- {operation} `{path}`: {message}" for path, operation, message in errors[:20]]
        if c["errors"] > 20:
            lines.append(f"- ... {c['errors'] - 20} more in the run's log")
    if report.purge is not None and report.purge.runs:
        purge = report.purge
        did = "purged" if purge.confirmed else "would be purged"
        lines += [
            "",
            f"Quarantine runs older than {purge.retention_days} days {did}: {', '.join(purge.runs)}"
            f" ({purge.files} files, {_size(purge.bytes)}).",
        ]
    return "\n".join(lines)


def table_rows(report: CleanupReport) -> list[dict[str, Any]]:
    """The largest and the oldest planned files, one row each."""
    if report.plan is None:
        return []

    def row(kind: str, entry: FileEntry) -> dict[str, Any]:
        return {
            "list": kind,
            "path": uploads.display_path(entry.rel),
            "size": _size(entry.size),
            "bytes": entry.size,
            "modified": _when(entry.mtime),
        }

    return [row("largest", e) for e in report.plan.largest] + [row("oldest", e) for e in report.plan.oldest]


@task(name="publish-uploads-report", cache_policy=NO_CACHE)
def publish_report(report: CleanupReport) -> None:
    """Markdown and table artifacts with stable keys (a versioned series per stack)."""
    state = report.outcome if report.failure else ("dry run" if report.dry_run else report.mode)
    reports.publish_markdown(
        f"uploads-cleanup-{report.stack}",
        render_markdown(report),
        f"Uploads cleanup {report.run_id}: {state}",
    )
    rows = table_rows(report)
    if rows:
        reports.publish_table(
            f"uploads-cleanup-{report.stack}-files", rows, "Largest and oldest files of the plan"
        )


def _root_lock(
    settings: OpsSettings, root: Path, operation: str
) -> contextlib.AbstractContextManager[object]:
    """One cleanup or quarantine restore of this uploads root at a time, on every worker."""
    return locks.exclusive(
        settings,
        locks.uploads_lock_name(root),
        operation=operation,
        what=f"a cleanup or restore of the uploads in {root}",
    )


@task(name="prune-uploads-plans", cache_policy=NO_CACHE)
def prune_plans(plan_dir: Path, keep_days: int) -> int:
    """Remove this flow's own plan files older than ``keep_days`` (never anything else)."""
    if not plan_dir.is_dir():
        return 0
    limit = time.time() - max(keep_days, 1) * 86400
    removed = 0
    for path in plan_dir.glob("uploads-plan-*.jsonl"):
        with contextlib.suppress(FileNotFoundError):
            if path.is_file() and not path.is_symlink() and path.stat().st_mtime < limit:
                path.unlink()
                removed += 1
    return removed


def _run_token() -> str | None:
    run_id = flow_run.id
    return str(run_id).replace("-", "")[:8] if run_id else None


@flow(name="cleanup-uploads", log_prints=True)
def cleanup_uploads(
    older_than_days: int = 30,
    dry_run: bool = True,
    mode: Literal["quarantine", "delete"] = "quarantine",
    purge_quarantine: bool = True,
    plan_run_id: str | None = None,
) -> CleanupReport:
    """Runbook "File Upload Failures" -> "Clean up old uploads if disk is full".

    Preflight (root owner/mode, quarantine on the same filesystem, ``df``), plan (regular files older
    than ``older_than_days`` by mtime, minus protected patterns and files the application's database
    still references; written as JSON Lines), then, only when ``dry_run`` is false, quarantine or delete
    exactly those files, re-checking each right before, purge quarantine runs past retention, and
    ``df`` again. The report is published also when the run fails.

    Args:
        older_than_days: age by modification time; files modified more recently are never touched.
        dry_run: True (default): plan and report, change nothing. False: act.
        mode: ``quarantine`` (default; move into ``<quarantine>/<run id>/files``, restorable with the
            ``restore-uploads`` flow) or ``delete``.
        purge_quarantine: also remove quarantine runs older than
            ``uploads.quarantine_retention_days`` (listed only, in a dry run).
        plan_run_id: act on exactly the plan an earlier (dry) run wrote, after reviewing it, instead
            of scanning again; every file is still re-checked against this run's cutoff and the
            database.

    Returns:
        The report: counts, plan location, change records, disk before/after.

    Raises:
        ParameterError: a bad parameter, before anything is read or changed.
        UploadsRootRefused: the root is the system, a home or the project directory, a symlink, holds
            the quarantine, backups or plans, or has another owner than expected; nothing was read.
        UploadsRootInvalid, QuarantineInvalid: preflight failed; nothing changed.
        ReferenceCheckFailed: the database could not be asked; nothing (more) was removed.
        LockBusy: another cleanup or restore of this uploads root is running (on any worker; it is
            named); nothing was changed.
    """
    if not 1 <= older_than_days <= MAX_OLDER_THAN_DAYS:
        raise ParameterError(
            f"older_than_days must be between 1 and {MAX_OLDER_THAN_DAYS}, not {older_than_days}"
        )
    if mode not in ("quarantine", "delete"):
        raise ParameterError(f"mode must be 'quarantine' or 'delete', not {mode!r}")
    if plan_run_id is not None:
        uploads.run_id_time(plan_run_id)
    settings = load_settings()
    logger = run_logger(__name__)
    cutoff = time.time() - older_than_days * 86400
    run_id = uploads.new_run_id(token=_run_token())
    report = CleanupReport(
        stack=settings.stack,
        run_id=run_id,
        dry_run=dry_run,
        mode=mode,
        older_than_days=older_than_days,
        cutoff=cutoff,
    )
    with reports.publishing(report, publish_report, settings):
        root = report.root = uploads.check_root_task(settings.uploads, settings.storage)
        for problem in root.problems:
            logger.warning("uploads root %s: %s", root.path, problem)
        quarantine_dir = uploads.quarantine_directory(settings.uploads, root.path)
        quarantine = None
        if mode == "quarantine":
            quarantine = uploads.prepare_quarantine_task(settings.uploads, root, create=not dry_run)
            report.quarantine = str(quarantine)
        report.disk_before = uploads.disk_usage_task(root.path)
        plan_dir = uploads.plan_directory(settings.uploads, settings.storage, settings.runtime.state_dir)
        plan_path = plan_dir / f"uploads-plan-{run_id}.jsonl"
        # Plan and act under one lock, so two runs never act on the same files.
        with contextlib.nullcontext() if dry_run else _root_lock(settings, root.path, "cleanup-uploads"):
            saved_plan = plan_dir / f"uploads-plan-{plan_run_id}.jsonl" if plan_run_id else None
            outcome = uploads.clean_uploads_task(
                settings.uploads,
                settings.postgres,
                root=root.path,
                cutoff=cutoff,
                run_id=run_id,
                plan_path=plan_path,
                mode=mode,
                confirm=not dry_run,
                quarantine=quarantine,
                from_plan=saved_plan,
                on_progress=uploads.progress_reporter(
                    f"uploads-cleanup-{settings.stack}-progress",
                    uploads.count_plan(saved_plan) if saved_plan else None,
                ),
            )
            report.plan, report.removal = outcome.plan, outcome.removal
            if purge_quarantine:
                report.purge = uploads.purge_quarantine_task(
                    quarantine_dir,
                    retention_days=settings.uploads.quarantine_retention_days,
                    confirm=not dry_run,
                    current_run=run_id,
                )
        report.plans_pruned = prune_plans(plan_dir, settings.uploads.quarantine_retention_days)
        report.disk_after = uploads.disk_usage_task(root.path)
        counts = report.counts()
        logger.info(
            "uploads cleanup %s: %d scanned, %d old, %d planned, %d %s, %s freed, %d errors",
            run_id,
            counts["scanned"],
            counts["matched"],
            counts["planned"],
            report.removal.acted,
            report.removal.verb,
            _size(report.removal.acted_bytes),
            counts["errors"],
        )
    return report


@flow(name="restore-uploads", log_prints=True)
def restore_quarantine(run_id: str, dry_run: bool = False) -> RestoreRecord:
    """Runbook "File Upload Failures": put the files of one cleanup run back from quarantine.

    Each file goes back to its original relative path; a path that is taken again is left alone
    and reported as a conflict; running it twice changes nothing the second time.

    Args:
        run_id: the cleanup run id (in the cleanup report, and the quarantine directory's name).
        dry_run: only count what would come back.

    Returns:
        The change record: restored, already restored, conflicts, errors.

    Raises:
        ParameterError: ``run_id`` is not a run id.
        UploadsRootRefused: the root may not be used (see ``cleanup-uploads``); nothing was moved.
        QuarantineRunNotFound: no quarantine run with that id.
        LockBusy: a cleanup or restore of this uploads root is running (on any worker; it is named).
    """
    uploads.run_id_time(run_id)
    settings = load_settings()
    logger = run_logger(__name__)
    record: RestoreRecord | None = None

    def publish(run: reports.RunOutcome) -> None:
        publish_restore_report(settings.stack, run_id, dry_run, record, run.failure)

    with reports.publishing(reports.RunOutcome(), publish, settings):
        root = uploads.check_root_task(settings.uploads, settings.storage)
        quarantine = uploads.quarantine_directory(settings.uploads, root.path)
        with _root_lock(settings, root.path, "restore-uploads"):
            record = uploads.restore_quarantine_task(
                root.path,
                quarantine,
                run_id,
                confirm=not dry_run,
                cross_filesystem=settings.uploads.cross_filesystem,
            )
        logger.info(
            "restore of %s: %d %s, %d already back, %d conflicts, %d errors",
            run_id,
            record.restored,
            "restored" if record.confirmed else "would be restored",
            record.already_restored,
            len(record.conflicts),
            record.errors.count,
        )
    return record


@task(name="publish-uploads-restore-report", cache_policy=NO_CACHE)
def publish_restore_report(
    stack: str, run_id: str, dry_run: bool, record: RestoreRecord | None, error: str | None
) -> None:
    """Markdown artifact of a restore from quarantine."""
    state = "failed" if error else ("dry run" if dry_run else "restored")
    lines = [f"# Uploads restore of run `{run_id}` ({stack}): **{state}**"]
    if error:
        lines += ["", f"**Error:** {error}"]
    if record is not None:
        verb = "restored" if record.confirmed else "would be restored"
        rows = [
            [verb, record.restored, _size(record.restored_bytes)],
            ["already back", record.already_restored, ""],
            ["conflicts (path taken again; left in quarantine)", len(record.conflicts), ""],
            ["errors", record.errors.count, ""],
        ]
        lines += ["", reports.markdown_table(["", "files", "size"], rows)]
        lines += [f"- conflict: `{path}`" for path in record.conflicts[:20]]
        lines += [f"- {op} `{path}`: {message}" for path, op, message in record.errors.items[:20]]
    reports.publish_markdown(
        f"uploads-restore-{stack}", "\n".join(lines), f"Uploads restore {run_id}: {state}"
    )


if __name__ == "__main__":
    print(render_markdown(cleanup_uploads(dry_run=True)))
