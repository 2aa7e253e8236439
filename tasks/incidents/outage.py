"""The steps of outage-triage (runbook "Total Service Outage"), so that the flow reads as their
sequence: assess, recent changes and the proposal, offer the rollback.

:class:`Triage` holds what one run found; its report can be rendered at any moment (the proposal while
the approval waits, everything at the end, a failure in between). rollback-release is a flow: the flow
module runs it as a subflow and hands the call to :func:`offer_rollback`. The plain functions (recent
changes, the proposal) are in :mod:`tasks.incidents.triage`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tasks import approvals, releases, reports
from tasks.errors import ApprovalRejected, ParameterError
from tasks.health import HealthReport, Status
from tasks.incidents.prefect_tasks import health_report_task, service_histories_task, service_statuses_task
from tasks.incidents.reports import _failure_line, render_triage
from tasks.incidents.steps import approval_timeout
from tasks.incidents.triage import (
    RecentChange,
    RollbackProposal,
    propose_rollback,
    recent_changes,
    recent_migration_runs,
)
from tasks.reports import RunOutcome
from tasks.runlog import run_logger
from tasks.runtime import Revision, Runtime, ServiceStatus
from tasks.secrets import safe_error
from tasks.settings import OpsSettings


@dataclass
class Triage:
    """One outage-triage run: its parameters, and what it found so far."""

    settings: OpsSettings
    window: timedelta
    timeout: int
    propose_when_healthy: bool
    statuses: list[ServiceStatus] = field(default_factory=list)
    histories: dict[str, list[Revision]] = field(default_factory=dict)
    runtime_error: str | None = None
    report: HealthReport | None = None
    changes: list[RecentChange] = field(default_factory=list)
    migration: releases.MigrationRevision | None = None
    proposal: RollbackProposal | None = None
    rollback: Any = None
    approval: str = ""

    @property
    def key(self) -> str:
        return f"outage-triage-{self.settings.stack}"

    @property
    def healthy(self) -> bool:
        """Every check passes, every service is healthy and the runtime answered."""
        report = self.report
        return (
            report is not None
            and report.status is Status.HEALTHY
            and all(s.healthy for s in self.statuses)
            and not self.runtime_error
        )

    def markdown(self, outcome: str) -> str:
        """The triage as it stands: services, checks, recent changes, the proposal and its fate."""
        return render_triage(
            self.settings.stack,
            outcome,
            self.statuses,
            self.runtime_error,
            self.report,
            self.changes,
            self.migration,
            self.window,
            self.proposal,
            self.rollback,
            self.approval,
        )

    def publish(self, run: RunOutcome) -> None:
        """The report and the recent changes, also when the run fails."""
        markdown = self.markdown(run.outcome) + "\n".join(_failure_line(run))
        reports.publish_markdown(self.key, markdown, f"Outage triage of {self.settings.stack}: {run.outcome}")
        if self.changes:
            reports.publish_table(f"{self.key}-changes", [c.as_row() for c in self.changes], "Recent changes")

    def result(self, outcome: str) -> dict[str, Any]:
        """What the flow returns at the end."""
        assert self.report is not None
        proposal, rollback = self.proposal, self.rollback
        return {
            "outcome": outcome,
            "health": self.report.status.value,
            "services": [
                {"name": s.name, "image": s.image, "ready": s.ready, "desired": s.desired, "state": s.state}
                for s in self.statuses
            ],
            "runtime_error": self.runtime_error,
            "recent_changes": [c.as_row() for c in self.changes],
            "proposal": None
            if proposal is None
            else {
                "reason": proposal.reason,
                "target_release": proposal.target_release,
                "target_images": proposal.target_images,
            },
            "rollback": rollback if isinstance(rollback, dict | None) else str(rollback),
            "approval": self.approval or None,
        }


def start(
    settings: OpsSettings,
    *,
    approved: bool,
    window_hours: float | None,
    approval_timeout_seconds: int | None,
    propose_when_healthy: bool,
) -> Triage:
    """Check the parameters (before any side effect) and set up the run's record.

    Raises:
        ParameterError: ``approved`` where pre-approval is not allowed, a window or a timeout that is not
            positive.
    """
    approvals.check_preapproval(settings, approved)
    if window_hours is not None and window_hours <= 0:
        raise ParameterError("window_hours must be positive")
    return Triage(
        settings=settings,
        timeout=approval_timeout(settings, approval_timeout_seconds),
        window=timedelta(hours=window_hours or settings.incidents.release_window_hours),
        propose_when_healthy=propose_when_healthy,
    )


def assess(tri: Triage, runtime: Runtime) -> None:
    """Step 1: every service's status and rollout history (an unreachable runtime is a finding), and
    every health check."""
    try:
        tri.statuses = service_statuses_task(runtime)
        tri.histories = service_histories_task(runtime, [s.name for s in tri.statuses])
    except Exception as exc:
        # An unreachable runtime is itself a finding of the triage, not the end of it.
        tri.runtime_error = safe_error(exc, tri.settings)
        tri.histories = {}
    tri.report = health_report_task(tri.settings)


def review_changes(tri: Triage) -> RollbackProposal | None:
    """Step 2: what changed within the window (releases, rollout revisions, migration runs, the
    database's migration revision), and the rollback proposal (None: nothing to roll back)."""
    settings = tri.settings
    store = releases.ReleaseStore.from_settings(settings)
    records = store.all()
    tri.migration = releases.read_migration_revision(settings.postgres, settings.runtime.migration_query)
    try:
        runs = recent_migration_runs(settings, window=tri.window)
    except Exception as exc:
        run_logger(__name__).warning("migration runs not read: %s", safe_error(exc, settings))
        runs = []
    tri.changes = recent_changes(records, tri.histories, runs, window=tri.window, now=datetime.now(UTC))
    current = {s.name: s.image for s in tri.statuses if s.image}
    tri.proposal = propose_rollback(
        tri.changes,
        healthy=tri.healthy,
        services=tri.statuses,
        previous_good=store.previous_good(current) if current else store.latest_good(),
        propose_when_healthy=tri.propose_when_healthy,
    )
    return tri.proposal


def offer_rollback(
    tri: Triage,
    run: RunOutcome,
    *,
    approved: bool,
    start_rollback: Callable[[RollbackProposal], Any],
) -> None:
    """Step 3: the proposal published, an approval (form or ``approved``), then
    ``start_rollback(proposal)`` (rollback-release as a subflow). A rejection ends the triage as
    ``rollback-declined``, not as a failure."""
    proposal = tri.proposal
    assert proposal is not None
    run.outcome = "rollback proposed"
    reports.publish_markdown(
        tri.key, tri.markdown("rollback proposed, waiting for approval"), "Outage triage: rollback proposed"
    )
    try:
        record, _ = approvals.request_approval(
            tri.settings,
            approved=approved,
            action=f"roll back to release {proposal.target_release}",
            plan_markdown=proposal.describe(),
            timeout_seconds=tri.timeout,
        )
    except ApprovalRejected as exc:
        # The triage itself is done; only the rollback was not applied.
        run.outcome = "rollback-declined"
        tri.approval = str(exc)
        run_logger(__name__).info("rollback not started: %s", exc)
    else:
        tri.approval = record.describe()
        run.outcome = "rollback failed"  # until the subflow returns
        tri.rollback = start_rollback(proposal)
        run.outcome = "rolled-back"
