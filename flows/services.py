"""Runbook: the restart resolutions of "Common Issues" ("docker compose restart backend worker" to reset
connections, "kubectl rollout restart deployment/..."), and "Performance Troubleshooting: High CPU
Usage: scale if the load is legitimate" ("kubectl scale deployment backend --replicas=3"), on
whichever runtime the settings name.

The steps and report sections they share with the release flows are in tasks/rollout.py; the scaling
plan, its bounds and the refusals in tasks/scaling.py.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from prefect import flow
from prefect.context import FlowRunContext

from tasks import approvals, locks, releases, reports, scaling
from tasks.errors import CheckFailed, ParameterError
from tasks.health import HealthReport
from tasks.releases import Readiness, ReleaseStore
from tasks.rollout import (
    health_lines,
    list_services,
    migration_revision,
    restart,
    rollout_sections,
    wait_until_ready,
)
from tasks.runlog import run_logger
from tasks.runtime import ChangeRecord, Runtime, ServicesNotReady, ServiceStatus, get_runtime
from tasks.scaling import ScaleStep
from tasks.settings import OpsSettings, load_settings


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


@dataclass
class ScaleReport:
    """What scale-services planned, who approved it, what changed and the evidence after."""

    environment: str
    runtime: str
    dry_run: bool
    outcome: str = "started"
    failure: str | None = None
    steps: list[ScaleStep] = field(default_factory=list)
    approval: str = ""
    before: list[ServiceStatus] = field(default_factory=list)
    records: list[ChangeRecord] = field(default_factory=list)
    after: list[ServiceStatus] = field(default_factory=list)
    readiness: Readiness | None = None
    still_running: list[str] = field(default_factory=list)
    release_id: str | None = None

    @property
    def report(self) -> HealthReport | None:
        return self.readiness.report if self.readiness else None

    def plan_lines(self) -> list[str]:
        return [f"- {step.describe()}" for step in self.steps] or ["No plan was made."]

    def undo(self) -> str:
        """The parameter that puts the counts back as they were."""
        back = ", ".join(f'"{s.service}": {s.current}' for s in self.steps if s.changes)
        return f"scale-services -p replicas='{{{back}}}' -p dry_run=false"

    def markdown(self) -> str:
        changed = [s for s in self.steps if s.changes]
        lines = [
            f"# Scale services of {self.environment} on {self.runtime}: **{self.outcome}**",
            "",
            *([f"**Why:** {self.failure}", ""] if self.failure else []),
            "## Plan",
            "",
            *self.plan_lines(),
            "",
        ]
        if self.dry_run:
            lines += [
                "Dry run: nothing was changed. Run with `dry_run=false` to apply; a change outside the"
                " bounds (`OPS_SCALING__BOUNDS`) or to 0 asks for approval first.",
                "",
            ]
        if self.approval:
            lines += [f"**Approval:** {self.approval}", ""]
        if self.records:
            lines += [f"Undo: `{self.undo()}`", ""]
        if self.still_running:
            lines += [f"Still running after the timeout: {', '.join(self.still_running)}", ""]
        if self.release_id:
            lines += [
                f"Recorded in the release history as {self.release_id}: a rollback keeps these counts.",
                "",
            ]
        if not self.dry_run or self.records:
            lines += rollout_sections(
                before=self.before,
                records=self.records,
                after=self.after,
                readiness=self.readiness,
                nothing_changed="No service was scaled." if changed else "Nothing to change.",
            )
            lines += health_lines(self.report)
        return "\n".join(lines)

    def as_result(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "runtime": self.runtime,
            "dry_run": self.dry_run,
            "outcome": self.outcome,
            "plan": [
                {
                    "service": s.service,
                    "current": s.current,
                    "target": s.target,
                    "approval": s.approval,
                    "bounds": None if s.bounds is None else {"min": s.bounds.min, "max": s.bounds.max},
                }
                for s in self.steps
            ],
            "approval": self.approval or None,
            "changes": [r.__dict__ | {"commands": list(r.commands)} for r in self.records],
            "after": [{"name": s.name, "desired": s.desired, "ready": s.ready} for s in self.after],
            "health": self.report.as_runbook() if self.report else None,
            "readiness": self.readiness.as_dict() if self.readiness else None,
            "release_id": self.release_id,
        }


def _publish_scale_report(key: str, report: ScaleReport) -> None:
    reports.publish_markdown(key, report.markdown(), f"Scale services: {report.outcome}")


def _record_scale(
    settings: OpsSettings, store: ReleaseStore, report: ScaleReport, statuses: list[ServiceStatus], ok: bool
) -> None:
    """Append the new counts to the release history (what ran, with which images and counts)."""
    revision = migration_revision(settings)
    context = FlowRunContext.get()
    record = store.record(
        kind="scale",
        status="succeeded" if ok else "failed",
        images={s.name: s.image for s in statuses if s.image},
        replicas={s.name: s.desired for s in statuses if s.state != "missing"},
        migration_revision=revision.revision,
        migration_note=revision.source,
        runtime=report.runtime,
        flow_run_id=str(context.flow_run.id) if context and context.flow_run else None,
        note="scale "
        + "; ".join(f"{s.service} {s.current} -> {s.target}" for s in report.steps if s.changes),
    )
    report.release_id = record.id


@flow(name="scale-services", log_prints=True)
def scale_services(
    replicas: dict[str, int],
    dry_run: bool = True,
    approved: bool = False,
    environment: str | None = None,
    timeout_seconds: float | None = None,
    health_scope: Literal["full", "services"] = "services",
    smoke_urls: list[str] | None = None,
    approval_timeout_seconds: float | None = None,
) -> dict[str, Any]:
    """Runbook "Performance Troubleshooting: High CPU Usage": scale if the load is legitimate.

    1. Plan: each named service from the replicas it runs now to the requested count, against its
       bounds (``OPS_SCALING__BOUNDS``). A count that the service's definition cannot run (a fixed
       host port or container_name on Compose) is refused here, before anything changes.
    2. Dry run (the default): publish the plan and stop.
    3. Approval: a count within the service's bounds needs none; a count outside them, 0, or a
       service without bounds waits for the approval form (or ``approved=true``, refused where
       pre-approval is not allowed, by default in production).
    4. Apply under the environment's lock (the one deploy-release and rollback-release take):
       Kubernetes through the Deployment's scale subresource, Compose with
       ``docker compose up --scale SERVICE=N --no-recreate`` (running containers are kept).
    5. Wait: scaled-up services ready (the runtime's readiness), services scaled to 0 gone, then the
       health check polled until it passes, all within ``timeout_seconds``.
    6. Record the new counts in the release history: deploys and rollbacks keep the counts (on
       Kubernetes an image change never touches ``replicas``; on Compose each ``up`` is given the
       running count), and the rollback report shows them.

    Args:
        replicas: service -> replica count, e.g. ``{"backend": 3}``.
        dry_run: only plan and report (default).
        approved: pre-approve a change that needs approval (CI, staging).
        environment: must equal ``runtime.environment`` when given (a guard against the wrong stack).
        timeout_seconds: how long to wait for readiness and health; default
            ``runtime.ready_timeout_seconds``.
        health_scope: ``services`` checks the app's HTTP endpoints only; ``full`` also PostgreSQL,
            Redis and the queues.
        smoke_urls: more URLs that must answer 2xx afterwards.
        approval_timeout_seconds: how long the approval form waits; default
            ``scaling.approval_timeout_seconds``.

    Returns:
        The plan (with bounds and why approval was needed), the approval, the changes with the
        commands run, the services after, the health report and the release record's id.

    Raises:
        ParameterError: bad input (no or negative counts, an unknown service, another environment),
            or ``approved`` where pre-approval is not allowed; nothing was changed.
        ScalingRefused: a count the service cannot run (fixed host port, container_name); nothing
            was changed.
        ApprovalRejected: the approval was refused or timed out; nothing was changed.
        LockBusy: a deploy, rollback or scaling of the environment runs (it is named); nothing was
            changed.
        CheckFailed: the services are not ready or not healthy after scaling (the report gives the
            parameters that undo it).
    """
    settings = load_settings()
    logger = run_logger(__name__)
    env = environment or settings.runtime.environment
    if env != settings.runtime.environment:
        raise ParameterError(
            f"environment {env!r} does not match these settings (runtime.environment ="
            f" {settings.runtime.environment!r}). Nothing was changed."
        )
    timeout = timeout_seconds if timeout_seconds is not None else settings.runtime.ready_timeout_seconds
    if timeout <= 0:
        raise ParameterError(f"timeout_seconds must be positive, not {timeout}")
    approval_timeout = approval_timeout_seconds or settings.scaling.approval_timeout_seconds
    urls = list(smoke_urls or []) + list(settings.runtime.smoke_urls)
    runtime = get_runtime(settings)
    report = ScaleReport(env, runtime.kind, dry_run)
    publish = functools.partial(_publish_scale_report, f"scale-services-{settings.stack}")
    with reports.publishing(report, publish, settings):
        lock = (
            contextlib.nullcontext()
            if dry_run
            else locks.exclusive(
                settings,
                locks.release_lock_name(settings, env),
                operation="scale-services",
                what=f"a deploy, rollback or scaling of {env}",
            )
        )
        with lock:
            statuses = list_services(runtime)
            report.before = [s for s in statuses if s.name in replicas]
            report.steps = scaling.plan_scale_task(statuses, replicas, settings.scaling.bounds)
            scaling.check_replicas_possible_task(runtime, report.steps)
            changing = [s for s in report.steps if s.changes]
            if not changing:
                report.outcome = "nothing to do"
                return report.as_result()
            if dry_run:
                report.outcome = "dry run"
                return report.as_result()
            gated = [s for s in changing if s.approval]
            if gated:
                approval, _ = approvals.request_approval(
                    settings,
                    approved=approved,
                    action=f"scale {', '.join(f'{s.service} to {s.target}' for s in changing)} in {env}",
                    plan_markdown="\n".join([f"# Scale services of {env}", "", *report.plan_lines()]),
                    timeout_seconds=math.ceil(approval_timeout),
                )
                report.approval = approval.describe()
            else:
                report.approval = "not needed: every change is within the service's bounds"
            store = ReleaseStore.from_settings(settings, env)
            healthy = False
            try:
                report.records = scaling.scale_services_task(runtime, {s.service: s.target for s in changing})
                report.readiness, report.still_running = _wait_scaled(
                    runtime, settings, changing, timeout, health_scope, urls, report
                )
                failures = report.readiness.failures
                if report.still_running:
                    failures = [f"still running: {', '.join(report.still_running)}", *failures]
                if failures:
                    raise CheckFailed(
                        f"scaled, but {'; '.join(failures)}. Run diagnose; to undo: {report.undo()}"
                    )
                healthy = True
            finally:
                if report.records:
                    report.after = [s for s in list_services(runtime) if s.name in replicas]
                    _record_scale(settings, store, report, list_services(runtime), healthy)
            report.outcome = "succeeded"
            logger.info("scaled %s", "; ".join(s.describe() for s in changing))
            return report.as_result()


def _wait_scaled(
    runtime: Runtime,
    settings: OpsSettings,
    steps: list[ScaleStep],
    timeout: float,
    scope: releases.VerificationScope,
    urls: list[str],
    report: ScaleReport,
) -> tuple[Readiness, list[str]]:
    """Services scaled up or down ready, services scaled to 0 gone, then health, within ``timeout``.

    Raises:
        CheckFailed: a service did not become ready in time (what was seen is kept in the report).
    """
    started = time.monotonic()
    up = [s.service for s in steps if s.target > 0]
    down = [s.service for s in steps if s.target == 0]
    try:
        statuses = scaling.wait_services_ready_task(runtime, up, timeout)
    except ServicesNotReady as exc:
        report.after = exc.statuses
        raise CheckFailed(f"scaled, but not ready: {exc}. To undo: {report.undo()}") from exc
    still = scaling.wait_scaled_down_task(runtime, down, timeout) if down else []
    seconds = round(time.monotonic() - started, 2)
    health = releases.wait_verified_task(settings, scope, urls, max(timeout - seconds, 0.0))
    return Readiness(statuses, seconds, health), still
