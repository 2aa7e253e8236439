"""Serve every deployment of the project from one process: the no-infrastructure default.

The deployments are read from ``prefect.yaml``, the one place they are declared, so what this
process serves and what ``prefect deploy --all`` creates for a work pool can never drift apart.
Needs a running Prefect server (``PREFECT_API_URL``); see ``scripts/run-local.sh``.

    python -m deployments.serve                  # every deployment
    python -m deployments.serve health-check     # only deployments of these flows
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment entry of prefect.yaml, as far as serving needs it."""

    name: str
    entrypoint: str
    description: str | None = None
    tags: tuple[str, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[dict[str, Any], ...] = ()
    concurrency_limit: dict[str, Any] | int | None = None
    triggers: tuple[dict[str, Any], ...] = ()

    @property
    def flow_module(self) -> str:
        return self.entrypoint.split(":")[0].removesuffix(".py").replace("/", ".")

    @property
    def flow_function(self) -> str:
        return self.entrypoint.split(":")[1]


def read_specs(path: Path = PREFECT_YAML) -> list[DeploymentSpec]:
    """The deployments declared in prefect.yaml."""
    document = yaml.safe_load(path.read_text())
    specs = []
    for entry in document.get("deployments") or []:
        specs.append(
            DeploymentSpec(
                name=entry["name"],
                entrypoint=entry["entrypoint"],
                description=entry.get("description"),
                tags=tuple(entry.get("tags") or ()),
                parameters=dict(entry.get("parameters") or {}),
                schedules=tuple(entry.get("schedules") or ()),
                concurrency_limit=entry.get("concurrency_limit"),
                triggers=tuple(entry.get("triggers") or ()),
            )
        )
    return specs


def load_flow(spec: DeploymentSpec) -> Any:
    """Import the flow object a spec's entrypoint names."""
    import importlib

    module = importlib.import_module(spec.flow_module)
    return getattr(module, spec.flow_function)


def to_runner_deployment(spec: DeploymentSpec) -> Any:
    """A ``RunnerDeployment`` with the spec's schedules, parameters, concurrency and triggers."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron, Interval

    schedules = []
    for entry in spec.schedules:
        active = bool(entry.get("active", True))
        if "cron" in entry:
            schedules.append(Cron(entry["cron"], timezone=entry.get("timezone"), active=active))
        elif "interval" in entry:
            schedules.append(Interval(entry["interval"], timezone=entry.get("timezone"), active=active))
        else:
            raise ValueError(f"deployment {spec.name}: schedule {entry} has neither cron nor interval")
    concurrency: Any = spec.concurrency_limit
    if isinstance(concurrency, dict):
        concurrency = ConcurrencyLimitConfig(**concurrency)
    triggers = [DeploymentEventTrigger(**trigger) for trigger in spec.triggers]
    return load_flow(spec).to_deployment(
        name=spec.name,
        description=spec.description,
        tags=list(spec.tags),
        parameters=spec.parameters,
        schedules=schedules or None,
        concurrency_limit=concurrency,
        triggers=triggers or None,
    )


def main(argv: list[str]) -> None:
    from prefect import serve

    wanted = set(argv)
    specs = [
        s for s in read_specs() if not wanted or s.entrypoint.split(":")[1] in wanted or s.name in wanted
    ]
    if not specs:
        raise SystemExit(f"no deployment matches {sorted(wanted)}; see prefect.yaml")
    serve(*(to_runner_deployment(spec) for spec in specs))


if __name__ == "__main__":
    main(sys.argv[1:])
