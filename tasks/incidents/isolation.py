"""Isolation of a security incident: block external traffic to the application, and put back exactly
what was there when the incident is over.

The runtime decides how (:meth:`tasks.runtime.Runtime.plan_isolation`): on Kubernetes a NetworkPolicy
that admits ingress only from the namespace's own pods, on Compose the public entry service stopped.
The plan holds the state before; it is written as the isolation record under
``runtime.state_dir/isolation/`` *before* anything changes (the undo is registered before acting), so
a run that dies half way still leaves ``end-isolation`` what to put back. The record names who
approved, when, which run, the evidence bundle taken before, and every change made.

One isolation per stack and environment is in force at a time: while its record exists, isolating
again changes nothing (or is refused when the runtime no longer matches it); ending it moves the
record to ``isolation/ended/`` with who ended it and when.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.errors import OpsError
from tasks.incidents.stores import write_file_atomically
from tasks.runtime import ChangeRecord, IsolationPlan, Runtime
from tasks.settings import OpsSettings


class IsolationInForce(OpsError):
    """An isolation is recorded and the runtime no longer matches it: end it before isolating again."""


class IsolationNotRecorded(OpsError):
    """No isolation of the stack is recorded: there is nothing for end-isolation to put back."""


def isolation_path(settings: OpsSettings) -> Path:
    """Where the isolation in force of this stack and environment is recorded."""
    name = f"{settings.stack}-{settings.runtime.environment}.json"
    return settings.runtime.state_dir / "isolation" / name


def _run_label() -> str | None:
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    return f"{flow_run.get_name()} ({run_id})" if run_id else None


def _change_as_dict(change: ChangeRecord) -> dict[str, Any]:
    return {
        "operation": change.operation,
        "target": change.target,
        "changed": change.changed,
        "before": change.before,
        "after": change.after,
        "commands": list(change.commands),
    }


def _change_from_dict(data: dict[str, Any]) -> ChangeRecord:
    return ChangeRecord(
        operation=str(data["operation"]),
        target=str(data["target"]),
        changed=bool(data["changed"]),
        before=dict(data.get("before") or {}),
        after=dict(data.get("after") or {}),
        commands=tuple(data.get("commands") or ()),
    )


@dataclass(frozen=True)
class IsolationRecord:
    """An isolation: its plan (with the state before), who approved it, when, and what it changed."""

    stack: str
    environment: str
    plan: IsolationPlan
    isolated_at: datetime
    approval: str
    flow_run: str | None = None
    evidence: str | None = None
    changes: tuple[ChangeRecord, ...] = ()
    dry_run: bool = False
    # True: this run found the isolation already in force (recorded by an earlier run) and changed nothing.
    already_in_force: bool = False

    def describe(self) -> str:
        """``isolated at ... by <approval> (run ...)`` for reports and errors."""
        run = f" in run {self.flow_run}" if self.flow_run else ""
        return f"isolated at {self.isolated_at:%Y-%m-%d %H:%M:%S UTC}{run}, {self.approval}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "environment": self.environment,
            "isolated_at": self.isolated_at.isoformat(),
            "approval": self.approval,
            "flow_run": self.flow_run,
            "evidence": self.evidence,
            "plan": self.plan.as_dict(),
            "changes": [_change_as_dict(c) for c in self.changes],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IsolationRecord:
        return cls(
            stack=str(data["stack"]),
            environment=str(data["environment"]),
            plan=IsolationPlan.from_dict(data["plan"]),
            isolated_at=datetime.fromisoformat(data["isolated_at"]),
            approval=str(data.get("approval") or ""),
            flow_run=data.get("flow_run"),
            evidence=data.get("evidence"),
            changes=tuple(_change_from_dict(c) for c in data.get("changes") or ()),
        )


@dataclass(frozen=True)
class IsolationEnd:
    """What end-isolation put back (or, on a dry run, would put back) and where the record went."""

    record: IsolationRecord
    dry_run: bool
    changes: tuple[ChangeRecord, ...] = ()
    archived: Path | None = None
    ended_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write the record in one rename, fsynced: a reader sees the old record or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_isolation(settings: OpsSettings) -> IsolationRecord | None:
    """The isolation in force (its record), or None."""
    path = isolation_path(settings)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return IsolationRecord.from_dict(json.loads(text))


def plan_isolation(runtime: Runtime, services: Sequence[str] | None = None) -> IsolationPlan:
    """What isolating would change now (read-only): the runtime's plan."""
    return runtime.plan_isolation(list(services) if services else None)


