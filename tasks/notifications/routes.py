"""Routes: which events reach which audience, declared in ``automations.yaml`` beside prefect.yaml
and applied as Prefect automations, one per route, each running the notify-event deployment with
the event's facts as parameters.

Applying is idempotent: an automation is found by its name (``swagger2mcp-ops/<route>``) and updated
in place, duplicates are removed, and an automation of a route no longer declared is deleted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.errors import SettingsError

NAME_PREFIX = "swagger2mcp-ops/"
ROUTE_TAG = "swagger2mcp-ops-route"
PROJECT_FLOWS = "project"


class Route(BaseModel):
    """One route of ``automations.yaml``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    description: str = ""
    kind: Literal["flow-run", "health", "event"] = Field(
        description="flow-run: a run's state changed; health: the paging rules; event: any other event"
    )
    expect: list[str] = Field(min_length=1, description="the event names (trailing * allowed)")
    resource: str = Field(
        default="swagger2mcp-ops.stack.*",
        description="the events' resource id pattern (flow-run: prefect.flow-run.*)",
    )
    flows: list[str] | Literal["project"] | None = Field(
        default=None, description="flow-run routes: flow names, or 'project' for every flow of prefect.yaml"
    )
    except_flows: list[str] = Field(default_factory=list, description="flow-run routes: flows left out")
    to: list[str] = Field(min_length=1, description="audiences (channels name the audiences they serve)")
    degraded_to: list[str] = Field(default_factory=list, description="health: who hears of degraded checks")
    page: bool = Field(
        default=False, description="a PagerDuty trigger with a dedup key, rather than a notice"
    )
    incident: bool = Field(default=False, description="collect an incident bundle and link it")
    enabled: bool = True

    @field_validator("expect")
    @classmethod
    def _events(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or " " in name or "*" in name[:-1]:
                raise ValueError(f"{name!r} is not an event name (a trailing * is the only wildcard)")
        return value

    @property
    def automation_name(self) -> str:
        return NAME_PREFIX + self.name


class RoutesFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    routes: list[Route]


def load_routes(path: Path) -> list[Route]:
    """The routes of ``path``.

    Raises:
        SettingsError: the file is missing, not YAML, or a route is invalid (names the route and field).
    """
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"cannot read the routes file {path}: {exc}") from None
    try:
        routes = RoutesFile.model_validate(document).routes
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise SettingsError(f"invalid routes file {path}: {problems}") from None
    names = [r.name for r in routes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SettingsError(
            f"routes file {path}: route names must be unique, repeated: {', '.join(duplicates)}"
        )
    return routes


def find_route(routes: Sequence[Route], name: str) -> Route:
    for route in routes:
        if route.name == name:
            return route
    raise SettingsError(f"no route {name!r} in the routes file; routes: {', '.join(r.name for r in routes)}")


def _jinja(template: str) -> dict[str, str]:
    # The explicit form: a bare "{{ ... }}" string is upgraded by the server to "{{ ... | tojson }}",
    # which fails on UUIDs (event.id) and would hand the flow JSON-quoted strings.
    return {"__prefect_kind": "jinja", "template": template}


# What the automation passes to notify-event: rendered by the server from the triggering event.
EVENT_PARAMETERS = {
    "event_name": _jinja("{{ event.event }}"),
    "event_id": _jinja("{{ event.id }}"),
    "resource_id": _jinja("{{ event.resource.id }}"),
}
# The project's own events carry JSON payloads; Prefect's flow-run events carry UUIDs that tojson
# cannot render, and their facts are read from the API instead.
PAYLOAD_PARAMETER = {"payload": _jinja("{{ event.payload | tojson }}")}


def automation_for(route: Route, deployment_id: UUID, project_flows: Sequence[str]) -> Any:
    """The automation of one route: an event trigger and a run-deployment action."""
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    match_related: dict[str, Any] = {}
    resource = route.resource
    if route.kind == "flow-run":
        resource = "prefect.flow-run.*"
        flows = list(project_flows) if route.flows == PROJECT_FLOWS else list(route.flows or [])
        flows = [f for f in flows if f not in route.except_flows]
        if not flows:
            raise SettingsError(f"route {route.name}: a flow-run route names its flows (or 'project')")
        match_related = {"prefect.resource.role": "flow", "prefect.resource.name": sorted(flows)}
    trigger = EventTrigger(
        expect=set(route.expect),
        match={"prefect.resource.id": resource},
        match_related=match_related,
        posture=Posture.Reactive,
        threshold=1,
        within=timedelta(0),
    )
    action = RunDeployment(
        source="selected",
        deployment_id=deployment_id,
        job_variables=None,
        parameters={
            "route": route.name,
            **EVENT_PARAMETERS,
            **(PAYLOAD_PARAMETER if route.kind != "flow-run" else {}),
        },
    )
    return AutomationCore(
        name=route.automation_name,
        description=route.description
        or f"route {route.name}: {', '.join(route.expect)} -> {', '.join(route.to)}",
        enabled=route.enabled,
        tags=[ROUTE_TAG],
        trigger=trigger,
        actions=[action],
    )


@dataclass(frozen=True)
class ApplyResult:
    """What applying the routes did, by automation name."""

    created: tuple[str, ...]
    updated: tuple[str, ...]
    deleted: tuple[str, ...]


def apply_routes(routes: Sequence[Route], deployment_id: UUID, project_flows: Sequence[str]) -> ApplyResult:
    """Create or update one automation per route; delete duplicates and routes no longer declared."""
    from prefect.client.orchestration import get_client

    wanted = {route.automation_name: automation_for(route, deployment_id, project_flows) for route in routes}
    created, updated, deleted = [], [], []
    with get_client(sync_client=True) as client:
        existing = [
            a for a in client.read_automations() if a.name.startswith(NAME_PREFIX) and ROUTE_TAG in a.tags
        ]
        by_name: dict[str, list[Any]] = {}
        for automation in sorted(existing, key=lambda a: str(a.id)):
            by_name.setdefault(automation.name, []).append(automation)
        for name, automation in wanted.items():
            found = by_name.pop(name, [])
            if found:
                client.update_automation(found[0].id, automation)
                updated.append(name)
                for extra in found[1:]:
                    client.delete_automation(extra.id)
                    deleted.append(name)
            else:
                client.create_automation(automation)
                created.append(name)
        for name, stale in by_name.items():
            for automation in stale:
                client.delete_automation(automation.id)
                deleted.append(name)
    return ApplyResult(tuple(created), tuple(updated), tuple(deleted))
