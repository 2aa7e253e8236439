"""Runbook: the restart resolutions of "Common Issues" ("docker compose restart backend worker" to reset
connections, "kubectl rollout restart deployment/..."), on whichever runtime the settings name.

The steps and report sections it shares with the release flows are in tasks/rollout.py.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow

from tasks import reports
from tasks.errors import CheckFailed, ParameterError
from tasks.health import HealthReport
from tasks.releases import Readiness
from tasks.rollout import (
    health_lines,
    list_services,
    restart,
    rollout_sections,
    wait_until_ready,
)
from tasks.runlog import run_logger
from tasks.runtime import ChangeRecord, ServicesNotReady, ServiceStatus, get_runtime
from tasks.settings import load_settings


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

    def publish(run: reports.RunOutcome) -> None:
        lines = [
            f"# Restart of {', '.join(names)} on {runtime.kind}: **{run.outcome}**",
            "",
            *([f"**Why:** {run.failure}", ""] if run.failure else []),
            *rollout_sections(
                before=before,
                records=records,
                after=after,
                readiness=readiness,
                nothing_changed="Nothing was restarted.",
            ),
            *health_lines(report),
        ]
        reports.publish_markdown(
            f"restart-services-{settings.stack}",
            "\n".join(lines),
            f"Restart of {', '.join(names)}: {run.outcome}",
        )

    with reports.publishing(reports.RunOutcome(), publish, settings) as run:
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
        run.outcome = "succeeded"
        logger.info("restarted %s; health %s", ", ".join(names), report.status.value if report else "?")
    return {
        "services": names,
        "runtime": runtime.kind,
        "after": [{"name": s.name, "image": s.image, "ready": s.ready, "desired": s.desired} for s in after],
        "changes": [r.__dict__ | {"commands": list(r.commands)} for r in records],
        "health": report.as_runbook() if report else None,
        "readiness": readiness.as_dict() if readiness else None,
    }
