"""Runbook: "Maintenance Procedures" / "Database Migrations".

Plan, approval, then the window: stop the application's writers, back up, apply, verify; if anything
fails after applying started, restore the backup (the replaced database is kept, read-only, and the
report lists its tables whose rows changed since the backup), prove the data equals the backup, start
the writers again and end Failed. The restore is an explicit task in this flow body (with retries and
its own log), not a transaction rollback hook.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.runtime import flow_run

from tasks import approvals, backup, health, migrate, postgres, reports
from tasks.backup import BackupManifest, RestoreResult, TableComparison
from tasks.errors import OpsError, ParameterError
from tasks.health import HealthReport, Status
from tasks.migrate import (
    ApplyRecord,
    InterruptedMigration,
    MigrationPlan,
    MigrationRun,
    MigrationVerifyFailed,
    Verification,
    WritersNotStoppable,
    WriterStopPlan,
    WriterStopRecord,
    WritesPolicy,
)
from tasks.ops_task import ops_task
from tasks.runlog import run_logger
from tasks.settings import OpsSettings, load_settings

EVENT_PREFIX = "swagger2mcp-ops.migration"
SQL_SHOWN_PER_REVISION = 6000


class MigrationFailed(OpsError):
    """Applying or verifying failed; the message says whether the backup was restored and proven.

    ``summary`` is the run's summary (outcome ``failed-restored`` when the data was proven equal to
    the backup), for a calling flow that decides what to do next.
    """

    def __init__(self, message: str, summary: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.summary = summary or {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Failed states carry the exception; it must survive pickling with its summary.
        return (type(self), (self.args[0], self.summary))


@dataclass
class MigrationReport:
    """Everything the run found and did, rendered into the report artifact (also on failure)."""

    stack: str
    database: str
    tool: str
    dry_run: bool
    target: str = migrate.HEAD
    outcome: str = "started"
    writers_plan: WriterStopPlan | None = None
    writers_refusal: str | None = None
    writers: WriterStopRecord | None = None
    lock: str = ""
    plan: MigrationPlan | None = None
    backup: BackupManifest | None = None
    approval: str = ""
    applied: ApplyRecord | None = None
    verification: Verification | None = None
    health: HealthReport | None = None
    failure: str | None = None
    restore: RestoreResult | None = None
    comparison: TableComparison | None = None
    interrupted: list[MigrationRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The result the flow returns (and CI reads)."""
        return {
            "outcome": self.outcome,
            "database": self.database,
            "tool": self.tool,
            "dry_run": self.dry_run,
            "pending": [s.revision for s in self.plan.steps] if self.plan else [],
            "backup_id": self.backup.id if self.backup else None,
            "applied": [s.revision for s in self.applied.steps] if self.applied else [],
            "restored": self.restore is not None,
            "data_matches_backup": self.comparison.matches if self.comparison else None,
            "failure": self.failure,
            "approval": self.approval,
            "target": self.target,
            "writers": self.writers_plan.as_dict() if self.writers_plan else None,
            "writer_events": list(self.writers.events) if self.writers else [],
            "kept_database": self.restore.old_database if self.restore and self.restore.old_kept else None,
            "kept_changed_tables": self.restore.kept_changed_tables if self.restore else [],
            "kept_open_command": self.restore.kept_open_command if self.restore else "",
            "timings": dict(self.timings),
        }


@contextlib.contextmanager
def timed(report: MigrationReport, step: str) -> Iterator[None]:
    """Record how long a step of the flow took (also when it fails)."""
    started = time.monotonic()
    try:
        yield
    finally:
        report.timings[step] = round(time.monotonic() - started, 3)


