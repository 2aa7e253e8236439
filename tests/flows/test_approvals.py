"""The one approval model: the form needs a name and a reason, pre-approval obeys the environment, and
a run that is not approved says "not applied" — under the Prefect test harness."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from prefect import flow
from prefect.flow_runs import resume_flow_run

from tasks import approvals
from tasks.errors import ApprovalRejected, ParameterError
from tasks.settings import load_settings
from tests.fixtures.core import wait_paused

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_harness")]


@flow(name="approval-probe")
def approval_probe(approved: bool = False, timeout: int = 60) -> str:
    settings = load_settings()
    record, _ = approvals.request_approval(
        settings,
        approved=approved,
        action="do the probe",
        plan_markdown="# Plan\n\nnothing real",
        timeout_seconds=timeout,
    )
    return record.describe()


def _run_paused(answer: dict[str, Any] | None, timeout: int = 60) -> Any:
    name = f"approval-{uuid.uuid4().hex[:8]}"
    outcome: dict[str, Any] = {}

    def run() -> None:
        outcome["state"] = approval_probe.with_options(flow_run_name=name)(timeout=timeout, return_state=True)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        paused = wait_paused(name)
        if answer is not None:
            resume_flow_run(paused.id, run_input=answer)
    finally:
        thread.join(timeout=120)
    return outcome["state"]


def test_form_approval_records_who_and_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.chdir(tmp_path)
    state = _run_paused({"approve": True, "approver": "alice", "reason": "INC-7 fix"})
    assert state.is_completed(), state.message
    described = state.result()
    assert described.startswith("approved in the form by alice at ")
    assert described.endswith(": INC-7 fix")


def test_rejection_says_not_applied_with_who_and_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.chdir(tmp_path)
    state = _run_paused({"approve": False, "approver": "bob", "reason": "not during the demo"})
    assert state.is_failed()
    assert "not applied: rejected by bob: not during the demo" in (state.message or "")


def test_timeout_says_not_applied(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.chdir(tmp_path)
    state = _run_paused(None, timeout=2)
    # The server's own sweep of expired pauses may fail the run first, with its own message; the
    # run's report carries "not applied" either way (the flows' report tests check that).
    assert state.is_failed()
    assert state.message
    assert "not applied: nobody approved within 2s" in state.message or "never resumed" in state.message


def test_preapproval_is_refused_in_production_before_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPS_RUNTIME__ENVIRONMENT", "production")
    state = approval_probe(approved=True, return_state=True)
    assert state.is_failed()
    assert "not applied: approved=true is not allowed" in (state.message or "")
    monkeypatch.setenv("OPS_APPROVALS__ALLOW_PREAPPROVED", "true")
    assert approval_probe(approved=True).startswith("pre-approved by the `approved` parameter")


def test_preapproval_policy(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.chdir(tmp_path)
    assert approvals.preapproval_allowed(load_settings())
    monkeypatch.setenv("OPS_RUNTIME__ENVIRONMENT", "production")
    assert not approvals.preapproval_allowed(load_settings())
    with pytest.raises(ParameterError):
        approvals.check_preapproval(load_settings(), True)
    approvals.check_preapproval(load_settings(), False)
    monkeypatch.setenv("OPS_RUNTIME__ENVIRONMENT", "staging")
    monkeypatch.setenv("OPS_APPROVALS__ALLOW_PREAPPROVED", "false")
    assert not approvals.preapproval_allowed(load_settings())
    assert issubclass(ApprovalRejected, Exception)
