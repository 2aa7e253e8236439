"""The steps of recover-data (runbook "Data Loss / Corruption"), so that the flow reads as their
sequence: check the parameters, assess, approve, stop writes / restore / validate / resume, health.

:class:`Recovery` holds what one run found and did; its report can be rendered at any moment (the plan
before the approval, everything at the end, a failure in between). The source is either a logical
backup (restored into a new database, proven against its manifest, swapped in) or a point in time
(``target_time`` / ``target_lsn`` / ``target_xid``: the WAL archive replayed into a scratch instance,
copied, compared, swapped in; or, with ``tables``, only those tables into a side schema). Either way
the replaced database is kept.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import Field

from tasks import approvals, backup, locks, postgres, reports, scaling
from tasks.approvals import ApprovalForm
from tasks.errors import CheckFailed, ParameterError
from tasks.health import HealthReport, Status
from tasks.incidents.prefect_tasks import health_report_task, validation_queries_task
from tasks.incidents.reports import _backup_rows, _failure_line, _validation_next_steps, render_recovery
from tasks.incidents.steps import StepLog, approval_timeout
from tasks.incidents.validation import ValidationResult, require_settings
from tasks.reports import RunOutcome
from tasks.runlog import run_logger
from tasks.runtime import Runtime
from tasks.scaling import ReplicaCount
from tasks.secrets import configured_secrets
from tasks.settings import OpsSettings
from tasks.wal import point
from tasks.wal import steps as wal_steps
from tasks.wal.recover import PointPlan, PointRestoreResult


class RecoveryApproval(ApprovalForm):
    """The form shown before recover-data stops the application and replaces the database: it can
    name another backup than the one planned (a restore from a backup only)."""

    backup_id: str = Field(
        default="", description="the backup to restore (another id than planned is allowed)"
    )


@dataclass(frozen=True)
class Source:
    """What recover-data restores from: a logical backup, or a point in time (and maybe some tables)."""

    backup_id: str | None = None
    target_time: datetime | None = None
    target_lsn: str | None = None
    target_xid: int | None = None
    tables: list[str] | None = None

    @property
    def is_point(self) -> bool:
        return point.point_target_given(self.target_time, self.target_lsn, self.target_xid)


@dataclass
class Recovery:
    """One recover-data run: its parameters, and what it found and did so far."""

    settings: OpsSettings
    source: Source
    database: str
    queries: list[str]
    queries_source: str
    timeout: int
    candidates: int
    steps: StepLog
    preflight: backup.RestorePreflight | None = None
    manifest: backup.BackupManifest | None = None
    listing: list[backup.BackupManifest] = field(default_factory=list)
    point_plan: PointPlan | None = None
    point_done: PointRestoreResult | None = None
    recorded: list[ReplicaCount] = field(default_factory=list)
    validations: list[ValidationResult] = field(default_factory=list)
    report: HealthReport | None = None
    restore: backup.RestoreResult | None = None
    approval: str = ""

    @property
    def key(self) -> str:
        return f"recover-data-{self.settings.stack}"

    def markdown(self, outcome: str) -> str:
        """The recovery's report as it stands (the plan before approval; everything at the end)."""
        return render_recovery(
            self.settings.stack,
            outcome,
            self.steps,
            self.preflight,
            self.listing,
            self.recorded,
            self.validations,
            self.report,
            self.restore,
            self.queries,
            self.queries_source,
            self.approval,
            point_plan=self.point_plan,
            point_done=self.point_done,
        )

    def publish(self, run: RunOutcome) -> None:
        """The report, the steps table and the candidate backups, also when the run fails."""
        markdown = self.markdown(run.outcome) + "\n".join(_failure_line(run))
        reports.publish_markdown(self.key, markdown, f"Data recovery of {self.settings.stack}: {run.outcome}")
        reports.publish_table(f"{self.key}-steps", self.steps.rows(), "Each step with its timing")
        if self.listing:
            reports.publish_table(
                f"{self.key}-backups",
                _backup_rows(self.listing, self.preflight.backup_id if self.preflight else None),
                "Candidate backups, newest first, with their verification state",
            )

    def what(self) -> str:
        """The source in words, for the approval and the messages."""
        if self.point_plan is not None:
            return f"{self.database} as it was at {self.point_plan.target}"
        assert self.manifest is not None
        return f"backup {self.manifest.id}"

    def result(self, outcome: str) -> dict[str, Any]:
        """What the flow returns at the end."""
        done = self.point_done
        return {
            "outcome": outcome,
            "backup_id": self.manifest.id if self.manifest else None,
            "target": self.point_plan.target if self.point_plan else None,
            "target_database": self.database,
            "old_database": self.restore.old_database
            if self.restore
            else (done.old_database if done else None),
            "kept_changed_tables": self.restore.kept_changed_tables if self.restore else [],
            "side_schema": done.side.schema if done and done.side else None,
            "restored_tables": {t.name: t.rows for t in done.side.tables} if done and done.side else {},
            "replicas": {r.service: r.replicas for r in self.recorded},
            "validations": [{"query": v.query, "ok": v.ok, "value": v.value} for v in self.validations],
            "health": self.report.status.value if self.report else None,
            "steps": self.steps.rows(),
            "approval": self.approval,
        }


