"""Scaling the application's services through the runtime: the replica counts recorded before they
are scaled to zero (so that they go back to exactly what ran), scaling, and waiting until scaled-down
services are gone or scaled-back services are ready.

recover-data and the writers' window of migrate-database (:mod:`tasks.migrate.writers`) both stop the
application's writers this way. scale-services (runbook "High CPU Usage: scale if the load is
legitimate") plans with :func:`plan_scale` against the bounds of ``OPS_SCALING__BOUNDS`` (which
changes need a person's approval) and :func:`check_replicas_possible` (a count the service's
definition cannot run is refused before anything changes); diagnose sizes its suggestion with
:func:`suggest_replicas`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tasks.errors import ParameterError
from tasks.ops_task import ops_task
from tasks.runtime import ChangeRecord, Runtime, ServiceStatus
from tasks.settings import ReplicaBounds


class ScalingRefused(ParameterError):
    """A requested replica count cannot run (a fixed host port or container name); nothing changed."""


@dataclass(frozen=True)
class ReplicaCount:
    """A service's replicas before it was scaled to zero: what it is scaled back to."""

    service: str
    replicas: int
    image: str | None
    state: str


def record_replicas(runtime: Runtime, services: Sequence[str]) -> list[ReplicaCount]:
    """The replica counts of ``services`` now (a service the runtime does not have is left out).

    Raises:
        ParameterError: none of the services exists in the runtime (nothing could stop the writes).
    """
    statuses = {s.name: s for s in runtime.list_services()}
    recorded = [
        ReplicaCount(name, statuses[name].desired, statuses[name].image, statuses[name].state)
        for name in services
        if name in statuses and statuses[name].state != "missing"
    ]
    if not recorded:
        raise ParameterError(
            f"none of {', '.join(services)} runs in the {runtime.kind!r} runtime, so writes cannot be"
            " stopped by scaling; stop the application yourself and pass stop_writes=false, or configure"
            " OPS_RUNTIME__KIND. Nothing was done"
        )
    return recorded


def scale_services(runtime: Runtime, targets: Mapping[str, int]) -> list[ChangeRecord]:
    """Scale each service to its count, in order (all are tried; the first error is raised after)."""
    records: list[ChangeRecord] = []
    first_error: BaseException | None = None
    for service, replicas in targets.items():
        try:
            records.append(runtime.scale(service, replicas))
        except Exception as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return records


def wait_services_ready(runtime: Runtime, services: Sequence[str], timeout: float) -> list[ServiceStatus]:
    """Wait until the services are ready (nothing to wait for when the list is empty)."""
    return runtime.wait_ready(list(services), timeout) if services else []


def wait_scaled_down(runtime: Runtime, services: Sequence[str], timeout: float) -> list[str]:
    """Wait until no replica of ``services`` is ready (they are gone, not only told to go).

    Returns:
        ``<service> <ready replicas>`` of those still running when ``timeout`` passed; empty when every
        service reached 0 in time.
    """
    deadline = time.monotonic() + timeout
    while True:
        statuses = {s.name: s for s in runtime.list_services() if s.name in services}
        running = [f"{n} {s.ready}" for n, s in statuses.items() if s.ready > 0]
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.2)


@dataclass(frozen=True)
class ScaleStep:
    """One service's move from the replicas it runs now to the requested count, and whether the move
    needs a person's approval (and why)."""

    service: str
    current: int
    target: int
    bounds: ReplicaBounds | None
    approval: str | None

    @property
    def changes(self) -> bool:
        return self.current != self.target

    def describe(self) -> str:
        """``backend: 2 -> 4 (bounds 1-6: no approval needed)``."""
        bounds = f"bounds {self.bounds.min}-{self.bounds.max}" if self.bounds else "no bounds"
        if not self.changes:
            return f"{self.service}: already at {self.current} ({bounds})"
        why = f"needs approval: {self.approval}" if self.approval else "no approval needed"
        return f"{self.service}: {self.current} -> {self.target} ({bounds}: {why})"


