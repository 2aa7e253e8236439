"""What a message about a flow run says, read from the Prefect API: the flow, the deployment, the
parameters (masked), the failing step, the error, the logs and artifacts, and the run's UI link."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import LogSort

from tasks.errors import ParameterError
from tasks.secrets import MASK, mask_text

_SECRET_NAME = re.compile(r"(?i)password|passwd|secret|token|api[_-]?key|access[_-]?key|dsn|credential")
FLOW_RUN_PREFIX = "prefect.flow-run."


def flow_run_id(resource_id: str) -> UUID:
    """The run id of a ``prefect.flow-run.<id>`` resource.

    Raises:
        ParameterError: the resource is not a flow run.
    """
    try:
        return UUID(resource_id.removeprefix(FLOW_RUN_PREFIX))
    except ValueError:
        raise ParameterError(f"{resource_id!r} is not a prefect.flow-run.<id> resource") from None


def mask_parameters(parameters: dict[str, Any], secrets: list[str]) -> dict[str, Any]:
    """Parameters fit to show: a value whose name says secret is replaced, every other has known
    secrets and URL passwords masked."""
    shown: dict[str, Any] = {}
    for name, value in parameters.items():
        if _SECRET_NAME.search(name):
            shown[name] = MASK
            continue
        text = json.dumps(value, default=str)
        masked = mask_text(text, secrets)
        shown[name] = value if masked == text else masked
    return shown


@dataclass(frozen=True)
class FailedStep:
    """A task run of the flow run that ended Failed or Crashed."""

    name: str
    state: str
    message: str


@dataclass(frozen=True)
class RunSummary:
    """A flow run as a message and an incident bundle need it (every text already masked)."""

    id: str
    name: str
    flow: str
    deployment: str | None
    state: str
    message: str
    parameters: dict[str, Any]
    failed_steps: tuple[FailedStep, ...] = ()
    logs: tuple[str, ...] = ()
    artifacts: tuple[dict[str, Any], ...] = field(default=())

    def ui_link(self, ui_url: str) -> str:
        return f"{ui_url}/runs/flow-run/{self.id}"

    @property
    def failing_step(self) -> str:
        if not self.failed_steps:
            return "the flow itself (no task failed)"
        return ", ".join(step.name for step in self.failed_steps)


def read_run(run_id: UUID, secrets: list[str], *, log_limit: int = 200) -> RunSummary:
    """Read one flow run with its failed task runs, last log lines and artifacts from the API."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        flow = client.read_flow(run.flow_id)
        deployment = client.read_deployment(run.deployment_id).name if run.deployment_id else None
        failed = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
            task_run_filter=TaskRunFilter(
                state=TaskRunFilterState(
                    type=TaskRunFilterStateType(any_=[StateType.FAILED, StateType.CRASHED])
                )
            ),
        )
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
            limit=log_limit,
            sort=LogSort.TIMESTAMP_DESC,
        )
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    state = run.state

    def masked(text: str | None) -> str:
        return mask_text(" ".join((text or "").split()), secrets)

    return RunSummary(
        id=str(run.id),
        name=run.name,
        flow=flow.name,
        deployment=f"{flow.name}/{deployment}" if deployment else None,
        state=(state.name if state else None) or "unknown",
        message=masked(state.message if state else ""),
        parameters=mask_parameters(dict(run.parameters), secrets),
        failed_steps=tuple(
            FailedStep(
                t.name,
                (t.state.name if t.state else None) or "Failed",
                masked(t.state.message if t.state else ""),
            )
            for t in sorted(failed, key=lambda t: t.start_time or t.expected_start_time or run.created)  # type: ignore[arg-type, return-value]
        ),
        logs=tuple(
            mask_text(f"{log.timestamp.isoformat()} {logging_level(log.level)} {log.message}", secrets)
            for log in reversed(logs)
        ),
        artifacts=tuple(
            {
                "key": a.key,
                "type": a.type,
                "description": mask_text(a.description or "", secrets),
                "data": mask_text(
                    a.data if isinstance(a.data, str) else json.dumps(a.data, default=str), secrets
                ),
            }
            for a in artifacts
        ),
    )


def logging_level(level: int) -> str:
    import logging

    return logging.getLevelName(level)