def render_plan(plan: MigrationPlan) -> str:
    """The plan as markdown: each pending revision with its SQL, or the tool's status output."""
    lines = [f"## Plan ({plan.tool}) for `{plan.database}`, target `{plan.requested_target}`", ""]
    if not plan.pending:
        return "\n".join([*lines, "Nothing pending: the database is at the latest migration."])
    if plan.tool == "alembic":
        lines.append(
            f"From `{', '.join(plan.current) or 'base'}` to `{', '.join(plan.target)}`,"
            f" {len(plan.steps)} revision(s), applied one at a time:"
        )
        for step in plan.steps:
            sql_text = (step.sql or "").strip()
            if len(sql_text) > SQL_SHOWN_PER_REVISION:
                sql_text = sql_text[:SQL_SHOWN_PER_REVISION] + "\n-- ... (cut; see the run's log)"
            lines += ["", f"### `{step.revision}` {step.description}", "", "```sql", sql_text, "```"]
    else:
        lines += [
            f"Apply command: `{plan.apply_command}`",
            "",
            "Status output:",
            "",
            "```",
            plan.status_output.strip()[-SQL_SHOWN_PER_REVISION:],
            "```",
        ]
    return "\n".join(lines)


def render_markdown(report: MigrationReport) -> str:
    """The whole run as markdown: outcome, backup, plan, what ran, evidence, restore, timings."""
    mode = "dry run" if report.dry_run else "apply"
    lines = [
        f"# Migration of {report.database} ({report.stack}, {report.tool}, {mode}): **{report.outcome}**"
    ]
    if report.failure:
        lines += ["", f"**What failed:** {report.failure}"]
    if report.interrupted:
        lines += [
            "",
            "## Interrupted previous run",
            "",
            "```",
            migrate.describe_interrupted(report.interrupted, report.database),
            "```",
        ]
    if report.backup is not None:
        lines += [
            "",
            f"**Backup taken before applying:** `{report.backup.id}` ({report.backup.total_rows} rows in"
            f" {len(report.backup.tables)} tables, verified: {report.backup.strongest_verified or 'no'})",
        ]
    if report.writers_plan is not None:
        lines += ["", f"**Writers:** {report.writers_plan.detail}"]
    elif report.writers_refusal:
        lines += ["", f"**Writers:** a real run would refuse: {report.writers_refusal}"]
    if report.writers is not None and report.writers.events:
        lines += ["", *[f"- {e}" for e in report.writers.events]]
    if report.approval:
        lines += ["", f"**Approval:** {report.approval}"]
    if report.restore is not None:
        lines += [
            "",
            "## Restore",
            "",
            f"Backup `{report.restore.backup_id}` restored into `{report.restore.target_database}` in"
            f" {report.restore.duration_seconds:.1f}s"
            f" ({report.restore.terminated_connections} sessions ended).",
            "",
            *report.restore.kept_lines(),
        ]
    if report.comparison is not None:
        verdict = "**data matches the backup**" if report.comparison.matches else "**DATA DIFFERS**"
        lines += ["", f"Proof after restore: {verdict}: {report.comparison.summary()}"]
    if report.applied is not None and report.applied.steps:
        lines += [
            "",
            "## Applied",
            "",
            reports.markdown_table(
                ["step", "seconds"], [(s.revision, s.seconds) for s in report.applied.steps]
            ),
        ]
    if report.verification is not None:
        v = report.verification
        lines += [
            "",
            "## Verification",
            "",
            f"At target: {'yes' if v.at_target else 'no'} (current: {', '.join(v.status.current) or '-'})",
        ]
        if v.smoke:
            lines += [
                "",
                reports.markdown_table(
                    ["smoke query", "ok", "value", "error", "ms"],
                    [(s.query, "yes" if s.ok else "no", s.value, s.error, s.ms) for s in v.smoke],
                ),
            ]
        lines += [f"- {p}" for p in v.problems]
    if report.health is not None:
        lines += ["", f"Health check after migrating: **{report.health.status.value}**"]
    if report.plan is not None:
        lines += ["", render_plan(report.plan)]
    if report.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in report.notes]]
    if report.timings:
        lines += [
            "",
            "## Timings",
            "",
            reports.markdown_table(["step", "seconds"], list(report.timings.items())),
        ]
    return "\n".join(lines)


def _event_outcome(outcome: str) -> str:
    return "not-applied" if outcome.startswith(approvals.NOT_APPLIED) else outcome


