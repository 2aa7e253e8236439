"""Scaling the application's services through the runtime: the replica counts recorded before they
are scaled to zero (so that they go back to exactly what ran), scaling, and waiting until scaled-down
services are gone or scaled-back services are ready.

recover-data and the writers' window of migrate-database (:mod:`tasks.migrate.writers`) both stop the
application's writers this way.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tasks.errors import ParameterError
from tasks.ops_task import ops_task
from tasks.runtime import ChangeRecord, Runtime, ServiceStatus


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


# --- Prefect task wrappers ------------------------------------------------------------------------

record_replicas_task = ops_task(record_replicas, name="record-replicas")
scale_services_task = ops_task(scale_services, name="scale-services", retries=1)
wait_services_ready_task = ops_task(wait_services_ready, name="wait-services-ready")
