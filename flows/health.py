"""Runbook: "Service Health Checks".

PostgreSQL, Redis, the BullMQ queues and the app's own HTTP health endpoints, each checked under a
bounded timeout, folded into one report in the runbook's JSON shape; and, where point-in-time
recovery is in use, the WAL archive (RPO, slot, restorable window).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.runtime import flow_run

from tasks import health, reports
from tasks.errors import CheckFailed
from tasks.health import CheckResult, HealthReport, Status
from tasks.runlog import run_logger
from tasks.settings import OpsSettings, load_settings
from tasks.wal import steps as wal_steps

EVENT_PREFIX = "swagger2mcp-ops.health"


@task(name="run-health-check", cache_policy=NO_CACHE, task_run_name="check-{name}")
def run_check(name: str, settings: OpsSettings) -> CheckResult:
    """Run one named check under its deadline; never raises for a failing service."""
    check = health.all_checks(settings)[name]
    return health.run_with_deadline(name, check, settings.health.timeout_seconds * 2 + 1)


@task(name="run-health-check", cache_policy=NO_CACHE, task_run_name="check-wal-archive")
def run_wal_archive_check(settings: OpsSettings) -> CheckResult | None:
    """The WAL archive's check under its deadline; None when point-in-time recovery is not in use.

    Also emits ``swagger2mcp-ops.wal.rpo-exceeded`` when its RPO passes the threshold (once per
    episode, see :func:`tasks.wal.steps.emit_rpo_exceeded`; every run records whether it is past).
    """
    result = health.run_wal_archive_check(settings)
    if result is not None and result.error is None:
        wal_steps.emit_rpo_exceeded(settings, result.details)
    return result


def render_markdown(report: HealthReport) -> str:
    """The report as markdown: status line, one row per check, then warnings and errors."""
    rows = []
    for name, check in report.checks.items():
        counts = ""
        if name == "queue" and check.error is None:
            counts = ", ".join(
                f"{s} {check.details.get(s, 0)}" for s in ("waiting", "active", "delayed", "failed")
            )
        if name == health.WAL_ARCHIVE_CHECK and check.error is None:
            rpo, last = check.details.get("rpo_seconds"), check.details.get("last_wal") or "-"
            counts = f"RPO {'-' if rpo is None else f'{rpo:g} s'}, last {last}"
        rows.append(
            [name, check.status.value, "" if check.latency is None else f"{check.latency} ms", counts]
        )
    lines = [
        f"# Health of {report.stack}: **{report.status.value}**",
        "",
        f"Checked at {report.as_runbook()['timestamp']}.",
        "",
        reports.markdown_table(["check", "status", "latency", "jobs"], rows),
    ]
    problems = [
        f"- **{name}**: {text}"
        for name, check in report.checks.items()
        for text in ([check.error] if check.error else []) + check.warnings
    ]
    if problems:
        lines += ["", "## Findings", "", *problems]
        if report.status is not Status.HEALTHY:
            lines += ["", "Run the `diagnose` flow for the evidence behind these findings."]
    return "\n".join(lines)


def table_rows(report: HealthReport) -> list[dict[str, Any]]:
    """One table row per check."""
    return [
        {
            "check": name,
            "status": check.status.value,
            "latency_ms": check.latency,
            "error": check.error,
            "warnings": "; ".join(check.warnings),
        }
        for name, check in report.checks.items()
    ]


@task(name="publish-health-report", cache_policy=NO_CACHE)
def publish_report(report: HealthReport) -> None:
    """Markdown and table artifacts with stable keys (a versioned series per stack in the UI)."""
    reports.publish_markdown(
        f"health-{report.stack}", render_markdown(report), f"Health of {report.stack}: {report.status.value}"
    )
    reports.publish_table(f"health-{report.stack}-checks", table_rows(report), "Health checks, one row each")


@task(name="emit-health-event", cache_policy=NO_CACHE)
def emit_health_events(report: HealthReport) -> int:
    """One event per failing check, so an automation can start diagnostics; returns how many."""
    emitted = 0
    for name in report.failed_checks:
        check = report.checks[name]
        event = emit_event(
            event=f"{EVENT_PREFIX}.{check.status.value}",
            resource={
                "prefect.resource.id": f"swagger2mcp-ops.stack.{report.stack}.check.{name}",
                "prefect.resource.name": f"{report.stack} {name}",
                "swagger2mcp-ops.stack": report.stack,
                "swagger2mcp-ops.check": name,
            },
            payload={"status": report.status.value, "check": check.as_runbook()},
        )
        emitted += event is not None
    return emitted


@task(name="emit-health-checked", cache_policy=NO_CACHE)
def emit_checked_event(report: HealthReport) -> bool:
    """``swagger2mcp-ops.health.checked`` after every run, healthy or not, with each check's status:
    health paging counts consecutive unhealthy checks and resolves its page on a healthy one."""
    event = emit_event(
        event=f"{EVENT_PREFIX}.checked",
        resource={
            "prefect.resource.id": f"swagger2mcp-ops.stack.{report.stack}",
            "prefect.resource.name": report.stack,
            "swagger2mcp-ops.stack": report.stack,
        },
        payload={
            "status": report.status.value,
            "checks": {name: check.status.value for name, check in report.checks.items()},
            "details": {
                name: "; ".join(([check.error] if check.error else []) + check.warnings)
                for name, check in report.checks.items()
                if check.error or check.warnings
            },
            "flow_run_id": flow_run.get_id(),
        },
    )
    return event is not None


@flow(name="health-check", log_prints=True)
def health_check(fail_when_unhealthy: bool = True, fail_when_degraded: bool = False) -> dict[str, Any]:
    """Runbook "Service Health Checks": PostgreSQL, Redis, BullMQ queues and the app's HTTP endpoints,
    and the WAL archive where point-in-time recovery is in use.

    Every check runs at once under a bounded timeout; a service that is down, refuses or hangs makes
    its check unhealthy with the (masked) error. The report is published as markdown and table
    artifacts; when not healthy, an event per failing check is emitted
    (``swagger2mcp-ops.health.unhealthy`` / ``.degraded``) for automations such as diagnose, and
    every run emits ``swagger2mcp-ops.health.checked`` with each check's status (health paging).
    The ``wal-archive`` check (only when the storage holds a base backup or WAL) is degraded at worst;
    when its RPO passes ``wal.rpo_warn_seconds``, ``swagger2mcp-ops.wal.rpo-exceeded`` is emitted
    once (and daily while it lasts) for DevOps.

    Args:
        fail_when_unhealthy: end the run Failed when the overall status is unhealthy (CI and the UI
            see it).
        fail_when_degraded: also end Failed when degraded.

    Returns:
        The report in the runbook's JSON shape (``status``, ``timestamp``, ``checks.*``).

    Raises:
        CheckFailed: the stack is unhealthy (or degraded, when asked), after the report is published.
    """
    settings = load_settings()
    logger = run_logger(__name__)
    names = list(health.all_checks(settings))
    futures = {name: run_check.submit(name, settings) for name in names}
    archive = run_wal_archive_check.submit(settings)
    results = {name: f.result() for name, f in futures.items()}
    wal = archive.result()
    if wal is not None:
        results[health.WAL_ARCHIVE_CHECK] = wal
    report = health.assemble_report(settings.stack, results)
    publish_report(report)
    if report.status is not Status.HEALTHY:
        emit_health_events(report)
    emit_checked_event(report)
    logger.info("health of %s: %s", report.stack, report.status.value)
    failing = report.status is Status.UNHEALTHY and fail_when_unhealthy
    failing = failing or (report.status is Status.DEGRADED and fail_when_degraded)
    if failing:
        summary = "; ".join(
            f"{name}: {report.checks[name].error or '; '.join(report.checks[name].warnings)}"
            for name in report.failed_checks
        )
        raise CheckFailed(f"{report.stack} is {report.status.value}: {summary}. Run the diagnose flow.")
    return report.as_runbook()


if __name__ == "__main__":
    import json

    print(json.dumps(health_check(fail_when_unhealthy=False), indent=2))
