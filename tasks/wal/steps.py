"""The Prefect tasks of point-in-time recovery, in one place (the plain functions stay importable
without Prefect: the restore_command and the archiver never load it)."""

from __future__ import annotations

from typing import Any

from prefect.events import emit_event

from tasks.backup import BackupCorrupt, BackupNotFound
from tasks.errors import ParameterError
from tasks.ops_task import ops_task
from tasks.settings import OpsSettings
from tasks.wal.archive import WalArchiveError
from tasks.wal.base import create_base_backup, prune_base_backups
from tasks.wal.drill import plan_drill, run_drill
from tasks.wal.recover import PointRestoreError, plan_point_restore, restore_to_point
from tasks.wal.status import RPO_EXCEEDED_EVENT, archive_status, rpo_alert_due

_PERMANENT = (ParameterError, BackupNotFound, BackupCorrupt, WalArchiveError, PointRestoreError)

# A failed base backup leaves no manifest (its object is discarded), so another attempt is safe.
create_base_backup_task = ops_task(
    create_base_backup, name="create-base-backup", retries=1, retry_delay_seconds=60
)
prune_base_backups_task = ops_task(prune_base_backups, name="prune-base-backups")
plan_point_restore_task = ops_task(plan_point_restore, name="plan-point-restore", permanent=_PERMANENT)
# No retry: a second replay would take as long again; the app's database is untouched on failure.
restore_to_point_task = ops_task(restore_to_point, name="restore-to-point")
archive_status_task = ops_task(archive_status, name="wal-archive-status")
plan_drill_task = ops_task(plan_drill, name="plan-pitr-drill")
# No retry: a second replay would take as long again, and a difference must be looked at.
run_drill_task = ops_task(run_drill, name="run-pitr-drill")


def wal_resource(stack: str) -> dict[str, str]:
    """The WAL archive as an event resource; under ``swagger2mcp-ops.stack.*`` so routes match it."""
    return {
        "prefect.resource.id": f"swagger2mcp-ops.stack.{stack}.wal-archive",
        "prefect.resource.name": f"{stack} WAL archive",
        "swagger2mcp-ops.stack": stack,
    }


def emit_rpo_exceeded(settings: OpsSettings, facts: dict[str, Any]) -> bool:
    """Emit ``swagger2mcp-ops.wal.rpo-exceeded`` when :func:`rpo_alert_due` says so; whether it did.

    Once per episode of the RPO past ``wal.rpo_warn_seconds`` (and a daily reminder), whichever of
    health-check and check-wal-archive sees it first.

    Args:
        settings: the loaded settings.
        facts: ``rpo_seconds`` (None: no WAL archived), ``last_wal``, ``last_wal_at``,
            ``slot_retained_bytes``, ``caught_up`` (:meth:`ArchiveStatus.rpo_facts`, or health's
            details).
    """
    rpo_seconds = facts.get("rpo_seconds")
    if not rpo_alert_due(settings, rpo_seconds, caught_up=bool(facts.get("caught_up"))):
        return False
    rpo = "no WAL archived" if rpo_seconds is None else f"newest WAL {rpo_seconds:.0f} s old"
    threshold = settings.wal.rpo_warn_seconds
    event = emit_event(
        RPO_EXCEEDED_EVENT,
        resource=wal_resource(settings.stack),
        payload={
            "message": f"WAL archive RPO past {threshold:.0f} s: {rpo}; is the archiver running?",
            "threshold_seconds": threshold,
            **{k: facts.get(k) for k in ("rpo_seconds", "last_wal", "last_wal_at", "slot_retained_bytes")},
        },
    )
    return event is not None
