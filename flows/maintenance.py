"""Runbook: "Maintenance Procedures" / "Scheduled Downtime".

Notify, maintenance mode on, backup, migrations (the migrate-database flow as a subflow), smoke tests,
maintenance mode off, notify. Dry-run by default: the dry run plans the migrations and runs the
read-only smoke checks, and says what the real run would switch and back up.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from flows.migrate import migrate_database
from tasks import approvals, backup, health, migrate, reports
from tasks.errors import CheckFailed
from tasks.health import HealthReport, Status
from tasks.migrate import MaintenanceChange, SmokeResult, WritesPolicy
from tasks.ops_task import ops_task
from tasks.runlog import run_logger
from tasks.secrets import safe_error
from tasks.settings import OpsSettings, load_settings

EVENT_PREFIX = "swagger2mcp-ops.maintenance"


class MaintenanceFailed(CheckFailed):
    """A step of the maintenance window failed; the message says where the application was left."""


@dataclass
class MaintenanceReport:
    """What the window did, step by step, rendered into the report artifact (also on failure)."""

    stack: str
    database: str
    dry_run: bool
    message: str
    outcome: str = "started"
    steps: list[tuple[str, str, str]] = field(default_factory=list)
    maintenance_on: MaintenanceChange | None = None
    maintenance_off: MaintenanceChange | None = None
    backup_id: str | None = None
    migration: dict[str, Any] | None = None
    migration_error: str | None = None
    health: HealthReport | None = None
    smoke: list[SmokeResult] = field(default_factory=list)
    notified: list[str] = field(default_factory=list)
    failure: str | None = None
    not_applied: str | None = None

    def step(self, name: str, status: str, detail: str) -> None:
        self.steps.append((name, status, detail))
        run_logger(__name__).info("%s: %s (%s)", name, status, detail)

    def summary(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "dry_run": self.dry_run,
            "maintenance_mode_configured": bool(self.maintenance_on and self.maintenance_on.configured),
            "maintenance_mode_left_on": bool(
                self.maintenance_on and self.maintenance_on.changed and not self.maintenance_off
            ),
            "backup_id": self.backup_id,
            "migration": self.migration,
            "health": self.health.status.value if self.health else None,
            "smoke_ok": all(s.ok for s in self.smoke),
            "steps": [list(s) for s in self.steps],
            "failure": self.failure,
        }


def render_markdown(report: MaintenanceReport) -> str:
    """The window as markdown: outcome, each step with its status, and what the users were told."""
    mode = "dry run" if report.dry_run else "real run"
    lines = [
        f"# Maintenance window of {report.stack} ({mode}): **{report.outcome}**",
        "",
        f"> {report.message}",
    ]
    if report.failure:
        lines += ["", f"**What failed:** {report.failure}"]
    lines += ["", reports.markdown_table(["step", "status", "detail"], report.steps)]
    if report.smoke:
        lines += [
            "",
            reports.markdown_table(
                ["smoke query", "ok", "value", "error"],
                [(s.query, "yes" if s.ok else "no", s.value, s.error) for s in report.smoke],
            ),
        ]
    if report.migration:
        lines += [
            "",
            f"Migration: {report.migration.get('outcome')}"
            f" (backup {report.migration.get('backup_id') or '-'})",
        ]
        if report.migration.get("approval"):
            lines += ["", f"Migration approval: {report.migration['approval']}"]
        kept = report.migration.get("kept_database")
        if kept:
            changed = report.migration.get("kept_changed_tables") or []
            lines += [
                "",
                f"The database the migration's restore replaced is kept as `{kept}` (read-only by default;"
                f" open it: `{report.migration.get('kept_open_command')}`). Tables whose rows changed there"
                f" since the backup: {', '.join(f'`{t}`' for t in changed) or 'none'}.",
            ]
    if report.notified:
        lines += ["", "Notifications (events): " + ", ".join(f"`{e}`" for e in report.notified)]
    return "\n".join(lines)


@task(name="publish-maintenance-report", cache_policy=NO_CACHE)
def publish_report(report: MaintenanceReport) -> None:
    """The markdown report, with a stable key per stack."""
    reports.publish_markdown(
        f"maintenance-{report.stack}", render_markdown(report), f"Maintenance window: {report.outcome}"
    )


@task(name="notify-maintenance", cache_policy=NO_CACHE)
def emit_notification(stack: str, phase: str, message: str, summary: dict[str, Any]) -> str:
    """Emit ``swagger2mcp-ops.maintenance.<phase>`` for automations (banner, e-mail, chat)."""
    name = f"{EVENT_PREFIX}.{phase}"
    emit_event(
        event=name,
        resource={"prefect.resource.id": f"swagger2mcp-ops.stack.{stack}", "swagger2mcp-ops.stack": stack},
        payload={"message": message, "summary": summary},
    )
    return name


def notify(report: MaintenanceReport, phase: str) -> None:
    """Tell users and automations (an event); a dry run only says what it would emit."""
    if report.dry_run:
        report.step(f"notify {phase}", "skipped", f"dry run: would emit {EVENT_PREFIX}.{phase}")
        return
    name = emit_notification(report.stack, phase, report.message, report.summary())
    report.notified.append(name)
    report.step(f"notify {phase}", "done", f"event {name}")


smoke_queries = migrate.run_smoke_queries_task
health_check = ops_task(health.run_checks, name="maintenance-health-check")


def _close(report: MaintenanceReport, started: float) -> None:
    """The window's last steps, also after a failure: its duration, the closing event, the report."""
    report.step("duration", "", f"{time.monotonic() - started:.1f}s")
    try:
        notify(report, "completed" if report.outcome in {"completed", "dry-run"} else "failed")
    finally:
        publish_report(report)