def start(
    settings: OpsSettings,
    source: Source,
    *,
    approved: bool,
    target_database: str | None,
    candidates: int,
    approval_timeout_seconds: int | None,
    validation_queries: list[str] | None,
) -> Recovery:
    """Check the parameters and settings (before any side effect) and set up the run's record.

    Raises:
        ParameterError: ``approved`` where pre-approval is not allowed, ``candidates`` under 1, an
            empty validation query, a bad timeout, a backup and a point in time both given, ``tables``
            without a point in time.
    """
    approvals.check_preapproval(settings, approved)
    require_settings(settings)
    timeout = approval_timeout(settings, approval_timeout_seconds)
    if candidates < 1:
        raise ParameterError("candidates must be at least 1")
    point.refuse_backup_and_target(source.backup_id, source.tables, source.is_point)
    if validation_queries is not None and not all(q.strip() for q in validation_queries):
        raise ParameterError(
            "validation_queries holds an empty query; remove it, or pass no validation_queries to use"
            " incidents.validation_queries. Nothing was done"
        )
    queries = list(
        settings.incidents.validation_queries if validation_queries is None else validation_queries
    )
    return Recovery(
        settings=settings,
        source=source,
        # The application's database (the DSN's) unless another is named: candidates, "latest" and an
        # explicit id are all of that database, so a backup of another one is never swapped in.
        database=target_database or postgres.database_name(settings.postgres.dsn.get_secret_value()),
        queries=queries,
        queries_source="incidents.validation_queries"
        if validation_queries is None
        else "the run's validation_queries",
        timeout=timeout,
        candidates=candidates,
        steps=StepLog(secrets=configured_secrets(settings)),
    )


def database_lock(rec: Recovery) -> contextlib.AbstractContextManager[object]:
    """The database's restore lock, for the whole recovery (replica counts included), on every worker:
    a second recovery, a restore or a migration of it waits, then refuses naming this run."""
    return locks.exclusive(
        rec.settings,
        backup.database_lock_name(rec.database),
        operation="recover-data",
        what=f"a recovery, restore or migration of database {rec.database}",
        timeout=rec.settings.backup.lock_timeout_seconds,
    )


def assess(rec: Recovery, runtime: Runtime, services: list[str], *, stop_writes: bool) -> None:
    """Step 1: the source (candidate backups and the restore plan, or the point-in-time plan with its
    archive check) and the replicas of the services that write.

    Raises:
        DatabaseNotFound: the database does not exist (a point-in-time per-table restore needs it too).
        TargetOutsideWindow / WalArchiveError / PointRestoreError: the point cannot be restored.
    """
    name = (
        "assess: point in time, plan, replicas" if rec.source.is_point else "assess: backups, plan, replicas"
    )
    with rec.steps.step(name) as step:
        src = rec.source
        if src.is_point:
            rec.point_plan = wal_steps.plan_point_restore_task(
                rec.settings,
                target_time=src.target_time,
                target_lsn=src.target_lsn,
                target_xid=src.target_xid,
                database=rec.database,
                tables=src.tables,
            )
            exists = backup.database_exists(rec.settings, rec.database)
            chosen = f"point {rec.point_plan.target} (base backup {rec.point_plan.base.id})"
        else:
            rec.listing = backup.list_backups_task(rec.settings, rec.database)[: rec.candidates]
            rec.manifest = backup.resolve_backup_task(
                rec.settings, src.backup_id or "latest-verified", database=rec.database
            )
            rec.preflight = backup.restore_preflight_task(
                rec.settings, rec.manifest, target_database=rec.database, keep_old=True
            )
            exists = rec.preflight.target_exists
            chosen = f"backup {rec.manifest.id}"
        if not exists:
            raise backup.DatabaseNotFound(
                f"target database {rec.database!r} does not exist; use restore-database with"
                " create_missing=true. Nothing was done"
            )
        if stop_writes:
            rec.recorded = scaling.record_replicas_task(runtime, services)
        replicas = ", ".join(f"{r.service}={r.replicas}" for r in rec.recorded) or "-"
        step.detail = f"{chosen}; replicas {replicas}"


