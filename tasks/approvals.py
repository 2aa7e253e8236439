"""The one approval model of every gated flow (restore, migration, rollback, recovery, rotation, FLUSHDB).

A gated flow takes one pre-approval parameter, ``approved``. Without it the run pauses on a form
that shows the plan and needs a name and a reason; with it (CI, staging) the run goes on at once,
unless pre-approval is not allowed where it runs: ``approvals.allow_preapproved``, by default
allowed everywhere but ``runtime.environment = "production"``, where a destructive run always waits
for a person. Either way the run's report records who approved (form or parameter), when and why.

A run that is not approved (rejected, or nobody answered in time) raises :class:`ApprovalRejected`
whose message starts with "not applied:", so its state message and report say that nothing was
done, not that something failed.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from pydantic import Field

from tasks.errors import ApprovalRejected, ParameterError
from tasks.runlog import run_logger
from tasks.settings import OpsSettings

NOT_APPLIED = "not applied"


class ApprovalForm(RunInput):
    """The form a gated run pauses on; its description shows the plan. Flows may add fields."""

    approve: bool = Field(default=False, description="apply the plan shown above")
    approver: str = Field(min_length=1, description="your name: kept in the run's report")
    reason: str = Field(min_length=3, description="why: kept in the run's report")


Form = TypeVar("Form", bound=ApprovalForm)


@dataclass(frozen=True)
class Approval:
    """Who approved a gated run, how, when and why (rendered into the run's report)."""

    how: Literal["form", "parameter"]
    by: str
    reason: str
    at: datetime

    def describe(self) -> str:
        """One line for the report: ``approved in the form by alice at ...: reason``."""
        when = self.at.strftime("%Y-%m-%d %H:%M:%S UTC")
        if self.how == "form":
            return f"approved in the form by {self.by} at {when}: {self.reason}"
        return f"pre-approved by the `approved` parameter ({self.by}) at {when}: {self.reason}"


# The approval a person gave on this run's form: a subflow the run starts for the approved action
# (outage-triage's rollback) is pre-approved by it, also where the parameter alone is not allowed.
_granted: ContextVar[Approval | None] = ContextVar("swagger2mcp_ops_approval", default=None)


def preapproval_allowed(settings: OpsSettings) -> bool:
    """Whether ``approved=true`` may replace the form here (the setting, else: not in production)."""
    configured = settings.approvals.allow_preapproved
    if configured is not None:
        return configured
    return settings.runtime.environment != "production"


def check_preapproval(settings: OpsSettings, approved: bool) -> None:
    """Refuse ``approved=true`` where pre-approval is not allowed; call it before any side effect.

    Raises:
        ParameterError: pre-approval is not allowed for this stack; nothing was done.
    """
    if approved and not preapproval_allowed(settings) and _granted.get() is None:
        raise ParameterError(
            f"{NOT_APPLIED}: approved=true is not allowed for {settings.stack}"
            f" (environment {settings.runtime.environment!r}, OPS_APPROVALS__ALLOW_PREAPPROVED);"
            " start the run without it and approve the form in the UI. Nothing was done"
        )


def _run_label() -> str:
    name, run_id = flow_run.get_name(), flow_run.get_id()
    return f"flow run {name} ({run_id})" if run_id else "a direct call"


def request_approval(
    settings: OpsSettings,
    *,
    approved: bool,
    action: str,
    plan_markdown: str,
    timeout_seconds: int,
    form: type[Form] = ApprovalForm,  # type: ignore[assignment]
    **initial: Any,
) -> tuple[Approval, Form | None]:
    """Approve ``action``: by the ``approved`` parameter, or by a person on the form.

    Args:
        settings: the run's settings (whether pre-approval is allowed).
        approved: the flow's pre-approval parameter.
        action: what approval lets the run do, shown under the plan ("restore backup X over db").
        plan_markdown: the plan, shown on the form.
        timeout_seconds: how long the run waits for an answer.
        form: the form, :class:`ApprovalForm` or a subclass with more fields.
        initial: initial values of the form's extra fields.

    Returns:
        The approval record, and the form's answer (None when pre-approved).

    Raises:
        ParameterError: ``approved`` where pre-approval is not allowed (before anything else).
        ApprovalRejected: rejected, or nobody answered within ``timeout_seconds``; nothing applied.
    """
    check_preapproval(settings, approved)
    if approved:
        parent = _granted.get()
        reason = (
            f"given with the calling run ({parent.describe()})"
            if parent
            else "pre-approved for CI or staging"
        )
        record = Approval("parameter", _run_label(), reason, datetime.now(UTC))
        run_logger(__name__).info("%s", record.describe())
        return record, None
    if timeout_seconds <= 0:
        raise ParameterError("the approval timeout must be positive")
    description = f"{plan_markdown}\n\n---\n\n**Approve to {action}.** Give your name and the reason."
    try:
        answer = pause_flow_run(
            wait_for_input=form.with_initial_data(description=description, approve=False, **initial),
            timeout=timeout_seconds,
            # Short timeouts (tests, CI) should not wait for the default 10 s poll.
            poll_interval=max(1, min(10, timeout_seconds // 4)),
        )
    except FlowPauseTimeout:
        raise ApprovalRejected(
            f"{NOT_APPLIED}: nobody approved within {timeout_seconds}s; run again and approve the form"
        ) from None
    if not answer.approve:
        raise ApprovalRejected(f"{NOT_APPLIED}: rejected by {answer.approver}: {answer.reason}")
    record = Approval("form", answer.approver, answer.reason, datetime.now(UTC))
    _granted.set(record)
    run_logger(__name__).info("%s", record.describe())
    return record, answer