def _switch(settings: OpsSettings, report: MaintenanceReport, on: bool) -> MaintenanceChange:
    change = migrate.set_maintenance_mode_task(settings, on, dry_run=report.dry_run)
    status = "done" if change.changed else ("not configured" if not change.configured else "skipped")
    report.step(
        f"maintenance mode {change.mode}", status, f"{change.detail} {' '.join(change.commands)}".strip()
    )
    return change


@flow(name="maintenance-window", log_prints=True)
def maintenance_window(
    dry_run: bool = True,
    approved: bool = False,
    run_migrations: bool = True,
    message: str = "Scheduled maintenance",
    writes_policy: WritesPolicy = "stop",
) -> dict[str, Any]:
    """Runbook "Maintenance Procedures" / "Scheduled Downtime".

    1. Notify (event ``swagger2mcp-ops.maintenance.started``).
    2. Maintenance mode on, with the configured command or HTTP call (``migrations.maintenance_*``);
       when none is configured the report says the application stays reachable.
    3. Backup of the database (verified at catalog level).
    4. Migrations: the ``migrate-database`` flow as a subflow (its own plan, approval, backup, apply,
       verify, restore on failure keeping the replaced database). With maintenance mode on, the
       subflow is told the writers are stopped; without it, the subflow stops them through the runtime
       (``writes_policy``), or the window refuses before anything happens when nothing can stop them.
    5. Smoke tests: the health check and the configured smoke queries.
    6. Maintenance mode off: after success, after a migration that applied nothing (rejected, lock
       busy), and after a failed migration whose restore was proven (the application's old code
       matches the restored schema). Otherwise it stays on and the report says so.
    7. Notify (``.completed`` or ``.failed``) and publish the report.

    Args:
        dry_run: plan only (the default): nothing is switched, backed up or applied.
        approved: pre-approve the migration (otherwise its approval form pauses the subflow); refused
            before anything happens where pre-approval is not allowed (``approvals.allow_preapproved``;
            by default in production).
        run_migrations: run the migrate-database subflow.
        message: what users are told (in the events' payload and the report).
        writes_policy: ``stop`` (default) or ``keep-running`` (the operator's explicit choice), as for
            migrate-database; with maintenance mode configured, ``stop`` is what maintenance mode does.

    Returns:
        A summary of every step.

    Raises:
        ParameterError: ``approved`` where pre-approval is not allowed; nothing was done or announced.
        MaintenanceFailed: a step failed, or the migration was not applied (rejected, lock busy: the
            outcome is then "not applied: ..."); says whether maintenance mode was left on.
    """
    settings = load_settings()
    # Refused before the first notification, where pre-approval is not allowed.
    approvals.check_preapproval(settings, approved)
    subflow_policy: str = writes_policy
    if run_migrations:
        migrate.require_configured(settings)
        if writes_policy == "stop" and (
            settings.migrations.maintenance_on_argv or settings.migrations.maintenance_on_url
        ):
            # This flow's own maintenance mode stops the writers for the whole window.
            subflow_policy = "stopped-by-caller"
        if not dry_run:
            # Refused here, before the first notification or switch, when nothing can stop the writers.
            migrate.plan_writer_stop(settings, subflow_policy)
    report = MaintenanceReport(
        stack=settings.stack,
        database=migrate.target_database(settings),
        dry_run=dry_run,
        message=message,
    )
    started = time.monotonic()
    with reports.publishing(report, functools.partial(_close, started=started), settings):
        notify(report, "started")
        report.maintenance_on = _switch(settings, report, True)

        if dry_run:
            report.step("backup", "skipped", "dry run: would back up and verify at catalog level")
        else:
            manifest = backup.create_backup_task(settings, verify="catalog", content_hashes=True)
            report.backup_id = manifest.id
            report.step("backup", "done", f"backup {manifest.id}, {manifest.total_rows} rows")

        safe_to_reopen = True
        if run_migrations:
            state = migrate_database(
                dry_run=dry_run, approved=approved, writes_policy=subflow_policy, return_state=True
            )
            if state.is_completed():
                report.migration = state.result()
                report.step("migrate", "done", str(report.migration.get("outcome")))
            else:
                not_applied: str | None = None
                failed: dict[str, Any] = {"outcome": "failed"}
                try:
                    state.result()
                except Exception as exc:
                    report.migration_error = safe_error(exc, settings)
                    failed = getattr(exc, "summary", None) or failed
                    not_applied = reports.refusal(exc, settings)
                report.migration = failed
                # Nothing applied, or the old schema is back and proven: the running application
                # matches the database again. Anything else keeps the application closed.
                safe_to_reopen = not_applied is not None or failed.get("outcome") == "failed-restored"
                report.not_applied = not_applied
                report.failure = (
                    f"migration {not_applied}"
                    if not_applied
                    else f"migration failed: {report.migration_error}"
                )
                report.step("migrate", "not applied" if not_applied else "failed", str(failed.get("outcome")))
        else:
            report.step("migrate", "skipped", "run_migrations is false")

        report.health = health_check(settings)
        report.smoke = smoke_queries(settings)
        smoke_ok = report.health.status is not Status.UNHEALTHY and all(s.ok for s in report.smoke)
        report.step(
            "smoke tests",
            "passed" if smoke_ok else "failed",
            f"health {report.health.status.value}, {sum(s.ok for s in report.smoke)}/{len(report.smoke)}"
            " smoke queries passed",
        )
        if not smoke_ok:
            safe_to_reopen = False
            report.failure = report.failure or "smoke tests failed after the maintenance"

        if safe_to_reopen:
            report.maintenance_off = _switch(settings, report, False)
        elif report.maintenance_on.changed:
            report.step("maintenance mode off", "left on", "the application is not in a known-good state")
        if report.not_applied and smoke_ok:
            # The migration was refused (rejected, lock busy) and the rest passed: nothing applied.
            report.outcome = report.not_applied
        elif report.failure:
            report.outcome = "failed"
        else:
            report.outcome = "dry-run" if dry_run else "completed"
    if report.failure:
        left_on = report.summary()["maintenance_mode_left_on"]
        raise MaintenanceFailed(
            f"{report.failure}; maintenance mode {'is still ON' if left_on else 'is off'}."
            + (" Fix the application, then turn maintenance mode off." if left_on else "")
        )
    return report.summary()