@task(name="publish-migration-report", cache_policy=NO_CACHE)
def publish_report(report: MigrationReport) -> None:
    """Markdown report plus a table of the plan's revisions, with stable keys; an event with the outcome."""
    reports.publish_markdown(
        f"migration-{report.stack}",
        render_markdown(report),
        f"Migration of {report.database}: {report.outcome}",
    )
    if report.plan is not None and report.plan.steps:
        applied = {s.revision: s.seconds for s in report.applied.steps} if report.applied else {}
        reports.publish_table(
            f"migration-{report.stack}-revisions",
            [
                {
                    "revision": s.revision,
                    "description": s.description,
                    "applied_seconds": applied.get(s.revision),
                }
                for s in report.plan.steps
            ],
            "Pending revisions of the plan",
        )
    emit_event(
        # A refused run's outcome is a sentence ("not applied: rejected by ..."); its event is one word.
        event=f"{EVENT_PREFIX}.{_event_outcome(report.outcome)}",
        resource={
            "prefect.resource.id": f"swagger2mcp-ops.stack.{report.stack}.database.{report.database}",
            "swagger2mcp-ops.stack": report.stack,
        },
        payload=report.summary(),
    )


check_health = ops_task(health.run_checks, name="post-migration-health-check")
restore_backup = backup.restore_backup_task.with_options(retries=2, retry_delay_seconds=10)
compare_to_backup = backup.compare_database_task
read_manifest = backup.read_backup_manifest_task


def approve(settings: OpsSettings, report: MigrationReport, approved: bool, what: str) -> str:
    """The approval (form showing the report so far, or ``approved``); returns the report's approval line.

    Raises:
        ApprovalRejected: rejected or timed out; nothing was applied.
    """
    record, _ = approvals.request_approval(
        settings,
        approved=approved,
        action=what,
        plan_markdown=render_markdown(report),
        timeout_seconds=int(settings.migrations.approval_timeout_seconds),
    )
    return record.describe()


def take_backup(settings: OpsSettings, report: MigrationReport) -> BackupManifest:
    """The backup a failure restores: catalog-verified, with per-table content hashes."""
    with timed(report, "backup"):
        report.backup = backup.create_backup_task(settings, verify="catalog", content_hashes=True)
    run_logger(__name__).info("backup %s taken before migrating", report.backup.id)
    return report.backup


def _restore_and_prove(
    settings: OpsSettings, report: MigrationReport, manifest: BackupManifest
) -> TableComparison:
    """Restore ``manifest`` into the target, then compare the target with it; both recorded in the report.

    The replaced database is always kept (read-only by default) and compared with the backup, so the
    report names it and lists its tables whose rows changed since the backup's snapshot (the project's
    own run marker, written after the backup, is not one of them).
    """
    with timed(report, "restore"):
        # The run holds the database's restore lock (migration_lock) on its own session.
        restored = restore_backup(
            settings, manifest.id, target_database=report.database, database_lock_held=True, keep_old=True
        )
        report.restore = migrate.without_own_tables(settings, restored)
    if report.writers_plan is not None and report.writers_plan.policy == "keep-running":
        # The app kept writing: the swapped-in database already has its new writes, so comparing it
        # now would report them as a difference. The proof is the restored copy's own comparison with
        # the backup, made while it loaded and before the swap.
        report.comparison = report.restore.comparison
        report.notes.append(
            "writers kept running: the restored copy was proven equal to the backup before the swap;"
            " writes the app made after the swap are the app's"
        )
        return report.comparison
    with timed(report, "prove-restore"):
        report.comparison = compare_to_backup(settings, manifest, report.database)
    return report.comparison


def _kept_sentence(report: MigrationReport) -> str:
    """One sentence for an error message: where the replaced database is and what changed in it."""
    restore = report.restore
    if restore is None or not restore.old_kept or not restore.old_database:
        return ""
    changed = restore.kept_changed_tables
    return (
        f" The replaced database is kept as {restore.old_database} (read-only; open it with"
        f" {restore.kept_open_command})"
        + (
            f"; tables whose rows changed there since the backup: {', '.join(changed)}"
            if changed
            else "; none of its rows differ from the backup"
        )
        + (
            ""
            if report.writers_plan is None or report.writers_plan.stops
            else ". Writers kept running: their writes after the backup are only in that database"
        )
    )


