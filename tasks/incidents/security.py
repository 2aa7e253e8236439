"""The steps of security-incident (runbook "Security Incident"), so that the flow reads as their
sequence: evidence (always, first), plan, locks, approval, isolate, rotate and restart, patch and
redeploy.

:class:`SecurityIncident` holds what one run found and did; its report can be rendered at any moment
(the plan while the approval waits, everything at the end, a failure in between). The isolation steps
are in :mod:`tasks.incidents.isolation_steps`. update-dependencies is a flow: the flow module runs it
as a subflow and hands the call to :func:`patch_and_redeploy`, which records its runs and outcome.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tasks import approvals, locks, reports, scaling
from tasks.errors import CheckFailed, ParameterError
from tasks.health import HealthReport, Status
from tasks.incidents import isolation_steps
from tasks.incidents.evidence import EvidenceBundle, EvidenceTampered, EvidenceVerification
from tasks.incidents.isolation import IsolationRecord
from tasks.incidents.prefect_tasks import (
    collect_evidence_task,
    health_report_task,
    plan_isolation_task,
    plan_rotation_task,
    restart_for_new_config_task,
    rotate_secrets_task,
    verify_evidence_task,
)
from tasks.incidents.reports import LinkedRun, PatchStep, _failure_line, render_security
from tasks.incidents.rotation import RotationPlan, RotationRecord, RotationRefused
from tasks.incidents.steps import StepLog, approval_timeout
from tasks.reports import RunOutcome
from tasks.runlog import run_logger
from tasks.runtime import Runtime, RuntimeUnavailable
from tasks.secrets import configured_secrets, mask_text, safe_error
from tasks.settings import OpsSettings

if TYPE_CHECKING:
    from prefect.client.schemas.objects import State

STAGING = "staging"


@dataclass
class SecurityIncident:
    """One security-incident run: its parameters, and what it found and did so far."""

    settings: OpsSettings
    timeout: int
    rotate: list[str] | None
    restart: bool
    isolate: bool
    isolate_services: list[str] | None
    steps: StepLog
    patch: PatchStep | None = None
    bundle: EvidenceBundle | None = None
    verification: EvidenceVerification | None = None
    plan: RotationPlan | None = None
    record: RotationRecord | None = None
    report: HealthReport | None = None
    isolation: IsolationRecord | None = None
    approval: str = ""
    # What was done so far, in order: the outcome of a run that acted.
    done: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"security-incident-{self.settings.stack}"

    @property
    def rotating(self) -> bool:
        return self.plan is not None and not self.plan.empty

    @property
    def acting(self) -> bool:
        """Whether a confirmed run has anything to change (isolate, rotate or patch)."""
        return self.rotating or self.isolate or self.patch is not None

    def did(self, run: RunOutcome, what: str) -> None:
        self.done.append(what)
        run.outcome = "; ".join(self.done)

    def markdown(self, outcome: str) -> str:
        """The incident response as it stands; secrets appear only as names and fingerprints."""
        return render_security(
            self.settings.stack,
            outcome,
            self.steps,
            self.bundle,
            self.verification,
            self.plan,
            self.record,
            self.report,
            self.approval,
            isolation=self.isolation,
            isolate=self.isolate,
            patch=self.patch,
        )

    def publish(self, run: RunOutcome) -> None:
        """The report, the steps table and the rotated secrets (names, fingerprints), also on failure."""
        markdown = self.markdown(run.outcome) + "\n".join(_failure_line(run))
        reports.publish_markdown(
            self.key, markdown, f"Security incident on {self.settings.stack}: {run.outcome}"
        )
        reports.publish_table(f"{self.key}-steps", self.steps.rows(), "Each step with its timing")
        if self.record is not None and self.record.secrets:
            reports.publish_table(
                f"{self.key}-secrets",
                [s.as_row() for s in self.record.secrets],
                "Secrets: names and fingerprints only",
            )

    def result(self, outcome: str) -> dict[str, Any]:
        """What the flow returns at the end."""
        bundle, verification, plan, patch = self.bundle, self.verification, self.plan, self.patch
        assert bundle is not None
        assert verification is not None
        assert plan is not None
        return {
            "outcome": outcome,
            "approval": self.approval or None,
            "evidence": {
                "location": bundle.location,
                "prefix": bundle.prefix,
                "bundle_id": bundle.manifest.bundle_id,
                "manifest_sha256": bundle.manifest_sha256,
                "files": [f.path for f in bundle.manifest.files],
                "errors": bundle.manifest.errors,
                "verified": verification.ok,
            },
            "isolation": isolation_steps.isolation_result(self.isolation, self.settings),
            "rotation": None
            if self.record is None
            else {
                "dry_run": self.record.dry_run,
                "secrets": [s.as_row() for s in self.record.secrets],
            },
            "problems": list(plan.problems),
            "health": None if self.report is None else self.report.status.value,
            "patch": None
            if patch is None
            else {
                "planned_only": patch.planned_only,
                "deploy_to_staging": patch.deploy_to_staging,
                "runs": [{"flow": r.flow, "id": r.id, "state": r.state, "url": r.url} for r in patch.runs],
                "summary": patch.summary,
            },
            "steps": self.steps.rows(),
        }


def start(
    settings: OpsSettings,
    *,
    approved: bool,
    rotate: list[str] | None,
    restart: bool,
    approval_timeout_seconds: int | None,
    isolate: bool,
    isolate_services: list[str] | None,
    patch_and_redeploy: bool,
) -> SecurityIncident:
    """Check the parameters (before any side effect, the evidence too) and set up the run's record.

    Raises:
        ParameterError: ``approved`` where pre-approval is not allowed, a bad timeout, or
            ``isolate_services`` without ``isolate``.
    """
    approvals.check_preapproval(settings, approved)
    timeout = approval_timeout(settings, approval_timeout_seconds)
    if isolate_services is not None and not isolate:
        raise ParameterError("isolate_services names what isolate=true cuts off; pass isolate=true too")
    patch = None
    if patch_and_redeploy:
        points_at_staging = settings.runtime.kind != "none" and settings.runtime.environment == STAGING
        patch = PatchStep(deploy_to_staging=points_at_staging, planned_only=True)
    return SecurityIncident(
        settings=settings,
        timeout=timeout,
        rotate=rotate,
        restart=restart,
        isolate=isolate,
        isolate_services=isolate_services,
        steps=StepLog(secrets=configured_secrets(settings)),
        patch=patch,
    )


def collect_evidence(inc: SecurityIncident, runtime: Runtime) -> None:
    """Step 1: the evidence bundle, written and verified before anything changes.

    Raises:
        RuntimeOperationFailed / RuntimeUnavailable: a service to isolate does not exist, or there is
            no runtime to isolate on (checked first, read-only).
        EvidenceTampered: the bundle did not verify right after it was written.
    """
    if inc.isolate:
        # Read-only, before the evidence: an unknown service or no runtime to isolate on fails here.
        plan_isolation_task(runtime, inc.isolate_services)
    with inc.steps.step("collect evidence") as step:
        inc.bundle = collect_evidence_task(inc.settings, runtime)
        step.detail = f"{inc.bundle.prefix}: {len(inc.bundle.manifest.files)} files"
    with inc.steps.step("verify evidence bundle") as step:
        inc.verification = verify_evidence_task(inc.settings, inc.bundle)
        step.detail = inc.verification.summary()
        if not inc.verification.ok:
            raise EvidenceTampered(inc.verification.summary())


def plan(inc: SecurityIncident, runtime: Runtime) -> None:
    """Step 2: the isolation plan (when asked for) and the rotation plan; nothing changes."""
    assert inc.bundle is not None
    if inc.isolate:
        inc.isolation = isolation_steps.plan_isolation(
            inc.steps, inc.settings, runtime, inc.isolate_services, evidence=inc.bundle.prefix
        )
    with inc.steps.step("plan secret rotation") as step:
        inc.plan = plan_rotation_task(inc.settings, only=inc.rotate)
        step.detail = f"{len(inc.plan.targets)} secrets, {len(inc.plan.problems)} problems"


def dry_run(inc: SecurityIncident, run: RunOutcome) -> None:
    """A dry run's end: the rotation's dry run (names and fingerprints only), and the outcome."""
    if inc.rotating:
        assert inc.plan is not None
        inc.record = rotate_secrets_task(inc.settings, inc.plan, confirm=False)
    run.outcome = "evidence collected; " + (
        "rotation dry run" if inc.rotating else "nothing configured to rotate"
    )
    if inc.isolate:
        run.outcome += "; isolation dry run"
    if inc.patch is not None:
        run.outcome += "; patch dry run"


def hold_locks(inc: SecurityIncident, held: contextlib.ExitStack) -> None:
    """The stack's isolation and rotation locks (what this run needs), held until ``held`` closes;
    then a rotation plan with problems is refused.

    Raises:
        LockBusy: another run isolates this stack or rotates its secrets; nothing changed.
        RotationRefused: the rotation plan has problems; nothing changed.
    """
    settings = inc.settings
    if inc.isolate:
        held.enter_context(isolation_steps.isolation_lock(settings, "security-incident"))
    if inc.rotating:
        assert inc.plan is not None
        held.enter_context(
            locks.exclusive(
                settings,
                locks.rotation_lock_name(settings),
                operation="security-incident",
                what=f"a secret rotation of {settings.stack}",
            )
        )
        if inc.plan.problems:
            raise RotationRefused("rotation refused, nothing was changed: " + "; ".join(inc.plan.problems))


def approve(inc: SecurityIncident, run: RunOutcome, *, approved: bool) -> None:
    """Step 3: one approval (form or ``approved``) of the whole plan.

    Raises:
        ApprovalRejected: rejected or timed out; nothing changed (the evidence is kept).
    """
    doing = []
    plan_lines = []
    if inc.isolation is not None:
        doing.append("block external traffic")
        plan_lines += [
            "Isolate (end-isolation puts it back):",
            *[f"- {a}" for a in inc.isolation.plan.actions],
        ]
    if inc.rotating:
        assert inc.plan is not None
        doing.append(f"rotate {len(inc.plan.targets)} secret(s)")
        plan_lines += ["Rotate:", *[f"- {t.describe()}" for t in inc.plan.targets]]
    if inc.patch is not None:
        doing.append("run update-dependencies (security) and its staging deploy")
        plan_lines += ["Patch and redeploy:", *inc.patch.lines()]
    ask = functools.partial(
        approvals.request_approval,
        inc.settings,
        approved=approved,
        action=" and ".join(doing) + f" on {inc.settings.stack} (the evidence bundle is kept either way)",
        plan_markdown="\n".join(plan_lines),
        timeout_seconds=inc.timeout,
    )
    if approved:
        inc.approval = ask()[0].describe()
    else:
        run.outcome = "waiting for approval"
        reports.publish_markdown(
            inc.key, inc.markdown(run.outcome), "Security incident: waiting for approval"
        )
        with inc.steps.step("approval"):
            inc.approval = ask()[0].describe()


def isolate(inc: SecurityIncident, runtime: Runtime, run: RunOutcome) -> None:
    """Step 3, isolate (when asked for): external traffic blocked, the state before recorded first.

    Raises:
        IsolationInForce: an isolation is recorded and the runtime no longer matches it.
        RuntimeOperationFailed: the isolation did not take effect (its record stays: run end-isolation).
    """
    if not inc.isolate:
        return
    assert inc.bundle is not None
    inc.isolation = isolation_steps.isolate(
        inc.steps,
        inc.settings,
        runtime,
        inc.isolate_services,
        approval=inc.approval,
        evidence=inc.bundle.prefix,
    )
    inc.did(run, "isolation already in force" if inc.isolation.already_in_force else "isolated")


def _restart(inc: SecurityIncident, runtime: Runtime) -> None:
    settings = inc.settings
    services = settings.incidents.restart_services or settings.runtime.services
    stopped = inc.isolation.plan.stopped_services if inc.isolation is not None else ()
    # A service the isolation stopped stays stopped: restarting it would let traffic in again.
    services = [s for s in services if s not in stopped]
    if not inc.restart:
        inc.steps.skip("rolling restart", "restart=false: services keep the old secrets until restarted")
    elif not services:
        inc.steps.skip("rolling restart", "every service to restart is stopped by the isolation")
    else:
        try:
            with inc.steps.step("rolling restart") as step:
                changes = restart_for_new_config_task(settings, runtime, services)
                scaling.wait_services_ready_task(runtime, services, settings.runtime.ready_timeout_seconds)
                step.detail = ", ".join(c.target for c in changes)
        except RuntimeUnavailable as exc:
            inc.steps.steps[-1].outcome = "skipped"
            run_logger(__name__).warning("no restart: %s", exc)


def rotate_and_restart(inc: SecurityIncident, runtime: Runtime, run: RunOutcome) -> None:
    """Steps 3-4 for the secrets (when any are configured): rotate all or nothing, a rolling restart
    so the services read them (never of a service the isolation stopped), a health check.

    Raises:
        RotationFailed: the rotation failed (its message says what was put back).
        CheckFailed: the stack is unhealthy after the rotation.
    """
    if not inc.rotating:
        return
    assert inc.plan is not None
    with inc.steps.step("rotate secrets") as step:
        inc.record = rotate_secrets_task(inc.settings, inc.plan, confirm=True)
        step.detail = ", ".join(f"{s.name} {s.new_fingerprint}" for s in inc.record.secrets)
    inc.did(run, "secrets rotated")
    _restart(inc, runtime)
    with inc.steps.step("health check") as step:
        inc.report = health_report_task(inc.settings)
        step.detail = inc.report.status.value
    if inc.report.status is Status.UNHEALTHY:
        run.outcome += ", but unhealthy"
        raise CheckFailed(
            f"{inc.settings.stack} is unhealthy after the rotation: "
            + ", ".join(inc.report.failed_checks)
            + ". A service may still use an old secret: check its configuration and logs"
            + (
                "; checks that go through the isolated entry fail until end-isolation"
                if inc.isolation is not None
                else ""
            )
        )


def linked_runs(settings: OpsSettings, run_id: Any) -> list[LinkedRun]:
    """The run ``run_id`` and the runs it started (deploy-release), with their UI links."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    ui = settings.notifications.ui_url.rstrip("/")
    try:
        with get_client(sync_client=True) as client:
            parent = client.read_flow_run(run_id)
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))
            )
            flows = {r.flow_id: client.read_flow(r.flow_id).name for r in [parent, *children]}
    except Exception as exc:
        # The link is what matters: without the API's details the run id still finds the run.
        run_logger(__name__).warning("runs of %s not read: %s", run_id, safe_error(exc, settings))
        return [
            LinkedRun(
                "update-dependencies", str(run_id), str(run_id), "see the run", f"{ui}/runs/flow-run/{run_id}"
            )
        ]
    return [
        LinkedRun(
            flow=flows[r.flow_id],
            name=r.name,
            id=str(r.id),
            state=(r.state.name if r.state else None) or "unknown",
            url=f"{ui}/runs/flow-run/{r.id}",
        )
        for r in sorted(
            [parent, *children], key=lambda r: r.expected_start_time or r.created or datetime.now(UTC)
        )
    ]


