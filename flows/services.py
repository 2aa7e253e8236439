"""Runbook: the restart resolutions of "Common Issues" ("docker compose restart backend worker" to reset
connections, "kubectl rollout restart deployment/..."), on whichever runtime the settings name.

The runtime tasks here are shared with the release flows (flows/releases.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks import releases, reports
from tasks.errors import CheckFailed, ParameterError
from tasks.health import HealthReport
from tasks.releases import Readiness
from tasks.runlog import run_logger
from tasks.runtime import ChangeRecord, Runtime, ServicesNotReady, ServiceStatus, get_runtime
from tasks.settings import OpsSettings, load_settings


@task(name="list-services", cache_policy=NO_CACHE)
def list_services(runtime: Runtime) -> list[ServiceStatus]:
    """Every service with image, replicas ready/desired and state."""
    return runtime.list_services()


@task(name="restart-services", cache_policy=NO_CACHE)
def restart(runtime: Runtime, services: list[str]) -> list[ChangeRecord]:
    """Restart the services (compose restart / rollout restart); one change record each."""
    return runtime.restart(services)


@task(name="wait-services-ready", cache_policy=NO_CACHE)
def wait_ready(runtime: Runtime, services: list[str], timeout_seconds: float) -> list[ServiceStatus]:
    """Wait until every service is ready; raises ServicesNotReady with what was seen at the timeout."""
    return runtime.wait_ready(services, timeout_seconds)


@task(name="verify-health", cache_policy=NO_CACHE)
def verify_health(
    settings: OpsSettings, scope: releases.VerificationScope, smoke_urls: list[str]
) -> HealthReport:
    """The health evidence (full health check, or the app's endpoints only) plus smoke URLs."""
    return releases.verification_report(settings, scope, smoke_urls)


def wait_until_ready(
    runtime: Runtime,
    settings: OpsSettings,
    services: list[str],
    timeout_seconds: float,
    scope: releases.VerificationScope,
    smoke_urls: list[str],
) -> Readiness:
    """Ready means answering: the runtime's own readiness first (Kubernetes rollout status, Docker
    healthchecks, a running container), then the health and smoke URLs polled until they pass, all
    within ``timeout_seconds``. Health failures at the timeout are returned (``failures``), not raised.

    Raises:
        ServicesNotReady: the runtime did not report the services ready in time.
    """
    started = time.monotonic()
    statuses = wait_ready(runtime, services, timeout_seconds)
    services_seconds = round(time.monotonic() - started, 2)
    health = releases.wait_verified_task(
        settings, scope, smoke_urls, max(timeout_seconds - services_seconds, 0.0)
    )
    return Readiness(statuses, services_seconds, health)


def readiness_lines(readiness: Readiness | None) -> list[str]:
    if readiness is None:
        return []
    return ["## Readiness", "", *readiness.lines(), ""]


def status_rows(statuses: Sequence[ServiceStatus]) -> list[list[Any]]:
    return [[s.name, s.image, f"{s.ready}/{s.desired}", s.state, s.started_at, s.revision] for s in statuses]


def status_table(statuses: Sequence[ServiceStatus]) -> str:
    return reports.markdown_table(
        ["service", "image", "ready", "state", "started / restarted", "revision"], status_rows(statuses)
    )


def change_lines(records: Sequence[ChangeRecord]) -> list[str]:
    lines = []
    for record in records:
        change = ", ".join(
            f"{key}: {record.before.get(key)} -> {record.after.get(key)}"
            for key in dict.fromkeys([*record.before, *record.after])
        )
        changed = "changed" if record.changed else "no change"
        lines.append(f"- **{record.operation} {record.target}** ({changed}): {change}")
        lines.extend(f"  - `{command}`" for command in record.commands)
    return lines


def health_lines(report: HealthReport | None) -> list[str]:
    if report is None:
        return ["Health was not checked."]
    rows = [
        [
            name,
            check.status.value,
            "" if check.latency is None else f"{check.latency} ms",
            check.error or "; ".join(check.warnings),
        ]
        for name, check in report.checks.items()
    ]
    if not rows:
        return [f"Health: **{report.status.value}** (no checks configured: set OPS_HEALTH__URLS)"]
    return [
        f"Health: **{report.status.value}** at {report.as_runbook()['timestamp']}",
        "",
        reports.markdown_table(["check", "status", "latency", "finding"], rows),
    ]


@flow(name="restart-services", log_prints=True)
def restart_services(
    services: list[str] | None = None,
    timeout_seconds: float | None = None,
    health_scope: Literal["full", "services"] = "services",
    smoke_urls: list[str] | None = None,
) -> dict[str, Any]:
    """Runbook "Common Issues" restart resolutions: restart services, wait until ready, check health.

    With no ``services`` it restarts the configured ones (backend and worker by default: the runbook's
    "restart backend to reset connections"). Compose: ``docker compose restart``; Kubernetes:
    ``rollout restart`` (a new ``restartedAt`` template annotation). Then it waits until every
    restarted service is ready (the runtime's readiness, then the health check polled until it
    passes, within ``timeout_seconds``); the report shows each service's start time (or restart
    annotation) before and after, and how long each wait took.

    Args:
        services: service names (Compose services / Deployments); default ``runtime.services``.
        timeout_seconds: how long to wait for readiness; default ``runtime.ready_timeout_seconds``.
        health_scope: ``services`` checks the app's HTTP endpoints only (``OPS_HEALTH__URLS``);
            ``full`` also PostgreSQL, Redis and the queues.
        smoke_urls: more URLs that must answer 2xx afterwards.

    Returns:
        Services restarted, their status after, the health report in the runbook's shape, and the
        readiness timings.

    Raises:
        ParameterError: no services, or a timeout that is not positive (before anything restarts).
        ServicesNotReady: a service did not become ready in time.
        CheckFailed: the health check after the restart failed.
    """
    settings = load_settings()
    logger = run_logger(__name__)
    names = list(services or settings.runtime.services)
    timeout = timeout_seconds if timeout_seconds is not None else settings.runtime.ready_timeout_seconds
    if not names:
        raise ParameterError("no services to restart: name them or set runtime.services")
    if timeout <= 0:
        raise ParameterError(f"timeout_seconds must be positive, not {timeout}")
    urls = list(smoke_urls or []) + list(settings.runtime.smoke_urls)
    runtime = get_runtime(settings)
    before: list[ServiceStatus] = []
    after: list[ServiceStatus] = []
    records: list[ChangeRecord] = []
    report: HealthReport | None = None
    readiness: Readiness | None = None
    outcome = "failed"
    problem = ""
    try:
        before = [s for s in list_services(runtime) if s.name in names]
        records = restart(runtime, names)
        try:
            readiness = wait_until_ready(runtime, settings, names, timeout, health_scope, urls)
        except ServicesNotReady as exc:
            after = exc.statuses
            raise
        after, report, failures = readiness.statuses, readiness.report, readiness.failures
        if failures:
            raise CheckFailed(
                f"restarted {', '.join(names)}, but the health check after it failed: {'; '.join(failures)}."
                " Run the diagnose flow."
            )
        outcome = "succeeded"
        logger.info("restarted %s; health %s", ", ".join(names), report.status.value if report else "?")
    except Exception as exc:
        problem = str(exc)
        raise
    finally:
        lines = [
            f"# Restart of {', '.join(names)} on {runtime.kind}: **{outcome}**",
            "",
            *([f"**Why:** {problem}", ""] if problem else []),
            "## Before",
            "",
            status_table(before),
            "",
            "## Changes",
            "",
            *(change_lines(records) or ["Nothing was restarted."]),
            "",
            "## After",
            "",
            status_table(after),
            "",
            *readiness_lines(readiness),
            *health_lines(report),
        ]
        reports.publish_markdown(
            f"restart-services-{settings.stack}",
            "\n".join(lines),
            f"Restart of {', '.join(names)}: {outcome}",
        )
    return {
        "services": names,
        "runtime": runtime.kind,
        "after": [{"name": s.name, "image": s.image, "ready": s.ready, "desired": s.desired} for s in after],
        "changes": [r.__dict__ | {"commands": list(r.commands)} for r in records],
        "health": report.as_runbook() if report else None,
        "readiness": readiness.as_dict() if readiness else None,
    }
