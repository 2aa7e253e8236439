"""PostgreSQL backups: streamed, checksummed dumps with a data-level manifest, verification, restore and
retention.

A backup is ``pg_dump -Fc -Z0`` streamed through in-process zstd and sha256 straight into the storage
backend (no full-size temporary file). The per-table row counts and content hashes are computed in the
same snapshot the dump reads (``pg_export_snapshot()`` in a REPEATABLE READ transaction that stays open
while ``pg_dump --snapshot`` runs), so a restored copy can be compared with the manifest row for row.
The manifest is written last: a backup without one is unfinished and never listed.

Storage layout under the storage URL::

    manifests/<id>.json      the manifest (written last, re-written when a verification is recorded)
    data/<id>.dump.zst       the zstd-compressed custom-format dump

The package, along those steps (every public name below is re-exported here, so ``from tasks import
backup; backup.X`` and ``from tasks.backup import X`` work whichever module holds ``X``):

- :mod:`~tasks.backup.errors`: the typed errors;
- :mod:`~tasks.backup.manifest`: the manifest model, storage keys, read, list, scan, resolve;
- :mod:`~tasks.backup.database`: connections, libpq for the tools, scratch databases, the lock name;
- :mod:`~tasks.backup.stats`: row counts, content hashes, the comparison with a manifest;
- :mod:`~tasks.backup.archive`: the stored object read back and checked, its catalog;
- :mod:`~tasks.backup.dump`: :func:`create_backup`;
- :mod:`~tasks.backup.verify`: :func:`verify_backup` (checksum, catalog, restore drill);
- :mod:`~tasks.backup.restore`: the pipeline into an empty database (``pipeline``, ``streams``), the
  preflight, the swap by rename, :func:`restore_backup` (``replace``) and :func:`swap_back`;
- :mod:`~tasks.backup.retention`: the retention plan and :func:`delete_backups`;
- :mod:`~tasks.backup.prefect_tasks`: the Prefect tasks, wrapped once.
"""

from __future__ import annotations

from tasks.backup.archive import catalog_backup, checksum_backup
from tasks.backup.database import database_exists, database_lock_name, drop_database, scratch_name
from tasks.backup.dump import create_backup
from tasks.backup.errors import (
    BackupCorrupt,
    BackupError,
    BackupNotFound,
    BackupNotVerified,
    DatabaseNotFound,
    ManifestUnreadable,
    RestoreFailed,
)
from tasks.backup.manifest import (
    COMPRESSION,
    DATA_DIR,
    FORMAT,
    MANIFEST_DIR,
    VERIFY_RANK,
    BackupManifest,
    TableStats,
    UnreadableManifest,
    Verification,
    VerifyLevel,
    data_key,
    latest_verified,
    list_backups,
    manifest_key,
    new_backup_id,
    parse_manifest,
    read_manifest,
    resolve_backup_id,
    scan_backups,
    write_manifest,
)
from tasks.backup.prefect_tasks import (
    PERMANENT,
    checksum_backup_task,
    checksum_stored_backup,
    compare_database_task,
    create_backup_task,
    delete_backups_task,
    list_backups_task,
    read_backup_manifest_task,
    resolve_backup_task,
    restore_backup_task,
    restore_preflight_task,
    retention_plan_task,
    swap_back_preflight_task,
    swap_back_task,
    verify_backup_task,
)
from tasks.backup.restore.pipeline import restore_into
from tasks.backup.restore.preflight import (
    RestorePreflight,
    SwapBackPreflight,
    restore_preflight,
    swap_back_preflight,
)
from tasks.backup.restore.replace import RestoreResult, restore_backup
from tasks.backup.restore.swap import ConnectionInfo, kept_name, kept_open_command
from tasks.backup.restore.swap_back import swap_back
from tasks.backup.retention import (
    PruneResult,
    RetentionDecision,
    RetentionPlan,
    delete_backups,
    plan_retention,
    prune_backups,
    retention_plan,
)
from tasks.backup.stats import (
    CONTENT_HASH_ALGORITHM,
    CONTENT_HASH_ALGORITHMS,
    HASH_ROW_TEXT,
    HASH_TYPED_COLUMNS,
    TableComparison,
    TableDifference,
    compare_database_to_manifest,
    compare_stats,
    hash_algorithm,
    table_stats,
)
from tasks.backup.verify import restore_drill, verify_backup

__all__ = [
    "COMPRESSION",
    "CONTENT_HASH_ALGORITHM",
    "CONTENT_HASH_ALGORITHMS",
    "DATA_DIR",
    "FORMAT",
    "HASH_ROW_TEXT",
    "HASH_TYPED_COLUMNS",
    "MANIFEST_DIR",
    "PERMANENT",
    "VERIFY_RANK",
    "BackupCorrupt",
    "BackupError",
    "BackupManifest",
    "BackupNotFound",
    "BackupNotVerified",
    "ConnectionInfo",
    "DatabaseNotFound",
    "ManifestUnreadable",
    "PruneResult",
    "RestoreFailed",
    "RestorePreflight",
    "RestoreResult",
    "RetentionDecision",
    "RetentionPlan",
    "SwapBackPreflight",
    "TableComparison",
    "TableDifference",
    "TableStats",
    "UnreadableManifest",
    "Verification",
    "VerifyLevel",
    "catalog_backup",
    "checksum_backup",
    "checksum_backup_task",
    "checksum_stored_backup",
    "compare_database_task",
    "compare_database_to_manifest",
    "compare_stats",
    "create_backup",
    "create_backup_task",
    "data_key",
    "database_exists",
    "database_lock_name",
    "delete_backups",
    "delete_backups_task",
    "drop_database",
    "hash_algorithm",
    "kept_name",
    "kept_open_command",
    "latest_verified",
    "list_backups",
    "list_backups_task",
    "manifest_key",
    "new_backup_id",
    "parse_manifest",
    "plan_retention",
    "prune_backups",
    "read_backup_manifest_task",
    "read_manifest",
    "resolve_backup_id",
    "resolve_backup_task",
    "restore_backup",
    "restore_backup_task",
    "restore_drill",
    "restore_into",
    "restore_preflight",
    "restore_preflight_task",
    "retention_plan",
    "retention_plan_task",
    "scan_backups",
    "scratch_name",
    "swap_back",
    "swap_back_preflight",
    "swap_back_preflight_task",
    "swap_back_task",
    "table_stats",
    "verify_backup",
    "verify_backup_task",
    "write_manifest",
]