@flow(name="migrate-database", log_prints=True)
def migrate_database(
    dry_run: bool = True,
    approved: bool = False,
    restore_interrupted: bool = False,
    resolve_interrupted_run: str | None = None,
    target: str = migrate.HEAD,
    writes_policy: WritesPolicy = "stop",
) -> dict[str, Any]:
    """Runbook "Database Migrations": plan, approval, stop writers, backup, apply, verify; restore on failure.

    1. Preflight: the target and the writers policy are checked (a bad one fails before anything is
       touched); the database answers; the migration lock (a PostgreSQL advisory lock) is held for
       the whole run (a second run waits ``migrations.lock_timeout_seconds``, then fails naming the
       holder); a run that was interrupted earlier stops this one (see ``restore_interrupted``).
    2. Plan up to ``target``: Alembic's ``upgrade --sql`` per pending revision, or the tool's status
       output and apply command. Nothing pending: the run completes and changes nothing. A dry run
       stops after publishing the plan (and says how the writers would be treated).
    3. Approval form showing the plan, the target and how the writers are treated, unless ``approved``
       pre-approves (refused before anything where pre-approval is not allowed). The wait happens
       here, before the writers stop and before the backup.
    4. The window: the writers stop (maintenance mode, or the writing services scaled to 0; see
       ``writes_policy``); the backup is taken (catalog-verified, with content hashes); apply (a
       durable "in progress" marker is written first), then verify: at the target revision, smoke
       queries pass.
    5. Any failure in 4: restore the backup, keeping the replaced database (read-only) and listing its
       tables whose rows changed since the backup; prove the database equals the backup; end Failed.
    6. The writers start again (also on failure), then the health check.

    Args:
        dry_run: plan only (the default); nothing is backed up or applied.
        approved: pre-approve (staging, CI); otherwise a human approves in the UI. Refused before
            anything happens where pre-approval is not allowed (``approvals.allow_preapproved``; by
            default in production).
        restore_interrupted: when an earlier run was interrupted mid-apply, restore the backup it
            recorded (after approval, writers stopped), prove the data equals it, and stop.
        resolve_interrupted_run: the id of an interrupted run an operator checked by hand; it is
            marked resolved and this run continues.
        target: the revision to migrate to: ``head`` (every pending migration, the default), an
            Alembic revision id, or for a command tool the value its ``migrations.apply_target_argv``
            takes.
        writes_policy: ``stop`` (default): stop the writers for the window with the application's
            maintenance mode (``migrations.maintenance_*``) or, without it, by scaling the writing
            services to 0 through the runtime; refused before anything happens when neither is
            configured. ``keep-running``: the operator's explicit choice to leave them running (their
            writes after the backup end up only in the kept database on a restore).
            ``stopped-by-caller``: a calling flow (maintenance-window) already stopped them.

    Returns:
        A summary: outcome, target, pending and applied revisions, backup id, how the writers were
        treated, restore evidence, the kept database and its changed tables, timings.

    Raises:
        WritersNotStoppable: ``writes_policy`` is ``stop`` and nothing can stop the writers.
        ParameterError: a bad target or parameter combination, or ``approved`` where pre-approval is
            not allowed (nothing touched).
        InterruptedMigration: an earlier run did not finish (names its backup and the way out).
        LockBusy: another migration of the same database is running (names it).
        ApprovalRejected: rejected or timed out; nothing was applied (outcome "not applied: ...").
        MigrationFailed: apply or verify failed; says whether the restore happened and matched, and
            where the replaced database is kept.
    """
    settings = load_settings()
    migrate.require_configured(settings)
    if restore_interrupted and resolve_interrupted_run:
        raise ParameterError("pass restore_interrupted or resolve_interrupted_run, not both")
    migrate.require_target(settings, target)
    logger = run_logger(__name__)
    report = MigrationReport(
        stack=settings.stack,
        database=migrate.target_database(settings),
        tool=settings.migrations.tool,
        dry_run=dry_run,
        target=target,
    )
    owner = f"migrate-database {flow_run.get_name() or ''} {flow_run.get_id() or ''}".strip()
    with reports.publishing(report, publish_report, settings, running=("started", "applying")):
        # Refused here, before anything is planned or probed, where pre-approval is not allowed.
        approvals.check_preapproval(settings, approved)
        try:
            report.writers_plan = migrate.plan_writer_stop(settings, writes_policy)
        except WritersNotStoppable as exc:
            if not dry_run:
                raise
            # A dry run touches nothing, so it still shows the plan, and says the real run would refuse.
            report.writers_refusal = str(exc)
        with timed(report, "preflight"):
            postgres.probe_postgres_task(settings.postgres)
        report.lock = migrate.lock_name(settings)
        with contextlib.ExitStack() as held:
            with timed(report, "lock-wait"):
                held.enter_context(migrate.migration_lock(settings, owner=owner))
            _migrate(
                settings,
                report,
                dry_run=dry_run,
                approved=approved,
                restore_interrupted=restore_interrupted,
                resolve_run=resolve_interrupted_run,
            )
        logger.info("migration of %s: %s", report.database, report.outcome)
        return report.summary()


