"""Stopping the application's writers for the window in which a run backs up, changes and may restore
the database, so that a restore never silently discards a write the application accepted.

Two mechanisms, chosen from settings (never from the runtime's kind inside a flow):

- the application's maintenance mode (``migrations.maintenance_*``: a command or an HTTP call, the same
  hooks the maintenance-window flow uses); preferred when configured, the application keeps answering;
- scaling the writing services (``incidents.stop_services``, default ``runtime.services``) to 0
  through the runtime, recording their replica counts when the window starts (not earlier: an
  approval may have waited while someone scaled them) and scaling back to those counts afterwards.

The policy is a flow parameter: ``stop`` (the default) uses whichever mechanism is configured and
refuses, before any side effect, when none is; ``keep-running`` must be chosen explicitly;
``stopped-by-caller`` says a calling flow already stopped them (maintenance-window).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, get_args

from tasks import scaling
from tasks.errors import OpsError, ParameterError, SettingsError
from tasks.migrate.maintenance import set_maintenance_mode
from tasks.runlog import run_logger
from tasks.runtime import Runtime, get_runtime
from tasks.scaling import ReplicaCount
from tasks.settings import OpsSettings

WritesPolicy = Literal["stop", "keep-running", "stopped-by-caller"]
WRITES_POLICIES: tuple[str, ...] = get_args(WritesPolicy)


class WritersNotStoppable(SettingsError):
    """``writes_policy`` is ``stop`` but no way to stop the writers is configured."""


class WritersStillRunning(OpsError):
    """The writing services did not reach 0 ready replicas in time (the window did not start)."""


@dataclass(frozen=True)
class WriterStopPlan:
    """How this run treats the application's writers during its window."""

    policy: str
    method: Literal["maintenance", "runtime", "none"]
    services: tuple[str, ...] = ()
    detail: str = ""

    @property
    def stops(self) -> bool:
        return self.method != "none"

    def as_dict(self) -> dict[str, object]:
        return {"policy": self.policy, "method": self.method, "services": list(self.services)}


@dataclass
class WriterStopRecord:
    """What the window did to the writers: the counts it recorded and every change, in order."""

    plan: WriterStopPlan
    replicas: list[ReplicaCount] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    stopped: bool = False
    resumed: bool = False
    resume_error: str | None = None


def _maintenance_configured(settings: OpsSettings) -> bool:
    cfg = settings.migrations
    return bool(cfg.maintenance_on_argv or cfg.maintenance_on_url)


def writer_services(settings: OpsSettings) -> list[str]:
    """The services that write to the database: ``incidents.stop_services``, else ``runtime.services``."""
    return list(settings.incidents.stop_services or settings.runtime.services)


def plan_writer_stop(settings: OpsSettings, policy: str) -> WriterStopPlan:
    """Decide how the writers are treated; reads settings only.

    Raises:
        ParameterError: ``policy`` is not one of ``WRITES_POLICIES``.
        WritersNotStoppable: ``policy`` is ``stop`` and neither mechanism is configured; says how to
            configure one or to choose ``keep-running``.
    """
    if policy not in WRITES_POLICIES:
        raise ParameterError(f"writes_policy must be one of {', '.join(WRITES_POLICIES)}, not {policy!r}")
    if policy == "keep-running":
        return WriterStopPlan(
            policy,
            "none",
            detail="writers keep running (writes_policy=keep-running, chosen by the operator): a write made"
            " after the backup is not in a restored database; it stays in the kept one, whose changed"
            " tables the report lists",
        )
    if policy == "stopped-by-caller":
        return WriterStopPlan(policy, "none", detail="writers were stopped by the calling flow")
    if _maintenance_configured(settings):
        return WriterStopPlan(
            policy,
            "maintenance",
            detail="writers stopped by the application's maintenance mode (migrations.maintenance_*) for"
            " the window: on before the backup, off after apply/verify/restore (also on failure)",
        )
    if settings.runtime.kind != "none":
        services = tuple(writer_services(settings))
        return WriterStopPlan(
            policy,
            "runtime",
            services,
            detail=f"writers stopped by scaling {', '.join(services)} to 0 ({settings.runtime.kind}) for the"
            " window, back to the counts read when the window starts (also on failure)",
        )
    raise WritersNotStoppable(
        "writes_policy is 'stop' but nothing can stop the application's writers: configure its"
        " maintenance mode (OPS_MIGRATIONS__MAINTENANCE_ON_ARGV and _OFF_ARGV, or _ON_URL and _OFF_URL),"
        " or a runtime that can scale the writing services to 0 (OPS_RUNTIME__KIND=compose|kubernetes,"
        " services from OPS_INCIDENTS__STOP_SERVICES or OPS_RUNTIME__SERVICES); or, knowing that writes"
        ' made during the run may end up only in the kept database, pass writes_policy="keep-running".'
        " Nothing was done"
    )