def approval_reason(current: int, target: int, bounds: ReplicaBounds | None) -> str | None:
    """Why moving from ``current`` to ``target`` replicas needs approval; None within the bounds.

    Scaling to 0 stops the service, so it always needs approval; a service without bounds has no
    count that is known to be safe.
    """
    if target == current:
        return None
    if target == 0:
        return "scaling to 0 stops the service"
    if bounds is None:
        return "the service has no bounds (OPS_SCALING__BOUNDS)"
    if target > bounds.max:
        return f"{target} is above its max {bounds.max}"
    if target < bounds.min:
        return f"{target} is below its min {bounds.min}"
    return None


def plan_scale(
    statuses: Sequence[ServiceStatus], replicas: Mapping[str, int], bounds: Mapping[str, ReplicaBounds]
) -> list[ScaleStep]:
    """The steps from the replicas the services run now (``desired``) to ``replicas``.

    Raises:
        ParameterError: no service named, a negative count, or a service the runtime does not run;
            nothing was changed.
    """
    if not replicas:
        raise ParameterError('name the replica count of at least one service, e.g. {"backend": 3}')
    negative = [f"{s}={n}" for s, n in replicas.items() if n < 0]
    if negative:
        raise ParameterError(f"replica counts must be 0 or more: {', '.join(negative)}. Nothing was changed.")
    found = {s.name: s for s in statuses if s.state != "missing"}
    unknown = [s for s in replicas if s not in found]
    if unknown:
        raise ParameterError(
            f"no running service {', '.join(unknown)} to scale; the runtime has:"
            f" {', '.join(sorted(found)) or 'none'}. Nothing was changed."
        )
    return [
        ScaleStep(
            service,
            found[service].desired,
            target,
            bounds.get(service),
            approval_reason(found[service].desired, target, bounds.get(service)),
        )
        for service, target in replicas.items()
    ]


def check_replicas_possible(runtime: Runtime, steps: Sequence[ScaleStep]) -> None:
    """Refuse a count above 1 that the service's definition cannot run, before anything changes.

    Raises:
        ScalingRefused: names each such service and why (a fixed host port, a container_name).
    """
    refused = []
    for step in steps:
        if step.changes and step.target > 1:
            reason = runtime.single_replica_reason(step.service)
            if reason:
                refused.append(f"{step.service} cannot run {step.target} replicas: {reason}")
    if refused:
        raise ScalingRefused(
            f"{'; '.join(refused)}. Remove the fixed port (publish a range, or put a load balancer in"
            " front) or the container_name to scale it. Nothing was changed."
        )


@dataclass(frozen=True)
class ScaleSuggestion:
    """Replicas that would bring a service's CPU per replica down to the target, within its max."""

    service: str
    current: int
    replicas: int
    wanted: int
    bounds: ReplicaBounds | None

    @property
    def at_max(self) -> bool:
        """The max bound leaves no room: scaling out further needs approval or a higher bound."""
        return self.replicas <= self.current


def suggest_replicas(
    service: str, current: int, cpu_percent: float, target_percent: float, bounds: ReplicaBounds | None
) -> ScaleSuggestion:
    """``ceil(cpu / target)`` replicas (at least one more than now), capped by the max bound.

    ``cpu_percent`` is the service's total over its replicas, in percent of one core (what the
    runtimes' resource usage reports), so each of the suggested replicas would use about
    ``target_percent`` or less.
    """
    current = max(current, 1)
    wanted = max(current + 1, math.ceil(cpu_percent / target_percent))
    capped = min(wanted, bounds.max) if bounds else wanted
    return ScaleSuggestion(service, current, max(capped, current), wanted, bounds)


# --- Prefect task wrappers ------------------------------------------------------------------------

record_replicas_task = ops_task(record_replicas, name="record-replicas")
scale_services_task = ops_task(scale_services, name="scale-services", retries=1)
wait_services_ready_task = ops_task(wait_services_ready, name="wait-services-ready")
plan_scale_task = ops_task(plan_scale, name="plan-scale")
check_replicas_possible_task = ops_task(check_replicas_possible, name="check-replicas-possible")
wait_scaled_down_task = ops_task(wait_scaled_down, name="wait-scaled-down")