def _approval_what(report: MigrationReport, action: str) -> str:
    assert report.writers_plan is not None
    return (
        f"{action}. Writers: {report.writers_plan.detail}. The backup is taken after this approval,"
        " once the writers are stopped"
    )


def _migrate(
    settings: OpsSettings,
    report: MigrationReport,
    *,
    dry_run: bool,
    approved: bool,
    restore_interrupted: bool,
    resolve_run: str | None,
) -> None:
    """The body of the flow while the lock is held (steps 1-6 of its docstring)."""
    if resolve_run:
        resolved = migrate.resolve_run_task(settings, resolve_run, note=f"resolved by {flow_run.get_id()}")
        report.notes.append(f"interrupted run {resolved.id} marked resolved by the operator")
    with timed(report, "interrupted-check"):
        report.interrupted = migrate.unfinished_runs_task(settings)
    if report.interrupted:
        if not restore_interrupted:
            report.outcome = "interrupted-run-found"
            raise InterruptedMigration(
                migrate.describe_interrupted(report.interrupted, report.database), report.interrupted
            )
        _restore_interrupted(settings, report, dry_run=dry_run, approved=approved)
        return
    if restore_interrupted:
        raise ParameterError(
            f"restore_interrupted was asked but no interrupted migration of {report.database} was found;"
            " nothing was done"
        )

    with timed(report, "plan"):
        report.plan = migrate.plan_migrations_task(settings, report.target)
    if not report.plan.pending:
        report.outcome = "up-to-date"
        return
    reports.publish_markdown(
        f"migration-{report.stack}-plan", render_plan(report.plan), f"Migration plan for {report.database}"
    )
    if dry_run:
        report.outcome = "dry-run"
        report.notes.append("dry run: no backup taken, nothing applied; run with dry_run=false to apply")
        if not migrate.status_is_read_only(settings):
            report.notes.append("the tool's status command may have created its own bookkeeping tables")
        return

    # The approval wait comes before the window: nothing is stopped and no backup ages while waiting.
    with timed(report, "approval"):
        report.approval = approve(
            settings,
            report,
            approved,
            _approval_what(report, f"apply {len(report.plan.steps)} migration step(s) up to {report.target}"),
        )
    assert report.writers_plan is not None
    with timed(report, "writers-window"), migrate.writers_stopped(settings, report.writers_plan) as record:
        report.writers = record
        _apply_in_window(settings, report)
    with timed(report, "health"):
        report.health = check_health(settings)
    if report.health.status is Status.UNHEALTHY:
        # The writers run again on the migrated schema: restoring now would discard their writes, so
        # this is reported for an operator to decide, with the backup to restore if they choose to.
        report.outcome = "migrated-unhealthy"
        raise MigrationFailed(
            "migrated and verified, but the health check is unhealthy once the writers run again: "
            + "; ".join(f"{n}: {report.health.checks[n].error}" for n in report.health.failed_checks)
            + f". Nothing was restored (the application writes again). Run diagnose; to go back, restore"
            f" backup {report.backup.id if report.backup else '-'} with restore-database",
            report.summary(),
        )
    report.outcome = "migrated"


