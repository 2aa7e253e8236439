"""Runbook: "Worker Not Processing Jobs" (3) — failed and old jobs, through the official ``bullmq`` package.

``retry-failed-jobs`` moves failed jobs back to waiting (filtered by queue, failure reason and age,
in batches under a rate limit) so the worker processes them again; ``clean-jobs`` removes completed or
failed jobs older than N (what fills Redis up: runbook 2, "Redis out of memory"). Both are dry runs
unless ``dry_run=False``: the dry run lists the exact jobs the real run would touch, computed by the
same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks import queues as jobs
from tasks import reports
from tasks.errors import ParameterError
from tasks.queues import JobOperationRecord, JobPlan
from tasks.runlog import run_logger
from tasks.settings import OpsSettings, load_settings

_SHOWN_IN_MARKDOWN = 200
_TITLES = {"retry": "Retry failed jobs", "clean": "Clean jobs"}


def render_markdown(
    operation: str, stack: str, plan: JobPlan | None, record: JobOperationRecord | None, error: str | None
) -> str:
    """The operation as markdown: what was selected, what happened (or would), and each job."""
    title = _TITLES.get(operation, operation)
    if record is None:
        headline = "failed before any job was changed" if plan is None else "stopped; see the error"
    elif record.dry_run:
        headline = (
            f"dry run, {record.planned} jobs would be {'retried' if operation == 'retry' else 'removed'}"
        )
    else:
        headline = (
            f"{record.changed} of {record.planned} jobs {'retried' if operation == 'retry' else 'removed'}"
        )
        if record.skipped:
            headline += f", {record.skipped} skipped"
    lines = [f"# {title} on {stack}: {headline}", ""]
    if plan is not None:
        lines.append(f"Selection: {plan.selection.describe()}.")
    if error:
        lines += ["", f"**Error:** {error}"]
    if record is not None and not record.dry_run:
        lines.append(f"{record.batches} batches in {record.duration_seconds:g} s.")
    if record is not None and record.dry_run and record.planned:
        lines += ["", "Nothing was changed. Run again with `dry_run=false` to apply this selection."]
    if record is not None and record.jobs:
        shown = record.jobs[:_SHOWN_IN_MARKDOWN]
        now_ms = plan.planned_at_ms if plan else int(time.time() * 1000)
        info = {(j.queue, j.id): j for j in plan.jobs} if plan else {}
        rows = []
        for change in shown:
            job = info.get((change.queue, change.id))
            rows.append(
                [
                    change.queue,
                    change.id,
                    change.name,
                    change.outcome,
                    "" if job is None else f"{job.age_seconds(now_ms):.0f}",
                    "" if job is None else (job.failed_reason or "")[:120],
                    change.detail or "",
                ]
            )
        lines += [
            "",
            reports.markdown_table(["queue", "id", "name", "outcome", "age_s", "reason", "detail"], rows),
        ]
        if len(record.jobs) > len(shown):
            lines.append(f"... and {len(record.jobs) - len(shown)} more (see the table artifact).")
    elif plan is not None and not plan.jobs:
        lines += ["", "No job matches the selection."]
    return "\n".join(lines)


def _key(operation: str, stack: str) -> str:
    return f"{'retry-failed-jobs' if operation == 'retry' else 'clean-jobs'}-{stack}"


@task(name="publish-job-operation", cache_policy=NO_CACHE)
def publish_report(
    operation: str, stack: str, plan: JobPlan | None, record: JobOperationRecord | None, error: str | None
) -> None:
    """Markdown and a table of every job, with stable keys per stack and operation."""
    key = _key(operation, stack)
    markdown = render_markdown(operation, stack, plan, record, error)
    reports.publish_markdown(key, markdown, markdown.splitlines()[0].lstrip("# "))
    if record is not None and record.jobs:
        reports.publish_table(
            f"{key}-jobs", [c.as_row() for c in record.jobs], "Each selected job and its outcome"
        )


def _run_operation(
    settings: OpsSettings,
    operation: str,
    make_selection: Callable[[], jobs.JobFilter],
    *,
    dry_run: bool,
    batch_size: int,
    rate_per_second: float,
    reset_attempts: bool,
) -> dict[str, Any]:
    """Select, plan and apply (or only list) one job operation; its report is published also when a
    bad selection stops it before anything is read."""
    key = _key(operation, settings.stack)
    logger = run_logger(__name__)
    plan: JobPlan | None = None
    record: JobOperationRecord | None = None

    def publish(run: reports.RunOutcome) -> None:
        publish_report(operation, settings.stack, plan, record, run.failure)

    with reports.publishing(reports.RunOutcome(), publish, settings):
        selection = make_selection()
        plan = jobs.plan_job_operation_task(settings.redis, settings.queue, operation, selection)
        logger.info("%s: %d jobs selected (%s)", operation, len(plan.jobs), selection.describe())
        progress = (
            None if dry_run or not plan.jobs else reports.Progress(f"{key}-progress", f"{operation} jobs")
        )
        record = jobs.apply_job_plan_task(
            settings.redis,
            settings.queue,
            plan,
            confirm=not dry_run,
            batch_size=batch_size,
            rate_per_second=rate_per_second,
            reset_attempts=reset_attempts,
            on_progress=None
            if progress is None
            else (lambda done, total: progress.update(100 * done / total)),
        )
        logger.info(
            "%s: %s, planned %d, changed %d, skipped %d",
            operation,
            "dry run" if record.dry_run else "applied",
            record.planned,
            record.changed,
            record.skipped,
        )
        return record.as_dict()


def _check_common(batch_size: int, rate_per_second: float, limit: int | None) -> None:
    if batch_size < 1:
        raise ParameterError("batch_size must be at least 1")
    if rate_per_second <= 0:
        raise ParameterError("rate_per_second must be positive (jobs per second)")
    if limit is not None and limit < 1:
        raise ParameterError("limit must be at least 1, or unset for every matching job")


@flow(name="retry-failed-jobs", log_prints=True)
def retry_failed_jobs(
    queues: list[str] | None = None,
    reason_pattern: str | None = None,
    older_than_minutes: float = 0.0,
    newer_than_hours: float | None = None,
    limit: int | None = 1000,
    dry_run: bool = True,
    batch_size: int = 50,
    rate_per_second: float = 20.0,
    reset_attempts: bool = True,
) -> dict[str, Any]:
    """Runbook "Worker Not Processing Jobs", "Check for failed jobs": retry them, dry run first.

    Selects failed jobs (newest first) of the configured queues, by failure reason and age, and moves
    them back to waiting with BullMQ's own ``reprocessJob`` script, in batches under a rate limit.
    The worker then processes them again. A job that left the failed set since the plan is skipped,
    so running it twice retries nothing the second time.

    Args:
        queues: queue names (default: every configured queue).
        reason_pattern: regular expression searched in each job's failure reason.
        older_than_minutes: only jobs that failed at least this long ago.
        newer_than_hours: only jobs that failed within this many hours.
        limit: at most this many jobs in all.
        dry_run: list the exact jobs and change nothing (the default).
        batch_size: jobs retried at once.
        rate_per_second: at most this many jobs per second over the run.
        reset_attempts: give each retried job its full attempts again.

    Returns:
        The change record: planned, changed, skipped, batches, duration.

    Raises:
        ParameterError: unknown queue, bad pattern, bad ages or limits; nothing was read or changed.
    """
    settings = load_settings()

    def make() -> jobs.JobFilter:
        _check_common(batch_size, rate_per_second, limit)
        if older_than_minutes < 0:
            raise ParameterError("older_than_minutes must not be negative")
        return jobs.job_filter(
            settings.queue,
            state="failed",
            queues=queues,
            reason_pattern=reason_pattern,
            older_than_seconds=older_than_minutes * 60,
            newer_than_seconds=None if newer_than_hours is None else newer_than_hours * 3600,
            limit=limit,
        )

    return _run_operation(
        settings,
        "retry",
        make,
        dry_run=dry_run,
        batch_size=batch_size,
        rate_per_second=rate_per_second,
        reset_attempts=reset_attempts,
    )


DEFAULT_CLEAN_AGE_HOURS = 168.0


@flow(name="clean-jobs", log_prints=True)
def clean_jobs(
    state: Literal["completed", "failed"] = "completed",
    older_than_hours: float | None = None,
    queues: list[str] | None = None,
    reason_pattern: str | None = None,
    limit: int | None = None,
    dry_run: bool = True,
    batch_size: int = 200,
    rate_per_second: float = 1000.0,
    all: bool = False,  # the operator's word (all=true); the builtin is not used in this flow
) -> dict[str, Any]:
    """Runbook "Redis out of memory" (2) and "Worker Not Processing Jobs" (3): remove old finished jobs.

    Removes completed (or failed) jobs that finished more than ``older_than_hours`` ago with BullMQ's
    own ``removeJob`` script, in batches under a rate limit: the gentle alternative to the runbook's
    FLUSHDB, which loses every job.

    Args:
        state: ``completed`` or ``failed``.
        older_than_hours: only jobs that finished at least this long ago, at least 1 (default one
            week, 168). A shorter cutoff would take jobs that just finished: use ``all`` for that.
        queues: queue names (default: every configured queue).
        reason_pattern: for failed jobs, a regular expression searched in the failure reason.
        limit: at most this many jobs in all (default: every matching job).
        dry_run: list the exact jobs and change nothing (the default).
        batch_size: jobs removed at once.
        rate_per_second: at most this many jobs per second over the run.
        all: every finished job of ``state``, whatever its age (instead of ``older_than_hours``).

    Returns:
        The change record: planned, changed, skipped, batches, duration.

    Raises:
        ParameterError: bad state, queue, pattern, age or limit (``older_than_hours`` under 1 without
            ``all``, or both given); nothing was read or changed.
    """
    settings = load_settings()

    def make() -> jobs.JobFilter:
        _check_common(batch_size, rate_per_second, limit)
        if state not in {"completed", "failed"}:
            raise ParameterError("state must be 'completed' or 'failed'")
        if all and older_than_hours is not None:
            raise ParameterError(
                f"pass older_than_hours ({older_than_hours:g}) or all=true (every {state} job, whatever its"
                " age), not both"
            )
        hours = 0.0 if all else (DEFAULT_CLEAN_AGE_HOURS if older_than_hours is None else older_than_hours)
        # Under an hour the cutoff reaches jobs that just finished (0 takes every one): make it explicit.
        if not all and hours < 1:
            raise ParameterError(
                f"older_than_hours must be at least 1, not {hours:g}: a shorter cutoff selects the {state}"
                f" jobs that just finished. To remove every {state} job whatever its age, pass all=true"
                " (and no older_than_hours). Nothing was read or changed."
            )
        return jobs.job_filter(
            settings.queue,
            state=state,
            queues=queues,
            reason_pattern=reason_pattern,
            older_than_seconds=hours * 3600,
            limit=limit,
        )

    return _run_operation(
        settings,
        "clean",
        make,
        dry_run=dry_run,
        batch_size=batch_size,
        rate_per_second=rate_per_second,
        reset_attempts=False,
    )
