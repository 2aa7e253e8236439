"""The words of each message: a failed run, a health page and its resolve, a degraded check, any
other routed event, and the wiring test. Plain functions over what the event and the API said."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from tasks.notifications.model import Message, Severity
from tasks.notifications.paging import PagingDecision
from tasks.notifications.routes import Route
from tasks.notifications.runs import RunSummary
from tasks.secrets import mask_text

_FAILED_STATES = {"Failed", "Crashed", "TimedOut"}


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_message(
    route: Route, run: RunSummary, *, stack: str, ui_url: str, bundle: str | None, event: str
) -> Message:
    """A flow run's state, with flow, deployment, masked parameters, failing step, error and links."""
    failed = run.state in _FAILED_STATES
    title = f"[{stack}] {run.flow} run {run.name} {run.state}"
    if failed and run.message:
        title += f": {_short(run.message, 160)}"
    fields = [
        ("Flow", run.flow),
        ("Deployment", run.deployment or "(none: run directly)"),
        ("Run", f"{run.name} ({run.id})"),
        ("State", run.state),
        ("Parameters", json.dumps(run.parameters, default=str, sort_keys=True)),
    ]
    if failed:
        fields.append(("Failing step", run.failing_step))
        fields.append(("Error", _short(run.message or "(no message)", 1000)))
        for step in run.failed_steps:
            fields.append((f"Step {step.name}", _short(step.message or step.state, 500)))
    links = [("Run in the Prefect UI", run.ui_link(ui_url))]
    if bundle:
        links.append(("Incident bundle", bundle))
    return Message(
        title=title,
        severity="critical" if failed and route.page else ("error" if failed else "info"),
        source=f"{stack}/{run.flow}",
        fields=tuple(fields),
        links=tuple(links),
        action="trigger" if route.page else "notify",
        dedup_key=f"swagger2mcp-ops-{stack}-flow-run-{run.id}" if route.page else None,
        event=event,
    )


def health_message(
    decision: PagingDecision, *, stack: str, payload: Mapping[str, Any], ui_url: str, bundle: str | None
) -> Message:
    """A health page (trigger), its resolve, or a degraded notice for one check."""
    run_id = payload.get("flow_run_id")
    links = [("Health run in the Prefect UI", f"{ui_url}/runs/flow-run/{run_id}")] if run_id else []
    if bundle:
        links.append(("Incident bundle", bundle))
    fields = [("Stack", stack), ("Check", decision.check), ("Overall status", str(payload.get("status", "")))]
    if decision.kind == "trigger":
        return Message(
            title=f"[{stack}] health check {decision.check} unhealthy {decision.consecutive} times in a row",
            severity="critical",
            source=f"{stack}/health/{decision.check}",
            fields=(
                *fields,
                ("Consecutive unhealthy checks", str(decision.consecutive)),
                ("Error", decision.detail),
            ),
            links=tuple(links),
            action="trigger",
            dedup_key=decision.dedup_key,
            event="swagger2mcp-ops.health.unhealthy",
        )
    if decision.kind == "resolve":
        return Message(
            title=f"[{stack}] health check {decision.check} recovered ({decision.detail})",
            severity="info",
            source=f"{stack}/health/{decision.check}",
            fields=(*fields, ("Now", decision.detail)),
            links=tuple(links),
            action="resolve",
            dedup_key=decision.dedup_key,
            event="swagger2mcp-ops.health.recovered",
        )
    return Message(
        title=f"[{stack}] health check {decision.check} degraded",
        severity="warning",
        source=f"{stack}/health/{decision.check}",
        fields=(*fields, ("Warnings", decision.detail)),
        links=tuple(links),
        event="swagger2mcp-ops.health.degraded",
    )


_EVENT_SEVERITY: dict[str, Severity] = {
    "failed": "error",
    "renewal-failed": "error",
    "expiring": "error",
    "rpo-exceeded": "error",
}


def event_message(
    route: Route, *, event: str, resource_id: str, payload: Mapping[str, Any], stack: str, secrets: list[str]
) -> Message:
    """Any other routed event: its name, resource and payload facts (masked)."""
    what = event.rsplit(".", 1)[-1]
    subject = payload.get("message") or resource_id.rsplit(".", 1)[-1]
    title = (
        f"[{stack}] {event.removeprefix('swagger2mcp-ops.')}: {_short(mask_text(str(subject), secrets), 200)}"
    )
    fields = [("Event", event), ("Resource", resource_id)]
    for key, value in payload.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
        fields.append((key, _short(mask_text(text, secrets), 1000)))
    return Message(
        title=title,
        severity=_EVENT_SEVERITY.get(what, "warning" if route.page else "info"),
        source=f"{stack}/{route.name}",
        fields=tuple(fields),
        action="trigger" if route.page else "notify",
        dedup_key=f"swagger2mcp-ops-{stack}-{route.name}-{resource_id}" if route.page else None,
        event=event,
    )


def wiring_message(stack: str, *, ui_url: str, run_id: str | None, now: datetime | None = None) -> Message:
    """The wiring test: says what it is, so nobody acts on it."""
    now = now or datetime.now(UTC)
    links = (("notify-test run", f"{ui_url}/runs/flow-run/{run_id}"),) if run_id else ()
    return Message(
        title=f"[{stack}] notification test from swagger2mcp-ops (no action needed)",
        severity="info",
        source=f"{stack}/notify-test",
        fields=(
            ("Sent at", now.isoformat(timespec="seconds")),
            ("Purpose", "check that this channel is wired"),
        ),
        links=links,
        action="notify",
        dedup_key=f"swagger2mcp-ops-{stack}-notify-test",
        event="swagger2mcp-ops.notification.test",
    )
