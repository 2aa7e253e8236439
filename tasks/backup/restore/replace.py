"""Restoring a backup over a database: the target is either untouched or fully restored, never half."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import psycopg

from tasks import locks, postgres
from tasks.backup.archive import checksum_backup
from tasks.backup.database import (
    _maintenance,
    _pg_error,
    _require_database,
    _scratch_database,
    database_exists,
    database_lock_name,
    drop_database,
)
from tasks.backup.errors import BackupError, RestoreFailed
from tasks.backup.manifest import BackupManifest, _storage, resolve_backup_id
from tasks.backup.restore.pipeline import _restore_and_compare
from tasks.backup.restore.preflight import restore_preflight
from tasks.backup.restore.swap import _database_owner, _swap, kept_open_command
from tasks.backup.stats import TableComparison, compare_database_to_manifest, hash_algorithm
from tasks.errors import CommandError
from tasks.runlog import run_logger
from tasks.settings import OpsSettings


@dataclass(frozen=True)
class RestoreResult:
    """What a restore did; ``comparison`` is the evidence that the data equals the manifest."""

    backup_id: str
    target_database: str
    scratch_database: str
    old_database: str | None
    old_kept: bool
    terminated_connections: int
    comparison: TableComparison
    commands: list[str]
    duration_seconds: float
    # The kept database compared with the backup: its tables whose rows changed since the backup's
    # snapshot (the writes a restore took out of service), or why the compare could not run.
    kept_changes: TableComparison | None = None
    kept_compare_error: str | None = None
    kept_open_command: str = ""

    @property
    def kept_changed_tables(self) -> list[str]:
        """Tables of the kept database whose rows differ from the backup (empty when none kept)."""
        return [d.table for d in self.kept_changes.differences] if self.kept_changes else []

    def kept_lines(self) -> list[str]:
        """What an operator is told about the kept database: its name, how to open it, what changed."""
        if not self.old_database or not self.old_kept:
            return []
        lines = [
            f"The replaced database is kept as `{self.old_database}` (read-only by default; nothing was"
            f" dropped). Open it: `{self.kept_open_command}`"
        ]
        if self.kept_changes is not None:
            if self.kept_changes.matches:
                lines.append(f"It holds no row that differs from backup {self.backup_id}.")
            else:
                lines.append(
                    f"Tables whose rows changed since backup {self.backup_id} (these changes are only in"
                    f" `{self.old_database}`):"
                )
                lines += [
                    f"- `{d.table}`: {d.actual_rows if d.actual_rows is not None else 'absent'} rows there,"
                    f" {d.expected_rows if d.expected_rows is not None else 'absent'} in the backup"
                    + ("" if d.expected_rows != d.actual_rows else " (content differs)")
                    for d in self.kept_changes.differences
                ]
        elif self.kept_compare_error:
            lines.append(f"It could not be compared with the backup: {self.kept_compare_error}")
        return lines


def _kept_changes(
    settings: OpsSettings, manifest: BackupManifest, kept: str
) -> tuple[TableComparison | None, str | None]:
    """The kept database compared with the backup, or why it could not be (the restore stands)."""
    try:
        return compare_database_to_manifest(settings, manifest, kept), None
    except (BackupError, psycopg.Error) as exc:
        message = _pg_error(exc, settings) if isinstance(exc, psycopg.Error) else str(exc)
        run_logger(__name__).warning("restore: could not compare the kept database %s: %s", kept, message)
        return None, message


def restore_backup(
    settings: OpsSettings,
    backup_id: str,
    *,
    target_database: str | None = None,
    keep_old: bool = False,
    create_missing: bool = False,
    checksum_first: bool = True,
    database_lock_held: bool = False,
) -> RestoreResult:
    """Restore a backup so that the target is either untouched or fully restored, never half.

    Steps: resolve the backup; check the target exists (unless ``create_missing``); re-read the object
    and check its sha256 before anything is touched; restore into a new scratch database; compare it with
    the manifest; then, under an advisory lock, block and end the target's sessions and swap the two
    databases with ``ALTER DATABASE ... RENAME`` in one transaction. The old database is kept renamed
    (``<target>__old_<time>``, open to psql/pg_dump, read-only by default) when ``keep_old``, and
    compared with the backup so the result lists its tables whose rows changed since the backup's
    snapshot (the writes the restore took out of service); else it is dropped (by-hand restores only:
    automatic restores always keep it).

    Args:
        settings: the loaded settings.
        backup_id: an id, ``latest`` or ``latest-verified``.
        target_database: the database to replace; defaults to the backup's database.
        keep_old: keep the replaced database under its new name instead of dropping it.
        create_missing: allow restoring into a database that does not exist (recreate it).
        checksum_first: re-read the whole object and check it before anything else (a caller that
            just did so may skip it; the restore still checks the digest before the swap).
        database_lock_held: the caller holds the target's lock (:func:`database_lock_name`) on its
            own session, as a migration does for its whole run; else the restore takes it.

    Returns:
        The restore's change record, with the comparison proving the data equals the manifest.

    Raises:
        BackupNotFound / BackupNotVerified: the id does not resolve (nothing touched).
        DatabaseNotFound: the target does not exist and ``create_missing`` is False (nothing touched).
        BackupCorrupt: the object fails its checksum (nothing touched) or does not restore.
        RestoreFailed: the restored copy differs from the manifest (the target is untouched).
        LockBusy: another run works on the same database.
    """
    started = time.monotonic()
    logger = run_logger(__name__)
    manifest = resolve_backup_id(settings, backup_id)
    hash_algorithm(manifest)  # a hash this version cannot check fails here, before anything is touched
    target = target_database or manifest.database
    if not create_missing:
        _require_database(settings, target)
    storage = _storage(settings)
    if checksum_first:
        checksum_backup(storage, manifest)
    logger.info("backup %s checksum ok; restoring into a scratch database for %s", manifest.id, target)
    plan = restore_preflight(settings, manifest, target_database=target, keep_old=keep_old)
    commands: list[str] = []
    with contextlib.ExitStack() as held:
        lock_conn = held.enter_context(_maintenance(settings))
        owner = _database_owner(lock_conn, target)
        if not database_lock_held:
            # Named for a run that waits on another worker: flow run name and id, host, pid.
            holder = locks.Holder.current("restore-database")
            lock_conn.execute(
                "SELECT set_config('application_name', %s, false)", (holder.application_name(),)
            )
            held.enter_context(
                postgres.advisory_lock(
                    lock_conn,
                    database_lock_name(target),
                    settings.backup.lock_timeout_seconds,
                    holder=holder.describe(),
                )
            )
        with _scratch_database(settings, plan.scratch_database, owner=owner) as scratch:
            try:
                ran, comparison = _restore_and_compare(
                    settings, storage, manifest, scratch, unlogged_load=False
                )
            except CommandError as exc:
                raise RestoreFailed(
                    f"pg_restore of backup {manifest.id} failed; {target} was not touched and the scratch"
                    f" database was dropped: {exc}"
                ) from None
            commands += ran
            if not comparison.matches:
                raise RestoreFailed(
                    f"the restored copy does not match backup {manifest.id}; {target} was not touched:"
                    f" {comparison.summary()}"
                )
            old = plan.old_database if database_exists(settings, target) else None
            terminated = _swap(settings, target, scratch, old)
            commands.append(
                f"ALTER DATABASE {target} RENAME TO {old}; ALTER DATABASE {scratch} RENAME TO {target}"
                if old
                else f"ALTER DATABASE {scratch} RENAME TO {target}"
            )
            # The scratch name no longer exists; nothing to drop.
        if old is not None and not keep_old:
            drop_database(settings, old)
            commands.append(f"DROP DATABASE {old}")
    logger.info("restored backup %s into %s (%s sessions ended)", manifest.id, target, terminated)
    kept_changes, kept_error = (None, None)
    if old is not None and keep_old:
        kept_changes, kept_error = _kept_changes(settings, manifest, old)
        if kept_changes is not None and not kept_changes.matches:
            logger.warning(
                "the kept database %s has rows that changed since backup %s in: %s",
                old,
                manifest.id,
                ", ".join(d.table for d in kept_changes.differences),
            )
    return RestoreResult(
        backup_id=manifest.id,
        target_database=target,
        scratch_database=plan.scratch_database,
        old_database=old,
        old_kept=old is not None and keep_old,
        terminated_connections=terminated,
        comparison=comparison,
        commands=commands,
        duration_seconds=round(time.monotonic() - started, 3),
        kept_changes=kept_changes,
        kept_compare_error=kept_error,
        kept_open_command=kept_open_command(settings, old) if old is not None and keep_old else "",
    )
