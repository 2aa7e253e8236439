"""Rolling the app's services: the steps deploy-release, rollback-release and restart-services share.

Each step is a plain function over the :class:`~tasks.runtime.Runtime` protocol wrapped once as a
task, plus the report sections the three flows render (services, changes, readiness, health), so a
release report and a restart report read the same.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from tasks import releases, reports
from tasks.health import HealthReport
from tasks.ops_task import ops_task
from tasks.releases import MigrationRevision, Readiness, RollbackStep, read_migration_revision
from tasks.runtime import ChangeRecord, Revision, Runtime, ServiceStatus
from tasks.settings import OpsSettings


def _list_services(runtime: Runtime) -> list[ServiceStatus]:
    """Every service with image, replicas ready/desired and state."""
    return runtime.list_services()


def _restart(runtime: Runtime, services: Sequence[str]) -> list[ChangeRecord]:
    """Restart the services (compose restart / rollout restart); one change record each."""
    return runtime.restart(list(services))


def _wait_ready(runtime: Runtime, services: list[str], timeout_seconds: float) -> list[ServiceStatus]:
    """Wait until every service is ready; raises ServicesNotReady with what was seen at the timeout."""
    return runtime.wait_ready(services, timeout_seconds)


def _verify_health(
    settings: OpsSettings, scope: releases.VerificationScope, smoke_urls: list[str]
) -> HealthReport:
    """The health evidence (full health check, or the app's endpoints only) plus smoke URLs."""
    return releases.verification_report(settings, scope, smoke_urls)


def _migration_revision(settings: OpsSettings) -> MigrationRevision:
    """The database's applied migration revision now (None when there is none or it is unreachable)."""
    return read_migration_revision(settings.postgres, settings.runtime.migration_query)


def _set_images(runtime: Runtime, images: dict[str, str]) -> list[ChangeRecord]:
    """Set each service's image (unchanged services are left alone)."""
    return runtime.set_images(images)


def _histories(runtime: Runtime, services: Sequence[str]) -> dict[str, list[Revision]]:
    """Each service's rollout history (ReplicaSet revisions, or recorded releases on Compose)."""
    return {service: runtime.history(service) for service in services}


def _apply_rollback(runtime: Runtime, steps: list[RollbackStep]) -> list[ChangeRecord]:
    """Apply a rollback plan: undo to the kept revision where there is one, else set the image."""
    records = []
    for step in steps:
        if step.method == "revision":
            records.append(runtime.rollback(step.service, step.revision))
        elif step.method == "image":
            records.extend(runtime.set_images({step.service: step.to_image}))
    return records


list_services = ops_task(_list_services, name="list-services", retries=1)
restart = ops_task(_restart, name="restart-services")
wait_ready = ops_task(_wait_ready, name="wait-services-ready")
verify_health = ops_task(_verify_health, name="verify-health")
migration_revision = ops_task(
    _migration_revision, name="read-migration-revision", retries=1, retry_delay_seconds=2
)
set_images = ops_task(_set_images, name="set-images")
histories = ops_task(_histories, name="service-history")
apply_rollback = ops_task(_apply_rollback, name="apply-rollback")


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


def rollout_sections(
    *,
    before: Sequence[ServiceStatus] | None,
    records: Sequence[ChangeRecord],
    after: Sequence[ServiceStatus],
    readiness: Readiness | None,
    nothing_changed: str = "No service was changed.",
) -> list[str]:
    """The sections every deploy, rollback and restart report has, in one order: the services before
    (when known), the changes with the commands run, the services after, and the readiness waits."""
    lines = ["## Before", "", status_table(before), ""] if before is not None else []
    return [
        *lines,
        "## Changes",
        "",
        *(change_lines(records) or [nothing_changed]),
        "",
        "## After",
        "",
        status_table(after),
        "",
        *readiness_lines(readiness),
    ]