@contextlib.contextmanager
def writers_stopped(settings: OpsSettings, plan: WriterStopPlan) -> Iterator[WriterStopRecord]:
    """Stop the writers as ``plan`` says for the block, and start them again in ``finally``.

    With the runtime, the replica counts are read here, when the window starts, and the services are
    scaled back to exactly those. A failure to resume is recorded (``resume_error``) and raised when the
    block itself succeeded; when the block failed, its error is the one raised.

    Raises:
        WritersStillRunning: the services did not reach 0 (they are scaled back first).
        CommandError / MigrationError / RuntimeOperationFailed: a switch failed.
    """
    logger = run_logger(__name__)
    record = WriterStopRecord(plan)
    if not plan.stops:
        record.events.append(plan.detail)
        yield record
        return
    runtime = get_runtime(settings) if plan.method == "runtime" else None
    try:
        _stop(settings, record, runtime)
        logger.info("writers stopped (%s)", plan.method)
        yield record
    except BaseException:
        _resume(settings, record, runtime)
        raise
    _resume(settings, record, runtime)
    if record.resume_error:
        raise OpsError(f"the writers could not be started again: {record.resume_error}")


def _stop(settings: OpsSettings, record: WriterStopRecord, runtime: Runtime | None) -> None:
    """Switch maintenance mode on, or record the replica counts and scale the writers to 0 and wait."""
    if record.plan.method == "maintenance":
        change = set_maintenance_mode(settings, True, dry_run=False)
        record.events.append(f"maintenance mode on: {change.detail} {' '.join(change.commands)}".strip())
    else:
        assert runtime is not None
        record.replicas = scaling.record_replicas(runtime, list(record.plan.services))
        record.events.append(
            "replicas read at the start of the window: "
            + ", ".join(f"{r.service}={r.replicas}" for r in record.replicas)
        )
        scaling.scale_services(runtime, {r.service: 0 for r in record.replicas})
        timeout = settings.runtime.ready_timeout_seconds
        running = scaling.wait_scaled_down(runtime, [r.service for r in record.replicas], timeout)
        if running:
            raise WritersStillRunning(
                f"the writers did not stop within {timeout:g}s (ready replicas: {', '.join(running)});"
                " nothing was backed up or applied"
            )
        record.events.append("scaled to 0: " + ", ".join(r.service for r in record.replicas))
    record.stopped = True


def _resume(settings: OpsSettings, record: WriterStopRecord, runtime: Runtime | None) -> None:
    """Start the writers again; a failure is recorded, never raised here (the caller decides)."""
    if record.resumed:
        return
    try:
        if record.plan.method == "maintenance":
            change = set_maintenance_mode(settings, False, dry_run=False)
            record.events.append(f"maintenance mode off: {change.detail} {' '.join(change.commands)}".strip())
        elif record.replicas and runtime is not None:
            scaling.scale_services(runtime, {r.service: r.replicas for r in record.replicas})
            scaling.wait_services_ready(
                runtime,
                [r.service for r in record.replicas if r.replicas > 0],
                settings.runtime.ready_timeout_seconds,
            )
            record.events.append(
                "scaled back: " + ", ".join(f"{r.service} 0 -> {r.replicas}" for r in record.replicas)
            )
        record.resumed = True
    except Exception as exc:
        record.resume_error = f"{type(exc).__name__}: {exc}"
        record.events.append(f"FAILED to start the writers again: {record.resume_error}")
        run_logger(__name__).error("writers not resumed: %s", record.resume_error)
