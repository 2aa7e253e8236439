"""Applying a plan: one Alembic revision at a time (so the report says which one failed and how long
each took), or the command tool's apply command; the durable run marker is written first."""

from __future__ import annotations

import contextlib
import time

import psycopg

from tasks import postgres
from tasks.migrate import alembic_env
from tasks.migrate.config import run_tool, target_argv
from tasks.migrate.model import AppliedStep, ApplyRecord, MigrationError, MigrationPlan
from tasks.migrate.runs import begin_run, mark_run
from tasks.runlog import run_logger
from tasks.settings import OpsSettings


def apply_migrations(
    settings: OpsSettings,
    plan: MigrationPlan,
    *,
    backup_id: str | None,
    flow_run_id: str | None = None,
    run_id: str | None = None,
) -> ApplyRecord:
    """Apply exactly the planned revisions (or run the tool's apply command), marker first.

    The durable marker is written before anything is applied and set to ``verifying`` after; on an
    error it is set to ``failed``. Either way the caller verifies or restores.

    Args:
        plan: from :func:`tasks.migrate.plan_migrations`; an empty plan applies nothing.
        backup_id: the backup taken just before, recorded in the marker for the operator.
        run_id: an existing marker (from :func:`tasks.migrate.begin_run`); a new one is written when None.

    Returns:
        The change record: the steps that ran with their durations, and the commands.

    Raises:
        MigrationError: a revision or the apply command failed (names which).
    """
    if not plan.pending:
        return ApplyRecord(
            run_id or "", plan.tool, plan.database, plan.current, plan.current, (), changed=False
        )
    run_id = run_id or begin_run(settings, plan, backup_id=backup_id, flow_run_id=flow_run_id)
    started = time.monotonic()
    try:
        if plan.tool == "command":
            steps, commands = _apply_command(settings, plan)
            current = plan.current
        else:
            steps, commands = _apply_alembic(settings, plan)
            current = plan.target
    except BaseException as exc:
        with contextlib.suppress(psycopg.Error):
            mark_run(settings, run_id, "failed", str(exc)[:2000])
        raise
    mark_run(settings, run_id, "verifying")
    return ApplyRecord(
        run_id=run_id,
        tool=plan.tool,
        database=plan.database,
        from_revisions=plan.current,
        to_revisions=current,
        steps=tuple(steps),
        commands=tuple(commands),
        changed=True,
        seconds=round(time.monotonic() - started, 3),
    )


def _apply_command(settings: OpsSettings, plan: MigrationPlan) -> tuple[list[AppliedStep], list[str]]:
    """The command tool's apply command for the plan's target, as one step."""
    t0 = time.monotonic()
    argv = target_argv(settings, plan.requested_target)
    result = run_tool(settings, argv, "apply", check=False)
    if not result.ok:
        raise MigrationError(
            f"{result.command_line} exited {result.returncode}; the database may be partly"
            f" migrated. Output:\n{(result.stderr or result.stdout)[-3000:]}"
        )
    return [AppliedStep(result.command_line, round(time.monotonic() - t0, 3))], [result.command_line]


def _apply_alembic(settings: OpsSettings, plan: MigrationPlan) -> tuple[list[AppliedStep], list[str]]:
    """``alembic upgrade <revision>`` for each planned revision in order, stopping at the first failure."""
    from alembic import command

    logger = run_logger(__name__)
    steps: list[AppliedStep] = []
    commands: list[str] = []
    for step in plan.steps:
        t0 = time.monotonic()
        logger.info("applying revision %s (%s)", step.revision, step.description)
        commands.append(f"alembic upgrade {step.revision}")
        try:
            with alembic_env.logging_kept():
                command.upgrade(alembic_env.alembic_config(settings), step.revision)
        except Exception as exc:
            raise MigrationError(
                f"revision {step.revision} ({step.description}) failed after"
                f" {len(steps)} of {len(plan.steps)} revisions were applied:"
                f" {postgres.safe_error(exc, settings.postgres)}"
            ) from exc
        steps.append(AppliedStep(step.revision, round(time.monotonic() - t0, 3)))
        logger.info("revision %s applied in %.2fs", step.revision, steps[-1].seconds)
    return steps, commands