def plan_result(rec: Recovery) -> dict[str, Any]:
    """What a dry run returns: the plan."""
    return {
        "outcome": "dry-run",
        "backup_id": rec.manifest.id if rec.manifest else None,
        "target": rec.point_plan.target if rec.point_plan else None,
        "target_database": rec.database,
        "replicas": {r.service: r.replicas for r in rec.recorded},
        "plan": rec.point_plan.steps() if rec.point_plan else rec.preflight.steps() if rec.preflight else [],
        "validation_queries": rec.queries,
        "candidates": [m.id for m in rec.listing],
    }


def approve(rec: Recovery, run: RunOutcome, *, approved: bool) -> None:
    """Step 2: the approval (form or ``approved``); the form can pick another backup.

    Raises:
        ApprovalRejected: rejected or timed out; nothing changed.
    """
    logger = run_logger(__name__)
    if not approved:
        run.outcome = "waiting for approval"
        reports.publish_markdown(rec.key, rec.markdown(run.outcome), "Data recovery: waiting for approval")
    plan = rec.point_plan
    if plan is not None and plan.tables:
        names = ", ".join(f"{sc}.{t}" for sc, t in plan.tables)
        action = f"stop the writers and bring back {names} of {rec.what()} into a side schema"
    elif plan is not None:
        action = f"stop the writers and restore {rec.what()}"
    else:
        action = f"stop the writers and restore {rec.what()} over {rec.database}"
    extra: dict[str, Any] = (
        {} if rec.manifest is None else {"form": RecoveryApproval, "backup_id": rec.manifest.id}
    )
    ask = functools.partial(
        approvals.request_approval,
        rec.settings,
        approved=approved,
        action=action,
        plan_markdown=rec.markdown("approve?"),
        timeout_seconds=rec.timeout,
        **extra,
    )
    if approved:
        record, answer = ask()
    else:
        with rec.steps.step("approval"):
            record, answer = ask()
    rec.approval = record.describe()
    chosen = getattr(answer, "backup_id", "") if answer is not None else ""
    if chosen and rec.manifest is not None and chosen != rec.manifest.id:
        rec.manifest = backup.resolve_backup_task(rec.settings, chosen, database=rec.database)
        rec.preflight = backup.restore_preflight_task(
            rec.settings, rec.manifest, target_database=rec.database, keep_old=True
        )
        logger.info("the approval chose backup %s", rec.manifest.id)


def _stop_writes(rec: Recovery, runtime: Runtime, services: list[str]) -> None:
    with rec.steps.step("stop writes: scale to 0") as step:
        # Read again: the counts shown for approval may have changed while it waited, and the services
        # go back to what really ran. Nothing is scaled back if this fails.
        planned, rec.recorded = rec.recorded, []
        rec.recorded = scaling.record_replicas_task(runtime, services)
        changed = [
            f"{r.service} {p.replicas} -> {r.replicas}"
            for r in rec.recorded
            for p in planned
            if p.service == r.service and p.replicas != r.replicas
        ]
        if changed:
            run_logger(__name__).info("replicas changed while waiting for approval: %s", ", ".join(changed))
        scaling.scale_services_task(runtime, {r.service: 0 for r in rec.recorded})
        step.detail = ", ".join(f"{r.service} {r.replicas} -> 0" for r in rec.recorded) + (
            f" (read again after approval; changed: {', '.join(changed)})" if changed else ""
        )


def _restore(rec: Recovery) -> None:
    if rec.point_plan is not None:
        with rec.steps.step(f"restore to {rec.point_plan.target}") as step:
            # The run holds the database's lock already; the replaced database is kept.
            rec.point_done = wal_steps.restore_to_point_task(
                rec.settings, plan=rec.point_plan, database_lock_held=True
            )
            step.detail = rec.point_done.comparison.summary()
        return
    assert rec.manifest is not None
    assert rec.preflight is not None
    with rec.steps.step(f"restore {rec.manifest.id}") as step:
        backup.checksum_backup_task(rec.settings, rec.manifest)
        # Automatic path: the replaced database is always kept, never dropped.
        rec.restore = backup.restore_backup_task(
            rec.settings,
            rec.manifest.id,
            target_database=rec.preflight.target_database,
            keep_old=True,
            checksum_first=False,
            database_lock_held=True,
        )
        step.detail = rec.restore.comparison.summary()


