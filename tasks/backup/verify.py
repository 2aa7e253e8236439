"""Verifying a backup at a level (checksum, catalog, restore drill) and recording the result."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from tasks.backup.archive import catalog_backup, checksum_backup
from tasks.backup.database import _scratch_database, scratch_name
from tasks.backup.errors import BackupCorrupt, BackupNotFound
from tasks.backup.manifest import (
    VERIFY_RANK,
    BackupManifest,
    Verification,
    VerifyLevel,
    _storage,
    manifest_key,
    parse_manifest,
    resolve_backup_id,
)
from tasks.backup.restore.pipeline import _restore_and_compare
from tasks.backup.stats import TableComparison, hash_algorithm
from tasks.errors import CommandError, ParameterError
from tasks.runlog import run_logger
from tasks.secrets import mask_text
from tasks.settings import OpsSettings
from tasks.storage import ObjectNotFound, Storage, update_object


def _record(storage: Storage, backup_id: str, verification: Verification) -> None:
    """Append ``verification`` to the manifest with a conditional write, retried on a conflict, so a
    concurrent verification's entry is never lost.

    Raises:
        BackupNotFound: the backup was deleted meanwhile (nothing is written).
        ManifestUnreadable: the manifest no longer parses (nothing is written).
    """
    key = manifest_key(backup_id)

    def add(raw: bytes) -> bytes:
        manifest = parse_manifest(raw, key)
        manifest.verifications.append(verification)
        return manifest.model_dump_json(indent=2).encode()

    try:
        update_object(storage, key, add)
    except ObjectNotFound:
        raise BackupNotFound(
            f"backup {backup_id} was deleted while it was verified; its {verification.level} result"
            f" ({'ok' if verification.ok else 'failed'}) was not recorded"
        ) from None


def restore_drill(settings: OpsSettings, storage: Storage, manifest: BackupManifest) -> TableComparison:
    """Restore into a scratch database, compare it with the manifest, drop it.

    Raises:
        BackupCorrupt: the object fails its checksum or pg_restore fails.
    """
    hash_algorithm(manifest)  # a hash this version cannot check fails here, before anything is made
    name = scratch_name(manifest.database, "drill")
    with _scratch_database(settings, name, owner=None):
        try:
            _, comparison = _restore_and_compare(settings, storage, manifest, name, unlogged_load=True)
        except CommandError as exc:
            raise BackupCorrupt(f"backup {manifest.id} does not restore: {exc}") from None
        return comparison


def verify_backup(settings: OpsSettings, backup_id: str, level: VerifyLevel) -> Verification:
    """Verify a backup at ``level`` and record the result in its manifest.

    ``checksum`` re-reads the object and checks size and sha256; ``catalog`` also lists the archive
    with ``pg_restore --list`` and checks every table has data; ``restore`` restores it into a scratch
    database and compares every table's rows (and content hash) with the manifest.

    Returns:
        The recorded verification (``ok`` False when the backup failed it).

    Raises:
        BackupNotFound: unknown id (nothing is recorded).
        ParameterError: unknown level.
    """
    if level not in VERIFY_RANK:
        raise ParameterError(f"verification level must be one of {', '.join(VERIFY_RANK)}, not {level!r}")
    storage = _storage(settings)
    manifest = resolve_backup_id(settings, backup_id)
    logger = run_logger(__name__)
    started = time.monotonic()
    try:
        if level == "checksum":
            detail, ok = checksum_backup(storage, manifest), True
        elif level == "catalog":
            detail, ok = catalog_backup(settings, storage, manifest), True
        else:
            comparison = restore_drill(settings, storage, manifest)
            detail, ok = comparison.summary(), comparison.matches
    except BackupCorrupt as exc:
        detail, ok = str(exc), False
    verification = Verification(
        level=level,
        ok=ok,
        at=datetime.now(UTC),
        detail=mask_text(detail),
        duration_seconds=round(time.monotonic() - started, 3),
    )
    _record(storage, manifest.id, verification)
    (logger.info if ok else logger.error)("backup %s %s verification: %s", manifest.id, level, detail)
    return verification