def _apply_in_window(settings: OpsSettings, report: MigrationReport) -> None:
    """Backup, apply, verify with the writers stopped; restore (keeping the replaced database) on failure."""
    logger = run_logger(__name__)
    assert report.plan is not None
    take_backup(settings, report)
    assert report.backup is not None
    report.outcome = "applying"
    try:
        with timed(report, "apply"):
            report.applied = migrate.apply_migrations_task(
                settings, report.plan, backup_id=report.backup.id, flow_run_id=str(flow_run.get_id() or "")
            )
        with timed(report, "verify"):
            report.verification = migrate.verify_migrations_task(settings, report.plan)
        if report.verification.problems:
            raise MigrationVerifyFailed("verification failed: " + "; ".join(report.verification.problems))
    except Exception as exc:
        report.outcome = "failed"
        report.failure = f"{type(exc).__name__}: {exc}"
        logger.error("migration failed (%s); restoring backup %s", report.failure, report.backup.id)
        if report.applied is not None and report.applied.run_id:
            with contextlib.suppress(Exception):
                migrate.mark_run(settings, report.applied.run_id, "failed", report.failure[:2000])
        try:
            comparison = _restore_and_prove(settings, report, report.backup)
        except Exception as restore_exc:
            report.outcome = "failed-restore-failed"
            raise MigrationFailed(
                f"{report.failure}. Then the restore of backup {report.backup.id} FAILED:"
                f" {type(restore_exc).__name__}: {restore_exc}. The database may be half-migrated; the"
                f" interrupted-run marker stays so no migration runs until it is dealt with. Restore"
                f" backup {report.backup.id} with restore-database",
                report.summary(),
            ) from exc
        if not comparison.matches:
            report.outcome = "failed-restore-differs"
            raise MigrationFailed(
                f"{report.failure}. Backup {report.backup.id} was restored but the database DIFFERS from"
                f" it: {comparison.summary()}. Investigate before anything else.{_kept_sentence(report)}",
                report.summary(),
            ) from exc
        report.outcome = "failed-restored"
        raise MigrationFailed(
            f"{report.failure}. Backup {report.backup.id} was restored and the data matches it"
            f" ({comparison.summary()}).{_kept_sentence(report)}",
            report.summary(),
        ) from exc
    migrate.finish_run_task(settings, report.applied, report.verification)


def _restore_interrupted(
    settings: OpsSettings, report: MigrationReport, *, dry_run: bool, approved: bool
) -> None:
    """Restore the backup an interrupted run recorded, after approval and with the writers stopped, and
    prove the data equals it (the replaced database is kept)."""
    recorded = [r.backup_id for r in report.interrupted if r.backup_id]
    if not recorded:
        report.outcome = "interrupted-run-found"
        raise InterruptedMigration(
            "the interrupted run recorded no backup to restore; check the schema by hand and pass"
            " resolve_interrupted_run, or restore a backup with restore-database",
            report.interrupted,
        )
    # The oldest unfinished run's backup is the state before any of them.
    report.backup = read_manifest(settings, recorded[0])
    if dry_run:
        report.outcome = "dry-run"
        report.notes.append(f"dry run: would restore backup {report.backup.id}; run with dry_run=false")
        return
    report.approval = approve(
        settings,
        report,
        approved,
        _approval_what(report, f"restore backup {report.backup.id} over {report.database}"),
    )
    assert report.writers_plan is not None
    with migrate.writers_stopped(settings, report.writers_plan) as record:
        report.writers = record
        comparison = _restore_and_prove(settings, report, report.backup)
    if not comparison.matches:
        report.outcome = "restore-differs"
        raise MigrationFailed(
            f"backup {report.backup.id} was restored but {report.database} differs from it:"
            f" {comparison.summary()}.{_kept_sentence(report)}"
        )
    report.outcome = "restored-interrupted"
    report.notes.append(
        f"the database is back at backup {report.backup.id} (data proven equal); run migrate-database again"
    )
    report.notes += report.restore.kept_lines() if report.restore else []