def _validate(rec: Recovery) -> None:
    with rec.steps.step("verify data: validation queries") as step:
        rec.validations = validation_queries_task(rec.settings, rec.queries)
        failed = [v for v in rec.validations if not v.ok]
        step.detail = f"{len(rec.validations) - len(failed)} of {len(rec.validations)} passed"
        if failed:
            raise CheckFailed(
                "validation failed after the restore: " + "; ".join(f"{v.query!r}: {v.error}" for v in failed)
            )


def _resume(rec: Recovery, runtime: Runtime) -> None:
    with rec.steps.step("resume: scale back to the recorded counts") as step:
        scaling.scale_services_task(runtime, {r.service: r.replicas for r in rec.recorded})
        scaling.wait_services_ready_task(
            runtime,
            [r.service for r in rec.recorded if r.replicas > 0],
            rec.settings.runtime.ready_timeout_seconds,
        )
        step.detail = ", ".join(f"{r.service} 0 -> {r.replicas}" for r in rec.recorded)


def stop_restore_resume(rec: Recovery, runtime: Runtime, services: list[str]) -> CheckFailed | None:
    """Steps 3-6: stop writes, restore, validate, and scale back to the recorded counts (also when a
    step failed). Returns a failed validation instead of raising it: health is checked first.

    Raises:
        Whatever the stop or the restore raised (after scaling back); a scale-back failure when
        nothing failed before it.
    """
    primary: BaseException | None = None
    validation_error: CheckFailed | None = None
    try:
        if rec.recorded:
            _stop_writes(rec, runtime, services)
        _restore(rec)
        try:
            _validate(rec)
        except CheckFailed as exc:
            # The services go back and the health is checked first; the message then says what next.
            validation_error = exc
    except BaseException as exc:
        primary = exc
        raise
    finally:
        if rec.recorded:
            try:
                _resume(rec, runtime)
            except Exception:
                if primary is None:
                    raise
                # The first failure is the one to act on; the scale-back failure is in the steps.
                run_logger(__name__).error("scaling back failed too; see the steps table")
    return validation_error


def _point_next_steps(error: CheckFailed, rec: Recovery, report: HealthReport) -> str:
    done = rec.point_done
    kept = done.old_database if done else None
    side = done.side if done else None
    return (
        f"{error}. The restore to {rec.point_plan.target if rec.point_plan else '?'} stands; the services"
        " were scaled back."
        + (
            f" The replaced database is kept as {kept}. To undo, run restore-database with"
            f" swap_back={kept} target_database={rec.database}."
            if kept
            else ""
        )
        + (
            f" The restored tables are in schema {side.schema}; the live tables were not changed."
            if side
            else ""
        )
        + " Or run recover-data again with another target"
        + f". Health after: {report.status.value}"
    )


def check_health(rec: Recovery, run: RunOutcome, validation_error: CheckFailed | None) -> None:
    """Step 7: the health check, then the verdict (a failed validation says what to do next).

    Raises:
        CheckFailed: the validation failed, or the stack is unhealthy after the recovery.
    """
    with rec.steps.step("health check") as step:
        rec.report = health_report_task(rec.settings)
        step.detail = rec.report.status.value
    report = rec.report
    if validation_error is not None:
        run.outcome = "restored, validation failed"
        if rec.point_plan is not None:
            raise CheckFailed(_point_next_steps(validation_error, rec, report))
        assert rec.manifest is not None
        raise CheckFailed(
            _validation_next_steps(
                validation_error, rec.settings, rec.manifest, rec.restore, report, [m.id for m in rec.listing]
            )
        )
    run.outcome = "recovered" if report.status is not Status.UNHEALTHY else "restored, but unhealthy"
    if report.status is Status.UNHEALTHY:
        raise CheckFailed(
            f"{rec.settings.stack} is unhealthy after the recovery: "
            + "; ".join(f"{n}: {report.checks[n].error or 'failing'}" for n in report.failed_checks)
            + ". Run diagnose"
        )
