"""The Prefect tasks of point-in-time recovery, in one place (the plain functions stay importable
without Prefect: the restore_command and the archiver never load it)."""

from __future__ import annotations

from tasks.backup import BackupCorrupt, BackupNotFound
from tasks.errors import ParameterError
from tasks.ops_task import ops_task
from tasks.wal.archive import WalArchiveError
from tasks.wal.base import create_base_backup, prune_base_backups
from tasks.wal.drill import plan_drill, run_drill
from tasks.wal.recover import PointRestoreError, plan_point_restore, restore_to_point
from tasks.wal.status import archive_status

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