def isolate_systems(
    settings: OpsSettings,
    runtime: Runtime,
    services: Sequence[str] | None = None,
    *,
    confirm: bool,
    approval: str = "",
    evidence: str | None = None,
) -> IsolationRecord:
    """Block external traffic to the application, the one confirm-gated way to do it.

    The plan is made from what runs now by the same code path on a dry run (``confirm=False``, which
    changes and records nothing). Confirmed, the record (the plan with the state before, the approval,
    the run, the evidence bundle) is written first, then the runtime applies the plan, then the record
    gets the changes.

    Args:
        settings: the run's settings (stack, environment, state directory).
        runtime: where the services run.
        services: the services to cut off; default: the runtime's (every pod / the public entry).
        confirm: apply; otherwise only the plan.
        approval: who approved, when and why (``Approval.describe()``).
        evidence: the evidence bundle collected before the isolation.

    Returns:
        The record; ``already_in_force`` when an earlier isolation is in force and nothing changed.

    Raises:
        IsolationInForce: an isolation is recorded, and the runtime no longer matches it; nothing changed.
        RuntimeOperationFailed: the runtime refused or the change did not take effect (the record
            stays, so end-isolation can put back what was changed).
    """
    plan = plan_isolation(runtime, services)
    existing = read_isolation(settings)
    if existing is not None:
        if plan.actions:
            raise IsolationInForce(
                f"an isolation of {settings.stack} ({settings.runtime.environment}) is in force"
                f" ({existing.describe()}), and the runtime no longer matches it: "
                + "; ".join(plan.actions)
                + f". Run end-isolation first (it puts back what {isolation_path(settings)} recorded), then"
                " isolate again. Nothing was changed"
            )
        return replace(existing, already_in_force=True, dry_run=not confirm)
    record = IsolationRecord(
        stack=settings.stack,
        environment=settings.runtime.environment,
        plan=plan,
        isolated_at=datetime.now(UTC),
        approval=approval,
        flow_run=_run_label(),
        evidence=evidence,
        dry_run=not confirm,
    )
    if not confirm:
        return record
    path = isolation_path(settings)
    _write_json(path, record.as_dict())
    changes = runtime.isolate(plan)
    record = replace(record, changes=tuple(changes))
    _write_json(path, record.as_dict())
    return record


def end_isolation(
    settings: OpsSettings, runtime: Runtime, *, confirm: bool, approval: str = ""
) -> IsolationEnd:
    """Put back exactly the state the isolation recorded, the one confirm-gated way to do it.

    Args:
        settings: the run's settings.
        runtime: where the services run.
        confirm: restore; otherwise only show what would be put back.
        approval: who approved ending it (``Approval.describe()``).

    Returns:
        The record ended, the changes, and where the record was moved (``isolation/ended/``).

    Raises:
        IsolationNotRecorded: no isolation is recorded for the stack and environment; nothing changed.
        RuntimeOperationFailed: the recorded state could not be put back (the record stays in force).
    """
    record = read_isolation(settings)
    if record is None:
        raise IsolationNotRecorded(
            f"no isolation of {settings.stack} ({settings.runtime.environment}) is recorded in"
            f" {isolation_path(settings)}: there is nothing to end. An isolation is started by"
            " security-incident with isolate=true (check OPS_RUNTIME__STATE_DIR if one was). Nothing was"
            " changed"
        )
    if not confirm:
        return IsolationEnd(record=record, dry_run=True)
    changes = tuple(runtime.end_isolation(record.plan))
    ended = datetime.now(UTC)
    path = isolation_path(settings)
    archived = path.parent / "ended" / f"{path.stem}-{ended:%Y%m%dT%H%M%SZ}.json"
    _write_json(
        archived,
        {
            **record.as_dict(),
            "ended_at": ended.isoformat(),
            "ended_by": approval,
            "ended_in_run": _run_label(),
            "end_changes": [_change_as_dict(c) for c in changes],
        },
    )
    path.unlink()
    return IsolationEnd(record=record, dry_run=False, changes=changes, archived=archived, ended_at=ended)
