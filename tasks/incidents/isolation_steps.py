"""The isolation steps of security-incident and end-isolation, as the flows run them.

security-incident plans the isolation from what runs now (the dry run of the one isolating function)
and applies it after the approval, each a timed step; end-isolation reads the record, puts back what
it holds after its own approval, waits for what starts again and checks health. :class:`IsolationEnding`
holds what one end-isolation run found and did; its report can be rendered at any moment.

The isolating and restoring themselves (the record written before anything changes) are in
:mod:`tasks.incidents.isolation`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks import approvals, locks, reports, scaling
from tasks.errors import CheckFailed
from tasks.health import HealthReport, Status
from tasks.incidents.isolation import IsolationEnd, IsolationRecord, isolation_path
from tasks.incidents.prefect_tasks import end_isolation_task, health_report_task, isolate_systems_task
from tasks.incidents.reports import _failure_line, render_end_isolation
from tasks.incidents.steps import StepLog, approval_timeout
from tasks.reports import RunOutcome
from tasks.runtime import Runtime
from tasks.settings import OpsSettings


def isolation_lock(settings: OpsSettings, operation: str) -> contextlib.AbstractContextManager[object]:
    """The stack's isolation lock, on every worker: isolating it and ending its isolation never overlap
    (the second run waits, then refuses naming the first)."""
    return locks.exclusive(
        settings,
        locks.isolation_lock_name(settings),
        operation=operation,
        what=f"an isolation of {settings.stack}",
    )


# --- security-incident ----------------------------------------------------------------------------


def plan_isolation(
    steps: StepLog, settings: OpsSettings, runtime: Runtime, services: Sequence[str] | None, *, evidence: str
) -> IsolationRecord:
    """The step "plan isolation": what isolating would change now, nothing changed or recorded."""
    with steps.step("plan isolation") as step:
        # The dry run of the one isolating function: the exact plan, from what runs now.
        isolation = isolate_systems_task(settings, runtime, services, confirm=False, evidence=evidence)
        step.detail = f"{len(isolation.plan.actions)} change(s)" + (
            "; already in force" if isolation.already_in_force else ""
        )
    return isolation


def isolate(
    steps: StepLog,
    settings: OpsSettings,
    runtime: Runtime,
    services: Sequence[str] | None,
    *,
    approval: str,
    evidence: str,
) -> IsolationRecord:
    """The step "isolate: block external traffic", after the approval: recorded, then applied.

    Raises:
        IsolationInForce: an isolation is recorded and the runtime no longer matches it.
        RuntimeOperationFailed: the isolation did not take effect (its record stays: run end-isolation).
    """
    with steps.step("isolate: block external traffic") as step:
        isolation = isolate_systems_task(
            settings, runtime, services, confirm=True, approval=approval, evidence=evidence
        )
        step.detail = (
            "already in force"
            if isolation.already_in_force
            else ", ".join(c.target for c in isolation.changes if c.changed) or "nothing to change"
        )
    return isolation


def isolation_result(isolation: IsolationRecord | None, settings: OpsSettings) -> dict[str, Any] | None:
    """The isolation as security-incident returns it."""
    if isolation is None:
        return None
    return {
        "dry_run": isolation.dry_run,
        "already_in_force": isolation.already_in_force,
        "actions": list(isolation.plan.actions),
        "undo": list(isolation.plan.undo),
        "changes": [{"target": c.target, "changed": c.changed} for c in isolation.changes],
        "record": None if isolation.dry_run else str(isolation_path(settings)),
    }


# --- end-isolation --------------------------------------------------------------------------------


@dataclass
class IsolationEnding:
    """One end-isolation run: its settings, and what it read and put back so far."""

    settings: OpsSettings
    timeout: int
    end: IsolationEnd | None = None
    report: HealthReport | None = None
    approval: str = ""

    @property
    def key(self) -> str:
        return f"end-isolation-{self.settings.stack}"

    @property
    def path(self) -> Path:
        return isolation_path(self.settings)

    def markdown(self, outcome: str) -> str:
        """The report as it stands (what would be put back before the approval; everything at the end)."""
        return render_end_isolation(
            self.settings.stack, outcome, self.end, self.report, self.approval, str(self.path)
        )

    def publish(self, run: RunOutcome) -> None:
        """The report, also when the run fails."""
        reports.publish_markdown(
            self.key,
            self.markdown(run.outcome) + "\n".join(_failure_line(run)),
            f"End of isolation: {run.outcome}",
        )

    def result(self, outcome: str) -> dict[str, Any]:
        """What the flow returns at the end."""
        assert self.end is not None
        record = self.end.record
        return {
            "outcome": outcome,
            "record": str(self.path),
            "isolated_at": record.isolated_at.isoformat(),
            "isolated_by": record.approval,
            "isolated_in_run": record.flow_run,
            "evidence": record.evidence,
            "undo": list(record.plan.undo),
            "changes": [
                {"target": c.target, "changed": c.changed, "before": c.before, "after": c.after}
                for c in self.end.changes
            ],
            "archived": None if self.end.archived is None else str(self.end.archived),
            "health": None if self.report is None else self.report.status.value,
            "approval": self.approval or None,
        }


def start_ending(
    settings: OpsSettings, *, approved: bool, approval_timeout_seconds: int | None
) -> IsolationEnding:
    """Check the parameters (before any side effect) and set up the run's record.

    Raises:
        ParameterError: ``approved`` where pre-approval is not allowed, or a bad timeout.
    """
    approvals.check_preapproval(settings, approved)
    return IsolationEnding(settings=settings, timeout=approval_timeout(settings, approval_timeout_seconds))


def read_record(ending: IsolationEnding, runtime: Runtime) -> IsolationEnd:
    """Step 1: the isolation record, and what putting it back would do (nothing changed).

    Raises:
        IsolationNotRecorded: no isolation is recorded for the stack and environment.
    """
    ending.end = end_isolation_task(ending.settings, runtime, confirm=False)
    return ending.end


def approve_ending(ending: IsolationEnding, run: RunOutcome, *, approved: bool) -> None:
    """Step 3: the approval (form or ``approved``) of putting back what the record holds.

    Raises:
        ApprovalRejected: rejected or timed out; nothing changed.
    """
    assert ending.end is not None
    record = ending.end.record
    if not approved:
        run.outcome = "waiting for approval"
        reports.publish_markdown(
            ending.key, ending.markdown(run.outcome), "End of isolation: waiting for approval"
        )
    ending.approval = approvals.request_approval(
        ending.settings,
        approved=approved,
        action=f"end the isolation of {ending.settings.stack} and put back what it recorded",
        plan_markdown=f"{record.describe()}\n\nPut back:\n" + "\n".join(f"- {u}" for u in record.plan.undo),
        timeout_seconds=ending.timeout,
    )[0].describe()


def put_back(ending: IsolationEnding, runtime: Runtime, run: RunOutcome) -> None:
    """Step 3, applied: the recorded state put back (the record moves to ``isolation/ended/``), and the
    services the isolation stopped waited ready.

    Raises:
        RuntimeOperationFailed: the recorded state could not be put back (the record stays in force).
    """
    ending.end = end_isolation_task(ending.settings, runtime, confirm=True, approval=ending.approval)
    run.outcome = "isolation ended"
    plan = ending.end.record.plan
    started = [s for s in plan.stopped_services if s in (plan.state.get("running") or {})]
    if started:
        scaling.wait_services_ready_task(runtime, started, ending.settings.runtime.ready_timeout_seconds)


def check_health_after(ending: IsolationEnding, run: RunOutcome) -> None:
    """Step 4: the health check.

    Raises:
        CheckFailed: the stack is unhealthy (the isolation is ended all the same).
    """
    ending.report = health_report_task(ending.settings)
    if ending.report.status is Status.UNHEALTHY:
        run.outcome = "isolation ended, but unhealthy"
        raise CheckFailed(
            f"{ending.settings.stack} is unhealthy after the isolation ended: "
            + ", ".join(ending.report.failed_checks)
            + ". Run diagnose"
        )
