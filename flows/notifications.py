"""Runbook: "Escalation" (contact on-call, DevOps, the security team; create an incident with logs and
diagnostics) and the "notify users" steps of "Scheduled Downtime".

Routes in ``automations.yaml`` are Prefect automations that run ``notify-event`` with the event that
fired them; ``notify-event`` writes the message (and, for a page, the incident bundle it links to) and
delivers it to the channels of the route's audiences. ``notify-test`` checks the wiring from the UI.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from tasks import reports
from tasks.errors import CheckFailed, ParameterError, SettingsError
from tasks.notifications import Delivery, Message, Route, decide, find_route, load_routes, messages
from tasks.notifications.incident import all_secrets, bundle_link
from tasks.notifications.prefect_tasks import (
    collect_incident_task,
    deliver_task,
    load_paging_state_task,
    read_run_task,
    save_paging_state_task,
)
from tasks.notifications.runs import flow_run_id
from tasks.runlog import run_logger
from tasks.settings import OpsSettings, load_settings

ROUTES_FILE = Path(__file__).resolve().parent.parent / "automations.yaml"


def _publish(settings: OpsSettings, key: str, title: str, sent: list[tuple[Message, list[Delivery]]]) -> None:
    rows = [{"message": m.title, "action": m.action, **d.as_row()} for m, results in sent for d in results]
    lines = [f"# {title}", ""]
    if rows:
        lines.append(
            reports.markdown_table(
                ["message", "action", "channel", "kind", "delivered", "attempts", "detail"],
                [
                    [
                        r["message"],
                        r["action"],
                        r["channel"],
                        r["kind"],
                        r["delivered"],
                        r["attempts"],
                        r["detail"],
                    ]
                    for r in rows
                ],
            )
        )
    else:
        lines.append("Nothing to send (or no channel serves the route's audiences).")
    reports.publish_markdown(reports.artifact_key(key, settings.stack), "\n".join(lines), title)


def _send(
    settings: OpsSettings, message: Message, audiences: list[str], sent: list[tuple[Message, list[Delivery]]]
) -> None:
    results = deliver_task(message, audiences, settings.notifications, stack=settings.stack)
    if not results:
        run_logger(__name__).warning(
            "no channel serves %s: %r was not sent; add the audience to a channel"
            " (OPS_NOTIFICATIONS__CHANNELS)",
            ", ".join(audiences),
            message.title,
        )
    sent.append((message, results))


@flow(name="notify-test", log_prints=True)
def notify_test(audience: str = "*") -> list[dict[str, Any]]:
    """Runbook "Escalation": send one test message to every configured channel and report each delivery.

    PagerDuty channels get the test as a trigger followed at once by its resolve, so no incident stays
    open. The report (artifact ``notify-test-<stack>``) has one row per channel and attempt count.

    Args:
        audience: only the channels serving this audience (``*``: every channel).

    Returns:
        One row per channel: name, kind, delivered, attempts, what the receiver answered or the error.

    Raises:
        SettingsError: no channel is configured (or none serves ``audience``).
        CheckFailed: a channel could not be reached after its attempts (the report says which, why).
    """
    settings = load_settings()
    notify = settings.notifications
    if not any(audience == "*" or audience in c.audiences for c in notify.channels.values()):
        raise SettingsError(
            f"no notification channel serves {audience!r}: configure OPS_NOTIFICATIONS__CHANNELS"
            ' (e.g. {"chat": {"kind": "slack", "audiences": ["chat"], "url": "https://hooks.slack.com/..."}})'
        )
    message = messages.wiring_message(settings.stack, ui_url=notify.ui_url, run_id=flow_run.get_id())
    sent: list[tuple[Message, list[Delivery]]] = []
    results = deliver_task(message, [audience], notify, stack=settings.stack)
    sent.append((message, results))
    closing = dataclasses.replace(message, action="resolve")
    sent.append(
        (closing, deliver_task(closing, [audience], notify, stack=settings.stack, kinds=["pagerduty"]))
    )
    _publish(settings, "notify-test", "Notification test", sent)
    failed = [d for d in results if not d.delivered]
    if failed:
        detail = "; ".join(f"{d.channel} ({d.kind}): {d.detail}" for d in failed)
        raise CheckFailed(f"{len(failed)} of {len(results)} channels did not receive the test: {detail}")
    return [d.as_row() for d in results]


def _on_flow_run(
    settings: OpsSettings, route: Route, event_name: str, resource_id: str
) -> list[tuple[Message, list[Delivery]]]:
    run = read_run_task(flow_run_id(resource_id), all_secrets(settings))
    link = None
    if route.incident:
        bundle = collect_incident_task(
            settings,
            title=f"{run.flow} run {run.name} {run.state}",
            reason={"route": route.name, "event": event_name, "resource": resource_id},
            run=run,
        )
        link = bundle_link(bundle)
    message = messages.run_message(
        route, run, stack=settings.stack, ui_url=settings.notifications.ui_url, bundle=link, event=event_name
    )
    sent: list[tuple[Message, list[Delivery]]] = []
    _send(settings, message, route.to, sent)
    return sent


def _on_health(
    settings: OpsSettings, route: Route, payload: dict[str, Any]
) -> list[tuple[Message, list[Delivery]]]:
    statuses = {str(k): str(v) for k, v in (payload.get("checks") or {}).items()}
    details = {str(k): str(v) for k, v in (payload.get("details") or {}).items()}
    state = load_paging_state_task(settings)
    new_state, decisions = decide(
        state, statuses, threshold=settings.notifications.consecutive_unhealthy, details=details
    )
    sent: list[tuple[Message, list[Delivery]]] = []
    for decision in decisions:
        link = None
        if decision.kind == "trigger" and route.incident:
            bundle = collect_incident_task(
                settings,
                title=f"health check {decision.check} unhealthy",
                reason={"route": route.name, "check": decision.check, "report": payload},
                run=None,
            )
            link = bundle_link(bundle)
        message = messages.health_message(
            decision, stack=settings.stack, payload=payload, ui_url=settings.notifications.ui_url, bundle=link
        )
        _send(settings, message, route.degraded_to if decision.kind == "degraded" else route.to, sent)
    # Saved after sending: delivery never raises, and a lost save would at worst repeat a page.
    save_paging_state_task(settings, new_state)
    return sent


@flow(name="notify-event", log_prints=True)
def notify_event(
    route: str, event_name: str, resource_id: str, payload: str = "{}", event_id: str = ""
) -> dict[str, Any]:
    """Runbook "Escalation": deliver what one routed event means to the route's audiences.

    Started by the automations of ``automations.yaml`` (one per route), with the event's facts.
    A flow-run route reads the run (flow, deployment, masked parameters, failing step, error, logs,
    artifacts); a page also collects the incident bundle (diagnose report, the run's logs and artifacts,
    recent releases and migrations, sha256 manifest) and links it. The health route pages after N
    consecutive unhealthy checks, once per check, and resolves when it recovers. A channel that stays
    down is logged and reported as a ``swagger2mcp-ops.notification.failed`` event; the run completes.

    Args:
        route: the route's name in ``automations.yaml``.
        event_name: the event that fired the automation.
        resource_id: the event's resource (``prefect.flow-run.<id>``, ``swagger2mcp-ops.stack.<stack>``).
        payload: the event's payload as JSON.
        event_id: the event's id (kept in the report for tracing).

    Returns:
        The route, the event and one row per delivery.

    Raises:
        SettingsError: the routes file or the route is invalid or unknown.
        ParameterError: the payload is not JSON, or a flow-run route got another resource.
    """
    settings = load_settings()
    chosen = find_route(load_routes(ROUTES_FILE), route)
    try:
        facts = json.loads(payload or "{}")
    except json.JSONDecodeError as exc:
        raise ParameterError(
            f"payload is not JSON ({exc}); the automation passes {{{{ event.payload | tojson }}}}"
        ) from None
    if not isinstance(facts, dict):
        raise ParameterError("payload must be a JSON object")
    if chosen.kind == "flow-run":
        sent = _on_flow_run(settings, chosen, event_name, resource_id)
    elif chosen.kind == "health":
        sent = _on_health(settings, chosen, facts)
    else:
        message = messages.event_message(
            chosen,
            event=event_name,
            resource_id=resource_id,
            payload=facts,
            stack=settings.stack,
            secrets=all_secrets(settings),
        )
        sent = []
        _send(settings, message, chosen.to, sent)
    _publish(settings, f"notify-{chosen.name}", f"Route {chosen.name}: {event_name}", sent)
    return {
        "route": chosen.name,
        "event": event_name,
        "event_id": event_id,
        "deliveries": [
            {"message": m.title, "action": m.action, **d.as_row()} for m, results in sent for d in results
        ],
    }
