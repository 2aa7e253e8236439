"""The Prefect tasks of backups: each plain function wrapped once, here, with :func:`tasks.ops_task.ops_task`.

Retries are for what another attempt can fix (the network, the storage, a killed command); an error
in :data:`PERMANENT` (a bad id, a missing database, a corrupt backup, a failed proof) fails at once.
"""

from __future__ import annotations

from tasks.backup.archive import checksum_backup
from tasks.backup.dump import create_backup
from tasks.backup.errors import (
    BackupCorrupt,
    BackupNotFound,
    BackupNotVerified,
    DatabaseNotFound,
    ManifestUnreadable,
    RestoreFailed,
)
from tasks.backup.manifest import BackupManifest, _storage, list_backups, resolve_backup_id
from tasks.backup.restore.preflight import restore_preflight, swap_back_preflight
from tasks.backup.restore.replace import restore_backup
from tasks.backup.restore.swap_back import swap_back
from tasks.backup.retention import delete_backups, retention_plan
from tasks.backup.stats import compare_database_to_manifest
from tasks.backup.verify import verify_backup
from tasks.errors import ParameterError
from tasks.ops_task import ops_task
from tasks.settings import OpsSettings

# What no retry can fix.
PERMANENT: tuple[type[BaseException], ...] = (
    BackupNotFound,
    BackupNotVerified,
    ManifestUnreadable,
    DatabaseNotFound,
    BackupCorrupt,
    RestoreFailed,
    ParameterError,
)


def checksum_stored_backup(settings: OpsSettings, manifest: BackupManifest) -> str:
    """Re-read the stored object of ``manifest`` and check its size and sha256.

    Returns:
        What was checked.

    Raises:
        BackupCorrupt: size or digest differ, or the object is missing.
    """
    return checksum_backup(_storage(settings), manifest)


# A failed dump leaves no manifest (and its object is aborted), so running it again is safe.
create_backup_task = ops_task(
    create_backup, name="create-backup", retries=2, retry_delay_seconds=30, permanent=PERMANENT
)
verify_backup_task = ops_task(
    verify_backup, name="verify-backup", retries=1, retry_delay_seconds=10, permanent=PERMANENT
)
# The swap is atomic and the scratch database is dropped on failure: a retry starts clean.
restore_backup_task = ops_task(
    restore_backup, name="restore-backup", retries=1, retry_delay_seconds=30, permanent=PERMANENT
)
resolve_backup_task = ops_task(resolve_backup_id, name="resolve-backup")
# The same resolution, named for the migration flow's re-reading of a recorded backup.
read_backup_manifest_task = ops_task(resolve_backup_id, name="read-backup-manifest")
list_backups_task = ops_task(list_backups, name="list-backups")
restore_preflight_task = ops_task(restore_preflight, name="restore-preflight")
checksum_backup_task = ops_task(
    checksum_stored_backup, name="checksum-backup", retries=1, retry_delay_seconds=10, permanent=PERMANENT
)
retention_plan_task = ops_task(retention_plan, name="plan-retention")
delete_backups_task = ops_task(delete_backups, name="delete-backups")
compare_database_task = ops_task(compare_database_to_manifest, name="compare-database-to-manifest")
swap_back_preflight_task = ops_task(swap_back_preflight, name="swap-back-preflight")
# No retries: a failed proof must be looked at, not swapped again.
swap_back_task = ops_task(swap_back, name="swap-back-kept-database")