def patch_and_redeploy(
    inc: SecurityIncident,
    run: RunOutcome,
    update_dependencies: Callable[[bool], State[dict[str, Any]]],
) -> None:
    """Step 4, patch and redeploy (when asked for): ``update_dependencies(deploy_to_staging)`` runs
    update-dependencies with scope ``security`` (a subflow, which builds the patched image and deploys it
    to staging through deploy-release); the step gets its runs (linked) and summary, or the failure.

    Raises:
        CheckFailed: update-dependencies did not finish; what was done before stays done.
    """
    patch = inc.patch
    if patch is None:
        return
    with inc.steps.step("patch and redeploy: update-dependencies (security)") as step:
        state = update_dependencies(patch.deploy_to_staging)
        patch.planned_only = False
        patch.runs = linked_runs(inc.settings, state.state_details.flow_run_id)
        if state.is_completed():
            patch.summary = dict(state.result())
        else:
            patch.error = mask_text(state.message or state.name or "failed", configured_secrets(inc.settings))
        step.detail = ", ".join(f"{r.flow} {r.state}" for r in patch.runs)
        if patch.error:
            inc.did(run, "patch and redeploy failed")
            raise CheckFailed(
                f"update-dependencies (security) did not finish: {patch.error}. What was done"
                " before it stays done; see its run, linked in the report"
            )
    inc.did(run, "patched and deployed to staging" if patch.deploy_to_staging else "patched image built")
